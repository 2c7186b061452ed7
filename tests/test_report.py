"""Reporting (onelayer_fast/report.py): plots are written, the table carries the numbers, and the answers
to the paper's questions follow the numbers (a layer that recovers, none that does, Full no better than Base)."""
from __future__ import annotations

import numpy as np
import pytest

from onelayer_fast.report import (
    FULL,
    best_learning_rates,
    location_sentence,
    plot_contribution_intervals,
    plot_lr_heatmap,
    recovery_sentence,
    table_rows,
    write_report,
)
from onelayer_fast.stats import paired_bootstrap

PNG = b"\x89PNG\r\n\x1a\n"
LAYERS = (3, 9, 15, 21)


def sweep(reach: dict[int, float], full_top: float = 0.6, n: int = 2000, seed: int = 0, **kwargs):
    """Nested 0/1 scores from one difficulty per problem (Base solves d < 0.3, Full d < full_top, layer i
    d < reach[i]): pairing makes the intervals tight, so the answers are clear-cut."""
    rng = np.random.default_rng(seed)
    d = rng.random(n)
    return paired_bootstrap((d < 0.3) * 1.0, (d < full_top) * 1.0, {i: (d < r) * 1.0 for i, r in reach.items()},
                            resamples=1000, seed=seed, **kwargs)


@pytest.fixture(scope="module")
def recovers():
    return sweep({3: 0.33, 9: 0.58, 15: 0.45, 21: 0.31})  # layer 9: 0.28 / 0.30 = 0.93 of Full's gain


@pytest.fixture(scope="module")
def none_recovers():
    return sweep({3: 0.33, 9: 0.48, 15: 0.40, 21: 0.31})  # the best, layer 9: 0.6


def no_gain():
    """Full changes a few answers each way: no clear gain over Base."""
    rng = np.random.default_rng(5)
    n = 400
    base = (rng.random(n) < 0.5) * 1.0
    full = np.where(rng.random(n) < 0.05, 1.0 - base, base)
    return paired_bootstrap(base, full, {i: (rng.random(n) < 0.5) * 1.0 for i in LAYERS}, resamples=1000)


def png_ok(path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG) and len(data) > 2000


def test_contribution_plot_is_written(tmp_path, recovers):
    path = plot_contribution_intervals(recovers, tmp_path / "sub" / "contribution_intervals.png", title="toy")
    assert png_ok(path)
    assert png_ok(plot_contribution_intervals(recovers, tmp_path / "no_band.png", full_band=False))
    assert not list(tmp_path.rglob(".*tmp*"))  # no temp file left behind


def test_contribution_plot_without_any_contribution(tmp_path):
    rng = np.random.default_rng(1)
    scores = (rng.random(50) < 0.5) * 1.0
    result = paired_bootstrap(scores, scores, {0: rng.random(50), 1: rng.random(50)}, resamples=50)
    assert result.defined == 0
    assert png_ok(plot_contribution_intervals(result, tmp_path / "c.png"))


def test_contribution_plot_needs_layers(tmp_path):
    result = paired_bootstrap(np.zeros(5), np.ones(5), {}, resamples=10)
    with pytest.raises(ValueError, match="no single-layer"):
        plot_contribution_intervals(result, tmp_path / "c.png")


def test_lr_heatmap_is_written_with_a_full_row_and_gaps(tmp_path):
    rng = np.random.default_rng(2)
    gains = {(arm, lr): float(rng.normal(0, 0.1)) for arm in (FULL, *LAYERS) for lr in (1e-6, 5e-6, 2e-5)}
    gains[(9, 5e-6)] = float("nan")  # a run that diverged
    del gains[(15, 1e-6)]  # a run that never ran
    assert png_ok(plot_lr_heatmap(gains, tmp_path / "lr.png"))
    assert png_ok(plot_lr_heatmap({(0, 1e-5): 0.0}, tmp_path / "one.png"))  # a single cell, all zero


