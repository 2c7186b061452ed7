"""GRPO loss in Triton: in-kernel group advantages, per-token loss terms and d loss / d logp, fused with the
Triton lm_head log-prob kernels. Same math as `grpo_loss.py` (TRL GRPOTrainer semantics; see its docstring),
which stays the reference (`grpo_loss_ref`, `group_advantages`, `grpo_loss_from_logps`).

Layout: only the N unmasked tokens exist, flattened row by row; `row_offsets` (B+1,) int64 marks where
each completion row starts (row b = tokens [off[b], off[b+1]), off[B] = N). The mask is taken as binary.

Loss kernel, program b = completion row b (grid (B,)):
    A_b       rewards given: mean / Bessel std of b's group (recomputed by each row of the group: G loads),
              A = (r_b - mean) / (std + 1e-4) ("group"), / (batch std + 1e-4) ("batch"), or r_b - mean
              ("none"); A = 0 exactly where the group std is 0 (isclose(std, 0), as the reference).
              advantages given: A_b loaded, the advantage part is skipped.
    w         normalization weight of every token of the row: grpo 1/(B*max(1, n_b)),
              bnpo/dapo 1/max(1, N), dr_grpo 1/(B*max_completion_length).
    token IS: c = exp(logp - old) (old absent: c = 1, dc/dlogp = 1), S(c) = -min(min(c, delta)*A, clip(c)*A)
    seq. IS:  c = exp(mean_t(logp - old)) per row: a first pass over the row sums the log-ratios
    loss      sum_t w * (S + beta * kl_t),  kl_t = exp(ref - logp) - (ref - logp) - 1
              use_bias_correction_kl: kl_t * c (c before the delta clamp). Token level: d/dlogp = c * (dkl + kl)
              (dc/dlogp = c). Sequence level: one c per row, d c / d logp_t = c / n_b, so every token of the row
              also gets c * sum_s(kl_s) / n_b: the first pass over the row sums the KL too.
    dlogp_t   w * (dS/dlog c + beta * (1 - exp(ref - logp)))   both levels: at sequence level
              d log c / d logp_t = 1/n_b and the row's n_b tokens share w, so the factors cancel.
    dS/dlog c follows torch's own gradient conventions so that the result equals autograd on the reference:
    clamp passes the gradient on the closed interval, and min() splits it in half on ties (on-policy
    c = 1 is a tie).
    It writes dlogp (N,) and per-row partial sums (loss, kl, clip flags, A, constant-group flag).
Reduce kernel, one program: sums the B partials in a fixed order (deterministic, no atomics) into the
metrics vector [loss, kl, clip low, clip high, clip region, advantage mean, frac_reward_zero_std].

Fused path (`TritonGRPOLoss`): lm_head forward kernel (logp, lse of the N tokens) -> loss kernel ->
reduce kernel. Saved for backward: hidden, weight, token ids, lse (N,) fp32 and dlogp (N,) fp32.
Backward: the lm_head backward of `token_logprobs_triton.py` (`token_logprobs_triton_grads`) fed with
dlogp * grad_loss: one recompute of each logits tile for the hidden gradient and, only when the lm_head weight
requires grad, the weight gradient.
FLOPs (N tokens, hidden H, vocab V): forward 2*N*V*H (logits; the loss kernel is O(N)); backward 2*N*V*H
(logits recompute) + 2*N*V*H (grad_hidden) + 2*N*V*H (grad_W, only when the lm_head trains). So 6*N*V*H with
a frozen head, against the floor 4*N*V*H (the bench's `grpo_loss` reports both rates).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .grpo_loss import STD_EPS, TRITON_LOSS_TYPES, LossConfig
from .token_logprobs_triton import (
    is_interpreted,
    launch_config,
    token_logprobs_triton_forward,
    token_logprobs_triton_grads,
)

METRIC_NAMES = (
    "loss", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
    "advantage_mean", "frac_reward_zero_std",
)
_NUM_PARTIALS = 8  # per-row: loss, kl, low, high, region, advantage, constant group, (unused)
_LOSS_TYPE_CODE = {"grpo": 0, "bnpo": 1, "dapo": 1, "dr_grpo": 2}  # TRITON_LOSS_TYPES; the others run chunked
assert set(_LOSS_TYPE_CODE) == set(TRITON_LOSS_TYPES)
_ADV_CODE = {"given": 0, "group": 1, "batch": 2, "none": 3}
# Globals read inside the kernels must be tl.constexpr. The reference's std epsilon, and the atol of
# torch.isclose(std, 0), its test for a constant group.
_STD_EPS = tl.constexpr(STD_EPS)
_ZERO_STD_ATOL = tl.constexpr(1e-8)


@triton.jit
def _clipped_surrogate(coef, adv, eps_low, eps_high, delta, HAS_DELTA: tl.constexpr):
    """S = -min(min(c, delta) * A, clamp(c, 1-eps_low, 1+eps_high) * A) and dS/dlog(c), plus clip flags."""
    lo = 1.0 - eps_low
    hi = 1.0 + eps_high
    coef2 = tl.minimum(tl.maximum(coef, lo), hi)
    # d clamp(c) / d log c = c inside the closed interval (torch.clamp passes the gradient at the bounds).
    g2 = tl.where((coef >= lo) & (coef <= hi), coef, 0.0)
    if HAS_DELTA:
        coef1 = tl.minimum(coef, delta)
        g1 = tl.where(coef <= delta, coef, 0.0)
    else:
        coef1 = coef
        g1 = coef
    t1 = coef1 * adv
    t2 = coef2 * adv
    # torch.minimum's gradient: to the smaller input, half to each on a tie.
    g_min = tl.where(t1 < t2, g1, tl.where(t2 < t1, g2, 0.5 * (g1 + g2))) * adv
    # Clip flags (TRL's: on the delta-clamped ratio) as 0/1 floats; products, not `&`: the interpreter
    # cannot `&` a scalar bool with a vector bool.
    low = tl.where(coef1 < lo, 1.0, 0.0) * tl.where(adv < 0.0, 1.0, 0.0)
    high = tl.where(coef1 > hi, 1.0, 0.0) * tl.where(adv > 0.0, 1.0, 0.0)
    return -tl.minimum(t1, t2), -g_min, low, high


@triton.jit
def _grpo_loss_fwd_kernel(
    # pointers
    logp_ptr,  # (N,) fp32 log-probs of the unmasked tokens, row by row
    old_ptr,  # (N,) old log-probs (read when HAS_OLD)
    ref_ptr,  # (N,) reference log-probs (read when HAS_KL)
    row_off_ptr,  # (B+1,) int64 row starts; row_off[B] = N
    adv_in_ptr,  # (B,) rewards (ADV_MODE 1..3) or caller-given advantages (ADV_MODE 0)
    dlogp_ptr,  # (N,) fp32 out: d loss / d logp
    partial_ptr,  # (B, NUM_PARTIALS) fp32 out: per-row sums
    # sizes
    B,
    group_size,
    max_completion_length,
    # loss settings
    beta,
    eps_low,
    eps_high,
    delta,
    # meta-parameters
    ADV_MODE: tl.constexpr,  # 0 given, 1 group, 2 batch, 3 none
    LOSS_TYPE: tl.constexpr,  # 0 grpo, 1 bnpo/dapo, 2 dr_grpo
    SEQ_LEVEL: tl.constexpr,
    HAS_OLD: tl.constexpr,
    HAS_KL: tl.constexpr,  # beta != 0
    KL_CORRECTED: tl.constexpr,  # use_bias_correction_kl: KL times the importance ratio
    HAS_DELTA: tl.constexpr,
    NUM_PARTIALS: tl.constexpr,
    BLOCK: tl.constexpr,  # tokens (and batch rewards) per loop step
    BLOCK_G: tl.constexpr,  # next power of two >= group_size
):
    """Per-row GRPO loss terms; see the module docstring for the math. Program b = completion row b."""
    row = tl.program_id(0).to(tl.int64)

    # ---- advantage of this row (fp32, like the reference on fp32 rewards) ----
    constant = 0.0
    if ADV_MODE == 0:
        adv = tl.load(adv_in_ptr + row).to(tl.float32)
    else:
        g0 = (row // group_size) * group_size
        gi = tl.arange(0, BLOCK_G)
        g_mask = gi < group_size
        r = tl.load(adv_in_ptr + g0 + gi, mask=g_mask, other=0.0).to(tl.float32)
        mean = tl.sum(r, axis=0) / group_size
        dev = tl.where(g_mask, r - mean, 0.0)
        std = tl.sqrt_rn(tl.sum(dev * dev, axis=0) / (group_size - 1))  # Bessel, as torch.std
        adv = tl.load(adv_in_ptr + row).to(tl.float32) - mean
        if ADV_MODE == 1:
            adv = adv / (std + _STD_EPS)
        elif ADV_MODE == 2:
            # Batch std: every program re-reads the B rewards (B is a few hundred; O(B) loads each).
            acc = tl.zeros((BLOCK,), tl.float32)
            for b0 in range(0, B, BLOCK):
                bi = b0 + tl.arange(0, BLOCK)
                acc += tl.load(adv_in_ptr + bi, mask=bi < B, other=0.0).to(tl.float32)
            batch_mean = tl.sum(acc, axis=0) / B
            acc = tl.zeros((BLOCK,), tl.float32)
            for b0 in range(0, B, BLOCK):
                bi = b0 + tl.arange(0, BLOCK)
                x = tl.load(adv_in_ptr + bi, mask=bi < B, other=0.0).to(tl.float32)
                x = tl.where(bi < B, x - batch_mean, 0.0)
                acc += x * x
            batch_std = tl.sqrt_rn(tl.sum(acc, axis=0) / (B - 1))
            adv = adv / (batch_std + _STD_EPS)
        is_constant = std <= _ZERO_STD_ATOL  # torch.isclose(std, 0)
        adv = tl.where(is_constant, 0.0, adv)
        constant = is_constant.to(tl.float32)

    # ---- normalization weight shared by every token of the row ----
    start = tl.load(row_off_ptr + row)
    end = tl.load(row_off_ptr + row + 1)
    count = (end - start).to(tl.float32)
    if LOSS_TYPE == 0:
        w = 1.0 / (tl.maximum(count, 1.0) * B)
    elif LOSS_TYPE == 1:
        w = 1.0 / tl.maximum(tl.load(row_off_ptr + B).to(tl.float32), 1.0)
    else:
        w = 1.0 / B / max_completion_length  # float math: B or the length may arrive as constexpr 1

    # ---- sequence level: one ratio per row, from the mean log-ratio ----
    seq_loss = 0.0
    seq_grad = 0.0
    seq_low = 0.0
    seq_high = 0.0
    seq_coef = 1.0
    seq_kl_share = 0.0  # c * sum_s kl_s / n_b: what the row's ratio adds to each token's KL gradient
    if SEQ_LEVEL:
        # One pass over the row: the summed log-ratio (with old log-probs) and, for the bias-corrected KL, the
        # summed KL; each token's log-prob is read once for both.
        ratio_acc = tl.zeros((BLOCK,), tl.float32)
        kl_row_acc = tl.zeros((BLOCK,), tl.float32)
        if HAS_OLD or (HAS_KL and KL_CORRECTED):
            for t0 in range(start, end, BLOCK):
                offs = t0 + tl.arange(0, BLOCK)
                m = offs < end
                lp = tl.load(logp_ptr + offs, mask=m, other=0.0).to(tl.float32)
                if HAS_OLD:
                    old = tl.load(old_ptr + offs, mask=m, other=0.0).to(tl.float32)
                    ratio_acc += tl.where(m, lp - old, 0.0)
                if HAS_KL and KL_CORRECTED:
                    ref = tl.load(ref_ptr + offs, mask=m, other=0.0).to(tl.float32)
                    diff = ref - lp
                    kl_row_acc += tl.where(m, tl.exp(diff) - diff - 1.0, 0.0)
        log_ratio = tl.sum(ratio_acc, axis=0) / tl.maximum(count, 1.0)  # 0 without old log-probs
        seq_coef = tl.exp(log_ratio)
        seq_kl_share = seq_coef * tl.sum(kl_row_acc, axis=0) / tl.maximum(count, 1.0)
        s_loss, s_grad, s_low, s_high = _clipped_surrogate(
            tl.exp(log_ratio + tl.zeros((1,), tl.float32)), adv, eps_low, eps_high, delta, HAS_DELTA
        )
        seq_loss = tl.sum(s_loss, axis=0)
        seq_grad = tl.sum(s_grad, axis=0)
        seq_low = tl.sum(s_low, axis=0)
        seq_high = tl.sum(s_high, axis=0)

    # ---- per token: loss, d loss / d logp, KL, clip flags ----
    loss_acc = tl.zeros((BLOCK,), tl.float32)
    kl_acc = tl.zeros((BLOCK,), tl.float32)
    low_acc = tl.zeros((BLOCK,), tl.float32)
    high_acc = tl.zeros((BLOCK,), tl.float32)
    region_acc = tl.zeros((BLOCK,), tl.float32)
    for t0 in range(start, end, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        m = offs < end
        lp = tl.load(logp_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if SEQ_LEVEL:
            tok_loss = tl.zeros((BLOCK,), tl.float32) + seq_loss
            tok_grad = tl.zeros((BLOCK,), tl.float32) + seq_grad
            coef = tl.zeros((BLOCK,), tl.float32) + seq_coef
        else:
            if HAS_OLD:
                old = tl.load(old_ptr + offs, mask=m, other=0.0).to(tl.float32)
                coef = tl.exp(lp - old)
            else:  # old = logp.detach(): ratio 1, d ratio / d logp = 1
                coef = tl.zeros((BLOCK,), tl.float32) + 1.0
            tok_loss, tok_grad, low, high = _clipped_surrogate(coef, adv, eps_low, eps_high, delta, HAS_DELTA)
            low_acc += tl.where(m, low, 0.0)
            high_acc += tl.where(m, high, 0.0)
            region_acc += tl.where(m, tl.maximum(low, high), 0.0)
        if HAS_KL:
            ref = tl.load(ref_ptr + offs, mask=m, other=0.0).to(tl.float32)
            diff = ref - lp
            e = tl.exp(diff)
            kl = e - diff - 1.0
            if KL_CORRECTED:
                if SEQ_LEVEL:
                    tok_grad += beta * (coef * (1.0 - e) + seq_kl_share)
                else:
                    tok_grad += beta * coef * (1.0 - e + kl)
                kl = kl * coef
            else:
                tok_grad += beta * (1.0 - e)
            tok_loss += beta * kl
            kl_acc += tl.where(m, kl, 0.0)
        tl.store(dlogp_ptr + offs, w * tok_grad, mask=m)
        loss_acc += tl.where(m, w * tok_loss, 0.0)

    out = partial_ptr + row * NUM_PARTIALS
    tl.store(out + 0, tl.sum(loss_acc, axis=0))
    tl.store(out + 1, tl.sum(kl_acc, axis=0))
    if SEQ_LEVEL:  # one flag per row; the reference averages them over rows, not tokens
        tl.store(out + 2, seq_low)
        tl.store(out + 3, seq_high)
        tl.store(out + 4, tl.maximum(seq_low, seq_high))
    else:
        tl.store(out + 2, tl.sum(low_acc, axis=0))
        tl.store(out + 3, tl.sum(high_acc, axis=0))
        tl.store(out + 4, tl.sum(region_acc, axis=0))
    tl.store(out + 5, adv)
    tl.store(out + 6, constant)


@triton.jit
def _grpo_loss_reduce_kernel(
    partial_ptr,  # (B, NUM_PARTIALS) fp32 per-row sums
    row_off_ptr,  # (B+1,) int64
    loss_ptr,  # () fp32 out
    metrics_ptr,  # (NUM_PARTIALS,) fp32 out, METRIC_NAMES order
    B,
    SEQ_LEVEL: tl.constexpr,
    NUM_PARTIALS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: fixed-order sums of the per-row partials, then the reference's normalizations:
    kl / max(1, N); clip flags / max(1, N) at token level, / B at sequence level; means over B rows."""
    cols = tl.arange(0, NUM_PARTIALS)
    acc = tl.zeros((BLOCK, NUM_PARTIALS), tl.float32)
    for b0 in range(0, B, BLOCK):
        rows = b0 + tl.arange(0, BLOCK).to(tl.int64)
        acc += tl.load(partial_ptr + rows[:, None] * NUM_PARTIALS + cols[None, :], mask=(rows < B)[:, None], other=0.0)
    sums = tl.sum(acc, axis=0)
    tokens = tl.maximum(tl.load(row_off_ptr + B).to(tl.float32), 1.0)
    if SEQ_LEVEL:
        clip_div = B * 1.0
    else:
        clip_div = tokens
    divisor = tl.where(cols == 0, 1.0, tl.where(cols == 1, tokens, tl.where(cols <= 4, clip_div, B * 1.0)))
    metrics = sums / divisor
    tl.store(metrics_ptr + cols, metrics)
    # The loss gets its own tensor: it is the differentiable output, the metrics are not.
    tl.store(loss_ptr, tl.sum(tl.where(cols == 0, metrics, 0.0), axis=0))


