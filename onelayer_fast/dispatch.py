"""What `backend="auto"` runs, and the first-use self-check that admits the Triton kernels.

The rule, decided here and nowhere else (`loss.py`'s docstring states it for users):
    float64 states                                   -> "reference": float64 runs exist to test equalities
                                                        exactly; the Triton and chunked paths compute in fp32.
    CPU tensors, TRITON_INTERPRET unset              -> "chunked", without importing the Triton kernels
                                                        (their import and decoration cost start-up time).
    CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set, and triton installed:
        an input the Triton path does not cover      -> "chunked" (`triton_unsupported` names it; an explicit
                                                        backend="triton" raises instead)
        self-check for (device, dtype) passed        -> "triton"
        self-check failed                            -> "chunked", after one warning per (device, dtype)
    any other device                                 -> "chunked"

Self-check (`self_check`): one small problem with odd sizes (6 x 8 completion slots holding 37 tokens,
hidden 48, vocab 1013, groups of 3, old and reference log-probs, beta > 0, temperature 0.7), run through the
public `grpo_loss` and `token_logprobs` with backend="triton" and backend="chunked" on the device in the dtype.
It compares the loss, the token log-probs, the hidden gradient and the lm_head weight gradient of
`grpo_loss`, and the log-probs and hidden gradient of `token_logprobs` (the custom op, hidden gradient only):
    float32: max |triton - chunked| / max |chunked| <= 1e-4 for each. Both paths are fp32 throughout (IEEE fp32
        dots); their difference is summation order, <= 3e-6 here, while a wrong tile or mask moves them by
        far more than the bound, and so does the smallest term (the KL at beta 0.04: ~3e-3 of the loss).
    bfloat16 / float16: err(triton) <= 2 * err(chunked) + eps(output dtype) * max |oracle|, errors measured
        against the float64 reference path on the same rounded inputs. The two paths round in different places
        (the chunked one keeps the logits in the input dtype, the kernels in fp32), so their mutual difference
        is of the order of the dtype's resolution (~1e-2 in bf16) and a fixed bound on it would either fail
        good kernels or pass bad ones; bounding the kernels by PyTorch's own error does neither. The eps term
        allows the last rounding of each output: the cast of a gradient to the input dtype (which the
        interpreter truncates instead of rounding), fp32 for the loss and log-probs.
The verdict is cached per (device type, device index, dtype) for the life of the process;
`reset_self_checks` forgets them (tests).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import Callable

import torch
from torch import Tensor

from .kernels.grpo_loss import TRITON_LOSS_TYPES, LossConfig
from .kernels.token_logprobs import token_logprobs_ref

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP32_BOUND = 1e-4
_TEMPERATURE = 0.7  # of the self-check problem: != 1 so that the kernels' division by it is checked

_verdicts: dict[tuple[str, int | None, torch.dtype], bool] = {}


def reset_self_checks() -> None:
    """Forget every cached self-check verdict, so the next "auto" call on each (device, dtype) checks again."""
    _verdicts.clear()


def triton_unsupported(hidden: Tensor, weight: Tensor, completion_mask: Tensor | None = None,
                       config: LossConfig | None = None) -> str | None:
    """What in these inputs the Triton path does not cover, as a phrase naming it; None when it covers them.

    `config`: the loss settings (None: only the tensors are checked, as for `token_logprobs`).
    Covered: both importance-sampling levels, the loss types of TRITON_LOSS_TYPES, every reward scaling,
    delta, beta (with or without the bias-corrected KL), temperature, given advantages. Not covered: the other
    loss types (cispo, sapo, luspo, vespo), the row-level knobs (`LossConfig.row_level_knobs`: an
    off_policy_mask_threshold, a top_entropy_quantile below 1, a non-zero entropy_coef: the Triton loss computes
    no sequence masks and no entropies), dtypes other than fp32 / bf16 / fp16, a weight whose dtype differs from
    the states', and a completion mask with values other than 0 and 1 (the chunked and reference paths weight
    tokens by the mask; the Triton loss keeps or drops them).
    """
    if config is not None:
        if config.loss_type not in TRITON_LOSS_TYPES:
            return f"loss_type {config.loss_type!r} (the Triton loss covers {', '.join(TRITON_LOSS_TYPES)})"
        knobs = config.row_level_knobs
        if knobs:
            return (f"{', '.join(knobs)} (the Triton loss computes no sequence masks and no token entropies; "
                    f"the chunked path does)")
    if hidden.dtype not in TRITON_DTYPES:
        return f"hidden dtype {hidden.dtype} (the Triton kernels take float32, bfloat16 or float16)"
    if weight.dtype != hidden.dtype:
        return f"lm_head_weight dtype {weight.dtype} different from the hidden dtype {hidden.dtype}"
    if completion_mask is not None and completion_mask.dtype != torch.bool:
        # One device sync; the Triton path syncs anyway to find the unmasked tokens.
        if bool(((completion_mask != 0) & (completion_mask != 1)).any()):
            return "a completion_mask with values other than 0 and 1 (the Triton loss takes the mask as binary)"
    return None


def auto_backend(hidden: Tensor, weight: Tensor, completion_mask: Tensor | None = None,
                 config: LossConfig | None = None) -> str:
    """The backend "auto" runs for these inputs (the rule in the module docstring)."""
    if hidden.dtype == torch.float64:
        return "reference"
    if not _triton_can_run_on(hidden.device):
        return "chunked"
    if triton_unsupported(hidden, weight, completion_mask, config) is not None:
        return "chunked"
    return "triton" if triton_verified(hidden.device, hidden.dtype) else "chunked"


def _triton_can_run_on(device: torch.device) -> bool:
    # Imports nothing: on plain CPU the answer must cost no triton import.
    if device.type == "cuda":
        return _triton_installed()
    if device.type == "cpu":
        return _interpreter_requested() and _triton_installed()
    return False


def _interpreter_requested() -> bool:
    # Read on every call, like triton reads it; whether the kernels really were decorated under the interpreter
    # (the variable set before triton's import) is for the self-check to find out.
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_verified(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton path passed its self-check on (device, dtype); runs the check on first use and
    warns once when it fails."""
    key = (device.type, device.index, dtype)
    if key not in _verdicts:
        problem = self_check(device, dtype)
        if problem is not None:
            warnings.warn(
                f"onelayer_fast: the Triton loss kernels failed their self-check on {device} {dtype} ({problem}); "
                f"backend='auto' uses the chunked PyTorch path there instead",
                RuntimeWarning,
                stacklevel=5,  # the caller of grpo_loss / token_logprobs (via auto_backend, loss._resolve_backend)
            )
        _verdicts[key] = problem is None
    return _verdicts[key]


