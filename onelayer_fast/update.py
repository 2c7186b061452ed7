"""One GRPO update cycle on a fixed rollout batch: prefix once, reference once, then the inner iterations."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .batch import RolloutBatch
from .kernels.grpo_loss import LossConfig
from .lanes import lane_rows
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


@torch.no_grad()
def reference_logps(policy, cache, batch: RolloutBatch, config: UpdateConfig):
    """(B, C) log-probs of the completion tokens under the reference policy; None when beta is 0.

    Only unmasked tokens get one; the rest stay 0 and are ignored by the loss. They are taken with the
    loss's backend, in the states' precision (at least float32).
    """
    if config.loss.beta == 0.0:
        return None
    states = policy.completion_states(cache, reference=True)
    valid = batch.completion_mask.bool()
    logps = torch.zeros(valid.shape, dtype=torch.promote_types(states.dtype, torch.float32), device=states.device)
    logps[valid] = token_logprobs(states[valid], policy.lm_head_weight, batch.completion_ids[valid],
                                  config.loss.temperature, backend=config.loss_backend)
    return logps


def _advantage_args(batch: RolloutBatch) -> dict:
    """The loss's advantage inputs: per-row advantages when the batch carries them, else rewards in groups."""
    if batch.advantages is None:
        return {"rewards": batch.rewards, "group_size": batch.group_size}
    return {"advantages": batch.advantages}


def _record(result, grad_norm: Tensor) -> dict[str, float]:
    record = {name: float(v) for name, v in result.metrics.items()}
    record["loss"] = float(result.loss.detach())
    record["grad_norm"] = float(grad_norm)
    return record


def grpo_update(policy, optimizer: torch.optim.Optimizer, batch: RolloutBatch, config: UpdateConfig) -> list[dict[str, float]]:
    """Run `num_iterations` optimizer steps on one rollout batch; return one metrics dict per iteration.

    The prefix runs once. Old log-probs are not computed by a separate pass: the first iteration is
    on-policy (ratio 1 by definition), so its own log-probs, detached, are the old log-probs of the
    following iterations.
    """
    cache = prefix_cache(policy, batch, config)
    weight = policy.lm_head_weight
    ref_logps = reference_logps(policy, cache, batch, config)
    advantage_args = _advantage_args(batch)
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
        history.append(_record(result, grad_norm))
    return history


def lanes_update(policy, optimizers: list[torch.optim.Optimizer], batch: RolloutBatch,
                 config: UpdateConfig) -> list[list[dict[str, float]]]:
    """`grpo_update` for every lane of a LanePolicy at once: one prefix, one reference pass, and per iteration
    one suffix and one backward over all lanes; each lane's loss is normalized over its own rows exactly as
    if it ran alone, its gradient clipped and its optimizer stepped on its own.

    batch: rows laid out lane by lane in `policy.lanes` order, the same number per lane. optimizers[k]
    steps lane k's layer. Returns, per lane, one metrics dict per iteration.
    """
    lanes = policy.num_lanes
    if len(optimizers) != lanes:
        raise ValueError(f"{lanes} lanes need {lanes} optimizers, got {len(optimizers)}")
    layout, starts = policy.layout_of(batch, config.layout)
    cache = policy.prefix_layout(layout, starts)
    weight = policy.lm_head_weight
    rows = batch.batch_size // lanes
    parts = [lane_rows(batch, k, rows) for k in range(lanes)]
    all_ref_logps = reference_logps(policy, cache, batch, config)
    ref_logps = [None] * lanes if all_ref_logps is None else list(all_ref_logps.split(rows))
    old_logps: list = [None] * lanes
    history: list[list[dict[str, float]]] = [[] for _ in range(lanes)]
    for _ in range(config.num_iterations):
        states = policy.completion_states(cache).split(rows)
        results = []
        for k, part in enumerate(parts):
            results.append(grpo_loss(states[k], weight, part.completion_ids, part.completion_mask, **_advantage_args(part),
                                     old_logps=old_logps[k], ref_logps=ref_logps[k], config=config.loss,
                                     backend=config.loss_backend))
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        # Lanes share no trainable weight, so the gradient of the sum is each lane's own gradient.
        torch.stack([r.loss for r in results]).sum().backward()
        for k, (result, optimizer) in enumerate(zip(results, optimizers)):
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(k), config.max_grad_norm or float("inf"))
            optimizer.step()
            if old_logps[k] is None:
                old_logps[k] = result.token_logps
            history[k].append(_record(result, grad_norm))
    return history
