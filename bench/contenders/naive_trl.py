"""The naive contender: single-layer GRPO the way TRL's GRPOTrainer computes it, written out in plain PyTorch.

What a user without this engine would run: the whole model forward for every log-prob, a full reference copy.
The `step`, `step-real`, `iteration` and `sweep` workloads all measure it (`naive_trl`, `naive_per_layer`).
"""
from __future__ import annotations

import copy
from typing import Any


class NaiveTRLStep:
    """Single-layer GRPO the way TRL's GRPOTrainer runs it, in plain PyTorch/transformers.

    Only layer `layer` requires grad; the reference is a deepcopy of the whole model; old and
    reference log-probs each cost a full no-grad forward; every iteration is a full forward with
    `logits_to_keep = C + 1`, log-softmax via gather - logsumexp (row by row, as TRL's
    `selective_log_softmax`), the TRL loss, backward, grad clipping and an AdamW step (learning rate `lr`).
    The loss settings come from `shapes` (num_generations, num_iterations, epsilon, beta, max_grad_norm).
    """

    def __init__(self, model, batch, shapes: dict[str, Any], lr: float):
        import torch

        self.model = model
        model.requires_grad_(False)
        model.model.layers[shapes["layer"]].requires_grad_(True)
        self.ref_model = copy.deepcopy(model).requires_grad_(False).eval()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)
        self.shapes = shapes
        if batch is not None:  # the `iteration` workload passes None and samples a batch per step
            self.set_batch(batch)

    def set_batch(self, batch) -> None:
        """Train on `batch` (a RolloutBatch) from the next step on (the `iteration` workload samples one per step)."""
        import onelayer_fast as olf

        self.input_ids = batch.input_ids
        self.attention_mask = batch.attention_mask
        self.position_ids = olf.position_ids_from_mask(self.attention_mask)
        self.completion_ids = batch.completion_ids
        self.completion_mask = batch.completion_mask.float()
        self.rewards = batch.rewards

    def per_token_logps(self, model):
        import torch

        c = self.completion_ids.shape[1]
        logits = model(input_ids=self.input_ids, attention_mask=self.attention_mask,
                       position_ids=self.position_ids, logits_to_keep=c + 1).logits
        logits = logits[:, :-1, :]  # (B, C, V): position p predicts token p + 1
        ids = self.input_ids[:, -c:]
        selected = torch.gather(logits, dim=-1, index=ids.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return selected - lse

    def step(self) -> list[dict[str, float]]:
        import torch

        s = self.shapes
        g = s["num_generations"]
        with torch.no_grad():
            old_logps = self.per_token_logps(self.model)
            ref_logps = self.per_token_logps(self.ref_model)
            grouped = self.rewards.view(-1, g)
            mean = grouped.mean(dim=1).repeat_interleave(g)
            std = grouped.std(dim=1).repeat_interleave(g)
            advantages = ((self.rewards - mean) / (std + 1e-4)).unsqueeze(1)
        mask = self.completion_mask
        history = []
        for _ in range(s["num_iterations"]):
            logps = self.per_token_logps(self.model)
            coef_1 = torch.exp(logps - old_logps)
            coef_2 = torch.clamp(coef_1, 1 - s["epsilon"], 1 + s["epsilon"])
            per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
            per_token_kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
            if s["use_bias_correction_kl"]:  # TRL's default: the KL times the (differentiable) ratio
                per_token_kl = per_token_kl * coef_1
            per_token_loss = per_token_loss + s["beta"] * per_token_kl
            loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)  # dapo
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, s["max_grad_norm"])
            self.optimizer.step()
            kl = (per_token_kl * mask).sum() / mask.sum().clamp(min=1.0)
            history.append({"loss": float(loss.detach()), "grad_norm": float(grad_norm), "kl": float(kl.detach())})
        return history


