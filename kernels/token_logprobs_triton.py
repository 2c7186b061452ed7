"""Per-token log-probabilities through the lm_head in Triton, without a (tokens, vocab) tensor.

Same math as `token_logprobs.py` (see its docstring); for a row h (H,), lm_head weight W (V, H),
target y and temperature tau:
    z    = W @ h / tau            computed one (BLOCK_T, BLOCK_V) tile at a time, never stored
    lse  = log(sum_v exp(z_v))    online max / sum-exp over the vocab tiles, fp32
    logp = z_y - lse
    dL/dh = sum_v g * (onehot(y)_v - exp(z_v - lse)) / tau * W_v     (weight gradient: not here)

Precision: the softmax statistics and every elementwise op are fp32. The matmul operands are fp32
(with IEEE fp32 `tl.dot`, not TF32) for fp32 inputs and under the interpreter, and the input dtype
(bf16 / fp16, fp32 accumulation) for half-precision inputs on a GPU, like the PyTorch paths.

Token ids are not range-checked (that would need a device sync): an id outside [0, V) gives
logp = -lse instead of an error.

The kernels run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before this
module was imported (`triton.jit` decides at decoration time whether a kernel is interpreted).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr, rows, row_mask, cols, col_mask, H, stride_hn, stride_wv, temperature,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """(BLOCK_T, BLOCK_V) fp32 tile of z = hidden[rows] @ W[cols]^T / tau, accumulated over H tiles."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
    for h0 in range(0, H, BLOCK_H):
        ks = h0 + tl.arange(0, BLOCK_H)
        k_mask = ks < H
        a = tl.load(
            hidden_ptr + rows[:, None] * stride_hn + ks[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        b = tl.load(  # W tile transposed: (BLOCK_H, BLOCK_V)
            weight_ptr + cols[None, :] * stride_wv + ks[:, None],
            mask=k_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc / temperature


@triton.jit
def _token_logprobs_fwd_kernel(
    hidden_ptr,  # (N, H), row stride stride_hn, unit column stride
    weight_ptr,  # (V, H), row stride stride_wv, unit column stride
    token_ids_ptr,  # (N,) int32 / int64
    logp_ptr,  # (N,) fp32 out
    lse_ptr,  # (N,) fp32 out
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    temperature,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Forward. Program t owns token rows [t*BLOCK_T, (t+1)*BLOCK_T).

    For each vocab tile [v0, v0+BLOCK_V):
        z    = (hidden_rows @ W[v0:v0+BLOCK_V].T) / tau      (BLOCK_T, BLOCK_V), fp32 accumulate over H tiles
        m'   = max(m, max_v z)
        s    = s * exp(m - m') + sum_v exp(z - m')            (online sum-exp, fp32)
        zy  += z[:, y - v0] when y falls in the tile
    then lse = m + log(s), logp = zy - lse. Columns v >= V are -inf (contribute exp(.) = 0); rows
    t >= N compute on zeros and are not stored.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64: rows * stride_hn can pass 2^31
    row_mask = rows < N
    targets = tl.load(token_ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)

    run_max = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_T,), tl.float32)
    target_logit = tl.zeros((BLOCK_T,), tl.float32)

    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)  # int64: cols * stride_wv passes 2^31 at V*H > 2^31
        col_mask = cols < V
        z = _logits_tile(hidden_ptr, weight_ptr, rows, row_mask, cols, col_mask, H, stride_hn, stride_wv,
                         temperature, BLOCK_T, BLOCK_V, BLOCK_H, DOT_FP32)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        # First tile: run_max = -inf, new_max finite (every tile has >= 1 valid column) -> factor 0.
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)

    lse = run_max + tl.log(run_sum)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(logp_ptr + rows, target_logit - lse, mask=row_mask)


