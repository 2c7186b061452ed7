"""One GRPO update cycle on a fixed rollout batch: prefix once, reference once, then the inner iterations."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .loss import grpo_loss, token_logprobs
from .packing import PackedCache, build_layout, check_layout, packed_completion_states, packed_prefix, resolve_layout


@dataclass
class RolloutBatch:
    """Sampled completions and their rewards.

    Without `advantages`, rows are grouped (num_generations consecutive rows per prompt) and the loss
    normalizes `rewards` within each group. With `advantages` (e.g. one row per step of multi-turn
    episodes, any row count), the loss uses them as given and `rewards` are only reported.
    """

    prompt_ids: Tensor  # (B, P) left-padded
    prompt_mask: Tensor  # (B, P)
    completion_ids: Tensor  # (B, C)
    completion_mask: Tensor  # (B, C) 1 up to and including EOS
    rewards: Tensor  # (B,)
    advantages: Tensor | None = None  # (B,) precomputed per-row advantages, or None

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask.to(self.prompt_mask.dtype)], dim=1)


@dataclass
class UpdateSettings:
    """The loss knobs of one update cycle (TRL names)."""

    num_generations: int = 8
    num_iterations: int = 1
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    temperature: float = 1.0
    max_completion_length: int | None = None
    importance_sampling_level: str = "token"
    max_grad_norm: float | None = 1.0
    loss_backend: str = "auto"
    # How the batch runs through the layers (packing.py): "padded" (rows as given), "packed" (padding-free:
    # real tokens only, block-diagonal causal attention), "shared_prompt" (each group's prompt once, its
    # num_generations completions attending to it), or "auto" (packing.resolve_layout: shared_prompt on CPU
    # for prompt groups, padded elsewhere). Same loss and gradients; less work per token.
    layout: str = "auto"

    def __post_init__(self) -> None:
        check_layout(self.layout)


def prefix_cache(policy, batch: RolloutBatch, settings: UpdateSettings):
    """The policy's prefix over `batch` in `settings.layout`: a PrefixCache (padded) or a PackedCache."""
    check_layout(settings.layout)
    weight = policy.lm_head_weight
    layout = resolve_layout(settings.layout, batch, policy.model.config, weight.device, settings.num_generations)
    if layout == "padded":
        return policy.prefix(batch.input_ids, batch.attention_mask)
    return packed_prefix(policy, build_layout(batch, layout, group_size=settings.num_generations))


def completion_states(policy, cache, prompt_length: int, reference: bool = False) -> Tensor:
    """(B, C, H) states that predict the completion tokens (position p predicts token p + 1)."""
    if isinstance(cache, PackedCache):
        return packed_completion_states(policy, cache, reference=reference)
    return policy.suffix(cache, reference=reference)[:, prompt_length - 1 : -1]


def grpo_update(policy, optimizer: torch.optim.Optimizer, batch: RolloutBatch, settings: UpdateSettings) -> list[dict[str, float]]:
    """Run `num_iterations` optimizer steps on one rollout batch; return one metrics dict per iteration.

    The prefix runs once. Old log-probs are not computed by a separate pass: the first iteration is
    on-policy (ratio 1 by definition), so its own log-probs, detached, are the old log-probs of the
    following iterations.
    """
    prompt_length = batch.prompt_ids.shape[1]
    cache = prefix_cache(policy, batch, settings)
    weight = policy.lm_head_weight
    ref_logps = None
    if settings.beta != 0.0:
        with torch.no_grad():
            ref_states = completion_states(policy, cache, prompt_length, reference=True)
            # Only unmasked tokens need a reference log-prob; the rest stay 0 and are ignored by the loss.
            valid = batch.completion_mask.bool()
            ref_logps = torch.zeros(valid.shape, dtype=torch.float32, device=ref_states.device)
            ref_logps[valid] = token_logprobs(ref_states[valid], weight, batch.completion_ids[valid], settings.temperature)
    if batch.advantages is None:
        advantage_args = {"rewards": batch.rewards, "group_size": settings.num_generations}
    else:
        advantage_args = {"advantages": batch.advantages}
    params = policy.trainable_parameters()
    old_logps = None
    history = []
    for _ in range(settings.num_iterations):
        states = completion_states(policy, cache, prompt_length)
        loss, metrics = grpo_loss(
            states, weight, batch.completion_ids, batch.completion_mask,
            **advantage_args,
            old_logps=old_logps, ref_logps=ref_logps, beta=settings.beta,
            epsilon_low=settings.epsilon,
            epsilon_high=settings.epsilon if settings.epsilon_high is None else settings.epsilon_high,
            delta=settings.delta, loss_type=settings.loss_type, scale_rewards=settings.scale_rewards,
            temperature=settings.temperature, max_completion_length=settings.max_completion_length,
            importance_sampling_level=settings.importance_sampling_level, backend=settings.loss_backend,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm or float("inf"))
        optimizer.step()
        if old_logps is None:
            old_logps = metrics["token_logps"]
        record = {k: float(v) for k, v in metrics.items() if v.dim() == 0}
        record["loss"] = float(loss.detach())
        record["grad_norm"] = float(grad_norm)
        history.append(record)
    return history
