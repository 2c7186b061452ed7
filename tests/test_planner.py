"""The C++ planner (csrc/planner.cpp) against its pure-Python references, plus invariants and boundary errors.

Property-based (hypothesis, derandomized so CI sees the same cases): random lengths, budgets and groups ->
the same plan as the reference, every index exactly once, every micro-batch within budget, groups unsplit;
pack / unpack round-trips a random padded tensor exactly; anchor ids equal the reference and give GiGPO the
same anchor groups as `advantages.gigpo_advantages`.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onelayer_fast import planner
from onelayer_fast.advantages import StepRecord, discounted_returns, normalize_by_key
from onelayer_fast.planner import (
    METHODS,
    anchor_groups,
    anchor_groups_ref,
    pack,
    pack_ref,
    pack_tokens,
    plan_microbatches,
    plan_microbatches_ref,
    unpack_tokens,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# Derandomized and without an example database: the same cases on every run and no .hypothesis/ folder.
# The autouse seeding fixture of conftest.py is function-scoped; hypothesis draws its own randomness.
PROPERTY = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def plan_inputs(draw, max_n: int = 40):
    """(lengths, token_budget, group_ids or None): every sequence / group fits the budget."""
    n = draw(st.integers(1, max_n))
    lengths = draw(st.lists(st.integers(0, 60), min_size=n, max_size=n))
    group_ids = None
    if draw(st.booleans()):
        group_ids = draw(st.lists(st.integers(-3, 8), min_size=n, max_size=n))
        sums: dict[int, int] = {}
        for g, length in zip(group_ids, lengths):
            sums[g] = sums.get(g, 0) + length
        floor = max(sums.values())
    else:
        floor = max(lengths)
    budget = draw(st.integers(max(floor, 1), max(floor, 1) * 3 + 5))
    return lengths, budget, group_ids


def check_plan(batches: list[list[int]], lengths: list[int], budget: int, group_ids) -> None:
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths))), "every index exactly once"
    loads = [sum(lengths[i] for i in b) for b in batches]
    assert max(loads) <= budget
    assert all(b == sorted(b) and b for b in batches)
    assert len(batches) >= -(-sum(lengths) // budget)
    assert loads == sorted(loads, reverse=True)
    if group_ids is not None:
        batch_of = {i: k for k, b in enumerate(batches) for i in b}
        for g in set(group_ids):
            assert len({batch_of[i] for i, h in enumerate(group_ids) if h == g}) == 1, f"group {g} was split"


# --------------------------------------------------------------------------------------------------
# plan_microbatches
# --------------------------------------------------------------------------------------------------


@PROPERTY
@given(plan_inputs(), st.sampled_from(METHODS))
def test_plan_matches_reference(inputs, method):
    lengths, budget, group_ids = inputs
    batches = plan_microbatches(lengths, budget, method, group_ids)
    assert batches == plan_microbatches_ref(lengths, budget, method, group_ids)
    check_plan(batches, lengths, budget, group_ids)


@PROPERTY
@given(plan_inputs(max_n=60))
def test_largest_first_spread_at_most_the_largest_unit(inputs):
    """List scheduling: the heaviest bin was the lightest when it took its last unit, so max - min <= max unit."""
    lengths, budget, group_ids = inputs
    batches = plan_microbatches(lengths, budget, "largest_first", group_ids)
    loads = [sum(lengths[i] for i in b) for b in batches]
    assert max(loads) - min(loads) <= max(lengths if group_ids is None else loads)


@pytest.mark.parametrize("method", METHODS)
def test_plan_is_balanced_on_rollout_lengths(method):
    """1013 sequences of 16..1024 tokens: few micro-batches over the minimum, loads within a small spread."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(16, 1025, size=1013)
    budget = 8192
    batches = plan_microbatches(lengths, budget, method)
    assert batches == plan_microbatches_ref(lengths.tolist(), budget, method)
    check_plan(batches, lengths.tolist(), budget, None)
    loads = [int(lengths[b].sum()) for b in batches]
    minimum = -(-int(lengths.sum()) // budget)
    assert len(batches) <= minimum + 1
    assert max(loads) - min(loads) <= (16 if method == "karmarkar_karp" else 1024), loads


@pytest.mark.parametrize("method", METHODS)
def test_plan_inputs_types_and_ties(method):
    lengths = [4, 4, 4, 4, 4, 4]
    expected = plan_microbatches(lengths, 8, method)
    assert expected == [[0, 1], [2, 3], [4, 5]] or sorted(map(len, expected)) == [2, 2, 2]
    for same in (torch.tensor(lengths), np.array(lengths, dtype=np.int32), tuple(lengths),
                 np.array(lengths, dtype=np.uint8)):
        assert plan_microbatches(same, 8, method) == expected
    assert plan_microbatches([7], 7, method) == [[0]]
    assert plan_microbatches([0, 0, 0], 1, method) == [[0, 1, 2]]
    # Shared-prompt groups stay whole: 3 groups of 2 under a budget of 2 groups.
    assert plan_microbatches([3, 1, 2, 2, 1, 3], 8, method, group_ids=[0, 0, 1, 1, 2, 2]) in (
        [[0, 1, 2, 3], [4, 5]], [[0, 1, 4, 5], [2, 3]], [[2, 3, 4, 5], [0, 1]])


# --------------------------------------------------------------------------------------------------
# pack
# --------------------------------------------------------------------------------------------------


@st.composite
def pack_inputs(draw):
    n = draw(st.integers(1, 12))
    lengths = draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
    rows = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    padded_len = max(lengths) + draw(st.integers(0, 3))
    return lengths, rows, padded_len, draw(st.sampled_from(planner.PADDING_SIDES))


def assert_packed_equal(actual, expected):
    for name in ("cu_seqlens", "position_ids", "gather_index", "unpack_index"):
        a, e = getattr(actual, name), getattr(expected, name)
        assert a.dtype == e.dtype and a.shape == e.shape and torch.equal(a, e), name
    assert actual.max_seqlen == expected.max_seqlen


@PROPERTY
@given(pack_inputs())
def test_pack_matches_reference_and_round_trips(inputs):
    lengths, rows, padded_len, side = inputs
    packed = pack(lengths, rows, padded_len, side)
    assert_packed_equal(packed, pack_ref(lengths, rows, padded_len, side))
    assert packed.cu_seqlens.dtype == torch.int32 and packed.position_ids.dtype == torch.int64

    # cu_seqlens and position ids agree with the lengths.
    assert torch.equal(packed.cu_seqlens.diff(), torch.tensor([lengths[b] for b in rows], dtype=torch.int32))
    starts = packed.cu_seqlens[:-1].long().repeat_interleave(packed.cu_seqlens.diff().long())
    assert torch.equal(packed.position_ids, torch.arange(len(packed.position_ids)) - starts)

    # A random padded (B, T, 2) tensor, pads poisoned: pack -> unpack gives the rows back exactly.
    b_size = len(lengths)
    valid = torch.zeros(b_size, padded_len, dtype=torch.bool)
    for b, length in enumerate(lengths):
        if side == "right":
            valid[b, :length] = True
        else:
            valid[b, padded_len - length:] = True
    padded = torch.randn(b_size, padded_len, 2, dtype=torch.float64).masked_fill(~valid[..., None], float("nan"))
    tokens = pack_tokens(padded, packed)
    assert tokens.shape == (int(packed.cu_seqlens[-1]), 2) and not tokens.isnan().any()
    back = unpack_tokens(tokens, packed, fill=-7.0)
    expected = padded[rows].masked_fill(~valid[rows][..., None], -7.0)
    assert torch.equal(back, expected)
    # ... and scatters back into the (B, T) layout at the same places.
    scattered = torch.full((b_size * padded_len, 2), float("nan"), dtype=torch.float64)
    scattered[packed.gather_index] = tokens
    scattered = scattered.reshape(b_size, padded_len, 2)
    assert torch.equal(scattered[rows][valid[rows]], padded[rows][valid[rows]])


@PROPERTY
@given(plan_inputs(max_n=30), st.sampled_from(METHODS))
def test_plan_then_pack_covers_every_token_once(inputs, method):
    lengths, budget, group_ids = inputs
    covered = []
    for batch in plan_microbatches(lengths, budget, method, group_ids):
        packed = pack(lengths, batch)
        assert int(packed.cu_seqlens[-1]) <= budget
        covered.append(packed.gather_index)
    width = max(lengths)
    expected = [b * width + t for b, length in enumerate(lengths) for t in range(length)]
    assert sorted(torch.cat(covered).tolist()) == expected


# --------------------------------------------------------------------------------------------------
# anchor_groups
# --------------------------------------------------------------------------------------------------


@st.composite
def episodes(draw):
    """Step records of random episodes: groups of trajectories over a small observation alphabet."""
    steps = []
    for group in range(draw(st.integers(1, 4))):
        for trajectory in range(draw(st.integers(1, 4))):
            for index in range(draw(st.integers(1, 5))):
                observation = draw(st.sampled_from(["A", "B", "C", "start", "é", ""]))
                steps.append(StepRecord(group, trajectory, index, observation, draw(st.sampled_from([0.0, 0.5, 1.0]))))
    return draw(st.permutations(steps))


@PROPERTY
@given(episodes())
def test_anchor_groups_match_reference_and_gigpo(steps):
    groups = [s.group for s in steps]
    observations = [s.observation for s in steps]
    ids = anchor_groups(groups, observations)
    assert ids.dtype == torch.int64
    assert ids.tolist() == anchor_groups_ref(groups, observations)
    # The anchor grouping of gigpo_advantages is keyed by (group, observation): same partition, same A_S.
    gigpo_keys = [(s.group, s.observation) for s in steps]
    first_seen: dict = {}
    assert ids.tolist() == [first_seen.setdefault(key, len(first_seen)) for key in gigpo_keys]
    returns = discounted_returns(steps, 0.9)
    for scale in (False, True):
        assert torch.equal(normalize_by_key(returns, ids.tolist(), scale), normalize_by_key(returns, gigpo_keys, scale))
    # Integer hashes of the observations group the same way, in any container.
    hashes = [hash(o) for o in observations]
    for container in (hashes, np.array(hashes), torch.tensor(hashes)):
        assert torch.equal(anchor_groups(torch.tensor(groups), container), ids)
    assert torch.equal(anchor_groups(groups, np.array(observations)), ids)


def test_anchor_groups_examples():
    assert anchor_groups([0, 0, 1, 0, 1], ["x", "y", "x", "x", "x"]).tolist() == [0, 1, 2, 0, 2]
    assert anchor_groups([], []).tolist() == []
    long = "obs " * 10_000
    assert anchor_groups([3, 3, 3], [long, long + ".", long]).tolist() == [0, 1, 0]


# --------------------------------------------------------------------------------------------------
# Boundary errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, error, message", [
    (lambda: plan_microbatches([], 8), ValueError, "must not be empty"),
    (lambda: plan_microbatches([3, -1], 8), ValueError, r"lengths\[1\] = -1 is negative"),
    (lambda: plan_microbatches([3], 0), ValueError, "token_budget must be positive"),
    (lambda: plan_microbatches([3], -5), ValueError, "token_budget must be positive"),
    (lambda: plan_microbatches([3], 8, "best_fit"), ValueError, "method must be"),
    (lambda: plan_microbatches([3, 9], 8), ValueError, "sequence 1 has 9 tokens, more than token_budget = 8"),
    (lambda: plan_microbatches([3, 6], 8, group_ids=[5, 5]), ValueError, r"group 5 \(2 sequences\) has 9 tokens"),
    (lambda: plan_microbatches([3, 6], 8, group_ids=[1]), ValueError, "same size"),
    (lambda: plan_microbatches([3.5, 2.0], 8), TypeError, "must hold integers"),
    (lambda: plan_microbatches([True, False], 8), TypeError, "must hold integers"),
    (lambda: plan_microbatches([[3, 2]], 8), ValueError, "must be 1-D"),
    (lambda: plan_microbatches(np.array([2**64 - 1], dtype=np.uint64), 8), ValueError, "above 2"),
    (lambda: plan_microbatches([2**62, 2**62, 2**62], 2**62), ValueError, "more than 2"),
    (lambda: pack([3, 2], []), ValueError, "microbatch must not be empty"),
    (lambda: pack([3, 2], [2]), ValueError, r"microbatch\[0\] = 2 is out of range"),
    (lambda: pack([3, 2], [-1]), ValueError, "out of range"),
    (lambda: pack([3, 2], [1, 1]), ValueError, "sequence 1 twice"),
    (lambda: pack([3, 2], [0], padded_len=2), ValueError, "shorter than the longest"),
    (lambda: pack([3, 2], [0], padding_side="middle"), ValueError, "padding_side must be"),
    (lambda: pack([-3, 2], [0]), ValueError, "negative"),
    (lambda: pack([], [0]), ValueError, "must not be empty"),
    (lambda: pack([2**31, 1], [0]), ValueError, "cu_seqlens is int32"),
    (lambda: anchor_groups([0, 1], ["a"]), ValueError, "same size"),
    (lambda: anchor_groups([0], "a"), TypeError, "one string"),
    (lambda: anchor_groups([0, 1], ["a", 1]), TypeError, r"observations\[1\] is int"),
    (lambda: anchor_groups([0, 1], [1, "a"]), TypeError, "must hold integers"),
    (lambda: anchor_groups([0.5], ["a"]), TypeError, "group_ids must hold integers"),
])
def test_boundary_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setitem(sys.modules, "onelayer_fast._planner", None)  # makes `from . import _planner` fail
    with pytest.raises(ImportError, match=r"not built.*pip install -e \."):
        plan_microbatches([1, 2], 4)
    assert not planner.extension_available()