@pytest.mark.parametrize("gains", [{}, {(1.5, 1e-5): 0.1}, {(True, 1e-5): 0.1}, {(2, 0.0): 0.1},
                                   {(2, float("inf")): 0.1}, {("base", 1e-5): 0.1}])
def test_lr_heatmap_bad_input(tmp_path, gains):
    with pytest.raises(ValueError):
        plot_lr_heatmap(gains, tmp_path / "lr.png")


def test_best_learning_rates():
    gains = {(FULL, 1e-6): 0.1, (FULL, 1e-5): 0.3, (4, 1e-6): 0.2, (4, 1e-5): 0.2,  # a tie: the smaller rate
             (5, 1e-6): float("nan"), (5, 1e-5): -0.1, (6, 1e-6): float("nan")}  # 6: nothing to select
    assert best_learning_rates(gains) == {FULL: 1e-5, 4: 1e-6, 5: 1e-5}


def test_table_rows(recovers):
    rows = table_rows(recovers, {FULL: 1e-5, 9: 2e-5})
    assert [r["arm"] for r in rows] == ["Base", "Full", *(f"layer {i}" for i in LAYERS)]
    nine = rows[3]
    assert nine["learning_rate"] == 2e-5 and rows[2]["learning_rate"] is None
    assert nine["contribution"] == recovers.layers[9].contribution.estimate
    assert nine["contribution_low"] == recovers.layers[9].contribution.low
    assert nine["p_recovers"] == recovers.layers[9].p_recovers
    assert rows[1]["score_high"] == recovers.full.high and rows[0]["contribution"] is None


def test_report_has_settings_table_and_plots(tmp_path, recovers):
    plot = plot_contribution_intervals(recovers, tmp_path / "contribution_intervals.png")
    settings = {"model": "toy-model", "num_layers": 28, "grpo": {"max_steps": 60, "learning_rate": 5e-6}}
    path = tmp_path / "report.md"
    text = write_report(path, settings, recovers, selected_lr={FULL: 1e-5, 9: 2e-5}, plots=[plot])
    assert path.read_text(encoding="utf-8") == text
    assert "- model: toy-model" in text and "- grpo.max_steps: 60" in text
    assert "![contribution_intervals](contribution_intervals.png)" in text
    assert "| learning rate |" in text and "| 2e-05 |" in text
    for value in (recovers.base.estimate, recovers.full.estimate, recovers.full.low, recovers.gain.low):
        assert f"{value:.3f}" in text
    for s in recovers.layers.values():
        c = s.contribution
        assert f"| layer {s.layer} |" in text
        assert f"{c.estimate:.3f} [{c.low:.3f}, {c.high:.3f}]" in text
        assert f"{s.score.estimate:.3f} [{s.score.low:.3f}, {s.score.high:.3f}]" in text
    assert "P(contribution >= 0.8)" in text
    assert f"{recovers.num_problems} test problems" in text and f"{recovers.resamples} resamples" in text


def test_report_extra_columns_and_no_lr_column(tmp_path, recovers):
    rows = table_rows(recovers)
    for r in rows:
        r["seconds"] = 12.5 if r["layer"] == 9 else None
    text = write_report(tmp_path / "r.md", {}, recovers, rows=rows)
    assert "| seconds |" in text and "12.500" in text
    assert "learning rate" not in text


def test_a_layer_that_recovers(recovers):
    nine = recovers.layers[9]
    assert nine.contribution.low >= 0.8  # the construction works as intended
    sentence = recovery_sentence(recovers)
    assert sentence.startswith("Yes: layer 9 reaches")
    assert f"{nine.contribution.estimate:.2f} of Full's gain" in sentence
    assert f"95% interval {nine.contribution.low:.2f} to {nine.contribution.high:.2f}" in sentence
    assert f"in {nine.p_recovers:.0%} of resamples it is at least 0.8" in sentence