def self_check(device: torch.device, dtype: torch.dtype) -> str | None:
    """Run the Triton and chunked paths on one small problem (module docstring); None when they agree,
    otherwise what went wrong: the quantity and its error, or the exception."""
    try:
        # Grad on: the first "auto" call may come from a no_grad region (reference log-probs).
        with torch.enable_grad():
            return _compare(device, dtype)
    except Exception as error:  # compile errors arrive as several types (CompilationError, OutOfResources, ...)
        text = str(error).strip().splitlines()
        return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _problem(device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    # Drawn on CPU from a private generator: the same problem on every device, and the caller's RNG untouched.
    gen = torch.Generator().manual_seed(0)
    batch, length, hidden_size, vocab = 6, 8, 48, 1013
    lengths = torch.tensor([8, 3, 7, 5, 8, 6])  # 37 tokens; full rows and padded ones
    hidden = torch.randn(batch, length, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.3).to(dtype)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    true = token_logprobs_ref(hidden.double(), weight.double(), ids, _TEMPERATURE).float()
    problem = dict(
        hidden=hidden, weight=weight, ids=ids,
        mask=(torch.arange(length) < lengths[:, None]).float(),
        rewards=torch.randn(batch, generator=gen),
        # Ratios exp(+-0.2) around the true log-probs: some clip at epsilon 0.2 / 0.28, most do not.
        old=true + 0.2 * torch.randn(batch, length, generator=gen),
        ref=true + 0.2 * torch.randn(batch, length, generator=gen),
        grad_logp=torch.randn(batch, length, generator=gen),
    )
    return {name: t.to(device) for name, t in problem.items()}


# The public loss functions the self-check runs, registered by loss.py when it is imported (loss.py imports this
# module, so importing loss.py here would be a cycle).
_public: dict[str, Callable] = {}


def register_loss_functions(grpo_loss: Callable, token_logprobs: Callable) -> None:
    _public.update(grpo_loss=grpo_loss, token_logprobs=token_logprobs)


def _run(backend: str, p: dict[str, Tensor]) -> dict[str, Tensor | None]:
    grpo_loss, token_logprobs = _public["grpo_loss"], _public["token_logprobs"]
    hidden = p["hidden"].clone().requires_grad_()
    weight = p["weight"].clone().requires_grad_()
    result = grpo_loss(hidden, weight, p["ids"], p["mask"], rewards=p["rewards"], group_size=3, old_logps=p["old"],
                       ref_logps=p["ref"], beta=0.04, epsilon_high=0.28, temperature=_TEMPERATURE, backend=backend)
    result.loss.backward()
    states = p["hidden"].clone().requires_grad_()
    logps = token_logprobs(states, p["weight"], p["ids"], _TEMPERATURE, backend=backend)
    logps.backward(p["grad_logp"])
    return {"loss": result.loss, "token_logps": result.token_logps, "grad_hidden": hidden.grad,
            "grad_weight": weight.grad, "token_logprobs": logps, "token_logprobs grad_hidden": states.grad}


def _max_abs(t: Tensor) -> float:
    return t.detach().double().abs().max().item()


def _compare(device: torch.device, dtype: torch.dtype) -> str | None:
    p = _problem(device, dtype)
    triton, chunked = _run("triton", p), _run("chunked", p)
    oracle = None
    if dtype != torch.float32:
        exact = dict(p, hidden=p["hidden"].double(), weight=p["weight"].double())
        oracle = _run("reference", exact)
    for name, want in chunked.items():
        got = triton[name]
        if got is None or got.shape != want.shape:
            return f"{name}: shape {None if got is None else tuple(got.shape)}, chunked {tuple(want.shape)}"
        if oracle is None:
            err = _max_abs(got - want) / max(_max_abs(want), 1e-30)
            # `not <=`: a NaN error must fail.
            if not err <= FP32_BOUND:
                return f"{name}: relative error {err:.3g} against the chunked path (bound {FP32_BOUND:g})"
        else:
            exact = oracle[name].double()
            err, own = _max_abs(got.double() - exact), _max_abs(want.double() - exact)
            # One eps of the output's dtype: the last rounding of a gradient (bf16 / fp16) or a log-prob (fp32).
            bound = 2 * own + torch.finfo(got.dtype).eps * _max_abs(exact)
            if not err <= bound:
                return (f"{name}: error {err:.3g} against float64, bound {bound:.3g} "
                        f"(2 x the chunked path's {own:.3g} + one {got.dtype} eps)")
    return None
