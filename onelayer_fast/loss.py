"""Public loss functions: argument checks, then dispatch to `onelayer_fast.kernels`.

Backends (`backend=`):
- `"auto"` (decided in `dispatch.py`, one place):
  float64 states -> `"reference"` (float64 runs exist to test equalities exactly; the other paths compute in fp32);
  CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set and triton installed -> `"triton"` once a first-use
  self-check of the Triton kernels against the chunked path passed on that (device, dtype); a failed check warns
  once and gives `"chunked"`, and so does an input the Triton path does not cover (a dtype other than
  fp32 / bf16 / fp16, a weight in another dtype than the states, a completion mask with values other than 0 and 1,
  the loss types cispo, sapo, luspo and vespo, an off_policy_mask_threshold, a top_entropy_quantile below 1, a
  non-zero entropy_coef);
  plain CPU -> `"chunked"`, without importing the Triton kernels.
- `"triton"`: the Triton kernels. `grpo_loss` runs the fused path of `kernels/grpo_loss_triton.py`
  (lm_head log-prob kernel -> loss kernel with in-kernel group advantages -> recompute backward kernels);
  `token_logprobs` the custom op `torch.ops.onelayer_fast.token_logprobs` (`kernels/token_logprobs_triton.py`).
  Covers every LossConfig setting but the loss types cispo, sapo, luspo and vespo and the row-level knobs
  (`LossConfig.row_level_knobs`: off_policy_mask_threshold, top_entropy_quantile < 1, entropy_coef != 0), which
  run chunked only; an input it does not cover (see "auto") is a ValueError naming it.
  Needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is imported (tests).
- `"chunked"`: plain PyTorch, a chunk of token rows at a time (never a (tokens, vocab) tensor); the CPU path.
  Token-level importance sampling without row-level knobs: the fused op (loss and gradient in one pass over
  the lm_head). Sequence level: log-probs first, then the loss on them. Any of `LossConfig.row_level_knobs`
  (vespo, the off-policy and entropy masks, the entropy bonus): log-probs and entropies first
  (`chunked_token_logprobs_entropy`, fp64 for fp64 states), then the loss on them; its metrics include
  "entropy" (the reference path does the same).
- `"reference"`: materializes the logits; for debugging (the trainer's `loss_backend`) and tests.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import dispatch
from .kernels.grpo_loss import (
    FusedTokenGRPOLoss,
    GlobalCounts,
    LossConfig,
    check_counts_supported,
    group_advantages,
    grpo_loss_from_logps,
    token_loss_weights,
)
from .kernels.token_logprobs import (
    chunked_token_logprobs,
    chunked_token_logprobs_entropy,
    rows_per_chunk,
    token_logprobs_entropy_ref,
    token_logprobs_ref,
)

BACKENDS = ("auto", "chunked", "triton", "reference")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_lm_head(hidden: Tensor, weight: Tensor, token_ids: Tensor, temperature: float) -> None:
    if weight.dim() != 2:
        raise ValueError(f"lm_head_weight must be (vocab, hidden), got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden has {hidden.shape[-1]} features, lm_head_weight has {weight.shape[1]}"
        )
    if token_ids.shape != hidden.shape[:-1]:
        raise ValueError(f"token_ids shape {tuple(token_ids.shape)} must equal hidden.shape[:-1] {tuple(hidden.shape[:-1])}")
    if token_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= weight.shape[0]):
        raise ValueError(f"token_ids must lie in [0, {weight.shape[0]}) (the lm_head vocab)")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive number, got {temperature}")


def token_logprobs(
    hidden: Tensor, lm_head_weight: Tensor, token_ids: Tensor, temperature: float = 1.0, backend: str = "auto"
) -> Tensor:
    """Log-probability of each token: hidden (..., H), lm_head_weight (V, H), token_ids (...) -> (...) fp32.

    `hidden[..., i, :]` must be the state that predicts `token_ids[..., i]` (already shifted).
    Differentiable in `hidden` (and in the weight only if it requires grad).
    """
    _check_choice("backend", backend, BACKENDS)
    _check_lm_head(hidden, lm_head_weight, token_ids, temperature)
    backend = _resolve_backend(backend, hidden, lm_head_weight)
    if backend == "reference":
        return token_logprobs_ref(hidden, lm_head_weight, token_ids.long(), temperature)
    if backend == "triton":
        return _triton_token_logprobs(hidden, lm_head_weight, token_ids, temperature)
    flat = chunked_token_logprobs(hidden.reshape(-1, hidden.shape[-1]), lm_head_weight, token_ids.reshape(-1).long(), temperature)
    return flat.view(token_ids.shape)


def masked_token_logprobs(hidden: Tensor, lm_head_weight: Tensor, token_ids: Tensor, mask: Tensor,
                          temperature: float = 1.0, backend: str = "auto") -> Tensor:
    """`token_logprobs` at the unmasked positions only, 0 elsewhere: hidden (B, C, H), token_ids and mask (B, C)
    -> (B, C) in the states' precision (at least float32). `grpo_loss` takes its log-probs over the same tokens
    (and chunks them alike), so reference or old log-probs taken here equal the loss's to the bit wherever the
    weights agree: a zero KL gradient stays zero, not rounding noise that Adam would turn into a whole step."""
    valid = mask.bool()
    logps = torch.zeros(valid.shape, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    logps[valid] = token_logprobs(hidden[valid], lm_head_weight, token_ids[valid], temperature, backend=backend)
    return logps


def _resolve_backend(backend: str, hidden: Tensor, weight: Tensor, completion_mask: Tensor | None = None,
                     config: LossConfig | None = None) -> str:
    """"auto" as `dispatch.auto_backend` decides; an explicit "triton" checked for inputs it does not cover."""
    if backend == "auto":
        return dispatch.auto_backend(hidden, weight, completion_mask, config)
    if backend == "triton":
        unsupported = dispatch.triton_unsupported(hidden, weight, completion_mask, config)
        if unsupported is not None:
            raise ValueError(f"backend='triton' does not support {unsupported}; use backend='chunked' or 'auto'")
    return backend


def _triton_token_logprobs(hidden: Tensor, weight: Tensor, token_ids: Tensor, temperature: float) -> Tensor:
    # Imported here: importing triton costs start-up time that the default path does not need.
    from .kernels.token_logprobs_triton import token_logprobs_triton

    return token_logprobs_triton(hidden, weight, token_ids, temperature)


def _check_per_token(name: str, value: Tensor | None, shape: torch.Size) -> None:
    if value is not None and value.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} (batch, completion tokens), got {tuple(value.shape)}")


def _check_advantage_inputs(
    rewards: Tensor | None, group_size: int | None, advantages: Tensor | None, batch: int
) -> None:
    if (rewards is None) == (advantages is None):
        raise ValueError("pass exactly one of `rewards` (with `group_size`) or `advantages`")
    if advantages is not None:
        if advantages.shape != (batch,):
            raise ValueError(f"advantages must have shape ({batch},), got {tuple(advantages.shape)}")
        if not torch.isfinite(advantages).all():
            raise ValueError("advantages contain NaN or inf")
        return
    if rewards.shape != (batch,):
        raise ValueError(f"rewards must have shape ({batch},), one per completion row, got {tuple(rewards.shape)}")
    if group_size is None or group_size < 2:
        raise ValueError(f"group_size must be given and >= 2 with `rewards` (GRPO needs a group), got {group_size}")
    if batch % group_size != 0:
        raise ValueError(f"batch size {batch} is not divisible by group_size {group_size}")
    if not torch.isfinite(rewards).all():
        bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
        raise ValueError(f"rewards contain NaN or inf at rows {bad}")


def _resolve_advantages(
    rewards: Tensor | None, group_size: int | None, advantages: Tensor | None, batch: int, scale_rewards: str
) -> tuple[Tensor, Tensor | None]:
    _check_advantage_inputs(rewards, group_size, advantages, batch)
    if advantages is not None:
        return advantages.float(), None
    return group_advantages(rewards.float(), group_size, scale_rewards)


@dataclass
class LossResult:
    """What `grpo_loss` gives back.

    loss: the scalar to backpropagate. token_logps (B, T): the policy's log-probs, detached, 0 where masked
    (the next inner iteration's `old_logps`). metrics: 0-d tensors (TRL's names: kl, clip_ratio/*, ...).
    """

    loss: Tensor
    token_logps: Tensor
    metrics: dict[str, Tensor]


def loss_config(config: LossConfig | None = None, **knobs) -> LossConfig:
    """`config` (default LossConfig()) with the named knobs replaced; unknown names are a TypeError."""
    unknown = sorted(set(knobs) - {f.name for f in dataclasses.fields(LossConfig)})
    if unknown:
        raise TypeError(f"unknown loss setting(s) {unknown}; LossConfig has {[f.name for f in dataclasses.fields(LossConfig)]}")
    return dataclasses.replace(config or LossConfig(), **knobs)


def grpo_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    rewards: Tensor | None = None,
    group_size: int | None = None,
    advantages: Tensor | None = None,
    old_logps: Tensor | None = None,
    ref_logps: Tensor | None = None,
    config: LossConfig | None = None,
    backend: str = "auto",
    counts: GlobalCounts | None = None,
    sampling_weights: Tensor | None = None,
    sampling_logps: Tensor | None = None,
    entropy_metric: bool = False,
    **knobs,
) -> LossResult:
    """GRPO loss with TRL GRPOTrainer semantics (see `kernels/grpo_loss.py` for the math).

    hidden (B, T, H): states predicting the completion tokens (already shifted);
    lm_head_weight (V, H); completion_ids, completion_mask (B, T); rewards (B,) with group_size, or
    advantages (B,); old_logps, ref_logps (B, T) or None.
    The loss knobs come as a LossConfig (`config`), as keywords (`beta=0.04, loss_type="grpo"`, the
    LossConfig field names), or both (keywords override the config).
    counts: the whole batch's token and row counts when these rows are one data-parallel rank's share
    (kernels.grpo_loss.GlobalCounts); the loss is then this rank's share of the whole batch's loss, and the sum
    of the ranks' gradients the whole batch's gradient. The metrics stay over these rows.
    sampling_weights (B, T) or (B, 1): TRL's vLLM importance-sampling correction, pi_old / pi_sampler per token
    (or per row) as TRL's generation step computes it (truncated or masked there); it multiplies the policy term,
    not the KL (vespo: it enters the gamma weight). Not in the Triton kernels: "auto" runs chunked then.
    sampling_logps (B, T): the log-probs the rollouts were sampled with (vLLM's, NaN where unknown); the
    off-policy mask measures the drift from them instead of from old_logps, as TRL does.
    entropy_metric: report metrics["entropy"] (the mean token entropy, which TRL logs at every step) also where
    no loss knob needs the entropies; the chunked path then takes them in the same pass (no gradient). Not on
    the Triton path.
    """
    config = loss_config(config, **knobs)
    _check_choice("backend", backend, BACKENDS)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (batch, completion tokens, hidden), got shape {tuple(hidden.shape)}")
    _check_lm_head(hidden, lm_head_weight, completion_ids, config.temperature)
    batch, length = completion_ids.shape
    if completion_mask.shape != completion_ids.shape:
        raise ValueError(f"completion_mask shape {tuple(completion_mask.shape)} must equal completion_ids shape {(batch, length)}")
    _check_per_token("old_logps", old_logps, completion_ids.shape)
    _check_per_token("ref_logps", ref_logps, completion_ids.shape)
    _check_per_token("sampling_logps", sampling_logps, completion_ids.shape)
    if config.off_policy_mask_threshold is None:
        sampling_logps = None  # only the off-policy mask reads them
    if config.beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (the KL term would silently be zero without them)")
    check_counts_supported(config, counts)
    if sampling_weights is not None:
        if sampling_weights.shape not in ((batch, length), (batch, 1)):
            raise ValueError(f"sampling_weights must have shape {(batch, length)} or {(batch, 1)}, "
                             f"got {tuple(sampling_weights.shape)}")
        if sampling_weights.shape == completion_ids.shape:  # masked positions must not inject NaN / inf
            keep = completion_mask.bool()
            sampling_weights = torch.where(keep, sampling_weights, torch.ones_like(sampling_weights))
        if not torch.isfinite(sampling_weights).all():
            raise ValueError("sampling_weights contain NaN or inf at unmasked positions")
        if backend == "triton":
            raise ValueError("backend='triton' does not support sampling_weights (vLLM importance-sampling "
                             "correction); use backend='chunked' or 'auto'")
    backend = _resolve_backend(backend, hidden, lm_head_weight, completion_mask, config)
    if backend == "triton" and sampling_weights is not None:  # "auto" chose the kernels: they do not cover it
        backend = "chunked"
    if backend == "triton":  # advantages, loss, gradient and metrics all in the Triton kernels
        _check_advantage_inputs(rewards, group_size, advantages, batch)
        from .kernels.grpo_loss_triton import grpo_loss_triton

        loss, token_logps, metrics = grpo_loss_triton(
            hidden, lm_head_weight, completion_ids, completion_mask,
            rewards=None if rewards is None else rewards.float(), group_size=group_size,
            advantages=None if advantages is None else advantages.float(), old_logps=old_logps, ref_logps=ref_logps,
            config=config,
        )
        if counts is not None:  # the kernel normalizes over these rows; one normalizer (no entropy bonus here)
            loss = loss * counts.scale(completion_mask, config.loss_type)
        return LossResult(loss, token_logps, metrics)
    advantages, constant_group = _resolve_advantages(rewards, group_size, advantages, batch, config.scale_rewards)

    mask = completion_mask.to(torch.float32)
    ids = completion_ids.long()
    advantages = advantages.to(hidden.device)
    # Only unmasked tokens go through the lm_head: padding after EOS costs nothing.
    valid = completion_mask.reshape(-1).bool().nonzero().squeeze(1)
    fused_loss = entropies = None
    if backend == "reference":
        if config.row_level_knobs or entropy_metric:
            logps, entropies = token_logprobs_entropy_ref(hidden, lm_head_weight, ids, config.temperature)
            entropies = entropies * mask
            if not config.row_level_knobs:
                entropies = entropies.detach()  # the metric only
        else:
            logps = token_logprobs_ref(hidden, lm_head_weight, ids, config.temperature)
        logps = logps * mask
    else:
        flat_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, valid)
        flat_ids = ids.reshape(-1).index_select(0, valid)
        valid_entropies = None
        if config.row_level_knobs:
            # vespo, the off-policy / entropy masks and the entropy bonus need whole rows or entropies: log-probs
            # and entropies first (chunked, differentiable; fp64 for fp64 states), then the loss on them
            valid_logps, valid_entropies = chunked_token_logprobs_entropy(flat_hidden, lm_head_weight, flat_ids,
                                                                          config.temperature)
        elif config.importance_sampling_level == "token":
            def at_valid(per_token: Tensor | None) -> Tensor | None:
                return None if per_token is None else per_token.reshape(-1).float().index_select(0, valid)

            row_of_token = valid // length
            weights = token_loss_weights(mask, config.loss_type, config.normalizer_length(length), counts)
            fused_loss, valid_logps, fused_entropies = FusedTokenGRPOLoss.apply(
                flat_hidden, lm_head_weight, flat_ids, advantages.index_select(0, row_of_token),
                at_valid(weights), at_valid(old_logps), at_valid(ref_logps), config,
                rows_per_chunk(lm_head_weight.shape[0]),
                None if sampling_weights is None else at_valid(sampling_weights.expand(batch, length)),
                entropy_metric,
            )
            if entropy_metric:
                valid_entropies = fused_entropies
        else:  # sequence level: a token's gradient depends on its whole row, so forward then backward
            if entropy_metric:  # the same pass gives the entropies; only the log-probs carry a gradient
                valid_logps, valid_entropies = chunked_token_logprobs_entropy(flat_hidden, lm_head_weight, flat_ids,
                                                                              config.temperature)
                valid_entropies = valid_entropies.detach()
            else:
                valid_logps = chunked_token_logprobs(flat_hidden, lm_head_weight, flat_ids, config.temperature)
        def scatter(values: Tensor) -> Tensor:  # (valid tokens,) -> (batch, length), zero where masked
            full = torch.zeros(batch * length, dtype=values.dtype, device=hidden.device)
            return full.index_put((valid,), values).view(batch, length)

        logps = scatter(valid_logps)
        if valid_entropies is not None:
            entropies = scatter(valid_entropies)
    # Masked positions must not inject inf/NaN through exp(ref - logp); their value is irrelevant.
    keep = mask.bool()
    old = None if old_logps is None else torch.where(keep, old_logps.to(logps.dtype), logps.detach())
    ref = None if ref_logps is None else torch.where(keep, ref_logps.to(logps.dtype), logps.detach())
    if fused_loss is None:
        loss, metrics = grpo_loss_from_logps(logps, mask, advantages, old, ref, config, entropies, counts,
                                             sampling_weights, sampling_logps)
    else:  # the fused op gave loss and gradient; the same formulas on its log-probs give the metrics
        with torch.no_grad():
            _, metrics = grpo_loss_from_logps(logps, mask, advantages, old, ref, config, entropies,
                                              sampling_weights=sampling_weights)
        loss = fused_loss
    if constant_group is not None:
        metrics["frac_reward_zero_std"] = constant_group.float().mean()
    return LossResult(loss, logps.detach(), metrics)


# The self-check of "auto" runs these public paths (dispatch cannot import this module: it is imported by it).
dispatch.register_loss_functions(grpo_loss, token_logprobs)
