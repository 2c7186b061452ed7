"""Keyed uniforms and inverse-CDF sampling: batch-layout invariance, hash quality, sampling distributions.

The hash is checked bitwise against a pure-Python splitmix64 (which catches arithmetic-vs-logical shift
and signed-constant mistakes), then statistically. Samplers are checked two ways: with an evenly spaced
grid of uniforms, where inverse-CDF counts must equal N * p to within one per token (exact, no noise),
and with keyed uniforms, where frequencies must match within a few standard errors.
"""
from __future__ import annotations

import bisect
import math

import pytest
import torch

from onelayer_fast.sampling import greedy_tokens, keyed_uniform, sample_tokens

pytestmark = pytest.mark.usefixtures("torch_single_thread")

MASK64 = (1 << 64) - 1


def reference_uniform(*keys: int) -> float:
    """splitmix64 key folding in plain Python (unbounded ints masked to 64 bits)."""
    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    state = 0
    for key in keys:
        state = mix(((state + 0x9E3779B97F4A7C15) & MASK64) ^ (key & MASK64))
    return (state >> 11) * 2.0**-53


def grid(n: int) -> torch.Tensor:
    """n evenly spaced uniforms (i + 0.5) / n: inverse-CDF counts are then N * p to within one."""
    return (torch.arange(n, dtype=torch.float64) + 0.5) / n


def reference_nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    """Token ids kept by top-p: sort descending (ties by id), keep while the mass before the token < top_p."""
    order = sorted(range(len(probs)), key=lambda i: (-probs[i].item(), i))
    kept, before = set(), 0.0
    for i in order:
        if before >= top_p and kept:
            break
        kept.add(i)
        before += probs[i].item()
    return kept


def reference_sample(probs: torch.Tensor, uniforms: torch.Tensor, top_p: float = 1.0) -> list[int]:
    """Inverse CDF in plain Python: order by (-p, id), keep the nucleus, first cumulative > u * total."""
    kept = reference_nucleus(probs, top_p)
    order = [i for i in sorted(range(len(probs)), key=lambda i: (-probs[i].item(), i)) if i in kept]
    cumulative, total = [], 0.0
    for i in order:
        total += probs[i].item()
        cumulative.append(total)
    return [order[min(bisect.bisect_right(cumulative, u * total), len(order) - 1)] for u in uniforms.tolist()]


def correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([x, y]))[0, 1].item()


# ---------------------------------------------------------------- keyed_uniform


def test_keyed_uniform_matches_python_splitmix64():
    keys = [(0, 0, 0, 0, 0), (1, 2, 3, 4, 5), (-1, 7, -3, 2**40, 2**63 - 1), (-(2**63), 0, 1, 0, 99)]
    for key in keys:
        got = keyed_uniform(*key)
        assert got.dtype == torch.float64 and got.shape == ()
        assert got.item() == reference_uniform(*key), key


def test_keyed_uniform_range_dtype_deterministic():
    pos = torch.arange(50_000)
    u = keyed_uniform(3, 1, 2, 0, pos)
    assert u.dtype == torch.float64 and u.shape == (50_000,)
    assert u.min().item() >= 0.0 and u.max().item() < 1.0
    assert torch.equal(u, keyed_uniform(3, 1, 2, 0, pos))


def test_keyed_uniform_broadcasting():
    seed = torch.tensor([[0], [1], [2]])  # (3, 1)
    row = torch.arange(4)  # (4,)
    u = keyed_uniform(seed, 5, 0, row, 9)
    assert u.shape == (3, 4)
    for s in range(3):
        for r in range(4):
            assert u[s, r].item() == keyed_uniform(s, 5, 0, r, 9).item()
    # Integer tensors of other dtypes are keys too (widened to int64).
    assert torch.equal(keyed_uniform(1, 2, 3, 4, torch.arange(5, dtype=torch.int32)),
                       keyed_uniform(1, 2, 3, 4, torch.arange(5)))