# ---------------------------------------------------------------------------------------------
# Launcher of the loss kernels
# ---------------------------------------------------------------------------------------------


def grpo_loss_triton_terms(
    logp: Tensor,
    row_offsets: Tensor,
    rewards: Tensor | None,
    advantages: Tensor | None,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    config: LossConfig,
    group_size: int | None = None,
    max_completion_length: int = 1,
    **launch_overrides,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The loss kernels alone, on given log-probs.

    logp (N,) fp32 (unmasked tokens, row by row), row_offsets (B+1,) int64, rewards (B,) with
    group_size or advantages (B,), old_logps / ref_logps (N,) or None; max_completion_length: the dr_grpo
    normalizer (config.max_completion_length, resolved against the batch by the caller) ->
    (loss 0-d, dlogp (N,) fp32 = d loss / d logp, metrics (7,) in METRIC_NAMES order, advantages (B,) fp32).
    metrics[1] (kl) is 0 when beta == 0 and metrics[6] (frac_reward_zero_std) is 0 with given advantages.
    """
    if (rewards is None) == (advantages is None):
        raise ValueError("pass exactly one of rewards (with group_size) or advantages")
    if logp.dim() != 1 or row_offsets.dim() != 1 or row_offsets.dtype != torch.int64:
        raise ValueError(f"logp must be (N,) and row_offsets (B+1,) int64, got {tuple(logp.shape)}, "
                         f"{tuple(row_offsets.shape)} {row_offsets.dtype}")
    n, batch = logp.shape[0], row_offsets.shape[0] - 1
    per_row = rewards if advantages is None else advantages
    if batch < 1 or per_row.shape != (batch,):
        raise ValueError(f"rewards / advantages must be ({batch},), got {tuple(per_row.shape)}")
    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name} must be ({n},) like logp, got {tuple(t.shape)}")
    if config.loss_type not in TRITON_LOSS_TYPES:
        raise ValueError(f"the Triton GRPO loss covers loss_type {', '.join(TRITON_LOSS_TYPES)}, not "
                         f"{config.loss_type!r}: use the chunked backend")
    if config.row_level_knobs:
        raise ValueError(f"the Triton GRPO loss does not cover {', '.join(config.row_level_knobs)}: use the chunked backend")
    has_kl = config.beta != 0.0
    if has_kl and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps")
    g = group_size or 0
    if rewards is not None:
        if g < 2 or batch % g:
            raise ValueError(f"group_size must be >= 2 and divide the batch {batch}, got {g}")
    device = logp.device
    cfg = launch_config(torch.float32, is_interpreted(), **launch_overrides)
    logp = logp.to(torch.float32).contiguous()
    dlogp = torch.empty_like(logp)
    partials = torch.empty(batch, _NUM_PARTIALS, dtype=torch.float32, device=device)
    metrics = torch.empty(_NUM_PARTIALS, dtype=torch.float32, device=device)
    loss = torch.empty((), dtype=torch.float32, device=device)
    dummy = logp  # never read: the constexpr flags compile the loads away
    adv_mode = _ADV_CODE["given" if rewards is None else config.scale_rewards]
    seq_level = config.importance_sampling_level == "sequence"
    _grpo_loss_fwd_kernel[(batch,)](
        logp,
        dummy if old_logps is None else old_logps.to(torch.float32).contiguous(),
        ref_logps.to(torch.float32).contiguous() if has_kl else dummy,
        row_offsets.contiguous(),
        per_row.to(torch.float32).contiguous(),
        dlogp, partials,
        batch, max(g, 1), max_completion_length,
        float(config.beta), float(config.epsilon_low), float(config.epsilon_high),
        float(config.delta) if config.delta is not None else 0.0,
        ADV_MODE=adv_mode, LOSS_TYPE=_LOSS_TYPE_CODE[config.loss_type], SEQ_LEVEL=seq_level,
        HAS_OLD=old_logps is not None, HAS_KL=has_kl,
        KL_CORRECTED=config.use_bias_correction_kl, HAS_DELTA=config.delta is not None,
        NUM_PARTIALS=_NUM_PARTIALS, BLOCK=cfg["LOSS_BLOCK"],
        BLOCK_G=triton.next_power_of_2(max(g, 2)),
        num_warps=cfg["loss_warps"],
    )
    _grpo_loss_reduce_kernel[(1,)](
        partials, row_offsets, loss, metrics, batch,
        SEQ_LEVEL=seq_level, NUM_PARTIALS=_NUM_PARTIALS, BLOCK=cfg["LOSS_BLOCK"], num_warps=cfg["loss_warps"],
    )
    return loss, dlogp, metrics[: len(METRIC_NAMES)], partials[:, 5]


# ---------------------------------------------------------------------------------------------
# Fused lm_head + loss, forward and backward
# ---------------------------------------------------------------------------------------------


class TritonGRPOLoss(torch.autograd.Function):
    """apply(hidden (N, H), weight (V, H), token_ids (N,), row_offsets (B+1,), rewards (B,) | None,
    advantages (B,) | None, old_logps (N,) | None, ref_logps (N,) | None, config, group_size,
    max_completion_length, launch_overrides | None)
    -> (loss 0-d, logp (N,), metrics (7,), advantages (B,)); only the loss is differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, token_ids, row_offsets, rewards, advantages, old_logps, ref_logps,
                config: LossConfig, group_size: int | None, max_completion_length: int, launch_overrides: dict | None):
        # Chosen once here and stored, so the backward kernels run with the forward's launch settings.
        cfg = launch_config(hidden.dtype, is_interpreted(), **(launch_overrides or {}))
        logp, lse = token_logprobs_triton_forward(hidden, weight, token_ids, config.temperature, **cfg)
        loss, dlogp, metrics, adv = grpo_loss_triton_terms(
            logp, row_offsets, rewards, advantages, old_logps, ref_logps, config, group_size, max_completion_length,
            **cfg
        )
        ctx.save_for_backward(hidden, weight, token_ids, lse, dlogp)
        ctx.temperature = config.temperature
        ctx.launch = cfg
        ctx.mark_non_differentiable(logp, metrics, adv)
        return loss, logp, metrics, adv

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_metrics, _grad_adv):
        hidden, weight, token_ids, lse, dlogp = ctx.saved_tensors
        grad_logp = dlogp * grad_loss.to(torch.float32)
        grad_hidden, grad_weight = token_logprobs_triton_grads(
            grad_logp, hidden, weight, token_ids, lse, ctx.temperature,
            need_hidden=ctx.needs_input_grad[0], need_weight=ctx.needs_input_grad[1], **ctx.launch
        )
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None, None


