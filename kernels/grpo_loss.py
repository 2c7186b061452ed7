"""GRPO loss math (TRL GRPOTrainer semantics), from per-token log-probs.

Advantages (rewards r (B,), group size G):
    A = r - mean_group(r)                      then, unless scale_rewards == "none",
    A = A / (std + 1e-4)                       std: Bessel std of the group ("group") or batch ("batch")
    groups whose std is zero get A = 0 exactly (never NaN, never rounding noise)
Per token t of row b, with log-ratio d = logp - old_logp (old_logp = logp.detach() when not given):
    w      = exp(d)                            token level
    w      = exp(sum_t m*d / max(1, sum_t m))  sequence level (one weight per row)
    w1     = min(w, delta) if delta else w
    loss_t = -min(w1 * A_b, clamp(w, 1-eps_low, 1+eps_high) * A_b) + beta * kl_t
    kl_t   = exp(ref - logp) - (ref - logp) - 1        (k3 estimator)
Normalization over the completion mask m:
    grpo:    mean_b( sum_t m*loss / max(1, sum_t m) )
    bnpo:    sum m*loss / max(1, sum m)
    dapo:    sum m*loss / max(1, sum m)   (TRL divides by the tokens of the whole generation batch;
                                           one process and one batch make that the same as bnpo)
    dr_grpo: sum m*loss / (B * max_completion_length)
`grpo_loss_ref` materializes the logits and is the reference for the chunked and fused paths.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .token_logprobs import token_logprobs_ref

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
STD_EPS = 1e-4


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group") -> tuple[Tensor, Tensor]:
    """rewards (B,) -> (advantages (B,), constant_group (B,) bool). B must be a multiple of group_size >= 2."""
    grouped = rewards.view(-1, group_size)
    centered = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    group_std = grouped.std(dim=1).repeat_interleave(group_size)
    constant_group = torch.isclose(group_std, torch.zeros_like(group_std))
    if scale_rewards == "group":
        advantages = centered / (group_std + STD_EPS)
    elif scale_rewards == "batch":
        advantages = centered / (rewards.std() + STD_EPS)
    else:
        advantages = centered
    # A constant group carries no signal; its centered rewards are zero only up to rounding: make them exact.
    advantages = torch.where(constant_group, torch.zeros_like(advantages), advantages)
    return advantages, constant_group


def log_importance_weights(logps: Tensor, old_logps: Tensor | None, mask: Tensor, level: str) -> Tensor:
    """(B, T) log-ratio per token, or per row broadcast to (B, 1) at sequence level."""
    old = logps.detach() if old_logps is None else old_logps
    log_ratio = logps - old
    if level == "token":
        return log_ratio
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def normalize_loss(per_token_loss: Tensor, mask: Tensor, loss_type: str, max_completion_length: int) -> Tensor:
    """Reduce (B, T) per-token losses to the scalar loss of `loss_type`."""
    masked = per_token_loss * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type in ("bnpo", "dapo"):
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return masked.sum() / (per_token_loss.shape[0] * max_completion_length)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def grpo_loss_from_logps(
    logps: Tensor,
    mask: Tensor,
    advantages: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None,
    loss_type: str,
    max_completion_length: int,
    importance_sampling_level: str,
) -> tuple[Tensor, dict[str, Tensor]]:
    """logps (B, T) differentiable, mask (B, T) float, advantages (B,) -> (loss, metrics of 0-d tensors)."""
    adv = advantages.to(logps.dtype).unsqueeze(1)
    coef_1 = torch.exp(log_importance_weights(logps, old_logps, mask, importance_sampling_level))
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    token_count = mask.sum().clamp(min=1.0)
    metrics: dict[str, Tensor] = {}
    if beta != 0.0:
        diff = ref_logps - logps
        per_token_kl = torch.exp(diff) - diff - 1
        per_token_loss = per_token_loss + beta * per_token_kl
        metrics["kl"] = ((per_token_kl * mask).sum() / token_count).detach()
    loss = normalize_loss(per_token_loss, mask, loss_type, max_completion_length)

    def masked_mean(flags: Tensor) -> Tensor:
        # At sequence level there is one weight per row: TRL averages over rows, not tokens.
        if flags.shape[1] == 1:
            return flags.float().mean()
        return (flags.float() * mask).sum() / token_count

    with torch.no_grad():
        low = (coef_1 < 1 - epsilon_low) & (adv < 0)
        high = (coef_1 > 1 + epsilon_high) & (adv > 0)
        metrics["clip_ratio/low_mean"] = masked_mean(low)
        metrics["clip_ratio/high_mean"] = masked_mean(high)
        metrics["clip_ratio/region_mean"] = masked_mean(low | high)
        metrics["advantage_mean"] = advantages.float().mean()
    return loss, metrics


def grpo_loss_ref(
    hidden: Tensor,
    weight: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    advantages: Tensor,
    old_logps: Tensor | None = None,
    ref_logps: Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    loss_type: str = "dapo",
    temperature: float = 1.0,
    max_completion_length: int | None = None,
    importance_sampling_level: str = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Reference: hidden (B, T, H), weight (V, H), ids/mask (B, T), advantages (B,); logits materialized."""
    logps = token_logprobs_ref(hidden, weight, completion_ids, temperature)
    mask = completion_mask.to(logps.dtype)
    return grpo_loss_from_logps(
        logps, mask, advantages, old_logps, ref_logps, beta, epsilon_low, epsilon_high, delta, loss_type,
        max_completion_length or completion_ids.shape[1], importance_sampling_level,
    )