def test_keyed_uniform_batch_layout_invariance():
    """A key's draw is the same alone, in a large mixed batch, and in a permuted batch (bitwise)."""
    gen = torch.Generator().manual_seed(0)
    n = 4096
    keys = [torch.randint(0, 1000, (n,), generator=gen) for _ in range(5)]
    batch = keyed_uniform(*keys)
    perm = torch.randperm(n, generator=gen)
    permuted = keyed_uniform(*(k[perm] for k in keys))
    assert torch.equal(permuted, batch[perm])
    for i in (0, 1, 777, n - 1):
        alone = keyed_uniform(*(int(k[i]) for k in keys))
        assert alone.item() == batch[i].item()


def test_keyed_uniform_each_key_matters_and_order_matters():
    base = (11, 22, 33, 44, 55)
    u0 = keyed_uniform(*base).item()
    for i in range(5):
        changed = list(base)
        changed[i] += 1
        assert keyed_uniform(*changed).item() != u0, f"key {i} ignored"
    for i in range(5):
        for j in range(i + 1, 5):
            swapped = list(base)
            swapped[i], swapped[j] = swapped[j], swapped[i]
            assert keyed_uniform(*swapped).item() != u0, f"keys {i} and {j} commute"
    assert keyed_uniform(0, 0, 1, 2, 0).item() != keyed_uniform(0, 0, 2, 1, 0).item()


def test_keyed_uniform_rejects_non_integer_keys():
    with pytest.raises(ValueError, match="position"):
        keyed_uniform(0, 0, 0, 0, torch.zeros(3))
    with pytest.raises(ValueError, match="seed"):
        keyed_uniform(1.5, 0, 0, 0, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="row"):
        keyed_uniform(0, 0, 0, torch.tensor([True]), 0)


def test_keyed_uniform_rough_uniformity():
    n = 200_000
    u = keyed_uniform(7, 3, 1, 2, torch.arange(n))
    assert abs(u.mean().item() - 0.5) < 0.005
    counts = torch.histc(u, bins=20, min=0.0, max=1.0)
    expected = n / 20
    assert ((counts - expected).abs() <= 0.03 * expected).all(), counts
    assert abs(correlation(u[:-1], u[1:])) < 0.01


@pytest.mark.parametrize("key", range(5))
def test_keyed_uniform_consecutive_keys_unrelated(key):
    """Neighbouring values of any one key (lanes 0, 1, 2, ..., rows 0, 1, 2, ...) give uncorrelated draws,
    and two streams differing only in that key are uncorrelated with each other."""
    n = 50_000
    counter = torch.arange(n)
    keys = [5, 6, 7, 8, 9]
    keys[key] = counter
    u = keyed_uniform(*keys)
    assert abs(u.mean().item() - 0.5) < 0.01
    assert abs(correlation(u[:-1], u[1:])) < 0.02
    other = [5, 6, 7, 8, 9]
    other[(key + 1) % 5] = counter  # the counter in another key slot, same integer values
    assert abs(correlation(u, keyed_uniform(*other))) < 0.02
    shifted = list(keys)
    shifted[(key + 1) % 5] += 1  # same counter, one other key bumped: a different stream
    assert abs(correlation(u, keyed_uniform(*shifted))) < 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_keyed_uniform_cuda_matches_cpu():
    pos = torch.arange(10_000)
    cpu = keyed_uniform(3, 1, torch.tensor(2), 0, pos)
    cuda = keyed_uniform(3, 1, torch.tensor(2, device="cuda"), 0, pos.cuda())
    assert cuda.device.type == "cuda"
    assert torch.equal(cuda.cpu(), cpu)


# ---------------------------------------------------------------- sample_tokens