def grpo_loss_triton(
    hidden: Tensor,
    weight: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    rewards: Tensor | None = None,
    group_size: int | None = None,
    advantages: Tensor | None = None,
    old_logps: Tensor | None = None,
    ref_logps: Tensor | None = None,
    config: LossConfig = LossConfig(),
    **launch_overrides,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Fused Triton GRPO loss. hidden (B, T, H), weight (V, H), completion_ids / completion_mask (B, T),
    rewards (B,) with group_size or advantages (B,), old_logps / ref_logps (B, T) or None.

    Returns (loss, token_logps (B, T) detached and 0 where masked, metrics) with the metric names of
    `onelayer_fast.grpo_loss` (`kl` only when beta != 0, `frac_reward_zero_std` only with rewards).
    Argument checking beyond shapes is the caller's (`onelayer_fast.loss.grpo_loss`).
    """
    if hidden.dim() != 3 or completion_ids.shape != hidden.shape[:2] or completion_mask.shape != completion_ids.shape:
        raise ValueError(f"hidden must be (B, T, H) and completion_ids / completion_mask (B, T), got "
                         f"{tuple(hidden.shape)}, {tuple(completion_ids.shape)}, {tuple(completion_mask.shape)}")
    batch, length = completion_ids.shape
    keep = completion_mask.bool()
    valid = keep.reshape(-1).nonzero().squeeze(1)
    row_offsets = torch.zeros(batch + 1, dtype=torch.int64, device=hidden.device)
    torch.cumsum(keep.sum(1), 0, out=row_offsets[1:])

    def at_valid(per_token: Tensor | None) -> Tensor | None:
        return None if per_token is None else per_token.reshape(-1).index_select(0, valid).float()

    loss, logp, metric_vec, adv = TritonGRPOLoss.apply(
        hidden.reshape(-1, hidden.shape[-1]).index_select(0, valid),
        weight,
        completion_ids.reshape(-1).index_select(0, valid),
        row_offsets,
        None if rewards is None else rewards.to(hidden.device),
        None if advantages is None else advantages.to(hidden.device),
        at_valid(old_logps),
        at_valid(ref_logps) if config.beta != 0.0 else None,
        config,
        group_size,
        config.normalizer_length(length),
        launch_overrides or None,
    )
    metrics = {name: metric_vec[i] for i, name in enumerate(METRIC_NAMES) if name != "loss"}
    if config.beta == 0.0:
        del metrics["kl"]
    if rewards is None:
        del metrics["frac_reward_zero_std"]
    token_logps = torch.zeros(batch * length, dtype=torch.float32, device=hidden.device)
    return loss, token_logps.index_put_((valid,), logp).view(batch, length), metrics