def test_no_layer_recovers(none_recovers):
    nine = none_recovers.layers[9]
    assert nine.contribution.high < 0.8
    sentence = recovery_sentence(none_recovers)
    assert sentence.startswith("No layer's interval lies above 0.8; the best is layer 9")
    assert f"{nine.contribution.estimate:.2f} of Full's gain" in sentence
    assert "every layer's interval lies below 0.8" in sentence


def test_uncertain_layer_is_neither_yes_nor_no():
    """Independent arms on 300 problems: the point contribution is 75 / 90 = 0.83, its interval wide."""
    rng = np.random.default_rng(3)

    def solved(count):  # exactly `count` of 300 problems, scattered at random
        return (rng.permutation(300) < count) * 1.0

    result = paired_bootstrap(solved(90), solved(180), {2: solved(165), 4: solved(100)}, resamples=1000)
    best = result.layers[2]
    assert best.contribution.estimate == pytest.approx(75 / 90)
    assert best.contribution.low < 0.8
    sentence = recovery_sentence(result)
    assert sentence.startswith("Possibly: layer 2 reaches 0.83 of Full's gain")
    assert f"in {best.p_recovers:.0%} of resamples" in sentence
    assert "no layer's interval lies entirely above 0.8" in sentence


def test_full_not_better_than_base():
    result = no_gain()
    assert result.gain.low <= 0 <= result.gain.high
    sentence = recovery_sentence(result)
    assert "not meaningful" in sentence and "Yes" not in sentence
    assert f"Full - Base = {result.gain.estimate:.3f}" in sentence
    worse = sweep({3: 0.3, 9: 0.35}, full_top=0.2)  # Full loses problems Base solved
    assert recovery_sentence(worse).startswith("Full does not beat Base")
    assert "Single(i) score" in location_sentence(worse)  # contributions are not used to rank then


def test_threshold_comes_from_the_result(tmp_path):
    result = sweep({3: 0.33, 9: 0.48, 15: 0.40, 21: 0.31}, recover_threshold=0.5)  # layer 9: 0.6 >= 0.5
    assert recovery_sentence(result).startswith("Yes: layer 9")
    text = write_report(tmp_path / "r.md", {}, result)
    assert "reach 50% of Full's gain?" in text and "P(contribution >= 0.5)" in text
    odd = sweep({9: 0.58}, level=0.975)
    assert "97.5% interval" in recovery_sentence(odd) and "score [97.5% interval]" in write_report(tmp_path / "o.md", {}, odd)


def test_location_sentence(recovers, none_recovers):
    sentence = location_sentence(recovers, num_layers=28)
    # top 3 by contribution: 9 (0.93), 15 (0.5), 3 (0.1); depths 9/27, 15/27, 3/27
    assert sentence.startswith("The best 3 layers by point contribution are 9 (0.93), 15 (0.50) and 3 (0.10)")
    assert "relative depths 0.33, 0.56 and 0.11 of 28 layers" in sentence
    assert "the lower and middle thirds" in sentence  # 28 // 3 = 9: layer 3 lower, 9 and 15 middle
    assert "Layer 9 scores highest in 100% of resamples" in sentence
    assert "lie above that of the other layer" in sentence  # layer 21: 0.03
    one = location_sentence(recovers, num_layers=28, top=1)
    assert one.startswith("The best layer by point contribution is 9 (0.93), at relative depth 0.33")
    assert "in the middle third" in one and "lie above those of all 3 other layers" in one
    close = location_sentence(sweep({3: 0.33, 9: 0.58, 15: 0.45, 21: 0.335}))  # 3: 0.10 and 21: 0.12
    assert "are 9 (0.93), 15 (0.50) and 21 (0.12); their intervals overlap those of layer 3, so" in close
    assert location_sentence(none_recovers) != location_sentence(recovers)
    assert "relative depth" not in location_sentence(recovers)  # no depth without num_layers


def test_sentences_follow_the_numbers(recovers, none_recovers):
    answers = {recovery_sentence(r) for r in (recovers, none_recovers, no_gain())}
    assert len(answers) == 3