def random_logits(v: int, seed: int) -> torch.Tensor:
    return torch.randn(v, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5


def test_sample_tokens_grid_counts_are_the_distribution():
    logits, temperature, n = random_logits(7, 1), 0.7, 100_000
    probs = torch.softmax(logits / temperature, -1)
    tokens = sample_tokens(logits.expand(n, -1), grid(n), temperature=temperature)
    assert tokens.dtype == torch.int64 and tokens.shape == (n,)
    counts = torch.bincount(tokens, minlength=7).double()
    assert ((counts - n * probs).abs() <= 1.0 + 1e-6).all(), (counts, n * probs)


def test_sample_tokens_keyed_frequencies_match_softmax():
    logits, temperature, n = random_logits(7, 2).float(), 0.7, 100_000
    probs = torch.softmax(logits.double() / temperature, -1)
    u = keyed_uniform(123, 0, 0, torch.arange(n), 0)
    counts = torch.bincount(sample_tokens(logits.expand(n, -1), u, temperature=temperature), minlength=7).double()
    stderr = (n * probs * (1 - probs)).sqrt()
    assert ((counts - n * probs).abs() <= 4 * stderr + 1).all(), (counts, n * probs)


@pytest.mark.parametrize("top_p", [0.3, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("seed", [3, 4, 5])
def test_sample_tokens_top_p_nucleus(top_p, seed):
    logits, temperature, n = random_logits(9, seed), 0.9, 50_000
    probs = torch.softmax(logits / temperature, -1)
    kept = reference_nucleus(probs, top_p)
    nucleus = torch.zeros_like(probs)
    nucleus[list(kept)] = probs[list(kept)]
    nucleus /= nucleus.sum()

    # Grid: exactly the kept set is reachable, with counts N * renormalized p to within one.
    tokens = sample_tokens(logits.expand(n, -1), grid(n), temperature=temperature, top_p=top_p)
    counts = torch.bincount(tokens, minlength=9).double()
    assert set(tokens.unique().tolist()) == kept
    assert ((counts - n * nucleus).abs() <= 1.0 + 1e-6).all(), (counts, n * nucleus)

    # Keyed uniforms: never outside the nucleus, frequencies within a few standard errors.
    u = keyed_uniform(seed, 1, 0, torch.arange(n), 0)
    tokens = sample_tokens(logits.expand(n, -1), u, temperature=temperature, top_p=top_p)
    assert set(tokens.unique().tolist()) <= kept
    counts = torch.bincount(tokens, minlength=9).double()
    stderr = (n * nucleus * (1 - nucleus)).sqrt()
    assert ((counts - n * nucleus).abs() <= 4 * stderr + 1).all(), (counts, n * nucleus)


def test_sample_tokens_top_p_on_known_probabilities():
    logits = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64).log()
    u = grid(1000)
    for top_p, kept in [(0.4, {1}), (0.6, {1, 2}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2})]:
        tokens = sample_tokens(logits.expand(1000, -1), u, top_p=top_p)
        assert set(tokens.tolist()) == kept, top_p


def test_sample_tokens_ties_break_by_lowest_id():
    logits = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    # top_p below one tied token's mass keeps only one of the two most probable: the lower id.
    assert set(sample_tokens(logits.expand(500, -1), grid(500), top_p=0.3).tolist()) == {1}
    assert sample_tokens(logits, torch.zeros(1, dtype=torch.float64)).item() == 1
    # Order is (1, 2, 0, 3): a uniform just past token 1's mass picks 2, not 0.
    p1 = torch.softmax(logits[0].double(), -1)[1].item()
    assert sample_tokens(logits, torch.tensor([p1 + 1e-6], dtype=torch.float64)).item() == 2


@pytest.mark.parametrize("top_p", [1.0, 0.6, 0.2])
def test_sample_tokens_many_ties_match_reference(top_p):
    """Quantized logits: many tied tokens across a vocabulary large enough that an unstable sort reorders
    them. Every token must be the reference's (ties in id order, ties split by the nucleus boundary too)."""
    logits = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(9)).double()
    probs = torch.softmax(logits, -1)
    u = grid(2000)
    tokens = sample_tokens(logits.expand(len(u), -1), u, top_p=top_p)
    assert tokens.tolist() == reference_sample(probs, u, top_p)


