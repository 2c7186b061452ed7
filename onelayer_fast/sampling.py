"""Batch-layout-invariant random draws for token sampling.

Many training runs ("lanes") can generate in one batch and still each get exactly the tokens they would
get alone only if a row's random draw does not depend on its batch neighbours or its place in the batch.
A stateful generator (torch.Generator) fails this: the value a row gets depends on how many values were
drawn before it. Here every draw is instead a pure function of integer keys

    (lane seed, step, prompt group, row in group, position)

through a counter-based hash (splitmix64 finalizer), so the same key gives the same uniform whatever
the batch holds. Sampling is then inverse-CDF over a deterministic token order (probability descending,
token id ascending on ties), so the sampled token is a pure function of (logits row, uniform) as well.

    keyed_uniform(seed, step, group, row, position)          -> float64 uniforms in [0, 1)
    sample_tokens(logits, uniforms, temperature, top_p)      -> token ids (temperature, nucleus)
    greedy_tokens(logits)                                    -> argmax, lowest id on ties
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# splitmix64 constants (Steele, Lea & Flood 2014), written as their signed int64 equivalents because
# torch int64 tensors cannot hold values >= 2**63. Multiplication wraps modulo 2**64 either way.
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MUL1 = 0xBF58476D1CE4E5B9 - 2**64
_MUL2 = 0x94D049BB133111EB - 2**64


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's `>>` is arithmetic: it copies the sign bit down)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(z: Tensor) -> Tensor:
    """splitmix64 finalizer: a bijection of 64-bit words in which every input bit flips ~half the outputs."""
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def keyed_uniform(
    seed: Tensor | int, step: Tensor | int, group: Tensor | int, row: Tensor | int, position: Tensor | int
) -> Tensor:
    """float64 uniforms in [0, 1), one per broadcast element of the five integer keys.

    The keys are folded one by one into a 64-bit state, `state = mix((state + golden) ^ key)`: each fold
    is a bijection in the key (so changing any one key changes the state) and the mix between folds makes
    key order matter ((group=1, row=2) and (group=2, row=1) give unrelated draws). The top 53 bits of the
    final state become the float64 mantissa. Python ints broadcast against tensors; the result lives on
    the device of the tensor arguments (CPU if none), and is the same bitwise on every device.
    """
    keys = (seed, step, group, row, position)
    devices = {k.device for k in keys if isinstance(k, Tensor)}
    if len(devices) > 1:
        raise ValueError(f"keyed_uniform: key tensors are on different devices {sorted(map(str, devices))}")
    for name, k in zip(("seed", "step", "group", "row", "position"), keys):
        if isinstance(k, Tensor):
            if k.dtype == torch.bool or k.is_floating_point() or k.is_complex():
                raise ValueError(f"keyed_uniform: {name} must be an integer tensor, got {k.dtype}")
        elif isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"keyed_uniform: {name} must be an int or an integer tensor, got {type(k).__name__}")
    device = devices.pop() if devices else torch.device("cpu")
    tensors = torch.broadcast_tensors(*(torch.as_tensor(k, dtype=torch.int64, device=device) for k in keys))
    state = torch.zeros_like(tensors[0])
    for key in tensors:
        state = _mix((state + _GOLDEN) ^ key)
    return _shr(state, 11).double() * 2.0**-53


def sample_tokens(logits: Tensor, uniforms: Tensor, temperature: float = 1.0, top_p: float = 1.0) -> Tensor:
    """Inverse-CDF sampling: logits (N, V), uniforms (N,) float64 -> token ids (N,) int64.

    Probabilities are softmax(logits / temperature) in float64. Tokens are ordered by probability
    descending, ties by token id ascending (stable sort), so the order, and with it the token picked
    for a given uniform, is deterministic. With top_p < 1 only the nucleus is kept, as HF's
    TopPLogitsWarper defines it: the smallest set of most probable tokens whose cumulative probability
    reaches top_p (a token is kept while the mass of the tokens before it is < top_p; the most probable
    token always). HF sums ascending and compares against 1 - top_p, so at a boundary within float
    rounding the two may differ by one token. The picked token is the first (in that order) whose
    cumulative kept probability exceeds u * kept total, which is sampling from the renormalized nucleus.
    Tokens of probability 0 (-inf logits) are never picked, even for u rounding up to 1.
    """
    if logits.dim() != 2:
        raise ValueError(f"sample_tokens: logits must be (N, V), got shape {tuple(logits.shape)}")
    if logits.shape[1] == 0:
        raise ValueError("sample_tokens: logits have an empty vocabulary (V = 0)")
    if uniforms.shape != logits.shape[:1]:
        raise ValueError(
            f"sample_tokens: uniforms must be (N,) = ({logits.shape[0]},), got shape {tuple(uniforms.shape)}"
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"sample_tokens: temperature must be finite and > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"sample_tokens: top_p must be in (0, 1], got {top_p}")

    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    if top_p < 1:
        # Mass strictly before each token in the sorted order (exclusive cumsum, exact zeros at the front).
        before = torch.cat([torch.zeros_like(sorted_probs[:, :1]), sorted_probs[:, :-1].cumsum(-1)], dim=-1)
        keep = before < top_p  # before[:, 0] = 0 < top_p: the most probable token is always kept
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
    cumulative = sorted_probs.cumsum(-1)
    targets = uniforms.to(torch.float64) * cumulative[:, -1]
    index = torch.searchsorted(cumulative, targets.unsqueeze(-1), right=True).squeeze(-1)
    # Zero-probability tokens sort last; clamping to the last positive one keeps them out even when
    # u * total rounds up to the total (where searchsorted returns V).
    last_positive = (sorted_probs > 0).sum(-1) - 1
    index = torch.minimum(index, last_positive.clamp(min=0))
    return order.gather(-1, index.unsqueeze(-1)).squeeze(-1)


def greedy_tokens(logits: Tensor) -> Tensor:
    """argmax over the vocabulary (lowest id on ties).

    torch.argmax documents that it returns the first maximal index, which is the lowest token id, the
    same tie rule sample_tokens uses, so greedy decoding is deterministic too.
    """
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"greedy_tokens: logits must be (N, V) with V > 0, got shape {tuple(logits.shape)}")
    return logits.argmax(dim=-1)
