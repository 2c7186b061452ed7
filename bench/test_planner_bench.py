"""The C++ planner (onelayer_fast._planner) against its pure-Python references, for pytest-benchmark:

    pytest bench/test_planner_bench.py --benchmark-only
    pytest bench/ --benchmark-only --benchmark-group-by=group --benchmark-columns=min,median,iqr,rounds

Workload: 10,000 sequences of 64..2048 tokens (uniform, seed 0; about 10.5M tokens), as one large GRPO rollout
batch after padding is dropped. Groups, each the extension against the `_ref` the tests use:
    plan_<method>       plan_microbatches under a 16,384-token budget (~645 micro-batches), per method
    plan_groups_<method> the same with shared-prompt groups of 8 kept whole, under 32,768 tokens
    pack                pack() of the first 64 micro-batches of the plan (~1.0M tokens: the reference builds
                        Python lists per token, so the whole batch would take it tens of seconds a round)
    pack_layout_<layout> pack_layout() of the whole batch as packing.build_layout plans it: the 10,000 sequences as
                        completions (C = 2048) behind left-padded prompts of 16..512 tokens (P = 512, one per group
                        of 8), one segment per row ("packed") or per group ("shared_prompt"), default budget
    anchor_groups       10,000 GiGPO steps in 1,250 groups, 200-character observations from 6 per group
Before timing, every contender is checked against its reference, so a fast wrong planner fails here.
The references run few rounds (they take up to seconds); the medians are what to compare.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (the [test] extra)")

from onelayer_fast import planner  # noqa: E402

N_SEQUENCES = 10_000
MIN_LEN, MAX_LEN = 64, 2048
BUDGET, GROUP_BUDGET, GROUP_SIZE = 16_384, 32_768, 8
PACKED_MICROBATCHES = 64
PROMPT_MIN, PROMPT_WIDTH = 16, 512
REF_ROUNDS = 3


@pytest.fixture(scope="module")
def lengths() -> np.ndarray:
    return np.random.default_rng(0).integers(MIN_LEN, MAX_LEN + 1, size=N_SEQUENCES)


def run(benchmark, impl: str, fn, *args):
    """Times fn(*args); the Python references get a fixed, small number of rounds."""
    if impl == "ref":
        return benchmark.pedantic(fn, args=args, rounds=REF_ROUNDS, iterations=1, warmup_rounds=0)
    return benchmark(fn, *args)


@pytest.mark.parametrize("impl", ["cpp", "ref"])
@pytest.mark.parametrize("method", planner.METHODS)
def test_plan_microbatches(benchmark, lengths, method, impl):
    benchmark.group = f"plan_{method}"
    expected = planner.plan_microbatches_ref(lengths.tolist(), BUDGET, method)
    if impl == "cpp":
        assert planner.plan_microbatches(lengths, BUDGET, method) == expected
        run(benchmark, impl, planner.plan_microbatches, lengths, BUDGET, method)
    else:
        run(benchmark, impl, planner.plan_microbatches_ref, lengths.tolist(), BUDGET, method)
    loads = [int(lengths[b].sum()) for b in expected]
    benchmark.extra_info.update(microbatches=len(expected), spread=max(loads) - min(loads),
                                lower_bound=-(-int(lengths.sum()) // BUDGET))


@pytest.mark.parametrize("impl", ["cpp", "ref"])
@pytest.mark.parametrize("method", planner.METHODS)
def test_plan_microbatches_groups(benchmark, lengths, method, impl):
    benchmark.group = f"plan_groups_{method}"
    groups = np.arange(N_SEQUENCES) // GROUP_SIZE
    expected = planner.plan_microbatches_ref(lengths.tolist(), GROUP_BUDGET, method, groups.tolist())
    if impl == "cpp":
        assert planner.plan_microbatches(lengths, GROUP_BUDGET, method, groups) == expected
        run(benchmark, impl, planner.plan_microbatches, lengths, GROUP_BUDGET, method, groups)
    else:
        run(benchmark, impl, planner.plan_microbatches_ref, lengths.tolist(), GROUP_BUDGET, method, groups.tolist())
    benchmark.extra_info.update(microbatches=len(expected))


@pytest.mark.parametrize("impl", ["cpp", "ref"])
def test_pack(benchmark, lengths, impl):
    benchmark.group = "pack"
    batches = planner.plan_microbatches(lengths, BUDGET)[:PACKED_MICROBATCHES]
    as_list = lengths.tolist()
    pack = planner.pack if impl == "cpp" else planner.pack_ref

    def pack_all(batches):
        return [pack(as_list if impl == "ref" else lengths, batch) for batch in batches]

    if impl == "cpp":
        for got, want in zip(pack_all(batches[:4]), [planner.pack_ref(as_list, b) for b in batches[:4]]):
            assert all(np.array_equal(np.asarray(g), np.asarray(w)) for g, w in zip(got, want))
    run(benchmark, impl, pack_all, batches)
    benchmark.extra_info.update(tokens=int(sum(lengths[b].sum() for b in batches)))


@pytest.mark.parametrize("impl", ["cpp", "ref"])
@pytest.mark.parametrize("layout", ["packed", "shared_prompt"])
def test_pack_layout(benchmark, lengths, layout, impl):
    benchmark.group = f"pack_layout_{layout}"
    prompt_lens = np.random.default_rng(1).integers(PROMPT_MIN, PROMPT_WIDTH + 1, size=N_SEQUENCES // GROUP_SIZE)
    args = (np.repeat(prompt_lens, GROUP_SIZE), lengths, PROMPT_WIDTH, MAX_LEN,
            GROUP_SIZE if layout == "shared_prompt" else None)
    if impl == "cpp":
        got, want = planner.pack_layout(*args), planner.pack_layout_ref(*args)
        assert all(g.dtype == w.dtype and np.array_equal(g.numpy(), w.numpy()) for g, w in zip(got, want))
        run(benchmark, impl, planner.pack_layout, *args)
    else:
        got = run(benchmark, impl, planner.pack_layout_ref, *args)
    rows, width = got.token_index.shape
    benchmark.extra_info.update(packed_rows=rows, row_length=width, tokens=rows * width,
                                real_tokens=int((got.segment_ids >= 0).sum()))


@pytest.mark.parametrize("impl", ["cpp", "ref"])
def test_anchor_groups(benchmark, impl):
    benchmark.group = "anchor_groups"
    rng = np.random.default_rng(0)
    groups = np.arange(N_SEQUENCES) // GROUP_SIZE
    observations = [f"{g}:{int(o)}:" + "x" * 190 for g, o in zip(groups, rng.integers(0, 6, size=N_SEQUENCES))]
    expected = planner.anchor_groups_ref(groups.tolist(), observations)
    if impl == "cpp":
        assert planner.anchor_groups(groups, observations).tolist() == expected
        run(benchmark, impl, planner.anchor_groups, groups, observations)
    else:
        run(benchmark, impl, planner.anchor_groups_ref, groups.tolist(), observations)
