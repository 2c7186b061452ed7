"""One GRPO update cycle on a fixed rollout batch: prefix once, reference once, then the inner iterations."""
from __future__ import annotations

import math
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
        # A negative bound would flip the gradient (train against the reward); 0 or nan would zero it.
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0 or None (no clipping), got {self.max_grad_norm}")


class DivergenceError(ValueError):
    """Training produced a non-finite loss, gradient norm or weight, or got rewards too large to train on.

    A ValueError, so the command line reports it as a usage error (exit code 2), not a traceback. `lanes`:
    the lanes (indices into the LanePolicy's `lanes`) that diverged, empty outside `lanes_update`.
    """

    def __init__(self, message: str, lanes: tuple[int, ...] = ()):
        super().__init__(message)
        self.lanes = lanes


# Beyond this magnitude a value's square overflows float32, the precision that norms, variances and RMSNorm
# work in: a weight or reward this large (still finite) already makes the next forward pass or the reward
# std inf, so it counts as diverged.
SQUARE_SAFE = math.sqrt(torch.finfo(torch.float32).max)  # about 1.8e19
_TRAINING_HINT = "lower --learning-rate (or clip harder with --max-grad-norm)"


def _where(policy, lane: int | None = None) -> str:
    if lane is not None:
        return f"lane {lane} (layer {policy.lanes[lane].layer})"
    layer = getattr(policy, "layer_index", None)
    return "the model" if layer is None else f"layer {layer}"


def _check_rewards(batch: RolloutBatch, where: str, lanes: tuple[int, ...] = ()) -> None:
    """DivergenceError unless the loss's advantage inputs are finite and small enough that their squares
    (the reward std that group/batch scaling divides by) stay finite: an inf std silently makes every
    advantage 0, and huge unscaled advantages overflow the gradient norm, which clipping then turns into a
    zero update. Either way nothing would be learned, and no error would say so."""
    values = batch.rewards if batch.advantages is None else batch.advantages
    name = "rewards" if batch.advantages is None else "advantages"
    peak = float(values.detach().abs().max()) if values.numel() else 0.0
    if not math.isfinite(peak):
        raise DivergenceError(f"the {name} of {where} are not finite ({peak}); check the task's reward functions",
                              lanes)
    if peak > SQUARE_SAFE:
        raise DivergenceError(f"the {name} of {where} are too large to train on (largest |{name[:-1]}| {peak:.3g}; "
                              f"beyond {SQUARE_SAFE:.2g} their square overflows float32, and the advantages or the "
                              f"gradient norm with it); scale the task's rewards down", lanes)


def _check_step(loss: Tensor, grad_norm: Tensor, where: str, lanes: tuple[int, ...] = ()) -> None:
    """Before the optimizer step: a finite loss and gradient norm (an inf norm would make clipping zero the
    gradient, a nan one the weights)."""
    loss_value, norm_value = (float(v) for v in torch.stack([loss.detach().float(), grad_norm.float()]).cpu())
    if not math.isfinite(loss_value):
        raise DivergenceError(f"the loss of {where} is {loss_value}; {_TRAINING_HINT}", lanes)
    if not math.isfinite(norm_value):
        raise DivergenceError(f"the gradient norm of {where} is {norm_value}; {_TRAINING_HINT}", lanes)


@torch.no_grad()
def _check_weights(params: list[Tensor], where: str, lanes: tuple[int, ...] = ()) -> None:
    """After an optimizer step: only the trained parameters can have changed, so only they are looked at."""
    peak = float(torch.stack([p.detach().abs().amax().float() for p in params]).amax())
    if not peak <= SQUARE_SAFE:  # also catches nan
        raise DivergenceError(f"the weights of {where} diverged in the optimizer step (largest |weight| {peak:.3g}, "
                              f"usable up to {SQUARE_SAFE:.2g}); {_TRAINING_HINT}", lanes)


def _clip(params: list[Tensor], max_grad_norm: float | None) -> Tensor:
    """The gradient norm before clipping (clip_grad_norm_ also computes it when there is no bound)."""
    return torch.nn.utils.clip_grad_norm_(params, float("inf") if max_grad_norm is None else max_grad_norm)


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

    DivergenceError (before the optimizer step) for rewards too large to train on, a non-finite loss or
    gradient norm; (after it) for trained weights that became non-finite or too large. The weights may then
    be a step ahead of the caller's count: a trainer must not save them.
    """
    where = _where(policy)
    _check_rewards(batch, where)
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
        grad_norm = _clip(params, config.max_grad_norm)
        _check_step(result.loss, grad_norm, where)
        optimizer.step()
        _check_weights(params, where)
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

    DivergenceError as grpo_update's, naming the lane and its layer (`.lanes`: which lanes). Every lane's
    loss and gradient norm is checked before any lane steps, so a divergence before the step leaves every
    lane's weights as they were.
    """
    lanes = policy.num_lanes
    if len(optimizers) != lanes:
        raise ValueError(f"{lanes} lanes need {lanes} optimizers, got {len(optimizers)}")
    layout, starts = policy.layout_of(batch, config.layout)
    cache = policy.prefix_layout(layout, starts)
    weight = policy.lm_head_weight
    rows = batch.batch_size // lanes
    parts = [lane_rows(batch, k, rows) for k in range(lanes)]
    for k, part in enumerate(parts):
        _check_rewards(part, _where(policy, k), (k,))
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
        grad_norms = [_clip(policy.trainable_parameters(k), config.max_grad_norm) for k in range(lanes)]
        for k, (result, grad_norm) in enumerate(zip(results, grad_norms)):
            _check_step(result.loss, grad_norm, _where(policy, k), (k,))
        for optimizer in optimizers:
            optimizer.step()
        for k in range(lanes):
            _check_weights(policy.trainable_parameters(k), _where(policy, k), (k,))
        for k, (result, grad_norm) in enumerate(zip(results, grad_norms)):
            if old_logps[k] is None:
                old_logps[k] = result.token_logps
            history[k].append(_record(result, grad_norm))
    return history
