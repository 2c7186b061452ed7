"""Error bars for a layer sweep: a paired bootstrap over test problems (and training seeds).

Every arm (Base, Full, Single(i) for each layer i) is scored on the same N test problems, so the
problems are shared units: a resample draws N problem indices with replacement ONCE and applies them to
every arm. Problem difficulty then cancels in differences and ratios between arms, which is what makes
the contribution interval as narrow as the data allow (an unpaired bootstrap would add each arm's
problem-sampling noise separately).

Trained arms may have K >= 1 training seeds, a (K, N) score array each; an arm's resampled score is the
mean over its drawn seeds and the drawn problems. Base is not trained: one row (N,), or (K_b, N) when it
was evaluated several times (e.g. sampled decoding); its rows are always drawn on their own.

    contribution(i) = (Single(i) - Base) / (Full - Base)

is computed inside every resample from that resample's three scores, never from the arms' intervals:
the ratio of interval endpoints is not an interval of the ratio (the endpoints of numerator and
denominator do not come from the same resample, and when Full - Base can be near 0 the ratio is wildly
non-linear). Intervals are percentile intervals (the `level` central share of the resampled values).

Resamples with |Full - Base| <= GAIN_EPS (possible with 0/1 scores, where the gain is a multiple of
1/(K N)) have no contribution: they are counted in `BootstrapResult.undefined` and left out of every
contribution interval and of `p_recovers`, which is therefore a share of the defined resamples. The
count is the same for every layer, as it depends on Base and Full only. Many undefined resamples mean
that Full's gain itself is uncertain: check `gain` (Full - Base) before reading contributions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

# The tolerance of sweep.contribution: a smaller |Full - Base| is "no gain to share".
GAIN_EPS = 1e-12
# Problem draws held at once (rows x N of int64 indices and float64 counts, ~64 MiB): bounds memory for
# large resamples x N. Every random stream is consumed in the same order whatever the chunking, so the
# results do not depend on it.
MAX_CHUNK_ELEMENTS = 1 << 22


# ------------------------------------------------------------------------------------------ results

def _num(value: float | None) -> float | None:
    """JSON-safe: NaN and inf (no value) become None."""
    return None if value is None or not math.isfinite(value) else float(value)


@dataclass(frozen=True)
class Interval:
    """A point estimate on the full data and the percentile interval of the resampled values.

    Any field is None when it is undefined (a contribution with Full == Base; no defined resample)."""

    estimate: float | None
    low: float | None
    high: float | None

    def contains(self, value: float) -> bool:
        return self.low is not None and self.high is not None and self.low <= value <= self.high

    @property
    def width(self) -> float | None:
        return None if self.low is None or self.high is None else self.high - self.low

    def to_dict(self) -> dict[str, float | None]:
        return {"estimate": _num(self.estimate), "low": _num(self.low), "high": _num(self.high)}


@dataclass(frozen=True)
class LayerStats:
    layer: int
    seeds: int  # K of this arm
    score: Interval  # Single(i)
    contribution: Interval
    p_recovers: float | None  # share of defined resamples with contribution >= recover_threshold; None: none defined
    p_best: float  # share of resamples where Single(i) is the highest of all layers (ties share the credit)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "seeds": self.seeds, "score": self.score.to_dict(),
                "contribution": self.contribution.to_dict(), "p_recovers": _num(self.p_recovers),
                "p_best": _num(self.p_best)}


@dataclass(frozen=True)
class BootstrapResult:
    base: Interval
    full: Interval
    gain: Interval  # Full - Base, resampled in pairs like everything else
    layers: dict[int, LayerStats]  # ascending layer
    num_problems: int
    base_seeds: int
    full_seeds: int
    resamples: int
    undefined: int  # resamples with |Full - Base| <= GAIN_EPS (no contribution there; see the module doc)
    level: float
    recover_threshold: float
    seed: int | None
    paired_seeds: bool

    @property
    def defined(self) -> int:
        """Resamples that have a contribution."""
        return self.resamples - self.undefined

    @property
    def gain_is_positive(self) -> bool:
        """Full clearly beats Base: the whole interval of Full - Base lies above 0."""
        return self.gain.low is not None and self.gain.low > 0

    def best_layer(self) -> int | None:
        """The layer with the highest Single(i) point score (lowest index on ties), as sweep.best_layer.

        While Full beats Base this is also the highest point contribution (one shared positive denominator)."""
        if not self.layers:
            return None
        return max(self.layers.values(), key=lambda s: (s.score.estimate, -s.layer)).layer

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (layers as a list: JSON object keys could not be ints; NaN as null)."""
        return {
            "method": "paired bootstrap, percentile intervals",
            "note": ("contribution = (single - base) / (full - base), computed in each resample; resamples with "
                     "full == base are undefined and excluded from contribution intervals and p_recovers"),
            "num_problems": self.num_problems, "base_seeds": self.base_seeds, "full_seeds": self.full_seeds,
            "resamples": self.resamples, "undefined": self.undefined, "level": self.level,
            "recover_threshold": self.recover_threshold, "seed": self.seed, "paired_seeds": self.paired_seeds,
            "base": self.base.to_dict(), "full": self.full.to_dict(), "gain": self.gain.to_dict(),
            "layers": [s.to_dict() for s in self.layers.values()],
        }


