"""One GRPO update cycle on a fixed rollout batch: prefix once, reference once, then the inner iterations."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from .batch import RolloutBatch
from .distributed import World
from .kernels.grpo_loss import GlobalCounts, LossConfig, high_entropy_mask
from .kernels.token_logprobs import chunked_token_logprobs_entropy
from .lanes import lane_rows
from .layout import check_layout, make_layout
from .loss import BACKENDS, grpo_loss, masked_token_logprobs
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


# ------------------------------------------------------------------------------ what happens at each optimizer step
# The learning-rate schedules of transformers' `get_scheduler` (5.x), as multipliers of the base rate. Optimizer
# step n (0-based) runs at base * multiplier(n), as the HF Trainer does (its scheduler steps after each optimizer
# step); the schedule spans every optimizer step of the run (max_steps * num_iterations here: each sampled batch
# gets num_iterations steps, as TRL's Trainer counts them with steps_per_generation 1).
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


def warmup_step_count(warmup_steps: float, total_steps: int) -> int:
    """transformers' TrainingArguments.get_warmup_steps: >= 1 is a step count (int()), below 1 a ratio of the
    total (rounded up)."""
    return int(warmup_steps) if warmup_steps >= 1 else math.ceil(total_steps * warmup_steps)


def lr_multiplier(kind: str, step: int, warmup: int, total: int) -> float:
    """The factor transformers' scheduler `kind` applies to the base learning rate at optimizer step `step`
    (`warmup` warm-up steps of `total`; cosine with num_cycles 0.5)."""
    if kind == "constant":
        return 1.0
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if kind == "constant_with_warmup":
        return 1.0
    if kind == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    if kind == "cosine":
        progress = float(step - warmup) / float(max(1, total - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    raise ValueError(f"lr_scheduler_type must be one of {LR_SCHEDULERS}, got {kind!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: float, total_steps: int,
                   done_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `optimizer`'s current rates with transformers' schedule `kind`, positioned after
    `done_steps` optimizer steps (a resumed run: the rates are set to step done_steps' own)."""
    warmup = warmup_step_count(warmup_steps, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(kind, step, warmup, total_steps))
    if done_steps:
        set_scheduler_step(scheduler, done_steps)
    return scheduler


