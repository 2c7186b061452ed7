"""Per-token log-probabilities through the lm_head in Triton, without a (tokens, vocab) tensor.

Same math as `token_logprobs.py` (see its docstring); for a row h (H,), lm_head weight W (V, H),
target y and temperature tau:
    z    = W @ h / tau            computed one (BLOCK_T, BLOCK_V) tile at a time, never stored
    lse  = log(sum_v exp(z_v))    online max / sum-exp over the vocab tiles, fp32
    logp = z_y - lse
    dL/dh = sum_v g * (onehot(y)_v - exp(z_v - lse)) / tau * W_v
    dL/dW_v = sum_n g_n * (onehot(y_n)_v - exp(z_nv - lse_n)) / tau * h_n     (only when W requires grad)

Entry point: `token_logprobs_triton` calls the custom op `torch.ops.onelayer_fast.token_logprobs`
(registered below with a fake implementation and an autograd formula), so `torch.compile` traces it
as one opaque node instead of breaking the graph on the Triton launches. The backward is the custom op
`onelayer_fast::token_logprobs_backward`, which runs the hidden-gradient kernel and, only when the
weight requires grad, the separate weight-gradient accumulation kernel.

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


@triton.jit
def _token_logprobs_bwd_weight_kernel(
    grad_logp_ptr,  # (N,) upstream gradient, any float dtype
    hidden_ptr,  # (N, H)
    weight_ptr,  # (V, H)
    token_ids_ptr,  # (N,)
    lse_ptr,  # (N,) fp32 from the forward
    grad_weight_ptr,  # (V, H) out, the weight's dtype, row stride stride_gwv
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    stride_gwv,
    temperature,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HO: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Weight gradient. Program (v, j) owns vocab rows [v*BLOCK_V, ...) and columns [j*BLOCK_HO, ...)
    of grad_weight and loops over all N token rows, so each output tile is written once: no atomics,
    deterministic, fp32 accumulation over tokens.

    For each token tile [t0, t0+BLOCK_T):
        z    = (hidden[t0:t0+BLOCK_T] @ W[v-tile].T) / tau        recomputed over all of H
        gz   = g * (onehot(y) - exp(z - lse)) / tau               (BLOCK_T, BLOCK_V)
        out += gz^T @ hidden[t0:t0+BLOCK_T, j-tile]                (BLOCK_V, BLOCK_HO)
    Same recompute cost as the hidden-gradient kernel (the logits are rebuilt cdiv(H, BLOCK_HO) times).
    """
    pid_v = tl.program_id(0)
    pid_h = tl.program_id(1)
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)  # int64: cols * stride_wv can pass 2^31
    col_mask = cols < V
    out_cols = pid_h * BLOCK_HO + tl.arange(0, BLOCK_HO)
    out_mask = out_cols < H

    out = tl.zeros((BLOCK_V, BLOCK_HO), tl.float32)
    for t0 in range(0, N, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        row_mask = rows < N
        targets = tl.load(token_ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        # Rows beyond N get g = 0: their gz is 0 whatever their (zero-input) logits are.
        scale = tl.load(grad_logp_ptr + rows, mask=row_mask, other=0.0).to(tl.float32) / temperature
        z = _logits_tile(hidden_ptr, weight_ptr, rows, row_mask, cols, col_mask, H, stride_hn, stride_wv,
                         temperature, BLOCK_T, BLOCK_V, BLOCK_H, DOT_FP32)
        probs = tl.exp(z - lse[:, None])
        onehot = (cols[None, :] == targets[:, None]).to(tl.float32)
        grad_z = scale[:, None] * (onehot - probs)  # padded columns are never stored
        h = tl.load(  # (BLOCK_T, BLOCK_HO)
            hidden_ptr + rows[:, None] * stride_hn + out_cols[None, :],
            mask=row_mask[:, None] & out_mask[None, :],
            other=0.0,
        )
        if DOT_FP32:
            out = tl.dot(tl.trans(grad_z), h.to(tl.float32), out, input_precision="ieee")
        else:
            out = tl.dot(tl.trans(grad_z.to(h.dtype)), h, out)

    tl.store(
        grad_weight_ptr + cols[:, None] * stride_gwv + out_cols[None, :],
        out.to(grad_weight_ptr.dtype.element_ty),
        mask=col_mask[:, None] & out_mask[None, :],
    )


# ---------------------------------------------------------------------------------------------
# Launch settings: the one place that picks block sizes and warps.
# ---------------------------------------------------------------------------------------------

# Autotune key: (input dtype, interpreted). No @triton.autotune: the interpreter rejects more than one
# config. The GPU values are starting points; README.md (Performance) says what has been tuned where.
_LAUNCH_KEYS = ("BLOCK_T", "BLOCK_V", "BLOCK_H", "BLOCK_HO", "num_warps", "num_stages", "LOSS_BLOCK", "loss_warps")


def is_interpreted() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_token_logprobs_fwd_kernel, InterpretedFunction)


def launch_config(dtype: torch.dtype, interpreted: bool | None = None, **overrides) -> dict:
    """Launch settings of every lm_head and GRPO-loss kernel; `overrides` replace single entries (tests use
    small blocks).

    BLOCK_T / BLOCK_V / BLOCK_H / BLOCK_HO, num_warps, num_stages: the three lm_head kernels (forward,
    hidden gradient, weight gradient). LOSS_BLOCK, loss_warps: the per-row GRPO loss kernel
    (`kernels/grpo_loss_triton.py`), which walks one completion row LOSS_BLOCK tokens at a time.
    The GPU values are starting points for tuning. Under the interpreter every program is run in numpy, so
    small tiles keep the padded work (and test time) down.
    """
    unknown = set(overrides) - set(_LAUNCH_KEYS)
    if unknown:
        raise TypeError(f"unknown launch settings {sorted(unknown)}; expected a subset of {_LAUNCH_KEYS}")
    if interpreted is None:
        interpreted = is_interpreted()
    if interpreted:
        config = dict(BLOCK_T=16, BLOCK_V=32, BLOCK_H=16, BLOCK_HO=16, num_warps=1, num_stages=1,
                      LOSS_BLOCK=16, loss_warps=1)
    elif dtype == torch.float32:
        # IEEE fp32 dot runs on FMA units, not tensor cores: smaller tiles.
        config = dict(BLOCK_T=32, BLOCK_V=64, BLOCK_H=32, BLOCK_HO=64, num_warps=4, num_stages=2,
                      LOSS_BLOCK=1024, loss_warps=4)
    else:
        config = dict(BLOCK_T=64, BLOCK_V=128, BLOCK_H=64, BLOCK_HO=128, num_warps=8, num_stages=3,
                      LOSS_BLOCK=1024, loss_warps=4)
    config.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("BLOCK_T", "BLOCK_V", "BLOCK_H", "BLOCK_HO", "LOSS_BLOCK"):
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


def _check_backward_inputs(n: int, device: torch.device, grad_logp: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    for name, t in (("grad_logp", grad_logp), ("lse", lse)):
        if t.numel() != n or t.device != device:
            raise ValueError(
                f"{name} must have one entry per token ({n}) on {device}, got shape {tuple(t.shape)} on {t.device}"
            )
    # contiguous(): an upstream gradient of a sum() is an expanded, stride-0 tensor.
    return grad_logp.reshape(-1).contiguous(), lse.reshape(-1).to(torch.float32).contiguous()


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
    g, lse_flat = _check_backward_inputs(n, hidden2.device, grad_logp, lse)
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


def token_logprobs_triton_backward_weight(
    grad_logp: Tensor,
    hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    lse: Tensor,
    temperature: float = 1.0,
    **launch_overrides,
) -> Tensor:
    """grad_logp (...), hidden (..., H), weight (V, H), token_ids (...), lse (...) -> grad_weight (V, H), weight's dtype.

    Run only when the lm_head weight requires grad: it streams every token row once per output tile.
    """
    hidden2, weight2, ids = _check_inputs(hidden, weight, token_ids, temperature)
    n, h = hidden2.shape
    v = weight2.shape[0]
    g, lse_flat = _check_backward_inputs(n, hidden2.device, grad_logp, lse)
    if n == 0:
        return torch.zeros_like(weight2)
    grad_weight = torch.empty_like(weight2)
    interpreted = is_interpreted()
    cfg = launch_config(hidden2.dtype, interpreted, **launch_overrides)
    grid = (triton.cdiv(v, cfg["BLOCK_V"]), triton.cdiv(h, cfg["BLOCK_HO"]))
    _token_logprobs_bwd_weight_kernel[grid](
        g, hidden2, weight2, ids, lse_flat, grad_weight,
        n, v, h, hidden2.stride(0), weight2.stride(0), grad_weight.stride(0), float(temperature),
        BLOCK_T=cfg["BLOCK_T"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"], BLOCK_HO=cfg["BLOCK_HO"],
        DOT_FP32=_dot_fp32(hidden2.dtype, interpreted),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return grad_weight


# ---------------------------------------------------------------------------------------------
# torch.library custom ops: what `token_logprobs_triton` calls, so torch.compile sees one opaque node.
# Launch overrides travel as a list of ints in _LAUNCH_KEYS order (0 = default): an op schema has no dict.
# ---------------------------------------------------------------------------------------------


def _launch_list(overrides: dict) -> list[int]:
    unknown = set(overrides) - set(_LAUNCH_KEYS)
    if unknown:
        raise TypeError(f"unknown launch settings {sorted(unknown)}; expected a subset of {_LAUNCH_KEYS}")
    return [int(overrides.get(key) or 0) for key in _LAUNCH_KEYS]


def _launch_dict(launch: list[int]) -> dict:
    return {key: value for key, value in zip(_LAUNCH_KEYS, launch) if value}


@torch.library.custom_op("onelayer_fast::token_logprobs", mutates_args=())
def _token_logprobs_op(
    hidden: Tensor, weight: Tensor, token_ids: Tensor, temperature: float, launch: list[int]
) -> tuple[Tensor, Tensor]:
    """(logp, lse), both token_ids' shape, fp32. lse is saved for the backward and is not differentiable."""
    return token_logprobs_triton_forward(hidden, weight, token_ids, temperature, **_launch_dict(launch))


@_token_logprobs_op.register_fake
def _token_logprobs_fake(hidden, weight, token_ids, temperature, launch):
    return (hidden.new_empty(token_ids.shape, dtype=torch.float32),
            hidden.new_empty(token_ids.shape, dtype=torch.float32))


@torch.library.custom_op("onelayer_fast::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward_op(
    grad_logp: Tensor, hidden: Tensor, weight: Tensor, token_ids: Tensor, lse: Tensor, temperature: float,
    launch: list[int], need_hidden: bool, need_weight: bool,
) -> tuple[Tensor, Tensor]:
    """(grad_hidden, grad_weight); a gradient that is not needed comes back as an empty tensor."""
    launch_overrides = _launch_dict(launch)
    grad_hidden = (
        token_logprobs_triton_backward(grad_logp, hidden, weight, token_ids, lse, temperature, **launch_overrides)
        if need_hidden else hidden.new_empty(0)
    )
    grad_weight = (
        token_logprobs_triton_backward_weight(grad_logp, hidden, weight, token_ids, lse, temperature, **launch_overrides)
        if need_weight else weight.new_empty(0)
    )
    return grad_hidden, grad_weight


@_token_logprobs_backward_op.register_fake
def _token_logprobs_backward_fake(grad_logp, hidden, weight, token_ids, lse, temperature, launch, need_hidden, need_weight):
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)))


def _token_logprobs_setup_context(ctx, inputs, output):
    hidden, weight, token_ids, temperature, launch = inputs
    _, lse = output
    ctx.save_for_backward(hidden, weight, token_ids, lse)
    ctx.temperature = temperature
    ctx.launch = launch
    ctx.mark_non_differentiable(lse)


def _token_logprobs_backward(ctx, grad_logp, _grad_lse):
    need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_logp is None or not (need_hidden or need_weight):
        return None, None, None, None, None
    hidden, weight, token_ids, lse = ctx.saved_tensors
    grad_hidden, grad_weight = torch.ops.onelayer_fast.token_logprobs_backward(
        grad_logp, hidden, weight, token_ids, lse, ctx.temperature, ctx.launch, need_hidden, need_weight
    )
    return (grad_hidden if need_hidden else None), (grad_weight if need_weight else None), None, None, None


torch.library.register_autograd(
    "onelayer_fast::token_logprobs", _token_logprobs_backward, setup_context=_token_logprobs_setup_context
)


def token_logprobs_triton(
    hidden: Tensor, weight: Tensor, token_ids: Tensor, temperature: float = 1.0, **launch_overrides
) -> Tensor:
    """hidden (..., H), weight (V, H), token_ids (...) -> logp (...) fp32, differentiable w.r.t. hidden and,
    when it requires grad, the weight (separate accumulation kernel)."""
    logp, _ = torch.ops.onelayer_fast.token_logprobs(hidden, weight, token_ids, float(temperature), _launch_list(launch_overrides))
    return logp
