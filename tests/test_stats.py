"""Paired bootstrap (onelayer_fast/stats.py): calibration on data with known means, pairing, per-resample
contribution, seeds, determinism, undefined resamples and bad input."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from onelayer_fast.stats import (contribution_components, contribution_half_width, paired_bootstrap,
                                 problems_needed, variance_components)
from onelayer_fast.sweep import contribution as sweep_contribution


def bernoulli(rng: np.random.Generator, p, shape) -> np.ndarray:
    """0/1 scores; p broadcasts against shape (a column of per-seed means for (K, N))."""
    return (rng.random(shape) < np.asarray(p)).astype(np.float64)


def unpaired_contribution_interval(base, full, single, resamples, rng, level=0.95):
    """The wrong way, for comparison: every arm resamples its problems on its own."""
    def means(x):
        n = x.shape[-1]
        return x[rng.integers(0, n, size=(resamples, n))].mean(axis=1)

    b, f, s = means(base), means(full), means(single)
    ratio = (s - b) / (f - b)
    return np.quantile(ratio, [(1 - level) / 2, (1 + level) / 2])


def width(interval) -> float:
    return interval.high - interval.low


def test_intervals_cover_known_means():
    """Independent Bernoulli arms with known means: the 95% intervals cover the truth in about 95% of
    data sets (neither much less, nor trivially always because they are too wide)."""
    rng = np.random.default_rng(11)
    truth = {"base": 0.3, "full": 0.6, 0: 0.45, 1: 0.6}  # contributions 0.5 and 1.0
    n, trials = 500, 60
    covered = {"full": 0, 0: 0, 1: 0}
    widths = []
    for trial in range(trials):
        r = paired_bootstrap(bernoulli(rng, truth["base"], n), bernoulli(rng, truth["full"], (1, n)),
                             {i: bernoulli(rng, truth[i], n) for i in (0, 1)}, resamples=1000, seed=trial)
        covered["full"] += r.full.contains(truth["full"])
        for i in (0, 1):
            covered[i] += r.layers[i].contribution.contains((truth[i] - 0.3) / 0.3)
        widths.append(width(r.full))
    for key, hits in covered.items():
        assert 0.85 <= hits / trials, (key, hits)
    expected = 2 * 1.96 * np.sqrt(0.6 * 0.4 / n)  # the normal interval of a mean of n Bernoulli(0.6)
    assert np.mean(widths) == pytest.approx(expected, rel=0.15)


def test_intervals_shrink_like_one_over_sqrt_n():
    rng = np.random.default_rng(12)

    def run(n):
        return paired_bootstrap(bernoulli(rng, 0.3, n), bernoulli(rng, 0.6, n), {4: bernoulli(rng, 0.5, n)},
                                resamples=4000, seed=1)

    small, large = run(400), run(3600)  # 9x the problems: a third of the width
    assert 2.4 < width(small.full) / width(large.full) < 3.7
    assert 2.4 < width(small.layers[4].contribution) / width(large.layers[4].contribution) < 3.7
    assert 2.4 < width(small.gain) / width(large.gain) < 3.7


def test_level_sets_the_interval():
    """A 50% interval of a near-normal mean is 0.674 / 1.96 of the 95% one, and nested inside it."""
    rng = np.random.default_rng(24)
    args = (bernoulli(rng, 0.3, 2000), bernoulli(rng, 0.6, 2000), {0: bernoulli(rng, 0.5, 2000)})
    wide = paired_bootstrap(*args, resamples=4000, seed=1)
    narrow = paired_bootstrap(*args, resamples=4000, seed=1, level=0.5)
    assert width(narrow.full) / width(wide.full) == pytest.approx(0.674 / 1.96, rel=0.15)
    c_wide, c_narrow = wide.layers[0].contribution, narrow.layers[0].contribution
    assert c_wide.low < c_narrow.low < c_narrow.estimate < c_narrow.high < c_wide.high
    assert narrow.level == 0.5 and narrow.to_dict()["level"] == 0.5


def test_pairing_narrows_the_interval_of_correlated_arms():
    """Arms that solve nested sets of problems (a problem's difficulty decides all of them): the paired
    contribution interval is far narrower than one that resamples each arm on its own."""
    rng = np.random.default_rng(13)
    n = 400
    difficulty = rng.random(n)
    base, full, single = (difficulty < 0.3) * 1.0, (difficulty < 0.6) * 1.0, (difficulty < 0.5) * 1.0
    paired = paired_bootstrap(base, full, {0: single}, resamples=4000, seed=2).layers[0].contribution
    low, high = unpaired_contribution_interval(base, full, single, 4000, rng)
    assert paired.contains(paired.estimate)
    assert width(paired) < 0.5 * (high - low)


def test_pairing_changes_nothing_for_independent_arms():
    """The counter-check: without correlation between arms, paired and unpaired widths agree."""
    rng = np.random.default_rng(14)
    n = 800
    base, full, single = bernoulli(rng, 0.3, n), bernoulli(rng, 0.6, n), bernoulli(rng, 0.5, n)
    paired = paired_bootstrap(base, full, {0: single}, resamples=4000, seed=3).layers[0].contribution
    low, high = unpaired_contribution_interval(base, full, single, 4000, rng)
    assert 0.8 < width(paired) / (high - low) < 1.25


def reference_bootstrap(base, full, single, resamples, rng, threshold=0.8):
    """A plain loop, one resample at a time, with explicit index lists (seeds shared by the trained arms)."""
    k, n = full.shape
    values = []
    for _ in range(resamples):
        problems = rng.integers(0, n, size=n)
        seeds = rng.integers(0, k, size=k)
        b = base[problems].mean()
        f = full[np.ix_(seeds, problems)].mean()
        s = single[np.ix_(seeds, problems)].mean()
        values.append((s - b) / (f - b))
    values = np.array(values)
    return np.quantile(values, [0.025, 0.975]), (values >= threshold).mean()


def test_matches_a_plain_loop():
    """The vectorized counts-times-scores computation gives the distribution of the obvious loop."""
    rng = np.random.default_rng(15)
    n = 300
    base = bernoulli(rng, 0.3, n)
    full = bernoulli(rng, [[0.55], [0.65]], (2, n))  # two seeds that disagree
    single = bernoulli(rng, [[0.5], [0.62]], (2, n))
    (low, high), p = reference_bootstrap(base, full, single, 4000, rng)
    r = paired_bootstrap(base, full, {7: single}, resamples=4000, seed=4).layers[7]
    assert r.contribution.low == pytest.approx(low, abs=0.04)
    assert r.contribution.high == pytest.approx(high, abs=0.04)
    assert r.p_recovers == pytest.approx(p, abs=0.03)


def test_contribution_is_computed_in_each_resample():
    """Three problems with a known resampling distribution. Base solves none, Full the first two, the
    single layer the first. With counts (c0, c1, c2) of a resample, contribution = c0 / (c0 + c1):
    undefined when c0 + c1 = 0 (probability 1/27); >= 0.8 only when c1 = 0 < c0, so
    P(>= 0.8 | defined) = ((2/3)^3 - (1/3)^3) / (26/27) = 7/26."""
    base, full, single = np.zeros(3), np.array([1.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0])
    resamples = 40_000
    r = paired_bootstrap(base, full, {0: single}, resamples=resamples, seed=5)
    layer = r.layers[0]
    assert layer.contribution.estimate == pytest.approx(0.5)
    assert r.undefined == pytest.approx(resamples / 27, abs=4 * np.sqrt(resamples / 27))
    assert r.defined == resamples - r.undefined
    assert layer.p_recovers == pytest.approx(7 / 26, abs=0.01)
    assert (layer.contribution.low, layer.contribution.high) == (0.0, 1.0)


def test_small_gain_interval_is_not_a_ratio_of_endpoints():
    """When Full - Base is small, dividing interval endpoints gives nonsense (a denominator interval that
    crosses 0); the per-resample interval is a different, ordered interval around the estimate."""
    rng = np.random.default_rng(16)
    n = 300
    difficulty = rng.random(n)
    base = (difficulty < 0.50) * 1.0
    improved = rng.random(n) < 0.1  # Full newly solves a few problems (about 15 of 300): a small gain
    full = np.maximum(base, improved)
    single = np.maximum(base, improved & (rng.random(n) < 0.7))  # ... of which the layer gets most
    r = paired_bootstrap(base, full, {3: single}, resamples=4000, seed=6)
    c, b = r.layers[3].contribution, r.base.estimate
    naive_low = (r.layers[3].score.low - b) / (r.full.high - b)
    naive_high = (r.layers[3].score.high - b) / (r.full.low - b)
    assert r.full.low < b < r.full.high  # Full's own interval straddles Base ...
    assert r.gain.low > 0  # ... but the paired gain is positive: pairing removes the shared problems' noise
    assert c.low <= c.estimate <= c.high
    assert abs(naive_low - c.low) > 0.1 and abs(naive_high - c.high) > 0.1


def test_seeds_that_disagree_widen_the_interval():
    rng = np.random.default_rng(17)
    n, k = 400, 4

    def run(full_means, single_means):
        full = bernoulli(rng, np.array(full_means)[:, None], (k, n))
        single = bernoulli(rng, np.array(single_means)[:, None], (k, n))
        return paired_bootstrap(bernoulli(rng, 0.3, n), full, {1: single}, resamples=3000, seed=7,
                                paired_seeds=False)

    agree = run([0.6] * 4, [0.5] * 4)
    disagree = run([0.45, 0.55, 0.65, 0.75], [0.35, 0.45, 0.55, 0.65])  # the same means over seeds
    assert width(disagree.full) > 1.5 * width(agree.full)
    assert width(disagree.layers[1].contribution) > 1.3 * width(agree.layers[1].contribution)


def test_paired_seeds_keep_an_effect_shared_by_the_arms():
    """A seed effect that moves Full and Single(i) together (the same prompt order): drawing the seeds
    jointly keeps it out of the ratio; drawing them per arm does not. Marginal intervals barely change."""
    rng = np.random.default_rng(18)
    n, shift = 600, np.array([-0.15, -0.05, 0.05, 0.15])[:, None]
    base = bernoulli(rng, 0.3, n)
    full, single = bernoulli(rng, 0.6 + shift, (4, n)), bernoulli(rng, 0.5 + shift, (4, n))
    joint = paired_bootstrap(base, full, {2: single}, resamples=3000, seed=8)
    apart = paired_bootstrap(base, full, {2: single}, resamples=3000, seed=8, paired_seeds=False)
    assert width(joint.layers[2].contribution) < 0.7 * width(apart.layers[2].contribution)
    assert 0.8 < width(joint.full) / width(apart.full) < 1.25


def test_deterministic_for_a_seed_and_independent_of_chunking():
    rng = np.random.default_rng(19)
    n = 120
    base = bernoulli(rng, 0.3, (2, n))  # two evaluations of Base: drawn on their own
    full = bernoulli(rng, 0.6, (3, n))
    singles = {i: bernoulli(rng, 0.3 + 0.1 * i, (3, n)) for i in range(3)}
    for paired_seeds in (True, False):
        a = paired_bootstrap(base, full, singles, resamples=900, seed=9, paired_seeds=paired_seeds)
        b = paired_bootstrap(base, full, singles, resamples=900, seed=9, paired_seeds=paired_seeds, chunk_elements=257)
        assert a == b
        assert a.to_dict() == paired_bootstrap(base, full, singles, resamples=900, seed=9,
                                               paired_seeds=paired_seeds).to_dict()
        assert a != paired_bootstrap(base, full, singles, resamples=900, seed=10, paired_seeds=paired_seeds)


def test_point_estimates_are_the_sweeps():
    rng = np.random.default_rng(20)
    base, full = bernoulli(rng, 0.3, 200), rng.random((2, 200))  # rewards in [0, 1] work the same
    singles = {i: rng.random((2, 200)) * (0.5 + 0.2 * i) for i in range(3)}
    r = paired_bootstrap(base, full, singles, resamples=200)
    assert r.base.estimate == pytest.approx(base.mean()) and r.full.estimate == pytest.approx(full.mean())
    assert r.gain.estimate == pytest.approx(full.mean() - base.mean())
    for i, s in singles.items():
        assert r.layers[i].contribution.estimate == pytest.approx(sweep_contribution(s.mean(), base.mean(), full.mean()))
        assert r.layers[i].seeds == 2
    assert list(r.layers) == [0, 1, 2]
    assert r.best_layer() == 2


def test_p_best_shares_ties_and_picks_a_clear_winner():
    rng = np.random.default_rng(21)
    n = 400
    strong = bernoulli(rng, 0.7, n)
    r = paired_bootstrap(bernoulli(rng, 0.3, n), bernoulli(rng, 0.7, n),
                         {0: bernoulli(rng, 0.35, n), 5: strong, 6: strong.copy()}, resamples=500)
    assert r.layers[5].p_best == pytest.approx(0.5) and r.layers[6].p_best == pytest.approx(0.5)
    assert r.layers[0].p_best == 0.0
    assert sum(s.p_best for s in r.layers.values()) == pytest.approx(1.0)


def test_full_equal_to_base_leaves_every_contribution_undefined():
    rng = np.random.default_rng(22)
    scores = bernoulli(rng, 0.4, 100)
    r = paired_bootstrap(scores, scores.copy(), {2: bernoulli(rng, 0.5, 100)}, resamples=300)
    assert r.undefined == 300 and r.defined == 0 and not r.gain_is_positive
    layer = r.layers[2]
    assert layer.contribution.estimate is None and layer.contribution.low is None and layer.p_recovers is None
    assert layer.score.low is not None  # the arm's own interval still exists
    text = json.dumps(r.to_dict(), allow_nan=False)  # no NaN sneaks into the JSON
    assert json.loads(text)["layers"][0]["contribution"] == {"estimate": None, "low": None, "high": None}


def test_to_dict_is_json():
    rng = np.random.default_rng(23)
    r = paired_bootstrap(bernoulli(rng, 0.3, 50), bernoulli(rng, 0.7, (2, 50)), {4: bernoulli(rng, 0.6, (2, 50))},
                         resamples=100, seed=3)
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["resamples"] == 100 and d["num_problems"] == 50 and d["full_seeds"] == 2 and d["seed"] == 3
    assert d["layers"][0]["layer"] == 4
    assert d["layers"][0]["contribution"]["estimate"] == pytest.approx(r.layers[4].contribution.estimate)


@pytest.mark.parametrize("change, message", [
    (dict(full=np.ones((2, 9))), "problems"),  # N differs from base's 10
    (dict(singles={0: np.ones((2, 11))}), "problems"),
    (dict(full=np.ones((0, 10))), "K >= 1"),
    (dict(base=np.ones(0)), "N >= 1"),
    (dict(base=np.ones((1, 2, 10))), "shape"),
    (dict(full=np.full((2, 10), np.nan)), "finite"),
    (dict(singles={0: np.ones((3, 10))}), "paired_seeds"),  # K differs between trained arms
    (dict(singles={"a": np.ones((2, 10))}), "layer"),
    (dict(level=0.0), "level"), (dict(level=1.0), "level"), (dict(level=1.5), "level"),
    (dict(level=float("nan")), "level"),
    (dict(resamples=0), "resamples"), (dict(resamples=2.5), "resamples"), (dict(resamples=True), "resamples"),
    (dict(recover_threshold=float("inf")), "recover_threshold"),
    (dict(chunk_elements=0), "chunk_elements"),
    (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"),
])
def test_bad_input_raises(change, message):
    args = dict(base=np.zeros(10), full=np.ones((2, 10)), singles={0: np.ones((2, 10))}, resamples=10)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(**args)


def test_unequal_seeds_are_fine_when_drawn_per_arm():
    r = paired_bootstrap(np.zeros(10), np.ones((2, 10)), {0: np.ones((3, 10))}, resamples=10, paired_seeds=False)
    assert r.layers[0].seeds == 3 and r.layers[0].contribution.estimate == 1.0


# ------------------------------------------------------------------------------------------ planning

def test_variance_components_recover_known_parts():
    """Seed effects, problem effects and noise of known variance: the ANOVA split finds each, and the
    variance of the mean it implies is the one a crossed bootstrap of seeds and problems measures."""
    rng = np.random.default_rng(0)
    k, n = 200, 1000
    x = (0.3 * rng.standard_normal((k, 1)) + 0.5 * rng.standard_normal((1, n)) + 0.7 * rng.standard_normal((k, n)))
    parts = variance_components(x)
    assert parts.seed == pytest.approx(0.09, rel=0.3)  # 200 seeds: the seed part is the loosest estimate
    assert parts.problem == pytest.approx(0.25, rel=0.1)
    assert parts.residual == pytest.approx(0.49, rel=0.03)
    small = x[:8, :60]
    means = [small[rng.integers(0, 8, 8)][:, rng.integers(0, 60, 60)].mean() for _ in range(4000)]
    assert variance_components(small).variance_of_mean(8, 60) == pytest.approx(np.var(means), rel=0.25)


def sweep_with_seed_effects(rng, k, n):
    """0/1 scores: Base 0.3, Full 0.6 and a layer 0.45 on average, with per-problem difficulty shared by
    the arms and a per-seed luck shared by Full and the layer (the sweep's seed k is one prompt order)."""
    difficulty = rng.normal(0.0, 0.15, n)
    luck = rng.normal(0.0, 0.06, (k, 1))
    base = bernoulli(rng, np.clip(0.3 + difficulty, 0, 1), (n,))
    full = bernoulli(rng, np.clip(0.6 + difficulty + luck, 0, 1), (k, n))
    single = bernoulli(rng, np.clip(0.45 + difficulty + 0.5 * luck, 0, 1), (k, n))
    return base, full, single


def test_planned_half_width_matches_the_bootstrap():
    """At the observed sizes the linearized half-width is the paired bootstrap's, within its own noise."""
    rng = np.random.default_rng(1)
    base, full, single = sweep_with_seed_effects(rng, 12, 600)
    parts, gain = contribution_components(base, full, single)
    predicted = contribution_half_width(parts, gain, 12, 600)
    result = paired_bootstrap(base, full, {5: single}, resamples=4000, seed=0)
    observed = result.layers[5].contribution.width / 2
    # the bootstrap of K seeds keeps (K - 1) / K of their variance; the plan is for fresh seeds
    assert predicted == pytest.approx(observed, rel=0.2)
    assert gain == pytest.approx(result.gain.estimate)


def test_problems_needed_reaches_the_target_and_no_fewer_would():
    rng = np.random.default_rng(2)
    base, full, single = sweep_with_seed_effects(rng, 4, 300)
    parts, gain = contribution_components(base, full, single)
    for seeds in (2, 4, 8, 16):
        n = problems_needed(parts, gain, seeds, 0.25)
        if n is None:  # the seed part alone is wider than the target
            assert math.sqrt(parts.seed / seeds) * 1.959964 / abs(gain) > 0.25
            continue
        assert contribution_half_width(parts, gain, seeds, n) <= 0.25 + 1e-12
        assert n == 1 or contribution_half_width(parts, gain, seeds, n - 1) > 0.25
    needs = [problems_needed(parts, gain, s, 0.25) for s in (2, 4, 8, 16)]
    finite = [x for x in needs if x is not None]
    assert finite and finite == sorted(finite, reverse=True)  # more seeds never need more problems


def test_planning_refuses_what_it_cannot_estimate():
    rng = np.random.default_rng(3)
    base, full, single = sweep_with_seed_effects(rng, 2, 50)
    with pytest.raises(ValueError, match="at least 2 of each"):
        variance_components(full[:1])
    with pytest.raises(ValueError, match="one shape"):
        contribution_components(base, full, single[:, :10])
    with pytest.raises(ValueError, match="Full does not differ"):
        contribution_components(base, np.tile(base, (2, 1)), single)