def set_scheduler_step(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put `scheduler` (and its optimizer's rates) at optimizer step `step` without stepping anything."""
    scheduler.last_epoch = step
    rates = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates


@dataclass
class EntropyControl:
    """TRL's entropy bonus coefficient (Skywork-OR1 adaptive control when `adaptive`).

    The step applies `applied()`: the coefficient as it stood at the end of the previous optimizer step and, in
    adaptive mode, 0 while the last measured entropy is above the target (inf before the first measurement,
    so the first step applies no bonus). After each step, adaptive control moves the coefficient by `delta`
    toward more bonus (entropy <= target, capped at `maximum`) or less (floored at `minimum`).
    """

    coef: float = 0.0
    adaptive: bool = False
    minimum: float = 0.0
    maximum: float = 1.0
    delta: float = 0.005
    target: float = 0.2
    last_entropy: float = math.inf

    def applied(self) -> float:
        if self.adaptive:
            return self.coef if self.last_entropy <= self.target else 0.0
        return self.coef

    def update(self, entropy: float) -> None:
        if not self.adaptive:
            return
        if entropy <= self.target:
            self.coef = min(self.coef + self.delta, self.maximum)
        else:
            self.coef = max(self.coef - self.delta, self.minimum)
        self.last_entropy = entropy


@dataclass
class StepControls:
    """One run's (or lane's) state that changes at every optimizer step, besides its weights and optimizer:
    the learning-rate schedule, the entropy coefficient, the reference sync (TRL's SyncRefModelCallback:
    every `sync_every` optimizer steps, at step end, reference = alpha * policy + (1 - alpha) * reference).

    optimizer_steps: the run's optimizer steps so far (TRL's global_step).
    sync_pairs: (reference parameter, policy parameter) pairs; None: no reference sync.
    """

    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    entropy: EntropyControl = field(default_factory=EntropyControl)
    optimizer_steps: int = 0
    sync_pairs: list[tuple[Tensor, Tensor]] | None = None
    sync_alpha: float = 0.6
    sync_every: int = 512

    def loss_config(self, loss: LossConfig) -> LossConfig:
        """The loss knobs of the next optimizer step: the entropy coefficient is the controller's."""
        coef = self.entropy.applied()
        return loss if coef == loss.entropy_coef else dataclasses.replace(loss, entropy_coef=coef)

    def learning_rate(self) -> float | None:
        return None if self.scheduler is None else float(self.scheduler.optimizer.param_groups[0]["lr"])

    @torch.no_grad()
    def step_end(self, metrics: dict[str, float]) -> None:
        """After an optimizer step: advance the schedule, then (TRL's on_step_end order) the entropy
        controller (metrics["entropy"]: the step's measured entropy, see `controlled_entropy`) and the
        reference sync."""
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer_steps += 1
        if self.entropy.adaptive:
            if "entropy" not in metrics:
                raise ValueError("adaptive entropy control needs the loss's 'entropy' metric")
            self.entropy.update(metrics["entropy"])
        if self.sync_pairs is not None and self.optimizer_steps % self.sync_every == 0:
            for reference, param in self.sync_pairs:
                reference.mul_(1.0 - self.sync_alpha).add_(param.detach().to(reference.dtype), alpha=self.sync_alpha)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the optimizer: the entropy controller and the synced reference (the
        schedule follows from the step count, `make_scheduler(done_steps=...)`)."""
        state: dict[str, Any] = {"entropy_coef": self.entropy.coef, "last_entropy": self.entropy.last_entropy}
        if self.sync_pairs is not None:
            state["reference"] = [reference.detach().cpu().clone() for reference, _ in self.sync_pairs]
        return state

    def resume(self, optimizer_steps: int, state: dict[str, Any]) -> None:
        """Continue after `optimizer_steps` optimizer steps from a checkpoint's state_dict (the optimizer's own
        state already loaded): the schedule is put at that step, the rest restored."""
        self.optimizer_steps = optimizer_steps
        if self.scheduler is not None:
            set_scheduler_step(self.scheduler, optimizer_steps)
        self.load_state_dict(state)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's state_dict (keys a checkpoint lacks keep their fresh values)."""
        if "entropy_coef" in state:
            self.entropy.coef = float(state["entropy_coef"])
            self.entropy.last_entropy = float(state["last_entropy"])
        if self.sync_pairs is not None and "reference" in state:
            if len(state["reference"]) != len(self.sync_pairs):
                raise ValueError(f"the checkpoint's reference has {len(state['reference'])} tensors, "
                                 f"this run's {len(self.sync_pairs)}")
            for (reference, _), saved in zip(self.sync_pairs, state["reference"]):
                reference.copy_(saved)


def _controls_loss(controls: StepControls | None, loss: LossConfig) -> LossConfig:
    return loss if controls is None else controls.loss_config(loss)


@torch.no_grad()
def controlled_entropy(states: Tensor, weight: Tensor, completion_ids: Tensor, completion_mask: Tensor,
                       loss: LossConfig, metrics: dict[str, float], world: World | None = None) -> float:
    """What TRL's adaptive entropy controller measures in a step: the token-weighted mean entropy over the
    tokens the policy loss acts on (every unmasked token, or the top_entropy_quantile subset). The loss's own
    "entropy" metric is that mean over every unmasked token whenever the loss computed entropies; otherwise
    (no bonus applied this step, or an entropy subset) the entropies are taken here, without autograd."""
    if "entropy" in metrics and loss.top_entropy_quantile >= 1.0:
        return metrics["entropy"]
    stats = entropy_sum_and_count(states, weight, completion_ids, completion_mask, loss)
    if world is not None:  # data parallel: the token mean over every rank's rows (metrics already reduced)
        stats = world.all_reduce_sum(stats)
    total, count = stats.tolist()
    return total / max(1.0, count)


@torch.no_grad()
def entropy_sum_and_count(states: Tensor, weight: Tensor, completion_ids: Tensor, completion_mask: Tensor,
                          loss: LossConfig) -> Tensor:
    """(sum of the entropies, number of tokens) over the tokens the policy loss acts on, float64: the parts of
    `controlled_entropy`'s mean that add up across micro-batches and ranks."""
    valid = completion_mask.bool()
    _, values = chunked_token_logprobs_entropy(states[valid], weight, completion_ids[valid], loss.temperature)
    entropies = torch.zeros(valid.shape, dtype=values.dtype, device=values.device)
    entropies[valid] = values
    mask = completion_mask.to(values.dtype)
    if loss.top_entropy_quantile < 1.0:
        mask = mask * high_entropy_mask(entropies, mask, loss.top_entropy_quantile)
    return torch.stack([(entropies * mask).sum(), mask.sum()]).double()


def _step_end(controls: StepControls | None, record: dict[str, float], measure=None) -> None:
    """After an optimizer step: log the rate it ran at, then advance the controls. `measure()` gives the step's
    entropy for adaptive entropy control (called only then)."""
    if controls is None:
        return
    rate = controls.learning_rate()
    if rate is not None:
        record["learning_rate"] = rate  # the rate this step ran at (TRL logs it before the scheduler steps)
    measured = {}
    if controls.entropy.adaptive:
        measured["entropy"] = measure()
        # Logged as the loss logs it (the mean over every unmasked token) where the loss did not.
        record.setdefault("entropy", measured["entropy"])
    controls.step_end(measured)
    if controls.entropy.adaptive or controls.entropy.coef:
        record["entropy_coef"] = controls.entropy.coef  # after the update, as TRL logs it


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
    return masked_token_logprobs(states, policy.lm_head_weight, batch.completion_ids, batch.completion_mask,
                                 config.loss.temperature, backend=config.loss_backend)


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


# The loss metrics that are means over unmasked tokens (at token-level importance sampling; at sequence level the
# clip ratios are means over rows); every other loss metric is a mean over rows. How data-parallel ranks combine them.
TOKEN_MEAN_METRICS = frozenset({"kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
                                "clip_ratio/region_mean", "cispo_clip_ratio"})
SEQUENCE_LEVEL_ROW_METRICS = frozenset({"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                                        "cispo_clip_ratio"})


def global_counts(world: World, completion_mask: Tensor) -> GlobalCounts:
    """The whole batch's unmasked tokens and rows, summed over the ranks."""
    return lane_global_counts(world, [completion_mask])[0]


def lane_global_counts(world: World, completion_masks: Sequence[Tensor]) -> list[GlobalCounts]:
    """Each lane's whole-batch unmasked tokens and rows (completion_masks[k]: this rank's rows of lane k),
    summed over the ranks in one collective."""
    local = torch.tensor([[float(mask.sum()), float(mask.shape[0])] for mask in completion_masks], dtype=torch.float64)
    return [GlobalCounts(tokens=tokens, rows=int(rows)) for tokens, rows in world.all_reduce_sum(local).tolist()]


def reduce_record(world: World, record: dict[str, float], completion_mask: Tensor, loss: LossConfig) -> dict[str, float]:
    """The whole batch's metrics from each rank's (over its own rows): "loss" summed (each rank's loss is its
    share), token means weighted by each rank's unmasked tokens, row means by its rows; grad_norm (taken after
    the gradient all-reduce) is the same on every rank. One collective."""
    return reduce_records(world, [record], [completion_mask], loss)[0]


def reduce_records(world: World, records: Sequence[dict[str, float]], completion_masks: Sequence[Tensor],
                   loss: LossConfig) -> list[dict[str, float]]:
    """`reduce_record` for several lanes (records[k] over this rank's rows of lane k, completion_masks[k] those
    rows' mask) in one collective. A lane's metric names are the same on every rank (its controls are)."""
    sequence = loss.importance_sampling_level == "sequence"
    layouts, local = [], []
    for record, mask in zip(records, completion_masks, strict=True):
        names = sorted(k for k in record if k not in ("loss", "grad_norm"))
        tokens, rows = float(mask.sum()), float(mask.shape[0])
        per_token = [name in TOKEN_MEAN_METRICS and not (sequence and name in SEQUENCE_LEVEL_ROW_METRICS)
                     for name in names]
        local += [record["loss"], *(record[n] * (tokens if t else rows) for n, t in zip(names, per_token)), tokens, rows]
        layouts.append((names, per_token))
    total = world.all_reduce_sum(torch.tensor(local, dtype=torch.float64)).tolist()
    reduced_records, offset = [], 0
    for record, (names, per_token) in zip(records, layouts):
        part = total[offset:offset + len(names) + 3]
        offset += len(names) + 3
        all_tokens, all_rows = part[-2], part[-1]
        reduced = dict(record)
        reduced["loss"] = part[0]
        for name, value, t in zip(names, part[1:-2], per_token):
            reduced[name] = value / max(1.0, all_tokens if t else all_rows)
        reduced_records.append(reduced)
    return reduced_records


def grpo_update(policy, optimizer: torch.optim.Optimizer, batch: RolloutBatch, config: UpdateConfig,
                controls: StepControls | None = None, world: World | None = None) -> list[dict[str, float]]:
    """Run `num_iterations` optimizer steps on one rollout batch; return one metrics dict per iteration.

    The prefix runs once. Old log-probs are not computed by a separate pass: the first iteration is
    on-policy (ratio 1 by definition), so its own log-probs, detached, are the old log-probs of the
    following iterations.

    DivergenceError (before the optimizer step) for rewards too large to train on, a non-finite loss or
    gradient norm; (after it) for trained weights that became non-finite or too large. The weights may then
    be a step ahead of the caller's count: a trainer must not save them.

    controls: the run's learning-rate schedule, entropy coefficient and reference sync, advanced after each
    optimizer step (StepControls); None: the optimizer's rate, config.loss as given, no sync.

    world: `batch` is this data-parallel rank's share of the step's batch (distributed.World, possibly of one
    process): the loss is normalized over the whole batch (global token and row counts), the gradients are
    summed over the ranks before clipping, and the metrics are the whole batch's. The batch must then carry
    its advantages, computed over the whole batch (each rank's rows of them).
    """
    where = _where(policy)
    _check_rewards(batch, where)
    counts = None
    if world is not None:
        if batch.advantages is None:
            raise ValueError("a data-parallel update needs the batch's advantages computed over every rank's rewards")
        counts = global_counts(world, batch.completion_mask)
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
                           old_logps=old_logps, ref_logps=ref_logps, config=_controls_loss(controls, config.loss),
                           backend=config.loss_backend, counts=counts)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        loss = result.loss
        if world is not None:
            world.all_reduce_gradients(params)
            loss = world.all_reduce_sum(result.loss.detach().double())  # every rank checks the same loss
        grad_norm = _clip(params, config.max_grad_norm)
        _check_step(loss, grad_norm, where)
        optimizer.step()
        _check_weights(params, where)
        if old_logps is None:
            old_logps = result.token_logps
        record = _record(result, grad_norm)
        if world is not None:
            record = reduce_record(world, record, batch.completion_mask, config.loss)
        _step_end(controls, record, lambda: controlled_entropy(states.detach(), weight, batch.completion_ids,
                                                               batch.completion_mask, config.loss, record, world))
        history.append(record)
    return history


def lanes_update(policy, optimizers: list[torch.optim.Optimizer], batch: RolloutBatch,
                 config: UpdateConfig, controls: Sequence[StepControls] | None = None,
                 world: World | None = None) -> list[list[dict[str, float]]]:
    """`grpo_update` for every lane of a LanePolicy at once: one prefix, one reference pass, and per iteration
    one suffix and one backward over all lanes; each lane's loss is normalized over its own rows exactly as
    if it ran alone, its gradient clipped and its optimizer stepped on its own.

    batch: rows laid out lane by lane in `policy.lanes` order, the same number per lane. optimizers[k]
    steps lane k's layer; controls[k] (optional) is lane k's schedule, entropy coefficient and reference sync.
    Returns, per lane, one metrics dict per iteration.

    DivergenceError as grpo_update's, naming the lane and its layer (`.lanes`: which lanes). Every lane's
    loss and gradient norm is checked before any lane steps, so a divergence before the step leaves every
    lane's weights as they were.

    world: `batch` holds this data-parallel rank's share of every lane's rows (the same number per lane, each
    lane's advantages computed over its whole batch): each lane's loss is normalized over its whole batch
    (GlobalCounts per lane), every lane's gradient is summed over the ranks (one flat all-reduce over all
    lanes) before its own clipping, and each lane's metrics are its whole batch's (as grpo_update's `world`).
    """
    lanes = policy.num_lanes
    if len(optimizers) != lanes:
        raise ValueError(f"{lanes} lanes need {lanes} optimizers, got {len(optimizers)}")
    controls = [None] * lanes if controls is None else list(controls)
    if len(controls) != lanes:
        raise ValueError(f"{lanes} lanes need {lanes} step controls, got {len(controls)}")
    layout, starts = policy.layout_of(batch, config.layout)
    cache = policy.prefix_layout(layout, starts)
    weight = policy.lm_head_weight
    rows = batch.batch_size // lanes
    parts = [lane_rows(batch, k, rows) for k in range(lanes)]
    for k, part in enumerate(parts):
        _check_rewards(part, _where(policy, k), (k,))
    counts: list[GlobalCounts | None] = [None] * lanes
    if world is not None:
        if batch.advantages is None:
            raise ValueError("a data-parallel update needs the batch's advantages computed over every rank's rewards")
        counts = lane_global_counts(world, [part.completion_mask for part in parts])
    all_ref_logps = reference_logps(policy, cache, batch, config)
    ref_logps = [None] * lanes if all_ref_logps is None else list(all_ref_logps.split(rows))
    old_logps: list = [None] * lanes
    history: list[list[dict[str, float]]] = [[] for _ in range(lanes)]
    for _ in range(config.num_iterations):
        states = policy.completion_states(cache).split(rows)
        results = []
        for k, part in enumerate(parts):
            results.append(grpo_loss(states[k], weight, part.completion_ids, part.completion_mask, **_advantage_args(part),
                                     old_logps=old_logps[k], ref_logps=ref_logps[k],
                                     config=_controls_loss(controls[k], config.loss), backend=config.loss_backend,
                                     counts=counts[k]))
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        # Lanes share no trainable weight, so the gradient of the sum is each lane's own gradient.
        torch.stack([r.loss for r in results]).sum().backward()
        losses = [r.loss for r in results]
        if world is not None:  # every lane's gradient summed over the ranks, then each lane clipped on its own
            world.all_reduce_gradients([p for k in range(lanes) for p in policy.trainable_parameters(k)])
            losses = list(world.all_reduce_sum(torch.stack([r.loss.detach().double() for r in results])))
        grad_norms = [_clip(policy.trainable_parameters(k), config.max_grad_norm) for k in range(lanes)]
        for k, (loss, grad_norm) in enumerate(zip(losses, grad_norms)):
            _check_step(loss, grad_norm, _where(policy, k), (k,))
        for optimizer in optimizers:
            optimizer.step()
        for k in range(lanes):
            _check_weights(policy.trainable_parameters(k), _where(policy, k), (k,))
        records = [_record(result, grad_norm) for result, grad_norm in zip(results, grad_norms)]
        if world is not None:
            records = reduce_records(world, records, [part.completion_mask for part in parts], config.loss)
        for k, (result, record) in enumerate(zip(results, records)):
            if old_logps[k] is None:
                old_logps[k] = result.token_logps
            _step_end(controls[k], record, lambda: controlled_entropy(
                states[k].detach(), weight, parts[k].completion_ids, parts[k].completion_mask, config.loss, record,
                world))
            history[k].append(record)
    return history