def test_sample_tokens_boundaries_are_strict():
    # u * total exactly at a cumulative boundary: "exceeds" is strict, so the next token is picked.
    assert sample_tokens(torch.zeros(1, 2), torch.tensor([0.5], dtype=torch.float64)).item() == 1
    # Mass before a token exactly equal to top_p: the nucleus already reached top_p, the token is out.
    logits = torch.tensor([[2.0, 1.0, 0.5]], dtype=torch.float64)
    p0 = torch.softmax(logits, -1)[0, 0].item()
    assert set(sample_tokens(logits.expand(1000, -1), grid(1000), top_p=p0).tolist()) == {0}
    assert set(sample_tokens(logits.expand(1000, -1), grid(1000), top_p=math.nextafter(p0, 1)).tolist()) == {0, 1}


def test_sample_tokens_never_picks_neg_inf():
    logits = torch.tensor([[-math.inf, 0.5, -math.inf, -1.0, -math.inf]])
    n = 10_000
    u = torch.cat([grid(n), torch.tensor([0.0, 1.0 - 2.0**-53])])
    for top_p in (1.0, 0.999999, 0.5):
        tokens = sample_tokens(logits.expand(len(u), -1), u, top_p=top_p)
        assert set(tokens.tolist()) <= {1, 3}
    # u just below one lands on the least probable finite token, not on a zero-probability one.
    assert sample_tokens(logits, torch.tensor([1.0 - 2.0**-53], dtype=torch.float64)).item() == 3


def test_sample_tokens_u_zero_picks_most_probable():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(6))
    for temperature, top_p in [(1.0, 1.0), (0.3, 0.9), (2.0, 0.1)]:
        tokens = sample_tokens(logits, torch.zeros(16, dtype=torch.float64), temperature, top_p)
        assert torch.equal(tokens, logits.argmax(-1))


def test_sample_tokens_row_independence():
    gen = torch.Generator().manual_seed(7)
    n, v = 64, 40
    logits = torch.randn(n, v, generator=gen) * 2
    u = keyed_uniform(1, 2, torch.arange(n) // 8, torch.arange(n) % 8, 0)
    for top_p in (1.0, 0.7):
        batch = sample_tokens(logits, u, temperature=0.8, top_p=top_p)
        perm = torch.randperm(n, generator=gen)
        assert torch.equal(sample_tokens(logits[perm], u[perm], temperature=0.8, top_p=top_p), batch[perm])
        for i in (0, 13, n - 1):
            alone = sample_tokens(logits[i : i + 1], u[i : i + 1], temperature=0.8, top_p=top_p)
            assert alone.item() == batch[i].item()


def test_sample_tokens_validation():
    logits, u = torch.zeros(2, 5), torch.zeros(2, dtype=torch.float64)
    for temperature in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            sample_tokens(logits, u, temperature=temperature)
    for top_p in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="top_p"):
            sample_tokens(logits, u, top_p=top_p)
    with pytest.raises(ValueError, match="logits"):
        sample_tokens(torch.zeros(5), u)
    with pytest.raises(ValueError, match="uniforms"):
        sample_tokens(logits, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="vocabulary"):
        sample_tokens(torch.zeros(2, 0), u)


# ---------------------------------------------------------------- greedy_tokens


def test_greedy_tokens_matches_argmax_lowest_id_on_ties():
    logits = torch.randn(32, 100, generator=torch.Generator().manual_seed(8))
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
    tied = torch.tensor([[0.0, 3.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0], [-math.inf, -1.0, -1.0, -5.0]])
    assert greedy_tokens(tied).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="logits"):
        greedy_tokens(torch.zeros(4))
