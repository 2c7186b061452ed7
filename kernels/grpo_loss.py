"""GRPO loss math (TRL GRPOTrainer semantics), from per-token log-probs.

Advantages (rewards r (B,), group size G):
    A = r - mean_group(r)                      then, unless scale_rewards == "none",
    A = A / (std + 1e-4)                       std: Bessel std of the group ("group") or batch ("batch")
    groups whose std is zero get A = 0 exactly (never NaN, never rounding noise)
Per token t of row b, with log-ratio d = logp - old_logp (old_logp = logp.detach() when not given):
    w      = exp(d)                            token level
    w      = exp(sum_t m*d / max(1, sum_t m))  sequence level (one weight per row)
    w1     = min(w, delta) if delta else w
    loss_t = -min(w1 * A_b, clamp(w, 1-eps_low, 1+eps_high) * A_b) + beta * kl_t     grpo, bnpo, dr_grpo, dapo, luspo
    loss_t = -sg(min(w, eps_high)) * A_b * logp + beta * kl_t                       cispo (sg: no gradient)
    loss_t = -sigmoid(tau * (w - 1)) * 4 / tau * A_b + beta * kl_t                  sapo, tau = sapo_temperature_pos
                                                                                 where A_b > 0, else _neg
    loss_t = -sg(phi_b) * A_b * logp + beta * kl_t                                  vespo (token level only)
        phi_b  = exp(lam + k * lw - lam * exp(lw)), NaN/inf -> 0     the gamma weight, phi(1) = 1, in log space:
        lw     = clamp(sum_t m * clamp(d, -20, 20), log(1e-8), 20)   the row's summed (not mean) log-ratio
        (k, lam) = (vespo_k_pos, vespo_lambda_pos) where A_b >= 0, else (vespo_k_neg, vespo_lambda_neg); lam >= 1e-4
    kl_t   = exp(ref - logp) - (ref - logp) - 1        (k3 estimator)
    kl_t   = kl_t * w     with use_bias_correction_kl (TRL's default): the differentiable ratio before the delta
                          clamp, so the KL gradient changes even on-policy where w == 1 (its d w / d logp is not 0)
Normalization over the completion mask m:
    grpo:    mean_b( sum_t m*loss / max(1, sum_t m) )
    bnpo:    sum m*loss / max(1, sum m)
    dapo:    sum m*loss / max(1, sum m)   (TRL divides by the tokens of the whole generation batch;
                                           one process and one batch make that the same as bnpo)
    dr_grpo: sum m*loss / (B * max_completion_length)
    cispo, vespo: as dapo;  sapo: as grpo;  luspo: mean_b( sum_t m*loss )
Masks on the policy term (multiplied in this order, before beta * kl_t is added, as TRL does):
    off_policy_mask_threshold delta:  keep_b = (A_b >= 0) | (sum_t m * (old_logp - sg(logp)) / max(1, sum_t m) <= delta)
                                      (the sampler's log-probs in place of old_logp where given: TRL's
                                      sampling_per_token_logps, from vLLM or a rollout_func)
    top_entropy_quantile q < 1:       keep_bt = m_bt != 0 and H_bt >= quantile({H_bt : m_bt != 0}, 1 - q)
                                      (torch.quantile, linear interpolation; no token when no token is unmasked)
    H_bt = -sum_v p log p of softmax(logits / temperature): the token's entropy, differentiable
    sampling weights s (TRL's vLLM importance-sampling ratio pi_old / pi_sampler, (B, T) or (B, 1), given):
                                      the policy term times s_bt, after the masks; vespo instead adds
                                      sum_t clamp(log s_bt, log(1e-8), 20) to its row's log-ratio lw (before lw's clamp)
Entropy bonus (entropy_coef c != 0), after the normalization above, whatever the loss type:
    loss = loss - c * sum(H * m_e) / max(1, sum m_e),   m_e = m * keep_bt (m without the entropy mask)
Metrics: "entropy" = sum(H * m) / max(1, sum m) (detached) wherever entropies were computed (any of vespo, the
masks, the bonus); "vespo/phi_seq_mean" = mean_b phi_b.
`grpo_loss_ref` materializes the logits and is the reference for the chunked and fused paths. The fused
token-level op (`FusedTokenGRPOLoss`) sees one token at a time and covers none of vespo, the two masks and the
entropy bonus: `LossConfig.row_level_knobs` names those, and the public `grpo_loss` then computes log-probs and
entropies first (`chunked_token_logprobs_entropy`) and this module's formulas on them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .token_logprobs import (
    logits_into,
    probs_to_grad_,
    softmax_stats_,
    softmax_stats_entropy_,
    accumulate_input_grads,
    chunk_buffer,
    token_logprobs_entropy_ref,
    token_logprobs_ref,
)

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # the PPO-style clipped surrogate
# What the Triton loss kernel (grpo_loss_triton.py) covers; here, so that dispatch can ask without importing triton.
TRITON_LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
STD_EPS = 1e-4
VESPO_LOG_W_MIN = math.log(1e-8)  # TRL's lower clamp of vespo's sequence log-ratio


@dataclass(frozen=True)
class LossConfig:
    """Every non-tensor knob of the GRPO loss, in one place: the public `grpo_loss`, the chunked and Triton
    paths, the update and the bench all take this. Names follow TRL where TRL has the knob (TRL's `epsilon`
    is `epsilon_low` here: the loss always sees both bounds).

    max_completion_length: the dr_grpo normalizer; None means the completion width of the batch.
    """

    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    temperature: float = 1.0
    max_completion_length: int | None = None
    importance_sampling_level: str = "token"
    use_bias_correction_kl: bool = True  # TRL's default: the KL term times the importance ratio
    sapo_temperature_pos: float = 1.0  # sapo: the soft gate's temperature where the advantage is > 0
    sapo_temperature_neg: float = 1.05  # ... and where it is <= 0
    vespo_k_pos: float = 2.0  # vespo: the gamma weight's power where the advantage is >= 0
    vespo_lambda_pos: float = 3.0  # ... and its decay there
    vespo_k_neg: float = 3.0  # ... power where the advantage is < 0
    vespo_lambda_neg: float = 2.0  # ... and decay there
    off_policy_mask_threshold: float | None = None  # drop rows with A < 0 whose mean (old - new) log-prob exceeds it
    top_entropy_quantile: float = 1.0  # keep only the top-q tokens by entropy in the policy term (1: all)
    entropy_coef: float = 0.0  # loss -= entropy_coef * mean token entropy

    def __post_init__(self) -> None:
        for name, choices in (("loss_type", LOSS_TYPES), ("scale_rewards", SCALE_REWARDS),
                              ("importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not (self.epsilon_low >= 0 and self.epsilon_high >= 0):
            raise ValueError(f"epsilons must be >= 0, got epsilon_low={self.epsilon_low}, epsilon_high={self.epsilon_high}")
        if self.delta is not None and not self.delta > 1.0:
            raise ValueError(f"delta (upper clamp of the ratio) must be > 1, got {self.delta}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        if not (self.sapo_temperature_pos > 0 and self.sapo_temperature_neg > 0):
            raise ValueError(f"sapo temperatures must be > 0, got {self.sapo_temperature_pos} and {self.sapo_temperature_neg}")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            raise ValueError("loss_type 'vespo' computes its sequence-level weight itself from the token log-ratios: "
                             f"importance_sampling_level must be 'token', got {self.importance_sampling_level!r}")
        threshold = self.off_policy_mask_threshold
        if threshold is not None and not (threshold >= 0 and math.isfinite(threshold)):
            raise ValueError("off_policy_mask_threshold (the largest mean log-prob drift old - new kept for a row "
                             f"with a negative advantage) must be None or a finite number >= 0, got {threshold}")
        if not 0 <= self.top_entropy_quantile <= 1:
            raise ValueError("top_entropy_quantile must be in [0, 1] (1 keeps every token, 0 only the highest-entropy "
                             f"one), got {self.top_entropy_quantile}")
        # As TRL: a negative coefficient is allowed (an entropy penalty).
        if not math.isfinite(self.entropy_coef):
            raise ValueError(f"entropy_coef (the entropy bonus' weight) must be a finite number, got {self.entropy_coef}")

    @property
    def needs_entropy(self) -> bool:
        """Whether the loss itself uses the token entropies (the entropy mask or the entropy bonus)."""
        return self.top_entropy_quantile < 1.0 or self.entropy_coef != 0.0

    @property
    def row_level_knobs(self) -> tuple[str, ...]:
        """The settings that need a row's log-probs or the token entropies before the loss: vespo, the
        off-policy mask, the entropy mask, the entropy bonus; each as `name=value`. Neither the fused token-level
        op nor the Triton loss computes them; the paths that do also compute the entropies (metric "entropy")."""
        knobs = []
        if self.loss_type == "vespo":
            knobs.append("loss_type='vespo'")
        if self.off_policy_mask_threshold is not None:
            knobs.append(f"off_policy_mask_threshold={self.off_policy_mask_threshold}")
        if self.top_entropy_quantile < 1.0:
            knobs.append(f"top_entropy_quantile={self.top_entropy_quantile}")
        if self.entropy_coef != 0.0:
            knobs.append(f"entropy_coef={self.entropy_coef}")
        return tuple(knobs)

    def normalizer_length(self, completion_width: int) -> int:
        """The dr_grpo normalizer length for a batch whose completions are `completion_width` wide."""
        return self.max_completion_length or completion_width


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


def check_counts_supported(config: LossConfig, counts: GlobalCounts | None) -> None:
    """ValueError for a setting whose loss is not yet computed over a batch split across ranks."""
    if counts is not None and config.top_entropy_quantile < 1.0:
        raise ValueError("top_entropy_quantile < 1 is not supported with data-parallel ranks yet: its entropy "
                         "quantile is taken over the whole batch's tokens, which no rank holds; train it in one "
                         "process (top_entropy_quantile 1 keeps every token)")


def log_importance_weights(logps: Tensor, old_logps: Tensor | None, mask: Tensor, level: str) -> Tensor:
    """(B, T) log-ratio per token, or per row broadcast to (B, 1) at sequence level."""
    old = logps.detach() if old_logps is None else old_logps
    log_ratio = logps - old
    if level == "token":
        return log_ratio
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


@dataclass(frozen=True)
class GlobalCounts:
    """The counts of the whole batch when it is split across data-parallel ranks, each rank's loss taking its
    rows: the unmasked completion tokens (bnpo, dapo, cispo, vespo and the entropy bonus normalize by them) and
    the rows (grpo, sapo, luspo, dr_grpo average over them). With them each rank's loss is its rows' share of
    the whole batch's loss, so the sum of the ranks' gradients is the whole batch's gradient."""

    tokens: float
    rows: int

    def normalizer(self, loss_type: str) -> float:
        """What a loss type divides the summed (row-normalized) per-token losses by, over the whole batch."""
        if loss_type in ("bnpo", "dapo", "cispo", "vespo"):
            return max(1.0, float(self.tokens))
        return float(self.rows)  # grpo, sapo, luspo, dr_grpo (the latter also by max_completion_length)

    def scale(self, mask: Tensor, loss_type: str) -> float:
        """local normalizer / global normalizer: turns a loss normalized over the local rows (the Triton path)
        into this rank's share of the global one. Exact for the loss types with one normalizer and no entropy bonus."""
        local = GlobalCounts(tokens=float(mask.sum()), rows=mask.shape[0])
        return local.normalizer(loss_type) / self.normalizer(loss_type)


