"""Reporting for a layer sweep with error bars: plots and a report.md whose sentences come from the numbers.

    plot_contribution_intervals(result, path)   contribution(i) with its interval per layer, Full and the threshold
    plot_lr_heatmap(gains, path)                 validation gain over (layer x learning rate), Full as its own row
    best_learning_rates(gains)                   the learning rate each arm would select from such a grid
    table_rows(result, selected_lr)              one dict per arm (Base, Full, Single(i)): what the table shows
    recovery_sentence / location_sentence        the answers to the paper's two questions, from `result`
    write_report(path, settings, result, ...)    report.md: settings, the table, the answers, the plots

`result` is a stats.BootstrapResult. Plots draw on a bare matplotlib Figure with the Agg canvas: no
pyplot, so no display is needed and no global backend is switched under the caller's feet.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .stats import GAIN_EPS, BootstrapResult, Interval, LayerStats

FULL = "full"  # Full's key in learning-rate grids and in `selected_lr` (layers are ints)
Arm = int | str


# ------------------------------------------------------------------------------------------- files

def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file + os.replace: a reader never sees a half-written report or PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    import io

    path = Path(path)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    _write_atomic(path, buffer.getvalue())
    return path


# ------------------------------------------------------------------------------------------- plots

def _describe(result: BootstrapResult) -> str:
    seeds = f", {result.full_seeds} seeds" if result.full_seeds > 1 else ""
    undefined = f", {result.undefined} undefined" if result.undefined else ""
    return (f"{_percent(result.level)} paired-bootstrap intervals: {result.num_problems} problems{seeds}, "
            f"{result.resamples} resamples{undefined}")


def plot_contribution_intervals(result: BootstrapResult, path: str | os.PathLike, full_band: bool = True,
                                title: str | None = None) -> Path:
    """contribution(i) per layer with its interval, lines at 0 (Base), 1 (Full) and the recovery threshold.

    full_band: shade Full's own interval on the contribution scale, (Full_low - Base) / (Full - Base) to
    (Full_high - Base) / (Full - Base) with Base at its point value: how precisely Full itself is measured.
    When no resample has a contribution (Full == Base throughout), Single(i) scores are drawn instead.
    Raises ValueError without layers. Returns `path`.
    """
    if not result.layers:
        raise ValueError("no single-layer results to plot")
    stats = list(result.layers.values())
    x = np.array([s.layer for s in stats])
    use_contribution = result.defined > 0
    pick = (lambda s: s.contribution) if use_contribution else (lambda s: s.score)
    est = np.array([np.nan if pick(s).estimate is None else pick(s).estimate for s in stats], dtype=float)
    low = np.array([np.nan if pick(s).low is None else pick(s).low for s in stats], dtype=float)
    high = np.array([np.nan if pick(s).high is None else pick(s).high for s in stats], dtype=float)
    best = result.best_layer()

    fig = _figure(max(4.5, 0.4 * len(stats) + 2.5), 3.8)
    ax = fig.add_subplot()
    colors = ["tab:orange" if s.layer == best else "tab:blue" for s in stats]
    ax.vlines(x, low, high, colors=colors, linewidth=2.0)
    ax.scatter(x, est, c=colors, zorder=3, s=22)
    if use_contribution:
        gain = result.gain.estimate or 0.0
        if full_band and abs(gain) > GAIN_EPS:
            ends = [(v - result.base.estimate) / gain for v in (result.full.low, result.full.high)]
            ax.axhspan(min(ends), max(ends), color="gray", alpha=0.2, linewidth=0,
                       label=f"Full's {_percent(result.level)} interval")
        ax.axhline(1.0, color="gray", linewidth=1.0, label="Full")
        ax.axhline(0.0, color="black", linewidth=0.8, label="Base")
        ax.axhline(result.recover_threshold, color="tab:red", linestyle="--", linewidth=1.0,
                   label=f"{result.recover_threshold:g} of Full's gain")
        # A ratio with a noisy denominator can have very long intervals: keep the interesting range readable.
        view_low = max(-5.0, min(-0.25, np.nanmin(low) if np.isfinite(low).any() else 0.0))
        view_high = min(6.0, max(1.25, np.nanmax(high) if np.isfinite(high).any() else 1.0))
        ax.set_ylim(view_low - 0.05, view_high + 0.05)
        clipped = bool(np.nanmin(low, initial=np.inf) < view_low or np.nanmax(high, initial=-np.inf) > view_high)
        ax.set_ylabel("contribution = (Single(i) - Base) / (Full - Base)", fontsize=8)
        note = " (view clipped)" if clipped else ""
    else:
        ax.axhline(result.base.estimate, color="black", linewidth=0.8, label="Base")
        ax.axhline(result.full.estimate, color="gray", linewidth=1.0, label="Full")
        ax.set_ylabel("Single(i) score", fontsize=8)
        note = "; Full == Base in every resample: contribution undefined, showing Single(i)"
    ax.set_xticks(x)
    ax.set_xlabel("layer")
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{title + chr(10) if title else ''}{_describe(result)}{note}", fontsize=8)
    return _save(fig, path)


def _grid(gains: Mapping[tuple[Arm, float], float]) -> tuple[list[Arm], list[float], np.ndarray]:
    """Rows (Full first, then layers ascending), learning rates ascending, values (NaN where missing)."""
    if not gains:
        raise ValueError("no (layer, learning rate) gains to plot")
    for arm, lr in gains:
        if not (arm == FULL or (isinstance(arm, (int, np.integer)) and not isinstance(arm, bool))):
            raise ValueError(f"a layer must be an int or {FULL!r}, got {arm!r}")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"a learning rate must be a finite number > 0, got {lr!r}")
    arms: list[Arm] = ([FULL] if any(a == FULL for a, _ in gains) else []) + sorted({a for a, _ in gains if a != FULL})
    lrs = sorted({float(lr) for _, lr in gains})
    values = np.full((len(arms), len(lrs)), np.nan)
    for (arm, lr), value in gains.items():
        values[arms.index(arm), lrs.index(float(lr))] = float(value) if value is not None else np.nan
    return arms, lrs, values


def best_learning_rates(gains: Mapping[tuple[Arm, float], float]) -> dict[Arm, float]:
    """Per arm, the learning rate with the highest validation gain (the smaller one on ties: the gentler
    step); arms whose gains are all missing (NaN) are left out."""
    arms, lrs, values = _grid(gains)
    chosen = {}
    for arm, row in zip(arms, values):
        if np.isfinite(row).any():
            chosen[arm] = lrs[int(np.nanargmax(row))]  # first maximum = smallest learning rate
    return chosen


def plot_lr_heatmap(gains: Mapping[tuple[Arm, float], float], path: str | os.PathLike,
                    title: str | None = None, selected: Mapping[Arm, float] | None = None) -> Path:
    """Heatmap of validation gain over layer x learning rate, Full (key FULL) as the top row if given.

    Missing cells are gray; each row's selected learning rate (default: best_learning_rates) is boxed.
    The color scale is centered on 0, so a loss is red and a gain blue. Returns `path`."""
    import matplotlib
    from matplotlib.patches import Rectangle

    arms, lrs, values = _grid(gains)
    selected = best_learning_rates(gains) if selected is None else selected
    finite = values[np.isfinite(values)]
    limit = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0

    fig = _figure(max(4.0, 0.9 * len(lrs) + 2.5), max(2.5, 0.35 * len(arms) + 1.5))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="lightgray")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
    fig.colorbar(image, ax=ax, label="validation gain")
    if values.size <= 400:  # numbers stay legible up to about a 20 x 20 grid
        for (r, c), value in np.ndenumerate(values):
            if np.isfinite(value):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(value) > 0.6 * limit else "black")
    for r, arm in enumerate(arms):
        if arm in selected and float(selected[arm]) in lrs:
            c = lrs.index(float(selected[arm]))
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5))
    if arms and arms[0] == FULL and len(arms) > 1:
        ax.axhline(0.5, color="black", linewidth=1.0)  # Full is not a layer: set it apart
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs], fontsize=7)
    ax.set_yticks(range(len(arms)), ["Full" if a == FULL else str(a) for a in arms], fontsize=7)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("layer")
    ax.set_title(title or "validation gain (boxed: selected learning rate)", fontsize=9)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------- table

def _lr(selected_lr: Mapping[Arm, float] | None, arm: Arm) -> float | None:
    return None if selected_lr is None or arm not in selected_lr else float(selected_lr[arm])


def table_rows(result: BootstrapResult, selected_lr: Mapping[Arm, float] | None = None) -> list[dict[str, Any]]:
    """Base, Full and one row per layer: score and contribution with their intervals, P(recovers), P(best).

    Base and Full have no contribution (0 and 1 by definition), so None there; plain values, ready for
    CSV or JSON too."""
    def arm_row(name: str, layer: int | None, seeds: int, lr: float | None, score: Interval) -> dict[str, Any]:
        return {"arm": name, "layer": layer, "seeds": seeds, "learning_rate": lr,
                "score": score.estimate, "score_low": score.low, "score_high": score.high,
                "contribution": None, "contribution_low": None, "contribution_high": None,
                "p_recovers": None, "p_best": None}

    rows = [arm_row("Base", None, result.base_seeds, None, result.base),
            arm_row("Full", None, result.full_seeds, _lr(selected_lr, FULL), result.full)]
    for s in result.layers.values():
        row = arm_row(f"layer {s.layer}", s.layer, s.seeds, _lr(selected_lr, s.layer), s.score)
        row.update(contribution=s.contribution.estimate, contribution_low=s.contribution.low,
                   contribution_high=s.contribution.high, p_recovers=s.p_recovers, p_best=s.p_best)
        rows.append(row)
    return rows


def _value(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _with_interval(row: Mapping[str, Any], key: str) -> str:
    if row.get(key) is None and row.get(f"{key}_low") is None:
        return ""
    return f"{_value(row.get(key))} [{_value(row.get(f'{key}_low'))}, {_value(row.get(f'{key}_high'))}]"


def _percent(value: float) -> str:
    """An exact setting as a percentage: 0.95 -> 95%, 0.975 -> 97.5% (":.0%" would say 98%)."""
    return f"{round(value * 100, 6):g}%"


def _share(value: float | None) -> str:
    """A percentage; never rounds a rare event to 0% or to 100%."""
    if value is None:
        return ""
    if 0 < value < 0.005:
        return "<1%"
    return ">99%" if 0.995 <= value < 1 else f"{value:.0%}"


_KNOWN = {"arm", "layer", "seeds", "learning_rate", "score", "score_low", "score_high", "contribution",
          "contribution_low", "contribution_high", "p_recovers", "p_best"}


def format_table(rows: Sequence[Mapping[str, Any]], level: float = 0.95, recover_threshold: float = 0.8) -> str:
    """A markdown table of table_rows(); keys it does not know (e.g. seconds, tokens) become extra columns."""
    columns: list[tuple[str, Any]] = [("arm", lambda r: str(r["arm"])), ("seeds", lambda r: _value(r.get("seeds")))]
    if any(r.get("learning_rate") is not None for r in rows):  # no empty column when no grid was searched
        columns.append(("learning rate", lambda r: "" if r.get("learning_rate") is None else f"{r['learning_rate']:g}"))
    columns += [(f"score [{_percent(level)} interval]", lambda r: _with_interval(r, "score")),
                (f"contribution [{_percent(level)} interval]", lambda r: _with_interval(r, "contribution")),
                (f"P(contribution >= {recover_threshold:g})", lambda r: _share(r.get("p_recovers"))),
                ("P(best layer)", lambda r: _share(r.get("p_best")))]
    extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in _KNOWN]
    columns += [(k, lambda r, k=k: _value(r.get(k)) if r.get(k) is not None else "") for k in extra]
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(render(r) for _, render in columns) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- sentences

def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _layers(stats: Iterable[LayerStats]) -> str:
    names = [str(s.layer) for s in stats]
    return ("layer " if len(names) == 1 else "layers ") + _join(names)


def recovery_sentence(result: BootstrapResult) -> str:
    """The answer to "Does any single layer reach `recover_threshold` of Full's gain?", from the numbers."""
    thr, level, g = result.recover_threshold, _percent(result.level), result.gain
    if not result.layers:
        return "There are no single-layer runs to compare with Full."
    if not result.gain_is_positive:
        verdict = ("Full does not beat Base" if g.estimate is None or g.estimate <= GAIN_EPS
                   else "Full's gain over Base is not clearly positive")
        return (f"{verdict} (Full - Base = {_value(g.estimate)}, {level} interval {_value(g.low)} to "
                f"{_value(g.high)}), so comparing single layers with Full's gain is not meaningful here.")

    def detail(s: LayerStats) -> str:
        c = s.contribution
        return (f"{_value(c.estimate, 2)} of Full's gain ({level} interval {_value(c.low, 2)} to {_value(c.high, 2)}; "
                f"in {_share(s.p_recovers)} of resamples it is at least {thr:g})")

    stats = [s for s in result.layers.values() if s.contribution.estimate is not None]
    if not stats:  # only when Full == Base on the full data, which a clearly positive gain all but rules out
        return "No layer has a contribution: Full == Base on the full data."
    best = max(stats, key=lambda s: (s.contribution.estimate, -s.layer))
    clear = [s for s in stats if s.contribution.low is not None and s.contribution.low >= thr]
    if clear:
        top = max(clear, key=lambda s: (s.contribution.estimate, -s.layer))
        sentence = f"Yes: layer {top.layer} reaches {detail(top)}, and its whole interval lies at or above {thr:g}."
        others = [s for s in clear if s is not top]
        if others:
            sentence += f" The intervals of {_layers(others)} also lie at or above {thr:g}."
    elif best.contribution.estimate >= thr:
        sentence = (f"Possibly: layer {best.layer} reaches {detail(best)}, but no layer's interval lies entirely "
                    f"above {thr:g}.")
    else:
        reach = [s for s in stats if s.contribution.high is not None and s.contribution.high >= thr]
        sentence = f"No layer's interval lies above {thr:g}; the best is layer {best.layer} with {detail(best)}"
        sentence += (f"; the intervals of {_layers(reach)} still reach {thr:g}, so it is not ruled out." if reach
                     else f", and every layer's interval lies below {thr:g}.")
    if result.undefined:
        sentence += (f" ({result.undefined} of {result.resamples} resamples had Full == Base and no contribution; "
                     f"the shares are of the other {result.defined}.)")
    return sentence


def _third(layer: int, num_layers: int) -> str:
    """The same thirds as sweep.middle_layers: the middle one is range(n // 3, n - n // 3)."""
    if layer < num_layers // 3:
        return "lower"
    return "upper" if layer >= num_layers - num_layers // 3 else "middle"


def location_sentence(result: BootstrapResult, num_layers: int | None = None, top: int = 3) -> str:
    """The answer to "Where in the stack are the best layers?": the `top` layers by point score (the same
    order as by contribution while Full beats Base), their relative depth when `num_layers` is known,
    whether their intervals separate them from the other layers, and how often the best one wins."""
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    if not result.layers:
        return "There are no single-layer runs."
    by_contribution = result.gain_is_positive
    pick = (lambda s: s.contribution) if by_contribution else (lambda s: s.score)
    ranked = sorted(result.layers.values(), key=lambda s: (-s.score.estimate, s.layer))
    best, rest = ranked[:top], ranked[top:]
    measure = "contribution" if by_contribution else "Single(i) score (Full does not clearly beat Base)"
    values = [f"{s.layer} ({_value(pick(s).estimate, 2)})" for s in best]
    sentence = (f"The best layer by point {measure} is {values[0]}" if len(best) == 1
                else f"The best {len(best)} layers by point {measure} are {_join(values)}")
    if num_layers:
        depths = _join([f"{s.layer / (num_layers - 1) if num_layers > 1 else 0.0:.2f}" for s in best])
        thirds = [t for t in ("lower", "middle", "upper") if any(_third(s.layer, num_layers) == t for s in best)]
        where = f"the {thirds[0]} third" if len(thirds) == 1 else f"the {_join(thirds)} thirds"
        sentence += (f", at relative depth{'s' if len(best) > 1 else ''} {depths} of {num_layers} layers "
                     f"(0 = first, 1 = last), in {where} of the stack")
    if rest:
        # Overlap with the weakest interval of the top group: could another layer belong to it instead?
        floor = min((pick(s).low for s in best if pick(s).low is not None), default=None)
        overlap = [s for s in rest if floor is None or pick(s).high is None or pick(s).high >= floor]
        if overlap:
            share = "" if len(overlap) == len(rest) else f" (of {len(rest)} other layers)"
            sentence += (f"; their intervals overlap those of {_layers(overlap)}{share}, so which layers make the "
                         "top group is not settled by these data")
        else:
            others = "that of the other layer" if len(rest) == 1 else f"those of all {len(rest)} other layers"
            sentence += f"; their intervals lie above {others}"
    leader = max(result.layers.values(), key=lambda s: (s.p_best, -s.layer))
    return sentence + f". Layer {leader.layer} scores highest in {_share(leader.p_best)} of resamples."


# ------------------------------------------------------------------------------------------- report

def _flatten(settings: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in settings.items():
        if isinstance(value, Mapping):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def write_report(path: str | os.PathLike, settings: Mapping[str, Any], result: BootstrapResult, *,
                 rows: Sequence[Mapping[str, Any]] | None = None, selected_lr: Mapping[Arm, float] | None = None,
                 num_layers: int | None = None, plots: Sequence[str | os.PathLike] = (),
                 title: str = "Layer sweep report", notes: Sequence[str] = ()) -> str:
    """Write report.md (atomically) and return its text: settings, method, table, answers, plots.

    rows: the table (default table_rows(result, selected_lr)); extra keys become extra columns.
    num_layers: the model's depth for relative positions (default settings["num_layers"] when present).
    plots: image files to link, relative to the report's directory when they are under it.
    notes: sentences for a closing Notes section (e.g. runs that diverged)."""
    path = Path(path)
    if num_layers is None and isinstance(settings.get("num_layers"), int):
        num_layers = settings["num_layers"]
    rows = table_rows(result, selected_lr) if rows is None else rows
    g = result.gain
    seeds = ""
    if result.full_seeds > 1 or any(s.seeds > 1 for s in result.layers.values()):
        how = "drawn jointly across trained arms" if result.paired_seeds else "drawn separately per arm"
        seeds = f" and the training seeds ({how})"
    undefined = (f" {result.undefined} of {result.resamples} resamples had Full == Base: they have no contribution "
                 "and are left out of its intervals and shares." if result.undefined else "")
    lines = [f"# {title}", "", "## Settings", ""]
    lines += [f"- {key}: {value}" for key, value in _flatten(settings)] or ["- (none given)"]
    lines += ["", "## Results", "",
              f"Paired bootstrap over the {result.num_problems} test problems{seeds}: {result.resamples} resamples "
              f"(seed {result.seed}), {_percent(result.level)} percentile intervals; contribution = (Single(i) - Base) / "
              f"(Full - Base) is computed within each resample.{undefined}", "",
              f"Full - Base = {_value(g.estimate)} ({_percent(result.level)} interval {_value(g.low)} to {_value(g.high)}).",
              "", format_table(rows, result.level, result.recover_threshold), "",
              "## Questions", "",
              f"**Does any single layer reach {_percent(result.recover_threshold)} of Full's gain?** "
              f"{recovery_sentence(result)}",
              "", f"**Where in the stack are the best layers?** {location_sentence(result, num_layers)}"]
    if plots:
        lines += ["", "## Plots", ""]
        for plot in plots:
            plot = Path(plot)
            try:
                link = plot.resolve().relative_to(path.parent.resolve()).as_posix()
            except ValueError:  # not under the report's directory
                link = plot.as_posix()
            lines.append(f"![{plot.stem}]({link})")
    if notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    text = "\n".join(lines) + "\n"
    _write_atomic(path, text.encode("utf-8"))
    return text