# ------------------------------------------------------------------------------------------ inputs

def _as_scores(name: str, values: Any) -> np.ndarray:
    """(N,) -> (1, N); (K, N) as is; float64, finite, K >= 1, N >= 1."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"{name}: scores must have shape (N,) or (K, N), got {array.shape}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{name}: need K >= 1 seeds and N >= 1 problems, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: scores must be finite")
    return array


def _check_settings(resamples: int, level: float, recover_threshold: float, chunk_elements: int) -> None:
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise ValueError(f"resamples must be an integer >= 1, got {resamples!r}")
    if not (isinstance(level, (int, float)) and 0.0 < level < 1.0):  # NaN fails the comparison too
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if not (isinstance(recover_threshold, (int, float)) and math.isfinite(recover_threshold)):
        raise ValueError(f"recover_threshold must be a finite number, got {recover_threshold!r}")
    if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, (int, np.integer)) or chunk_elements < 1:
        raise ValueError(f"chunk_elements must be an integer >= 1, got {chunk_elements!r}")


# ------------------------------------------------------------------------------------------ bootstrap

def _draw_counts(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """(rows, n) float64: how often each of n units is drawn in n draws with replacement, per row.

    Counts instead of index lists turn "mean over the drawn problems" into one matrix product."""
    idx = rng.integers(0, n, size=(rows, n))
    idx += np.arange(rows)[:, None] * n  # one bincount for all rows: row r's units live at r*n .. r*n+n-1
    return np.bincount(idx.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)


def _percentiles(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise percentile interval of (arms, resamples); NaN rows where there are no samples."""
    if samples.shape[-1] == 0:
        empty = np.full(samples.shape[:-1], np.nan)
        return empty, empty
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(samples, [tail, 1.0 - tail], axis=-1)
    return low, high


def _contribution(single: float, base: float, full: float) -> float | None:
    gain = full - base
    return None if abs(gain) <= GAIN_EPS else (single - base) / gain + 0.0  # + 0.0: no -0.0


