"""The C++ planner (csrc/planner.cpp) against its pure-Python references, plus invariants and boundary errors.

Property-based (hypothesis, derandomized so CI sees the same cases): random lengths, budgets and groups ->
the same plan as the reference, every index exactly once, every micro-batch within budget, groups unsplit;
pack / unpack round-trips a random padded tensor exactly; pack_layout equals its reference field for field,
takes every token once and predicts each completion token from a state it may attend to; anchor ids equal the
reference and give GiGPO the same anchor groups as `advantages.gigpo_advantages`.
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
    pack_layout,
    pack_layout_ref,
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
# pack_layout
# --------------------------------------------------------------------------------------------------


def segment_lengths(prompt_lens: list[int], completion_lens: list[int], group_size: int | None) -> list[int]:
    group = group_size or 1
    return [prompt_lens[first] + sum(completion_lens[first:first + group])
            for first in range(0, len(prompt_lens), group)]


@st.composite
def layout_inputs(draw):
    """(prompt_lens, completion_lens, prompt_width, completion_width, group_size or None, token_budget or None)."""
    group_size = draw(st.one_of(st.none(), st.integers(1, 4)))
    groups = draw(st.integers(1, 8))
    rows = groups * (group_size or 1)
    prompt_width, completion_width = draw(st.integers(1, 8)), draw(st.integers(0, 8))
    per_group = draw(st.lists(st.integers(1, prompt_width), min_size=groups, max_size=groups))
    prompt_lens = [p for p in per_group for _ in range(group_size or 1)]  # one prompt per group
    completion_lens = draw(st.lists(st.integers(0, completion_width), min_size=rows, max_size=rows))
    longest = max(segment_lengths(prompt_lens, completion_lens, group_size))
    budget = draw(st.one_of(st.none(), st.integers(longest, 3 * longest + 5)))
    return prompt_lens, completion_lens, prompt_width, completion_width, group_size, budget


def assert_layout_index_equal(actual: planner.LayoutIndex, expected: planner.LayoutIndex) -> None:
    for name, a, e in zip(planner.LayoutIndex._fields, actual, expected):
        assert a.dtype == e.dtype == torch.int64 and a.shape == e.shape and torch.equal(a, e), name


def check_layout_index(index: planner.LayoutIndex, prompt_lens, completion_lens, prompt_width, completion_width,
                       group_size, budget) -> None:
    """What build_layout relies on, independently of the reference: tokens, positions, states, branches, plan."""
    group = group_size or 1
    row_width = prompt_width + completion_width
    real = index.segment_ids >= 0
    assert torch.equal(real, index.token_index >= 0)
    # Every completion token once; every prompt once per segment, from the group's first row, left-padded.
    expected_tokens = []
    for first in range(0, len(prompt_lens), group):
        p = prompt_lens[first]
        expected_tokens += [first * row_width + t for t in range(prompt_width - p, prompt_width)]
        for b in range(first, first + group):
            expected_tokens += [b * row_width + prompt_width + t for t in range(completion_lens[b])]
    assert sorted(index.token_index[real].tolist()) == sorted(expected_tokens)
    # Positions: the prompt from 0, each completion continuing it.
    prompt_len_of = {t: prompt_lens[t // row_width] for t in expected_tokens}
    for token, position in zip(index.token_index[real].tolist(), index.position_ids[real].tolist()):
        within = token % row_width
        expected = within - (prompt_width - prompt_len_of[token]) if within < prompt_width \
            else prompt_len_of[token] + within - prompt_width
        assert position == expected
    # Each real completion token b * C + t is predicted by a state of its own segment at position p_b + t - 1
    # that it may attend to (branch 0, or its own completion's).
    targets = index.target_index.tolist()
    assert sorted(targets) == [b * completion_width + t for b, c in enumerate(completion_lens) for t in range(c)]
    target_rows = [x // completion_width for x in targets]
    target_steps = [x % completion_width for x in targets]

    def at_states(values: torch.Tensor) -> list[int]:
        return values.reshape(-1)[index.state_index].tolist()

    assert at_states(index.segment_ids) == [b // group for b in target_rows]
    assert at_states(index.position_ids) == [prompt_lens[b] + t - 1 for b, t in zip(target_rows, target_steps)]
    own_branches = [b % group + 1 if group_size else 0 for b in target_rows]
    assert all(branch in (0, own) for branch, own in zip(at_states(index.branch_ids), own_branches))
    # Rows: largest_first's micro-batches, ordered by first segment, within the budget.
    lengths = segment_lengths(prompt_lens, completion_lens, group_size)
    budget = max(row_width, max(lengths)) if budget is None else budget
    expected_rows = sorted(plan_microbatches(lengths, budget, "largest_first"), key=lambda r: r[0])
    assert [sorted(set(r[r >= 0].tolist())) for r in index.segment_ids] == expected_rows
    assert index.segment_ids.shape[1] == max(sum(lengths[s] for s in r) for r in expected_rows) <= budget


def test_pack_layout_examples():
    # Two rows sharing a 2-token prompt (P = 3, C = 2): one segment [prompt | completion 1 | completion 2].
    shared = pack_layout([2, 2], [1, 2], 3, 2, group_size=2)
    assert shared.token_index.tolist() == [[1, 2, 3, 8, 9]]
    assert shared.position_ids.tolist() == [[0, 1, 2, 2, 3]]
    assert shared.segment_ids.tolist() == [[0, 0, 0, 0, 0]]
    assert shared.branch_ids.tolist() == [[0, 0, 1, 2, 2]]
    assert shared.state_index.tolist() == [1, 1, 3]  # both first tokens come from the prompt's last token
    assert shared.target_index.tolist() == [0, 2, 3]
    # The same rows packed: one segment each, 3 and 4 tokens, one per row under the budget of 5.
    packed = pack_layout([2, 2], [1, 2], 3, 2)
    assert packed.token_index.tolist() == [[1, 2, 3, -1], [6, 7, 8, 9]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0], [0, 1, 2, 3]]
    assert packed.segment_ids.tolist() == [[0, 0, 0, -1], [1, 1, 1, 1]]
    assert packed.branch_ids.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]
    assert packed.state_index.tolist() == [1, 5, 6]
    assert packed.target_index.tolist() == [0, 2, 3]
    # A budget of 7 fits both segments in one row.
    assert pack_layout([2, 2], [1, 2], 3, 2, token_budget=7).segment_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1]]
    assert_layout_index_equal(shared, pack_layout_ref([2, 2], [1, 2], 3, 2, group_size=2))
    assert_layout_index_equal(packed, pack_layout_ref([2, 2], [1, 2], 3, 2))
    # Lengths as tensors, numpy arrays, tuples: the same layout.
    for lens in ((torch.tensor([2, 2]), torch.tensor([1, 2])), (np.array([2, 2], np.int32), np.array([1, 2], np.uint8)),
                 ((2, 2), (1, 2))):
        assert_layout_index_equal(pack_layout(*lens, 3, 2, group_size=2), shared)
    # Nothing to predict: no completion tokens at all.
    empty = pack_layout([1, 3], [0, 0], 3, 0)
    assert empty.state_index.numel() == empty.target_index.numel() == 0
    assert_layout_index_equal(empty, pack_layout_ref([1, 3], [0, 0], 3, 0))


@PROPERTY
@given(layout_inputs())
def test_pack_layout_matches_reference(inputs):
    index = pack_layout(*inputs)
    assert_layout_index_equal(index, pack_layout_ref(*inputs))
    check_layout_index(index, *inputs)


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
    (lambda: pack_layout([], [], 3, 2), ValueError, "prompt_lens must not be empty"),
    (lambda: pack_layout([2, 2], [1], 3, 2), ValueError, "same size"),
    (lambda: pack_layout([2], [1], 0, 2), ValueError, "prompt_width must be at least 1"),
    (lambda: pack_layout([2], [1], 3, -1), ValueError, "completion_width must not be negative"),
    (lambda: pack_layout([2, 0], [1, 1], 3, 2), ValueError, r"prompt_lens\[1\] = 0 is outside \[1, prompt_width = 3\]"),
    (lambda: pack_layout([4], [1], 3, 2), ValueError, r"prompt_lens\[0\] = 4 is outside"),
    (lambda: pack_layout([2], [3], 3, 2), ValueError, r"completion_lens\[0\] = 3 is outside \[0, completion_width = 2"),
    (lambda: pack_layout([2], [-1], 3, 2), ValueError, r"completion_lens\[0\] = -1 is outside"),
    (lambda: pack_layout([2, 2], [1, 1], 3, 2, group_size=0), ValueError, "group_size must be positive"),
    (lambda: pack_layout([2, 2, 2], [1, 1, 1], 3, 2, group_size=2), ValueError, r"\(3 rows\) is not whole groups"),
    (lambda: pack_layout([2, 3], [1, 1], 3, 2, group_size=2), ValueError, "rows 0 and 1 of group 0 have prompts of"),
    (lambda: pack_layout([2, 2], [2, 1], 3, 2, token_budget=3), ValueError,
     r"token_budget = 3 is smaller than the longest segment \(4 tokens\)"),
    (lambda: pack_layout([2], [1], 3, 2, token_budget=0), ValueError, "token_budget must be positive"),
    (lambda: pack_layout([2], [1], 2**62, 2**62), ValueError, "overflows int64"),
    (lambda: pack_layout([2.0], [1], 3, 2), TypeError, "prompt_lens must hold integers"),
    (lambda: pack_layout([2], [[1]], 3, 2), ValueError, "completion_lens must be 1-D"),
    (lambda: pack_layout([2], [1], 3.0, 2), TypeError, "incompatible function arguments"),
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
