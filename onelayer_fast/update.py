"""One GRPO update cycle on a fixed rollout batch: prefix once, reference once, then the inner iterations."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .batch import RolloutBatch
from .kernels.grpo_loss import LossConfig
from .layout import check_layout, make_layout
from .loss import BACKENDS, grpo_loss, token_logprobs
from .policy import PrefixCache


@dataclass(frozen=True)
class UpdateConfig:
    """Everything one update cycle needs besides the batch, the policy and the optimizer."""

    loss: LossConfig = field(default_factory=LossConfig)
    num_iterations: int = 1  # optimizer steps on each rollout batch (TRL's num_iterations)
    max_grad_norm: float | None = 1.0  # None: no clipping
    loss_backend: str = "auto"  # loss.BACKENDS
    layout: str = "auto"  # layout.LAYOUTS: how the rows run through the layers (same loss and gradients)

    def __post_init__(self) -> None:
        check_layout(self.layout)
        if self.loss_backend not in BACKENDS:
            raise ValueError(f"loss_backend must be one of {BACKENDS}, got {self.loss_backend!r}")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")


def prefix_cache(policy, batch: RolloutBatch, config: UpdateConfig) -> PrefixCache:
    """The policy's prefix over `batch`, laid out as `config.layout` says (layout.make_layout)."""
    layout = make_layout(batch, config.layout, policy.model.config, policy.lm_head_weight.device)
    return policy.prefix_layout(layout)


def grpo_update(policy, optimizer: torch.optim.Optimizer, batch: RolloutBatch, config: UpdateConfig) -> list[dict[str, float]]:
    """Run `num_iterations` optimizer steps on one rollout batch; return one metrics dict per iteration.

    The prefix runs once. Old log-probs are not computed by a separate pass: the first iteration is
    on-policy (ratio 1 by definition), so its own log-probs, detached, are the old log-probs of the
    following iterations.
    """
    cache = prefix_cache(policy, batch, config)
    weight = policy.lm_head_weight
    ref_logps = None
    if config.loss.beta != 0.0:
        with torch.no_grad():
            ref_states = policy.completion_states(cache, reference=True)
            # Only unmasked tokens need a reference log-prob; the rest stay 0 and are ignored by the loss.
            valid = batch.completion_mask.bool()
            ref_logps = torch.zeros(valid.shape, dtype=torch.float32, device=ref_states.device)
            ref_logps[valid] = token_logprobs(ref_states[valid], weight, batch.completion_ids[valid],
                                              config.loss.temperature)
    if batch.advantages is None:
        advantage_args = {"rewards": batch.rewards, "group_size": batch.group_size}
    else:
        advantage_args = {"advantages": batch.advantages}
    params = policy.trainable_parameters()
    old_logps = None
    history = []
    for _ in range(config.num_iterations):
        states = policy.completion_states(cache)
        result = grpo_loss(states, weight, batch.completion_ids, batch.completion_mask, **advantage_args,
                           old_logps=old_logps, ref_logps=ref_logps, config=config.loss, backend=config.loss_backend)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
        optimizer.step()
        if old_logps is None:
            old_logps = result.token_logps
        record = {k: float(v) for k, v in result.metrics.items()}
        record["loss"] = float(result.loss.detach())
        record["grad_norm"] = float(grad_norm)
        history.append(record)
    return history