def paired_bootstrap(
    base: np.ndarray,
    full: np.ndarray,
    singles: Mapping[int, np.ndarray],
    resamples: int = 10_000,
    seed: int | None = 0,
    level: float = 0.95,
    recover_threshold: float = 0.8,
    *,
    paired_seeds: bool = True,
    chunk_elements: int = MAX_CHUNK_ELEMENTS,
) -> BootstrapResult:
    """Paired bootstrap of Base, Full, Single(i), Full - Base and contribution(i).

    base: (N,) or (K_b, N) per-problem scores of the untrained model; full and every singles[i]: (N,) or
    (K, N), row k the scores of training seed k. Scores are 0/1 accuracies or rewards (any finite scale:
    the contribution is a ratio).

    Each resample draws N problem indices with replacement, the same for every arm. With
    `paired_seeds` (the default) it also draws K seed indices shared by every trained arm, which must
    then all have the same K: a sweep gives run k of every arm the same training seed, hence the same
    prompt order and sampling keys, so seed k is a shared unit like a problem and a lucky or unlucky
    prompt order moves Full and Single(i) together; drawing the seeds jointly keeps that link, as the
    problem draw does. Pass paired_seeds=False when seed k of different arms have nothing in common:
    each arm then draws its own seeds (and may have its own K). Base's rows are always drawn on their
    own: it was not trained with any of those seeds. With few seeds (K = 2 or 3) the seed part of the
    spread is coarse and somewhat too narrow (a bootstrap of K values has (K - 1) / K of their variance).

    `seed` fixes every draw: the same inputs and seed give the same result, whatever `chunk_elements`
    (how many problem draws are held in memory at once). Raises ValueError for bad shapes or settings.
    """
    _check_settings(resamples, level, recover_threshold, chunk_elements)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed must be an integer >= 0 or None, got {seed!r}")
    seed = None if seed is None else int(seed)  # a plain int in to_dict (JSON has no numpy integers)
    arms = [_as_scores("base", base), _as_scores("full", full)]
    layers = sorted(singles)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise ValueError(f"singles keys must be layer indices (int), got {layer!r}")
        arms.append(_as_scores(f"singles[{layer}]", singles[layer]))
    n = arms[0].shape[1]
    for name, array in zip(["full", *(f"singles[{i}]" for i in layers)], arms[1:]):
        if array.shape[1] != n:
            raise ValueError(f"{name} has {array.shape[1]} problems, base has {n}: every arm must be scored "
                             "on the same problems, in the same order")
    seeds = [a.shape[0] for a in arms]
    if paired_seeds and len(set(seeds[1:])) > 1:
        raise ValueError(f"paired_seeds needs the same number of seeds in every trained arm, got "
                         f"full={seeds[1]}, " + ", ".join(f"layer {i}={k}" for i, k in zip(layers, seeds[2:]))
                         + "; pass paired_seeds=False to draw each arm's seeds on its own")

    # All arms side by side: one matrix product per chunk gives every seed row's mean over the drawn problems.
    stacked = np.concatenate(arms, axis=0).T  # (N, sum of K)
    ends = np.cumsum(seeds)
    starts = ends - seeds
    # Separate streams (problems, shared seeds, each arm's own seeds): each is consumed in the same order
    # whatever the chunking, and switching paired_seeds leaves the problem draws unchanged.
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2 + len(arms))]
    problem_rng, shared_rng, arm_rngs = streams[0], streams[1], streams[2:]
    k_trained = seeds[1]

    scores = np.empty((len(arms), resamples))  # resampled score of each arm
    rows = max(1, chunk_elements // max(n, k_trained))
    for first in range(0, resamples, rows):
        count = min(rows, resamples - first)
        per_seed = _draw_counts(problem_rng, count, n) @ stacked / n  # (count, sum of K)
        shared = _draw_counts(shared_rng, count, k_trained) / k_trained if paired_seeds and k_trained > 1 else None
        for a, (lo, hi) in enumerate(zip(starts, ends)):
            k = hi - lo
            if k == 1:
                scores[a, first:first + count] = per_seed[:, lo]
                continue
            weights = shared if (shared is not None and a > 0) else _draw_counts(arm_rngs[a], count, k) / k
            scores[a, first:first + count] = np.einsum("rk,rk->r", per_seed[:, lo:hi], weights)

    base_r, full_r, singles_r = scores[0], scores[1], scores[2:]
    gain_r = full_r - base_r
    defined = np.abs(gain_r) > GAIN_EPS
    contrib_r = (singles_r[:, defined] - base_r[defined]) / gain_r[defined]  # (layers, defined resamples)

    points = [float(a.mean()) for a in arms]
    arm_low, arm_high = _percentiles(scores, level)
    gain_low, gain_high = _percentiles(gain_r[None, :], level)
    c_low, c_high = _percentiles(contrib_r, level)
    p_recovers = (contrib_r >= recover_threshold).mean(axis=1) if defined.any() else np.full(len(layers), np.nan)
    if layers:
        # Which layer is best in each resample: a paired ranking (shared problems), free of the gain's sign.
        top = singles_r >= singles_r.max(axis=0) - GAIN_EPS
        p_best = (top / top.sum(axis=0)).mean(axis=1)
    else:
        p_best = np.empty(0)

    def interval(a: int) -> Interval:
        return Interval(points[a], float(arm_low[a]), float(arm_high[a]))

    stats = {}
    for j, layer in enumerate(layers):
        point = _contribution(points[2 + j], points[0], points[1])
        stats[int(layer)] = LayerStats(
            layer=int(layer), seeds=seeds[2 + j], score=interval(2 + j),
            contribution=Interval(point, _num(c_low[j]), _num(c_high[j])),
            p_recovers=_num(p_recovers[j]), p_best=float(p_best[j]))
    return BootstrapResult(
        base=interval(0), full=interval(1),
        gain=Interval(points[1] - points[0], float(gain_low[0]), float(gain_high[0])),
        layers=stats, num_problems=n, base_seeds=seeds[0], full_seeds=seeds[1], resamples=int(resamples),
        undefined=int((~defined).sum()), level=float(level), recover_threshold=float(recover_threshold),
        seed=seed, paired_seeds=paired_seeds)


# ------------------------------------------------------------------------------------------ planning

@dataclass(frozen=True)
class VarianceComponents:
    """Two-way random-effects split of a (K seeds, N problems) score array, from the ANOVA mean squares
    (the seed-by-problem interaction is not separable from noise with one score per cell, so it is in
    `residual`). Components estimated below 0 are set to 0."""

    seed: float
    problem: float
    residual: float

    def variance_of_mean(self, seeds: int, problems: int) -> float:
        """The variance of the mean over `seeds` seeds and `problems` problems as the paired bootstrap
        (paired_bootstrap, drawing both) measures it: seed / K + problem / N + 3 residual / (K N). A draw of
        seeds and problems counts the residual three times (on its own, and inside the seed means and the
        problem means it resamples), where fresh seeds and problems would vary by 1 residual / (K N): the
        crossed bootstrap is conservative, and a plan for it must be too. (It also keeps only (K - 1) / K
        of the seed part; this leaves that shrinkage out, so small K is not planned on an optimistic interval.)"""
        return self.seed / seeds + self.problem / problems + 3 * self.residual / (seeds * problems)


def variance_components(scores: np.ndarray) -> VarianceComponents:
    """VarianceComponents of a (K, N) array with K >= 2 seeds and N >= 2 problems."""
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2 or not np.isfinite(x).all():
        raise ValueError(f"variance components need a finite (seeds, problems) array with at least 2 of each, "
                         f"got shape {x.shape}: the seed part cannot be told from noise with one seed")
    k, n = x.shape
    rows, cols, grand = x.mean(axis=1), x.mean(axis=0), x.mean()
    ms_rows = n * ((rows - grand) ** 2).sum() / (k - 1)
    ms_cols = k * ((cols - grand) ** 2).sum() / (n - 1)
    ms_err = ((x - rows[:, None] - cols[None, :] + grand) ** 2).sum() / ((k - 1) * (n - 1))
    return VarianceComponents(seed=max(0.0, (ms_rows - ms_err) / n), problem=max(0.0, (ms_cols - ms_err) / k),
                              residual=float(ms_err))


def _normal_quantile(level: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2)


def contribution_components(base: np.ndarray, full: np.ndarray, single: np.ndarray) -> tuple[VarianceComponents, float]:
    """The variance components of contribution(i), linearized, and Full's gain over Base.

    Around the point estimate c = (S - B) / (F - B), a change of the arms' means moves c by
    (dS - c dF - (1 - c) dB) / (F - B): so c's variance is that of the mean of Z = S - c F - (1 - c) B over
    seeds and problems (seed k of Full and Single(i) paired, as the sweep trains them; Base, untrained, is
    the same for every seed row), divided by (F - B)^2. full and single: (K, N) with K >= 2; base: (N,)."""
    base = np.asarray(base, dtype=np.float64).reshape(-1)
    full, single = np.asarray(full, dtype=np.float64), np.asarray(single, dtype=np.float64)
    if full.shape != single.shape or full.ndim != 2 or full.shape[1] != base.shape[0]:
        raise ValueError(f"full and single must be (seeds, problems) arrays of one shape over base's "
                         f"{base.shape[0]} problems, got {full.shape} and {single.shape}")
    gain = float(full.mean() - base.mean())
    if abs(gain) <= GAIN_EPS:
        raise ValueError("Full does not differ from Base: contribution has no variance to plan for")
    c = (float(single.mean()) - float(base.mean())) / gain
    return variance_components(single - c * full - (1 - c) * base[None, :]), gain


def contribution_half_width(components: VarianceComponents, gain: float, seeds: int, problems: int,
                            level: float = 0.95) -> float:
    """The normal-approximation half-width of contribution(i)'s `level` interval with `seeds` seeds per arm
    and `problems` test problems, at the variance of `contribution_components`."""
    return _normal_quantile(level) * math.sqrt(components.variance_of_mean(seeds, problems)) / abs(gain)


def problems_needed(components: VarianceComponents, gain: float, seeds: int, half_width: float,
                    level: float = 0.95) -> int | None:
    """The fewest test problems that bring contribution(i)'s half-width to `half_width` with `seeds` seeds;
    None when the seeds alone leave it wider (more problems cannot help: add seeds)."""
    budget = (half_width * abs(gain) / _normal_quantile(level)) ** 2 - components.seed / seeds
    if budget <= 0:
        return None
    # variance_of_mean(seeds, N) <= target  <=>  (problem + 3 residual / seeds) / N <= budget
    return max(1, math.ceil((components.problem + 3 * components.residual / seeds) / budget))