def token_loss_weights(mask: Tensor, loss_type: str, max_completion_length: int,
                       counts: GlobalCounts | None = None) -> Tensor:
    """(B, T) weights w with loss = sum(w * per_token_loss): the loss-type normalization as one tensor.

    counts: the whole batch's token and row counts when `mask` holds one data-parallel rank's rows (None: the
    batch is whole)."""
    rows = mask.shape[0] if counts is None else counts.rows
    if loss_type in ("grpo", "sapo"):
        return mask / (mask.sum(-1, keepdim=True).clamp(min=1.0) * rows)
    if loss_type in ("bnpo", "dapo", "cispo", "vespo"):
        if counts is not None:
            return mask / max(1.0, float(counts.tokens))
        return mask / mask.sum().clamp(min=1.0)
    if loss_type == "luspo":
        return mask / rows
    if loss_type == "dr_grpo":
        return mask / (rows * max_completion_length)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def vespo_gamma_weights(advantages: Tensor, log_ratio: Tensor, mask: Tensor, config: LossConfig,
                        sampling_weights: Tensor | None = None) -> Tensor:
    """vespo's gamma weight phi per row (B, 1), no gradient: advantages (B, 1), log_ratio logp - old (B, T);
    sampling_weights (B, T): pi_old / pi_sampler, folded into the row's log-ratio (TRL sums it over every
    position: it is 1 where the completion is masked)."""
    with torch.no_grad():
        summed = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
        if sampling_weights is not None:
            summed = summed + sampling_weights.to(summed.dtype).log().clamp(VESPO_LOG_W_MIN, 20.0).sum(-1, keepdim=True)
        log_w = summed.clamp(VESPO_LOG_W_MIN, 20.0)
        nonneg = advantages >= 0

        def per_sign(pos: float, neg: float) -> Tensor:  # in log_w's dtype: a float32 1.7 is not a float64 1.7
            as_tensor = lambda x: torch.tensor(x, dtype=log_w.dtype, device=log_w.device)  # noqa: E731
            return torch.where(nonneg, as_tensor(pos), as_tensor(neg))

        k = per_sign(config.vespo_k_pos, config.vespo_k_neg)
        lam = per_sign(config.vespo_lambda_pos, config.vespo_lambda_neg).clamp(min=1e-4)
        log_phi = lam + k * log_w - lam * log_w.exp()
        return log_phi.exp().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def off_policy_sequence_mask(advantages: Tensor, logps: Tensor, old_logps: Tensor, mask: Tensor,
                             threshold: float) -> Tensor:
    """(B, 1) in mask's dtype, 1 = keep: rows whose advantage is >= 0 or whose mean drift old - logp is <= threshold."""
    drift = torch.nan_to_num(old_logps - logps.detach(), nan=0.0)
    mean_drift = (drift * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (mean_drift <= threshold)).to(mask.dtype)


