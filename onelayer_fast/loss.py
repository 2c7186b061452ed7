"""Public loss functions: argument checks, then dispatch to `onelayer_fast.kernels`.

Backends (`backend=`):
- `"auto"`: `"chunked"` on every device for now. The Triton path has passed every interpreter test and
  compiles for sm_90, but it has not yet run or been timed on a GPU, and its backward recomputes the
  logits once per hidden slice; it becomes the CUDA default once a GPU run validates and measures it.
- `"triton"`: the Triton kernels. `grpo_loss` runs the fused path of `kernels/grpo_loss_triton.py`
  (lm_head log-prob kernel -> loss kernel with in-kernel group advantages -> recompute backward kernels);
  `token_logprobs` the custom op `torch.ops.onelayer_fast.token_logprobs` (`kernels/token_logprobs_triton.py`).
  Needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is imported (tests).
- `"chunked"`: plain PyTorch, a chunk of token rows at a time (never a (tokens, vocab) tensor); the CPU path.
- `"reference"`: materializes the logits; for debugging (the trainer's `loss_backend`) and tests.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .kernels.grpo_loss import (
    IMPORTANCE_SAMPLING_LEVELS,
    FusedTokenGRPOLoss,
    LOSS_TYPES,
    SCALE_REWARDS,
    group_advantages,
    grpo_loss_from_logps,
    token_loss_weights,
)
from .kernels.token_logprobs import chunked_token_logprobs, rows_per_chunk, token_logprobs_ref

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
    backend = _resolve_backend(backend)
    if backend == "reference":
        return token_logprobs_ref(hidden, lm_head_weight, token_ids.long(), temperature)
    if backend == "triton":
        return _triton_token_logprobs(hidden, lm_head_weight, token_ids, temperature)
    flat = chunked_token_logprobs(hidden.reshape(-1, hidden.shape[-1]), lm_head_weight, token_ids.reshape(-1).long(), temperature)
    return flat.view(token_ids.shape)


def _resolve_backend(backend: str) -> str:
    # One place decides what "auto" means (see the module docstring for why it is not Triton on CUDA yet).
    return "chunked" if backend == "auto" else backend


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
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    loss_type: str = "dapo",
    scale_rewards: str = "group",
    temperature: float = 1.0,
    max_completion_length: int | None = None,
    importance_sampling_level: str = "token",
    backend: str = "auto",
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss with TRL GRPOTrainer semantics (see `kernels/grpo_loss.py` for the math).

    hidden (B, T, H): states predicting the completion tokens (already shifted);
    lm_head_weight (V, H); completion_ids, completion_mask (B, T); rewards (B,) with group_size, or
    advantages (B,); old_logps, ref_logps (B, T) or None.
    Returns the scalar loss and metrics (0-d tensors, plus `token_logps` (B, T) detached, zero where
    masked, which the caller can keep as the next iteration's `old_logps`).
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    _check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    _check_choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    _check_choice("backend", backend, BACKENDS)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (batch, completion tokens, hidden), got shape {tuple(hidden.shape)}")
    _check_lm_head(hidden, lm_head_weight, completion_ids, temperature)
    batch, length = completion_ids.shape
    if completion_mask.shape != completion_ids.shape:
        raise ValueError(f"completion_mask shape {tuple(completion_mask.shape)} must equal completion_ids shape {(batch, length)}")
    _check_per_token("old_logps", old_logps, completion_ids.shape)
    _check_per_token("ref_logps", ref_logps, completion_ids.shape)
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (the KL term would silently be zero without them)")
    if epsilon_low < 0 or epsilon_high < 0:
        raise ValueError(f"epsilons must be >= 0, got epsilon_low={epsilon_low}, epsilon_high={epsilon_high}")
    if delta is not None and delta <= 1.0:
        raise ValueError(f"delta (upper clamp of the ratio) must be > 1, got {delta}")
    if max_completion_length is not None and max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")
    backend = _resolve_backend(backend)
    if backend == "triton":  # advantages, loss, gradient and metrics all in the Triton kernels
        _check_advantage_inputs(rewards, group_size, advantages, batch)
        from .kernels.grpo_loss_triton import grpo_loss_triton

        return grpo_loss_triton(
            hidden, lm_head_weight, completion_ids, completion_mask,
            rewards=None if rewards is None else rewards.float(), group_size=group_size,
            advantages=None if advantages is None else advantages.float(), old_logps=old_logps, ref_logps=ref_logps,
            beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta, loss_type=loss_type,
            scale_rewards=scale_rewards, temperature=temperature, max_completion_length=max_completion_length,
            importance_sampling_level=importance_sampling_level,
        )
    advantages, constant_group = _resolve_advantages(rewards, group_size, advantages, batch, scale_rewards)

    mask = completion_mask.to(torch.float32)
    ids = completion_ids.long()
    max_completion_length = max_completion_length or length
    advantages = advantages.to(hidden.device)
    loss_args = (beta, epsilon_low, epsilon_high, delta, loss_type, max_completion_length, importance_sampling_level)
    # Only unmasked tokens go through the lm_head: padding after EOS costs nothing.
    valid = completion_mask.reshape(-1).bool().nonzero().squeeze(1)
    fused_loss = None
    if backend == "reference":
        logps = token_logprobs_ref(hidden, lm_head_weight, ids, temperature) * mask
    else:
        flat_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, valid)
        flat_ids = ids.reshape(-1).index_select(0, valid)
        if importance_sampling_level == "token":
            def at_valid(per_token: Tensor | None) -> Tensor | None:
                return None if per_token is None else per_token.reshape(-1).float().index_select(0, valid)

            row_of_token = valid // length
            settings = (float(temperature), rows_per_chunk(lm_head_weight.shape[0]), beta, epsilon_low, epsilon_high, delta)
            fused_loss, valid_logps = FusedTokenGRPOLoss.apply(
                flat_hidden, lm_head_weight, flat_ids, advantages.index_select(0, row_of_token),
                at_valid(token_loss_weights(mask, loss_type, max_completion_length)),
                at_valid(old_logps), at_valid(ref_logps), settings,
            )
        else:  # sequence level: a token's gradient depends on its whole row, so forward then backward
            valid_logps = chunked_token_logprobs(flat_hidden, lm_head_weight, flat_ids, temperature)
        logps = torch.zeros(batch * length, dtype=torch.float32, device=hidden.device).index_put((valid,), valid_logps)
        logps = logps.view(batch, length)
    # Masked positions must not inject inf/NaN through exp(ref - logp); their value is irrelevant.
    keep = mask.bool()
    old = None if old_logps is None else torch.where(keep, old_logps.float(), logps.detach())
    ref = None if ref_logps is None else torch.where(keep, ref_logps.float(), logps.detach())
    if fused_loss is None:
        loss, metrics = grpo_loss_from_logps(logps, mask, advantages, old, ref, *loss_args)
    else:  # the fused op gave loss and gradient; the same formulas on its log-probs give the metrics
        with torch.no_grad():
            _, metrics = grpo_loss_from_logps(logps, mask, advantages, old, ref, *loss_args)
        loss = fused_loss
    if constant_group is not None:
        metrics["frac_reward_zero_std"] = constant_group.float().mean()
    metrics["token_logps"] = logps.detach()
    return loss, metrics