@triton.jit
def _token_logprobs_bwd_kernel(
    grad_logp_ptr,  # (N,) upstream gradient, any float dtype
    hidden_ptr,  # (N, H)
    weight_ptr,  # (V, H)
    token_ids_ptr,  # (N,)
    lse_ptr,  # (N,) fp32 from the forward
    grad_hidden_ptr,  # (N, H) out, hidden's dtype, row stride stride_gn
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    stride_gn,
    temperature,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HO: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Backward for the hidden rows. Program (t, j) owns rows [t*BLOCK_T, ...) and output columns
    [j*BLOCK_HO, (j+1)*BLOCK_HO) of grad_hidden.

    For each vocab tile [v0, v0+BLOCK_V):
        z      = (hidden_rows @ W[v0:v0+BLOCK_V].T) / tau      recomputed over all of H
        p      = exp(z - lse)                                   softmax, from the saved lse
        gz     = g * (onehot(y) - p) / tau                      (BLOCK_T, BLOCK_V) = dL/dz / tau
        out   += gz @ W[v0:v0+BLOCK_V, j*BLOCK_HO : (j+1)*BLOCK_HO]
    grad_hidden[rows, cols_j] = out.

    Cost: every one of the cdiv(H, BLOCK_HO) column programs of a row block recomputes that block's
    logits over the full H, so the logits matmul (2*N*V*H flops) is done cdiv(H, BLOCK_HO) times
    (7x at H=896, BLOCK_HO=128) on top of the 2*N*V*H of the output product, and W is streamed
    cdiv(H, BLOCK_HO) + 1 times per row block. Simple and correct; a faster version keeps the whole
    (BLOCK_T, H) output in one program or writes gz tiles once and reuses them.
    """
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < N
    out_cols = pid_h * BLOCK_HO + tl.arange(0, BLOCK_HO)
    out_mask = out_cols < H

    targets = tl.load(token_ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    # Rows beyond N get g = 0, so their gz is 0 and nothing they compute is stored anyway.
    scale = tl.load(grad_logp_ptr + rows, mask=row_mask, other=0.0).to(tl.float32) / temperature

    out = tl.zeros((BLOCK_T, BLOCK_HO), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
        z = _logits_tile(hidden_ptr, weight_ptr, rows, row_mask, cols, col_mask, H, stride_hn, stride_wv,
                         temperature, BLOCK_T, BLOCK_V, BLOCK_H, DOT_FP32)
        probs = tl.exp(z - lse[:, None])
        onehot = (cols[None, :] == targets[:, None]).to(tl.float32)
        grad_z = scale[:, None] * (onehot - probs)
        # Padded columns have z = 0, so p = exp(-lse) != 0; their W rows load as 0 below, so this mask is
        # redundant for the result, kept so that grad_z itself is exact (cheap: one select per tile).
        grad_z = tl.where(col_mask[None, :], grad_z, 0.0)
        w = tl.load(  # (BLOCK_V, BLOCK_HO)
            weight_ptr + cols[:, None] * stride_wv + out_cols[None, :],
            mask=col_mask[:, None] & out_mask[None, :],
            other=0.0,
        )
        if DOT_FP32:
            out = tl.dot(grad_z, w.to(tl.float32), out, input_precision="ieee")
        else:
            # Like the PyTorch path: dL/dz in the weight's dtype, fp32 accumulation.
            out = tl.dot(grad_z.to(w.dtype), w, out)

    tl.store(
        grad_hidden_ptr + rows[:, None] * stride_gn + out_cols[None, :],
        out.to(grad_hidden_ptr.dtype.element_ty),
        mask=row_mask[:, None] & out_mask[None, :],
    )


# ---------------------------------------------------------------------------------------------
# Launch settings: the one place that picks block sizes and warps.
# ---------------------------------------------------------------------------------------------

_LAUNCH_KEYS = ("BLOCK_T", "BLOCK_V", "BLOCK_H", "BLOCK_HO", "num_warps", "num_stages")


def is_interpreted() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_token_logprobs_fwd_kernel, InterpretedFunction)


def launch_config(dtype: torch.dtype, interpreted: bool | None = None, **overrides) -> dict:
    """Block sizes and warps for both kernels; `overrides` replace single entries (tests use small blocks).

    GPU defaults are a first guess, not tuned on hardware yet. Under the interpreter every program is
    run in numpy, so small tiles keep the padded work (and test time) down.
    """
    unknown = set(overrides) - set(_LAUNCH_KEYS)
    if unknown:
        raise TypeError(f"unknown launch settings {sorted(unknown)}; expected a subset of {_LAUNCH_KEYS}")
    if interpreted is None:
        interpreted = is_interpreted()
    if interpreted:
        config = dict(BLOCK_T=16, BLOCK_V=32, BLOCK_H=16, BLOCK_HO=16, num_warps=1, num_stages=1)
    elif dtype == torch.float32:
        # IEEE fp32 dot runs on FMA units, not tensor cores: smaller tiles.
        config = dict(BLOCK_T=32, BLOCK_V=64, BLOCK_H=32, BLOCK_HO=64, num_warps=4, num_stages=2)
    else:
        config = dict(BLOCK_T=64, BLOCK_V=128, BLOCK_H=64, BLOCK_HO=128, num_warps=8, num_stages=3)
    config.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("BLOCK_T", "BLOCK_V", "BLOCK_H", "BLOCK_HO"):
        value = config[key]
        if not isinstance(value, int) or value < 16 or value & (value - 1):
            raise ValueError(f"{key} must be a power of two >= 16 (tl.dot tile), got {value!r}")
    return config


def _dot_fp32(dtype: torch.dtype, interpreted: bool) -> bool:
    # The interpreter's half-precision arithmetic is not faithful: upcast there as well.
    return interpreted or dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _check_inputs(
    hidden: Tensor, weight: Tensor, token_ids: Tensor, temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate and flatten: hidden (..., H), weight (V, H), token_ids (...) -> (N, H), (V, H), (N,), contiguous."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (vocab, hidden), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden (..., H) must end in the weight's hidden size {weight.shape[1]}, got shape {tuple(hidden.shape)}"
        )
    if tuple(token_ids.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"token_ids shape {tuple(token_ids.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    if token_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"token_ids must be int32 or int64, got {token_ids.dtype}")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    devices = {hidden.device, weight.device, token_ids.device}
    if len(devices) != 1:
        raise ValueError(f"hidden, weight and token_ids must be on one device, got {sorted(map(str, devices))}")
    if hidden.device.type != "cuda" and not is_interpreted():
        raise RuntimeError(
            f"Triton token_logprobs needs CUDA tensors (got {hidden.device}), or TRITON_INTERPRET=1 set "
            "before this module is imported"
        )
    if weight.shape[0] == 0:
        raise ValueError("vocab size must be > 0")
    h = weight.shape[1]
    return hidden.reshape(-1, h).contiguous(), weight.contiguous(), token_ids.reshape(-1).contiguous()


def token_logprobs_triton_forward(
    hidden: Tensor, weight: Tensor, token_ids: Tensor, temperature: float = 1.0, **launch_overrides
) -> tuple[Tensor, Tensor]:
    """hidden (..., H), weight (V, H), token_ids (...) -> (logp (...) fp32, lse (...) fp32)."""
    out_shape = token_ids.shape
    hidden2, weight2, ids = _check_inputs(hidden, weight, token_ids, temperature)
    n, h = hidden2.shape
    v = weight2.shape[0]
    logp = torch.empty(n, dtype=torch.float32, device=hidden2.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden2.device)
    if n > 0:
        interpreted = is_interpreted()
        cfg = launch_config(hidden2.dtype, interpreted, **launch_overrides)
        grid = (triton.cdiv(n, cfg["BLOCK_T"]),)
        _token_logprobs_fwd_kernel[grid](
            hidden2, weight2, ids, logp, lse,
            n, v, h, hidden2.stride(0), weight2.stride(0), float(temperature),
            BLOCK_T=cfg["BLOCK_T"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"],
            DOT_FP32=_dot_fp32(hidden2.dtype, interpreted),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return logp.view(out_shape), lse.view(out_shape)


def token_logprobs_triton_backward(
    grad_logp: Tensor,
    hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    lse: Tensor,
    temperature: float = 1.0,
    **launch_overrides,
) -> Tensor:
    """grad_logp (...), hidden (..., H), weight (V, H), token_ids (...), lse (...) -> grad_hidden, hidden's shape and dtype."""
    hidden2, weight2, ids = _check_inputs(hidden, weight, token_ids, temperature)
    n, h = hidden2.shape
    v = weight2.shape[0]
    for name, t in (("grad_logp", grad_logp), ("lse", lse)):
        if t.numel() != n or t.device != hidden2.device:
            raise ValueError(
                f"{name} must have one entry per token ({n}) on {hidden2.device}, "
                f"got shape {tuple(t.shape)} on {t.device}"
            )
    # contiguous(): an upstream gradient of a sum() is an expanded, stride-0 tensor.
    g = grad_logp.reshape(-1).contiguous()
    lse_flat = lse.reshape(-1).to(torch.float32).contiguous()
    grad_hidden = torch.empty_like(hidden2)
    if n > 0:
        interpreted = is_interpreted()
        cfg = launch_config(hidden2.dtype, interpreted, **launch_overrides)
        grid = (triton.cdiv(n, cfg["BLOCK_T"]), triton.cdiv(h, cfg["BLOCK_HO"]))
        _token_logprobs_bwd_kernel[grid](
            g, hidden2, weight2, ids, lse_flat, grad_hidden,
            n, v, h, hidden2.stride(0), weight2.stride(0), grad_hidden.stride(0), float(temperature),
            BLOCK_T=cfg["BLOCK_T"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"], BLOCK_HO=cfg["BLOCK_HO"],
            DOT_FP32=_dot_fp32(hidden2.dtype, interpreted),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return grad_hidden.view(hidden.shape)


class TritonTokenLogprobs(torch.autograd.Function):
    """Autograd wrapper: gradient for hidden only. apply(hidden, weight, token_ids, temperature, launch_overrides)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, token_ids: Tensor, temperature: float, launch_overrides: dict | None):
        if ctx.needs_input_grad[1]:
            raise NotImplementedError(
                "TritonTokenLogprobs computes the gradient of hidden only; the lm_head weight requires grad. "
                "Detach / freeze the weight, or use kernels.token_logprobs.chunked_token_logprobs for dL/dW."
            )
        overrides = dict(launch_overrides or {})
        logp, lse = token_logprobs_triton_forward(hidden, weight, token_ids, temperature, **overrides)
        ctx.save_for_backward(hidden, weight, token_ids, lse)
        ctx.temperature = float(temperature)
        ctx.launch_overrides = overrides
        return logp

    @staticmethod
    def backward(ctx, grad_logp: Tensor):
        hidden, weight, token_ids, lse = ctx.saved_tensors
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            grad_hidden = token_logprobs_triton_backward(
                grad_logp, hidden, weight, token_ids, lse, ctx.temperature, **ctx.launch_overrides
            )
        return grad_hidden, None, None, None, None


def token_logprobs_triton(
    hidden: Tensor, weight: Tensor, token_ids: Tensor, temperature: float = 1.0, **launch_overrides
) -> Tensor:
    """hidden (..., H), weight (V, H), token_ids (...) -> logp (...) fp32, differentiable w.r.t. hidden."""
    return TritonTokenLogprobs.apply(hidden, weight, token_ids, float(temperature), launch_overrides or None)