def high_entropy_mask(entropies: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """(B, T) in mask's dtype, 1 = keep: unmasked tokens whose entropy is >= the (1 - quantile) quantile of the
    unmasked tokens' entropies; all 0 when no token is unmasked."""
    present = mask != 0
    values = entropies.detach()[present]
    if values.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(values, 1.0 - quantile)
    return ((entropies.detach() * mask >= threshold) & present).to(mask.dtype)


def per_token_terms(
    logps: Tensor, log_weights: Tensor, advantages: Tensor, ref_logps: Tensor | None, config: LossConfig,
    vespo_phi: Tensor | None = None, policy_masks: tuple[Tensor, ...] = (),
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Policy term (times each of `policy_masks`, in order) + beta * k3 KL per token. advantages broadcast
    against logps; vespo_phi (B, 1) is vespo's weight (`vespo_gamma_weights`), needed for that loss type only.

    Returns (per_token_loss, coef_1 after the delta clamp (TRL's clip metrics use it), per_token_kl or None;
    per_token_kl is the bias-corrected one when config.use_bias_correction_kl, as TRL logs it).
    """
    ratio = torch.exp(log_weights)
    coef_1 = ratio
    if config.loss_type == "cispo":
        per_token_loss = -torch.clamp(ratio, max=config.epsilon_high).detach() * advantages * logps
    elif config.loss_type == "vespo":
        if vespo_phi is None:
            raise ValueError("loss_type 'vespo' needs its sequence weight vespo_phi (see vespo_gamma_weights)")
        per_token_loss = -vespo_phi.detach() * advantages * logps
    elif config.loss_type == "sapo":
        tau = torch.where(advantages > 0, config.sapo_temperature_pos, config.sapo_temperature_neg)
        per_token_loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages
    else:
        coef_2 = torch.clamp(coef_1, 1 - config.epsilon_low, 1 + config.epsilon_high)
        if config.delta is not None:
            coef_1 = torch.clamp(coef_1, max=config.delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    for policy_mask in policy_masks:
        per_token_loss = per_token_loss * policy_mask
    per_token_kl = None
    if config.beta != 0.0:
        diff = ref_logps - logps
        per_token_kl = torch.exp(diff) - diff - 1
        if config.use_bias_correction_kl:
            per_token_kl = per_token_kl * ratio
        per_token_loss = per_token_loss + config.beta * per_token_kl
    return per_token_loss, coef_1, per_token_kl


def grpo_loss_from_logps(
    logps: Tensor,
    mask: Tensor,
    advantages: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    config: LossConfig,
    entropies: Tensor | None = None,
    counts: GlobalCounts | None = None,
    sampling_weights: Tensor | None = None,
    sampling_logps: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """logps (B, T) differentiable, mask (B, T) float, advantages (B,) -> (loss, metrics of 0-d tensors).

    sampling_weights (B, T) or (B, 1): TRL's vLLM importance-sampling ratio (see the module docstring), or None.
    sampling_logps (B, T): the log-probs the rollouts were sampled with, for the off-policy mask (NaN: unknown).

    entropies (B, T), differentiable: the tokens' entropies, needed when config.needs_entropy (the entropy mask,
    the entropy bonus); whenever given, their masked mean is the metric "entropy".
    counts: the whole batch's counts when these rows are one data-parallel rank's share (see GlobalCounts): the
    loss is then normalized over the whole batch (the metrics stay over these rows: the caller reduces them).
    """
    if config.needs_entropy and entropies is None:
        raise ValueError(f"{', '.join(config.row_level_knobs)} needs the token entropies (entropies=None given)")
    check_counts_supported(config, counts)
    # The mask in at least the log-probs' precision: float64 runs normalize exactly.
    mask = mask.to(torch.promote_types(mask.dtype, logps.dtype))
    adv = advantages.to(logps.dtype).unsqueeze(1)
    old = logps.detach() if old_logps is None else old_logps
    log_weights = log_importance_weights(logps, old, mask, config.importance_sampling_level)
    vespo_phi = None
    if config.loss_type == "vespo":
        vespo_phi = vespo_gamma_weights(adv, logps.detach() - old, mask, config, sampling_weights)
    policy_masks = []  # TRL's order: the off-policy mask, then the entropy mask
    if config.off_policy_mask_threshold is not None:
        behaviour = old if sampling_logps is None else sampling_logps.to(logps.dtype)
        policy_masks.append(off_policy_sequence_mask(adv, logps, behaviour, mask, config.off_policy_mask_threshold))
    entropy_mask = None
    if config.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(entropies, mask, config.top_entropy_quantile)
        policy_masks.append(entropy_mask)
    if sampling_weights is not None and config.loss_type != "vespo":
        policy_masks.append(sampling_weights.to(logps.dtype))
    per_token_loss, coef_1, per_token_kl = per_token_terms(logps, log_weights, adv, ref_logps, config, vespo_phi,
                                                           tuple(policy_masks))
    weights = token_loss_weights(mask, config.loss_type, config.normalizer_length(mask.shape[1]), counts)
    loss = (per_token_loss * weights).sum()
    if config.entropy_coef != 0.0:
        effective = mask if entropy_mask is None else mask * entropy_mask
        # with counts there is no entropy mask (check_counts_supported): the effective tokens are all tokens
        bonus_tokens = effective.sum().clamp(min=1.0) if counts is None else max(1.0, float(counts.tokens))
        loss = loss - config.entropy_coef * (entropies * effective).sum() / bonus_tokens
    token_count = mask.sum().clamp(min=1.0)
    metrics: dict[str, Tensor] = {}
    if per_token_kl is not None:
        metrics["kl"] = ((per_token_kl * mask).sum() / token_count).detach()
    if entropies is not None:
        metrics["entropy"] = ((entropies.detach() * mask).sum() / token_count)

    def masked_mean(flags: Tensor) -> Tensor:
        # At sequence level there is one weight per row: TRL averages over rows, not tokens.
        if flags.shape[1] == 1:
            return flags.float().mean()
        return (flags.float() * mask).sum() / token_count

    with torch.no_grad():
        # TRL's clip metrics: the clipped surrogate's bounds; cispo's cap; none for sapo's soft gate
        if config.loss_type in CLIPPED_LOSS_TYPES:
            low = (coef_1 < 1 - config.epsilon_low) & (adv < 0)
            high = (coef_1 > 1 + config.epsilon_high) & (adv > 0)
            metrics["clip_ratio/low_mean"] = masked_mean(low)
            metrics["clip_ratio/high_mean"] = masked_mean(high)
            metrics["clip_ratio/region_mean"] = masked_mean(low | high)
        elif config.loss_type == "cispo":
            metrics["cispo_clip_ratio"] = masked_mean((coef_1 > config.epsilon_high) & (adv > 0))
        elif config.loss_type == "vespo":
            metrics["vespo/phi_seq_mean"] = vespo_phi.mean()  # one weight per row: a mean over rows, as TRL's
        metrics["advantage_mean"] = advantages.float().mean()
    return loss, metrics


class FusedTokenGRPOLoss(torch.autograd.Function):
    """Token-level GRPO loss over the lm_head with the gradient formed during the forward.

    At token-level importance sampling dL/dlogp_t depends on token t alone, so each chunk's softmax,
    still in memory, is turned straight into dL/dhidden: one lm_head matmul pass fewer than
    forward + recompute-in-backward, and only (N, H) gradients are kept.
    Inputs are the N unmasked tokens, flattened: hidden (N, H), token_ids, advantages, weights
    (normalization), old/ref (N,) or None, the LossConfig, the chunk size in rows and the sampling weights
    (N,) or None (they multiply the policy term, as in `grpo_loss_from_logps`), and whether to also return each
    token's entropy (a metric only, no gradient; `softmax_stats_entropy_`, with a second chunk buffer).
    Returns (loss, logp (N,), entropy (N,) or an empty tensor), the last two non-differentiable.
    FLOPs (N tokens, hidden H, vocab V): 2*N*V*H (logits) + 2*N*V*H (grad_hidden) in the forward, + 2*N*V*H
    (grad_W) only when the lm_head trains; the backward only scales the saved gradients. So 4*N*V*H with a
    frozen head: the floor that the bench's `grpo_loss` workload counts against.
    """

    @staticmethod
    def forward(ctx, hidden, weight, token_ids, advantages, loss_weights, old_logps, ref_logps,
                config: LossConfig, chunk_rows: int, sampling_weights: Tensor | None = None,
                want_entropy: bool = False):
        temperature = config.temperature
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n if want_entropy else 0, dtype=torch.float32, device=hidden.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        buffer = chunk_buffer(n, chunk_rows, weight.shape[0], hidden.device)
        exp_buffer = torch.empty_like(buffer) if want_entropy else None
        for start in range(0, n, chunk_rows):
            part = slice(start, min(start + chunk_rows, n))
            logits = logits_into(buffer[: part.stop - start], hidden[part], weight, temperature)
            if want_entropy:  # from here on `logits` is exp(z - max), as softmax_stats_ leaves it
                chunk_logp, _, sum_exp, entropy[part], logits = softmax_stats_entropy_(
                    logits, token_ids[part], exp_buffer[: part.stop - start])
            else:
                chunk_logp, _, sum_exp = softmax_stats_(logits, token_ids[part])
            logp[part] = chunk_logp
            with torch.enable_grad():
                leaf = chunk_logp.detach().requires_grad_()
                old = leaf.detach() if old_logps is None else old_logps[part]
                ref = None if ref_logps is None else ref_logps[part]
                policy_masks = () if sampling_weights is None else (sampling_weights[part],)
                per_token_loss, _, _ = per_token_terms(leaf, leaf - old, advantages[part], ref, config,
                                                       policy_masks=policy_masks)
                chunk_loss = (per_token_loss * loss_weights[part]).sum()
                (grad_logp,) = torch.autograd.grad(chunk_loss, leaf)
            loss += chunk_loss.detach()
            if grad_hidden is not None or grad_weight is not None:
                probs = logits.div_(sum_exp.unsqueeze(1))
                grad_z = probs_to_grad_(probs, token_ids[part], grad_logp, temperature)
                rows_grad = grad_hidden[part] if grad_hidden is not None else torch.empty_like(hidden[part])
                accumulate_input_grads(grad_z, hidden[part], weight, rows_grad, grad_weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss.to(torch.float32)
        grad_hidden = None if grad_hidden is None else (grad_hidden * scale).to(grad_hidden.dtype)
        grad_weight = None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None


def grpo_loss_ref(
    hidden: Tensor,
    weight: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    advantages: Tensor,
    old_logps: Tensor | None = None,
    ref_logps: Tensor | None = None,
    config: LossConfig = LossConfig(),
    sampling_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Reference: hidden (B, T, H), weight (V, H), ids/mask (B, T), advantages (B,); logits materialized.
    With any of `config.row_level_knobs` it also computes the entropies (autograd through the softmax)."""
    entropies = None
    if config.row_level_knobs:
        logps, entropies = token_logprobs_entropy_ref(hidden, weight, completion_ids, config.temperature)
    else:
        logps = token_logprobs_ref(hidden, weight, completion_ids, config.temperature)
    mask = completion_mask.to(logps.dtype)
    return grpo_loss_from_logps(logps, mask, advantages, old_logps, ref_logps, config, entropies,
                                sampling_weights=sampling_weights)
