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
`onelayer_fast::token_logprobs_backward` (`token_logprobs_triton_grads`): one kernel that rebuilds each
logits tile once and forms from it the hidden gradient and, only when the weight requires grad, the weight
gradient, summed over tiles by fp32 atomics or by a deterministic two-stage reduction.

FLOPs (N tokens, vocab V, hidden H): forward 2*N*V*H; backward 2*N*V*H (logits recompute) + 2*N*V*H
(grad_hidden) + 2*N*V*H (grad_W, only when the weight trains).

Precision: the softmax statistics and every elementwise op are fp32. The matmul operands are fp32
(with IEEE fp32 `tl.dot`, not TF32) for fp32 inputs and under the interpreter, and the input dtype
(bf16 / fp16, fp32 accumulation) for half-precision inputs on a GPU, like the PyTorch paths.

Token ids are not range-checked (that would need a device sync): an id outside [0, V) gives
logp = -lse instead of an error.

The kernels run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before this
module was imported (`triton.jit` decides at decoration time whether a kernel is interpreted).
"""
from __future__ import annotations

import math

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
    """Forward, 2*N*V*H FLOPs. Program t owns token rows [t*BLOCK_T, (t+1)*BLOCK_T).

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
    grad_hidden_ptr,  # fp32: the (N, H) gradient (ATOMIC) or a (slabs, rows, H) scratch of partial sums
    grad_weight_ptr,  # fp32: the (V, H) gradient (ATOMIC) or a (slabs, rows, H) scratch of partial sums
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    stride_gh_slab,
    stride_gh_row,
    stride_gw_slab,
    stride_gw_row,
    t_block0,
    v_block0,
    temperature,
    filter_eps,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HO: tl.constexpr,
    DOT_FP32: tl.constexpr,
    HIDDEN_GRAD: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr,
    ATOMIC: tl.constexpr,
    FILTER: tl.constexpr,
):
    """Backward, one logits tile per program. Program (i, j) owns token block t = t_block0 + i and vocab
    block v = v_block0 + j:
        z   = (hidden[t] @ W[v].T) / tau                  (BLOCK_T, BLOCK_V), over H in BLOCK_H steps, once
        dz  = g * (onehot(y) - exp(z - lse)) / tau        fp32, from the forward's lse
        for each BLOCK_HO-column chunk c of H:
            grad_hidden[t, c] += dz   @ W[v, c]           (HIDDEN_GRAD)
            grad_W[v, c]      += dz.T @ hidden[t, c]      (WEIGHT_GRAD)

    FLOPs over the grid: 2*N*V*H (logits) + 2*N*V*H (grad_hidden) + 2*N*V*H (grad_W, only when it trains),
    i.e. the forward's 2*N*V*H recomputed once plus the two gradient products; no (N, V) tensor.

    Reduction over the other axis (vocab blocks for grad_hidden, token blocks for grad_W):
      ATOMIC: fp32 atomic adds into the (N, H) / (V, H) gradients (t_block0 = v_block0 = 0, slab strides 0);
        the summation order, so the last bits, can change from run to run.
      otherwise: program (i, j) stores its grad_hidden part in slab j and its grad_W part in slab i of a
        scratch, rows local to the launch (i*BLOCK_T + r, j*BLOCK_V + c); the launcher sums the slabs in a
        fixed order. Every element of a slab is written (masked edges aside), so the scratch needs no zeroing
        unless FILTER may skip a tile.
    Each program writes (BLOCK_T + BLOCK_V) * H fp32 values either way: at realistic sizes this output traffic,
    not the FLOPs, is what large tiles amortize.

    FILTER (Cut Cross-Entropy's gradient filtering): a tile in which every |onehot(y) - softmax| is below
    filter_eps skips both gradient products. The dropped dz entries are below g * filter_eps / tau each.
    """
    pid_t = tl.program_id(0)
    pid_v = tl.program_id(1)
    # int64: products with H pass 2^31. t_block0 / v_block0 enter through the program id because an int
    # argument equal to 1 arrives as a constexpr (Triton specializes it), which has no .to().
    local_rows = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    local_cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    rows = (t_block0 + pid_t).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = (v_block0 + pid_v).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V

    targets = tl.load(token_ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    scale = tl.load(grad_logp_ptr + rows, mask=row_mask, other=0.0).to(tl.float32) / temperature

    z = _logits_tile(hidden_ptr, weight_ptr, rows, row_mask, cols, col_mask, H, stride_hn, stride_wv,
                     temperature, BLOCK_T, BLOCK_V, BLOCK_H, DOT_FP32)
    onehot = (cols[None, :] == targets[:, None]).to(tl.float32)
    # Padded rows (g = 0) and columns (masked here) contribute exactly 0 to either product.
    residual = tl.where(row_mask[:, None] & col_mask[None, :], onehot - tl.exp(z - lse[:, None]), 0.0)
    grad_z = scale[:, None] * residual
    if DOT_FP32:
        grad_z_op = grad_z
    else:
        # Like the PyTorch path: dL/dz in the input dtype, fp32 accumulation.
        grad_z_op = grad_z.to(hidden_ptr.dtype.element_ty)

    keep = True
    if FILTER:
        keep = tl.max(tl.max(tl.abs(residual), axis=1), axis=0) >= filter_eps
    if keep:
        gh_base = grad_hidden_ptr + pid_v.to(tl.int64) * stride_gh_slab + local_rows[:, None] * stride_gh_row
        gw_base = grad_weight_ptr + pid_t.to(tl.int64) * stride_gw_slab + local_cols[:, None] * stride_gw_row
        for c0 in range(0, H, BLOCK_HO):
            ks = c0 + tl.arange(0, BLOCK_HO)
            k_mask = ks < H
            if HIDDEN_GRAD:
                w = tl.load(  # (BLOCK_V, BLOCK_HO)
                    weight_ptr + cols[:, None] * stride_wv + ks[None, :],
                    mask=col_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                if DOT_FP32:
                    part = tl.dot(grad_z_op, w.to(tl.float32), input_precision="ieee")
                else:
                    part = tl.dot(grad_z_op, w)
                out_mask = row_mask[:, None] & k_mask[None, :]
                if ATOMIC:
                    tl.atomic_add(gh_base + ks[None, :], part, mask=out_mask, sem="relaxed")
                else:
                    tl.store(gh_base + ks[None, :], part, mask=out_mask)
            if WEIGHT_GRAD:
                h = tl.load(  # (BLOCK_T, BLOCK_HO)
                    hidden_ptr + rows[:, None] * stride_hn + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                if DOT_FP32:
                    part = tl.dot(tl.trans(grad_z_op), h.to(tl.float32), input_precision="ieee")
                else:
                    part = tl.dot(tl.trans(grad_z_op), h)
                out_mask = col_mask[:, None] & k_mask[None, :]
                if ATOMIC:
                    tl.atomic_add(gw_base + ks[None, :], part, mask=out_mask, sem="relaxed")
                else:
                    tl.store(gw_base + ks[None, :], part, mask=out_mask)


# ---------------------------------------------------------------------------------------------
# Launch settings: the one place that picks block sizes and warps.
# ---------------------------------------------------------------------------------------------

# Autotune key: (input dtype, interpreted). No @triton.autotune: the interpreter rejects more than one
# config. The GPU values are starting points; README.md (Performance) says what has been tuned where.
# New keys go at the end: the custom ops carry the settings as a list in this order.
_LAUNCH_KEYS = ("BLOCK_T", "BLOCK_V", "BLOCK_H", "BLOCK_HO", "num_warps", "num_stages", "LOSS_BLOCK", "loss_warps",
                "deterministic", "scratch_kib", "grad_filter_log2")
_BOOL_KEYS = ("deterministic",)


def is_interpreted() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_token_logprobs_fwd_kernel, InterpretedFunction)


def launch_config(dtype: torch.dtype, interpreted: bool | None = None, **overrides) -> dict:
    """Launch settings of every lm_head and GRPO-loss kernel; `overrides` replace single entries (tests use
    small blocks).

    BLOCK_T / BLOCK_V / BLOCK_H, num_warps, num_stages: the lm_head kernels (forward and backward); BLOCK_H is
    the reduction step of the logits matmul. BLOCK_HO: the width of the H chunks in which the backward forms
    its gradient products (their output columns). LOSS_BLOCK, loss_warps: the per-row GRPO loss kernel
    (`kernels/grpo_loss_triton.py`), which walks one completion row LOSS_BLOCK tokens at a time.
    The GPU values are starting points for tuning. Under the interpreter every program is run in numpy, so
    small tiles keep the padded work (and test time) down.

    Backward reduction (see `token_logprobs_triton_grads`):
      deterministic: fixed-order sums of per-tile partials instead of fp32 atomics. Default: on under the
        interpreter or with torch.use_deterministic_algorithms(True), otherwise off (atomics move half the
        bytes and need no scratch).
      scratch_kib: the most fp32 scratch one deterministic launch may use; the tiles are processed in groups
        that fit (at least one tile per launch, whatever the budget).
      grad_filter_log2: k > 0 skips the gradient products of a logits tile whose |onehot - softmax| is below
        2**-k everywhere (Cut Cross-Entropy's filtering; k = 12 is bf16's resolution); 0 (default) is exact.
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
    config.update(deterministic=interpreted or torch.are_deterministic_algorithms_enabled(),
                  scratch_kib=1 << 20, grad_filter_log2=0)
    config.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("BLOCK_T", "BLOCK_V", "BLOCK_H", "BLOCK_HO", "LOSS_BLOCK"):
        value = config[key]
        if not isinstance(value, int) or value < 16 or value & (value - 1):
            raise ValueError(f"{key} must be a power of two >= 16 (tl.dot tile), got {value!r}")
    if not isinstance(config["deterministic"], bool):
        raise TypeError(f"deterministic must be a bool, got {config['deterministic']!r}")
    if not isinstance(config["scratch_kib"], int) or config["scratch_kib"] < 1:
        raise ValueError(f"scratch_kib must be a positive int, got {config['scratch_kib']!r}")
    if not isinstance(config["grad_filter_log2"], int) or not 0 <= config["grad_filter_log2"] <= 126:
        raise ValueError(f"grad_filter_log2 must be an int in [0, 126] (0 = off), got {config['grad_filter_log2']!r}")
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


def _tile_groups(
    token_blocks: int, vocab_blocks: int, block_t: int, block_v: int, need_hidden: bool, need_weight: bool,
    max_tiles: int,
) -> tuple[int, int]:
    """(token blocks, vocab blocks) per deterministic launch, at most max_tiles tiles.

    Besides its fixed scratch traffic, every launch adds its slab sum into the gradients: a pass over the
    grad_hidden rows per vocab group and over the grad_W rows per token group, i.e. in all
    N*H*(vocab_blocks/gv) + V*H*(token_blocks/gt) ~ H*token_blocks*vocab_blocks*(block_t/gv + block_v/gt)
    elements. For a fixed gt*gv that is least at gt/gv = block_v/block_t; with one gradient only, the group spans
    its whole summed axis.
    """
    if not need_weight:
        gv = min(vocab_blocks, max_tiles)
        return min(token_blocks, max(1, max_tiles // gv)), gv
    if not need_hidden:
        gt = min(token_blocks, max_tiles)
        return gt, min(vocab_blocks, max(1, max_tiles // gt))
    gt = min(token_blocks, max(1, round(math.sqrt(max_tiles * block_v / block_t))))
    gv = min(vocab_blocks, max(1, max_tiles // gt))
    return min(token_blocks, max(1, max_tiles // gv)), gv


def _launch_backward(
    g: Tensor, hidden: Tensor, weight: Tensor, ids: Tensor, lse: Tensor, temperature: float,
    grad_hidden: Tensor | None, grad_weight: Tensor | None, cfg: dict, interpreted: bool,
) -> None:
    """Add the gradients into the zero-filled fp32 (N, H) grad_hidden / (V, H) grad_weight (None: not wanted)."""
    n, h = hidden.shape
    v = weight.shape[0]
    block_t, block_v = cfg["BLOCK_T"], cfg["BLOCK_V"]
    token_blocks, vocab_blocks = triton.cdiv(n, block_t), triton.cdiv(v, block_v)
    need_hidden, need_weight = grad_hidden is not None, grad_weight is not None
    filter_log2 = cfg["grad_filter_log2"]
    unused = lse  # stands in for an output that is not wanted: the constexpr flags compile its stores away

    def launch(grid, gh: Tensor | None, gw: Tensor | None, gh_slab: int, gw_slab: int, t_block0: int,
               v_block0: int, atomic: bool) -> None:
        _token_logprobs_bwd_kernel[grid](
            g, hidden, weight, ids, lse, unused if gh is None else gh, unused if gw is None else gw,
            n, v, h, hidden.stride(0), weight.stride(0), gh_slab, h, gw_slab, h, t_block0, v_block0,
            float(temperature), 2.0 ** -filter_log2,
            BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_H=cfg["BLOCK_H"], BLOCK_HO=cfg["BLOCK_HO"],
            DOT_FP32=_dot_fp32(hidden.dtype, interpreted), HIDDEN_GRAD=need_hidden, WEIGHT_GRAD=need_weight,
            ATOMIC=atomic, FILTER=filter_log2 > 0,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )

    if not cfg["deterministic"]:
        launch((token_blocks, vocab_blocks), grad_hidden, grad_weight, 0, 0, 0, 0, atomic=True)
        return

    # Scratch: slab j of scratch_h holds vocab block j's part of the group's grad_hidden rows, slab i of
    # scratch_w token block i's part of the group's grad_W rows; summed over slabs in a fixed order below.
    tile_bytes = 4 * h * (block_t * need_hidden + block_v * need_weight)
    gt, gv = _tile_groups(token_blocks, vocab_blocks, block_t, block_v, need_hidden, need_weight,
                          max(1, cfg["scratch_kib"] * 1024 // tile_bytes))
    scratch_h = torch.empty(gv, gt * block_t, h, dtype=torch.float32, device=hidden.device) if need_hidden else None
    scratch_w = torch.empty(gt, gv * block_v, h, dtype=torch.float32, device=hidden.device) if need_weight else None
    scratches = [s for s in (scratch_h, scratch_w) if s is not None]
    for t0 in range(0, token_blocks, gt):
        nt = min(gt, token_blocks - t0)
        r0, r1 = t0 * block_t, min(n, (t0 + nt) * block_t)
        for v0 in range(0, vocab_blocks, gv):
            nv = min(gv, vocab_blocks - v0)
            c0, c1 = v0 * block_v, min(v, (v0 + nv) * block_v)
            if filter_log2:  # a filtered tile writes nothing, so its slab must read as zeros
                for scratch in scratches:
                    scratch.zero_()
            launch((nt, nv), scratch_h, scratch_w, gt * block_t * h, gv * block_v * h, t0, v0, atomic=False)
            if scratch_h is not None:
                grad_hidden[r0:r1] += scratch_h[:nv, : r1 - r0].sum(0)
            if scratch_w is not None:
                grad_weight[c0:c1] += scratch_w[:nt, : c1 - c0].sum(0)


def token_logprobs_triton_grads(
    grad_logp: Tensor,
    hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    lse: Tensor,
    temperature: float = 1.0,
    *,
    need_hidden: bool = True,
    need_weight: bool = True,
    **launch_overrides,
) -> tuple[Tensor | None, Tensor | None]:
    """grad_logp (...), hidden (..., H), weight (V, H), token_ids (...), lse (...) from the forward ->
    (grad_hidden in hidden's shape and dtype, grad_weight (V, H) in the weight's dtype); None where not needed.

    One kernel computes each (BLOCK_T, BLOCK_V) logits tile once and forms both gradient products
    from it (`_token_logprobs_bwd_kernel`: 2*N*V*H FLOPs per product plus 2*N*V*H for the recompute). The sums
    over tiles are fp32, by atomics or, with `deterministic`, by fixed-order sums of per-tile partials (at most
    `scratch_kib` of fp32 scratch per launch, plus the fp32 (N, H) / (V, H) sums for half-precision inputs).
    """
    hidden2, weight2, ids = _check_inputs(hidden, weight, token_ids, temperature)
    n, h = hidden2.shape
    v = weight2.shape[0]
    g, lse_flat = _check_backward_inputs(n, hidden2.device, grad_logp, lse)
    grad_hidden = torch.zeros(n, h, dtype=torch.float32, device=hidden2.device) if need_hidden else None
    grad_weight = torch.zeros(v, h, dtype=torch.float32, device=hidden2.device) if need_weight else None
    if n > 0 and (need_hidden or need_weight):
        interpreted = is_interpreted()
        cfg = launch_config(hidden2.dtype, interpreted, **launch_overrides)
        _launch_backward(g, hidden2, weight2, ids, lse_flat, temperature, grad_hidden, grad_weight, cfg, interpreted)
    return (
        None if grad_hidden is None else grad_hidden.to(hidden2.dtype).view(hidden.shape),
        None if grad_weight is None else grad_weight.to(weight2.dtype),
    )


def token_logprobs_triton_backward(
    grad_logp: Tensor,
    hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    lse: Tensor,
    temperature: float = 1.0,
    **launch_overrides,
) -> Tensor:
    """grad_logp (...), hidden (..., H), weight (V, H), token_ids (...), lse (...) -> grad_hidden, hidden's shape and dtype.

    When the weight's gradient is wanted too, `token_logprobs_triton_grads` forms both from one recompute.
    """
    grad_hidden, _ = token_logprobs_triton_grads(grad_logp, hidden, weight, token_ids, lse, temperature,
                                                 need_hidden=True, need_weight=False, **launch_overrides)
    return grad_hidden


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

    When the hidden gradient is wanted too, `token_logprobs_triton_grads` forms both from one recompute.
    """
    _, grad_weight = token_logprobs_triton_grads(grad_logp, hidden, weight, token_ids, lse, temperature,
                                                 need_hidden=False, need_weight=True, **launch_overrides)
    return grad_weight


# ---------------------------------------------------------------------------------------------
# torch.library custom ops: what `token_logprobs_triton` calls, so torch.compile sees one opaque node.
# Launch overrides travel as a list of ints in _LAUNCH_KEYS order (0 = default): an op schema has no dict.
# A bool setting is stored as 1 + value, so that False stays distinct from "default".
# ---------------------------------------------------------------------------------------------


def _launch_list(overrides: dict) -> list[int]:
    unknown = set(overrides) - set(_LAUNCH_KEYS)
    if unknown:
        raise TypeError(f"unknown launch settings {sorted(unknown)}; expected a subset of {_LAUNCH_KEYS}")
    return [
        (0 if overrides.get(key) is None else 1 + bool(overrides[key])) if key in _BOOL_KEYS
        else int(overrides.get(key) or 0)
        for key in _LAUNCH_KEYS
    ]


def _launch_dict(launch: list[int]) -> dict:
    return {
        key: (value == 2 if key in _BOOL_KEYS else value)
        for key, value in zip(_LAUNCH_KEYS, launch) if value
    }


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
    """(grad_hidden, grad_weight) from one backward pass; a gradient that is not needed comes back as an empty tensor."""
    grad_hidden, grad_weight = token_logprobs_triton_grads(
        grad_logp, hidden, weight, token_ids, lse, temperature,
        need_hidden=need_hidden, need_weight=need_weight, **_launch_dict(launch),
    )
    return (hidden.new_empty(0) if grad_hidden is None else grad_hidden,
            weight.new_empty(0) if grad_weight is None else grad_weight)


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
    when it requires grad, the weight (both from the same backward pass)."""
    logp, _ = torch.ops.onelayer_fast.token_logprobs(hidden, weight, token_ids, float(temperature), _launch_list(launch_overrides))
    return logp
