"""The sweep protocol: a learning-rate grid and seeds per arm, the rate selected on validation only, the
test scores reported with paired-bootstrap intervals, report.md and plots, resume and refusals."""
from __future__ import annotations

import csv
import importlib.util
import json
import math

import numpy as np
import pytest

from onelayer_fast import report
from onelayer_fast.cli import main
from onelayer_fast.stats import contribution_components, paired_bootstrap, problems_needed
from onelayer_fast.sweep import (CSV_COLUMNS, RECOVER_THRESHOLD, RunResult, SweepConfig, assemble,
                                 select_learning_rates, planning_note, run_sweep)
from onelayer_fast.trainer import GRPOConfig

pytestmark = pytest.mark.usefixtures("torch_single_thread")

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
GRPO = dict(max_steps=2, per_device_train_batch_size=4, num_generations=2, max_completion_length=3,
            num_iterations=1, beta=0.04, temperature=0.9)
RATES = (1e-2, 3e-2)


def grid_config(out, **overrides) -> SweepConfig:
    grpo = GRPOConfig(**{**GRPO, **overrides.pop("grpo", {})})
    values = dict(model="tiny", out=str(out), task="arithmetic", layers="1,-1", eval_size=8, val_size=6,
                  metric="mean_reward", grpo=grpo, progress=False, learning_rates=RATES, seeds=2, save_steps=1)
    values.update(overrides)
    return SweepConfig(**values)


# ------------------------------------------------------------------------- selection, on made-up runs

def made_run(mode: str, layer, rate, seed, test: list[int], val: list[int] | None) -> RunResult:
    """A finished run with the given per-problem 0/1 test and validation scores."""
    name = "base" if mode == "base" else f"{'full' if layer is None else f'layer-{layer}'}-lr{rate:g}-seed{seed}"
    val_dict = None if val is None else {"accuracy": sum(val) / len(val), "mean_reward": 0.0, "n": len(val),
                                         "seconds": 0.0, "correct": val, "rewards": [0.0] * len(val)}
    return RunResult(name=name, mode=mode, layer=layer, accuracy=sum(test) / len(test), mean_reward=0.0,
                     n=len(test), eval_seconds=0.0, train_seconds=1.0, steps=2, tokens=10, peak_memory_mib=1.0,
                     memory_kind="rss_peak", learning_rate=rate, seed=seed, correct=test,
                     rewards=[0.0] * len(test), val=val_dict)


def ones(n: int, k: int) -> list[int]:
    """n problems, the first k of them right."""
    return [1] * k + [0] * (n - k)


def made_sweep(flip_test: bool = False) -> list[RunResult]:
    """Base, Full and layer 3 at rates 1e-4 and 1e-3 with seeds 0 and 1, on 20 test and 10 validation problems.

    Validation prefers 1e-4 for layer 3 and 1e-3 for Full; test prefers the other rate of each arm.
    flip_test swaps the arms' test scores between the two rates, leaving validation as it is."""
    n, m = 20, 10
    runs = [made_run("base", None, None, None, ones(n, 4), ones(m, 2))]
    # (arm, rate) -> (test right per seed, validation right per seed)
    cells = {(None, 1e-4): ((8, 9), (5, 5)), (None, 1e-3): ((16, 15), (7, 8)),
             (3, 1e-4): ((6, 6), (6, 5)), (3, 1e-3): ((14, 13), (3, 4))}
    for (layer, rate), (tests, vals) in cells.items():
        other = 1e-3 if rate == 1e-4 else 1e-4
        if flip_test:
            tests = cells[(layer, other)][0]
        for seed, (t, v) in enumerate(zip(tests, vals)):
            runs.append(made_run("full" if layer is None else "single", layer, rate, seed, ones(n, t), ones(m, v)))
    return runs


def test_selection_uses_validation_only(tmp_path):
    result = assemble({"task": "t", "algo": "grpo", "model": "m", "num_layers": 4}, "accuracy", made_sweep(), tmp_path,
                      resamples=200)
    # Full: validation 7.5/10 at 1e-3 beats 5/10 at 1e-4 (and test agrees); layer 3: validation 5.5/10 at 1e-4
    # beats 3.5/10 at 1e-3, although its test score at 1e-3 (13.5/20) is far above 1e-4's (6/20).
    assert result.full.learning_rate == 1e-3 and result.singles[0].learning_rate == 1e-4
    assert result.singles[0].accuracy == pytest.approx(6 / 20)  # the selected rate's test mean over seeds
    assert result.full.accuracy == pytest.approx(15.5 / 20)
    assert [r.seed for r in result.singles[0].runs] == [0, 1] and result.singles[0].seeds == 2
    assert result.validation_gains[(3, 1e-4)] == pytest.approx(0.55 - 0.2)
    assert result.validation_gains[(report.FULL, 1e-3)] == pytest.approx(0.75 - 0.2)
    assert result.contributions[3] == pytest.approx((0.3 - 0.2) / (0.775 - 0.2))
    # The test scores never enter the choice: swapping them between the rates changes the reported
    # scores, not the rates chosen.
    flipped = assemble(result.settings, "accuracy", made_sweep(flip_test=True), tmp_path, resamples=200)
    assert flipped.selected_learning_rates == result.selected_learning_rates == {report.FULL: 1e-3, 3: 1e-4}
    assert flipped.singles[0].accuracy == pytest.approx(13.5 / 20)


def test_selection_takes_the_smaller_rate_on_a_validation_tie():
    runs = [made_run("base", None, None, None, [0, 1], [0, 1]),
            made_run("single", 2, 1e-3, 0, [1, 1], [1, 0]), made_run("single", 2, 1e-4, 0, [0, 0], [0, 1]),
            made_run("full", None, 1e-3, 0, [1, 1], [1, 1]), made_run("full", None, 1e-4, 0, [1, 1], [1, 1])]
    selected, gains = select_learning_rates(runs, "accuracy", base_val=0.5)
    assert selected == {2: 1e-4, report.FULL: 1e-4}
    assert gains[(2, 1e-3)] == gains[(2, 1e-4)] == 0.0


def test_one_rate_needs_no_validation():
    runs = [made_run("base", None, None, None, [0, 1], None), made_run("single", 2, 1e-3, 0, [1, 1], None),
            made_run("full", None, 1e-3, 0, [1, 1], None)]
    assert select_learning_rates(runs, "accuracy", base_val=None) == ({2: 1e-3, report.FULL: 1e-3}, {})


def test_intervals_are_the_paired_bootstrap_of_the_selected_runs(tmp_path):
    runs = made_sweep()
    result = assemble({"task": "t", "algo": "grpo", "model": "m"}, "accuracy", runs, tmp_path, resamples=500)

    def scores(layer, rate):
        chosen = [r for r in runs if r.layer == layer and r.learning_rate == rate and r.mode != "base"]
        return np.array([r.correct for r in sorted(chosen, key=lambda r: r.seed)], dtype=float)

    expected = paired_bootstrap(np.array(runs[0].correct, dtype=float), scores(None, 1e-3), {3: scores(3, 1e-4)},
                                resamples=500, recover_threshold=RECOVER_THRESHOLD)
    assert result.stats.to_dict() == expected.to_dict()
    row = result.rows()[0]
    stats = expected.layers[3]
    assert (row["single_ci_low"], row["single_ci_high"]) == (stats.score.low, stats.score.high)
    assert (row["contribution_ci_low"], row["contribution_ci_high"]) == (stats.contribution.low, stats.contribution.high)
    assert row["p_recovers_80"] == stats.p_recovers and row["n_seeds"] == 2 and row["selected_learning_rate"] == 1e-4


def test_planning_note_names_the_widest_layer_and_the_sizes_it_needs(tmp_path):
    """The report's planning line: for the layer with the widest contribution interval, the test problems
    that +-0.25 needs with K, 2K and 4K seeds, as stats.problems_needed computes them from the selected runs."""
    runs = made_sweep()
    result = assemble({"task": "t", "algo": "grpo", "model": "m"}, "accuracy", runs, tmp_path, resamples=500)
    note = planning_note(result)
    single = result.singles[0]
    parts, gain = contribution_components(result.base.scores("accuracy")[0], result.full.scores("accuracy"),
                                          single.scores("accuracy"))
    assert note.startswith(f"Planning: layer 3 has the widest contribution interval "
                           f"(width {result.stats.layers[3].contribution.width:.2f}, 2 seeds x 20 test problems)")
    for seeds in (2, 4, 8, 16):
        needed = problems_needed(parts, gain, seeds, 0.25)
        assert f"{seeds} seeds: {'no number of problems' if needed is None else f'{needed} test problems'}" in note
    one_seed = [r for r in runs if r.seed in (None, 0)]
    assert planning_note(assemble(result.settings, "accuracy", one_seed, tmp_path, resamples=100)) is None


# ------------------------------------------------------------------------------------ a real grid sweep

def test_grid_sweep_end_to_end(tmp_path):
    out = tmp_path / "grid"
    result = run_sweep(grid_config(out))
    names = sorted(p.name for p in (out / "runs").iterdir())
    assert len(names) == 1 + 3 * len(RATES) * 2  # Base + (Full, 2 layers) x 2 rates x 2 seeds
    assert "full-lr0.01-seed42" in names and "layer-3-lr0.03-seed43" in names

    data = json.loads((out / "results.json").read_text())
    assert data["format_version"] == 3 and data["settings"]["learning_rates"] == list(RATES)
    assert data["settings"]["seeds"] == [42, 43] and data["settings"]["val_examples"] == 6
    assert "learning_rate" not in data["settings"]["grpo"]  # one source of truth: the grid
    for run in data["runs"]:  # every run keeps its per-problem test and validation scores
        assert len(run["correct"]) == len(run["rewards"]) == 8
        assert run["val"]["n"] == 6 and len(run["val"]["rewards"]) == 6
        assert run["mean_reward"] == pytest.approx(np.mean(np.array(run["rewards"], dtype=np.float32)), rel=1e-6)

    # Per arm, the rate with the best validation mean over seeds (recomputed here from the runs)
    trained = [r for r in data["runs"] if r["mode"] != "base"]
    for arm in [None, 1, 3]:
        means = {rate: np.mean([r["val"]["mean_reward"] for r in trained if r["layer"] == arm
                                and r["learning_rate"] == rate]) for rate in RATES}
        best = max(RATES, key=lambda rate: (means[rate], -rate))
        chosen = result.full if arm is None else next(s for s in result.singles if s.layer == arm)
        assert chosen.learning_rate == best
        test_mean = np.mean([r["mean_reward"] for r in trained if r["layer"] == arm and r["learning_rate"] == best])
        assert chosen.mean_reward == pytest.approx(test_mean)

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS and [int(r["layer"]) for r in rows] == [1, 3]
    for row, single in zip(rows, result.singles):
        assert float(row["selected_learning_rate"]) == single.learning_rate and row["n_seeds"] == "2"
        assert float(row["single_ci_low"]) <= float(row["single"]) <= float(row["single_ci_high"])
        p = result.stats.layers[single.layer].p_recovers
        assert (row["p_recovers_80"] == "") == (p is None)

    text = (out / "report.md").read_text()
    assert "Does any single layer reach 80% of Full's gain?" in text and "Where in the stack" in text
    assert "learning_rates: [0.01, 0.03]" in text
    assert ("Planning: layer" in text) == (result.stats.gain.estimate != 0)  # 2 seeds: the plan is written
    if HAS_MATPLOTLIB:
        assert (out / "contribution.png").is_file() and (out / "lr_heatmap.png").is_file()


def test_grid_sweep_resumes_and_refuses_another_grid(tmp_path):
    out = tmp_path / "grid"
    run_sweep(grid_config(out, layers="1"))
    first = json.loads((out / "results.json").read_text())
    # a kill between runs: one run never wrote its result; the rerun redoes only that one, identically
    (out / "runs" / "layer-1-lr0.03-seed43" / "result.json").unlink()
    run_sweep(grid_config(out, layers="1"))
    again = json.loads((out / "results.json").read_text())
    keys = ("name", "learning_rate", "seed", "correct", "rewards", "val", "tokens")
    assert [{k: r[k] for k in keys if k != "val"} | {"val": r["val"]["rewards"]} for r in again["runs"]] == \
           [{k: r[k] for k in keys if k != "val"} | {"val": r["val"]["rewards"]} for r in first["runs"]]
    with pytest.raises(ValueError, match=r"different settings \(seeds: \[42, 43\] -> \[42, 43, 44\]\)"):
        run_sweep(grid_config(out, layers="1", seeds=3))
    with pytest.raises(ValueError, match=r"learning_rates: \[0\.01, 0\.03\] -> \[0\.01, 0\.02\]"):
        run_sweep(grid_config(out, layers="1", learning_rates=(1e-2, 2e-2)))
    with pytest.raises(ValueError, match=r"val_size: 6 -> 7"):
        run_sweep(grid_config(out, layers="1", val_size=7))


def test_full_has_its_own_grid(tmp_path):
    """--full-learning-rates: Full trains at its grid only, the layers at theirs; each arm selects within
    its own grid, a Full run is the same run whichever grid the layers have, and a change is refused."""
    run_sweep(grid_config(tmp_path / "shared", layers="1", seeds=1, dtype="float64"))
    own = run_sweep(grid_config(tmp_path / "own", layers="1", seeds=1, dtype="float64",
                                learning_rates=(3e-2, 9e-2), full_learning_rates=(1e-2, 3e-2)))
    names = sorted(p.name for p in (tmp_path / "own" / "runs").iterdir())
    assert names == ["base", "full-lr0.01", "full-lr0.03", "layer-1-lr0.03", "layer-1-lr0.09"]
    data = json.loads((tmp_path / "own" / "results.json").read_text())
    assert data["settings"]["learning_rates"] == [0.03, 0.09] and data["settings"]["full_learning_rates"] == [0.01, 0.03]
    assert "full_learning_rates" not in json.loads((tmp_path / "shared" / "results.json").read_text())["settings"]
    assert own.full.learning_rate in (1e-2, 3e-2) and own.singles[0].learning_rate in (3e-2, 9e-2)
    assert {rate for arm, rate in own.validation_gains if arm == report.FULL} == {1e-2, 3e-2}
    assert {rate for arm, rate in own.validation_gains if arm == 1} == {3e-2, 9e-2}

    def run(out, name):
        return json.loads((out / "runs" / name / "result.json").read_text())

    keys = ("accuracy", "mean_reward", "rewards", "tokens")
    for rate in ("0.01", "0.03"):  # Full's runs do not depend on the layers' grid
        a, b = run(tmp_path / "shared", f"full-lr{rate}"), run(tmp_path / "own", f"full-lr{rate}")
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys} and a["val"]["rewards"] == b["val"]["rewards"]
    a, b = run(tmp_path / "shared", "layer-1-lr0.03"), run(tmp_path / "own", "layer-1-lr0.03")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    with pytest.raises(ValueError, match=r"full_learning_rates"):
        run_sweep(grid_config(tmp_path / "own", layers="1", seeds=1, dtype="float64",
                              learning_rates=(3e-2, 9e-2), full_learning_rates=(1e-2, 2e-2)))
    # one rate for the layers and a grid for Full still selects (validation is scored)
    one = run_sweep(grid_config(tmp_path / "one", layers="1", seeds=1, learning_rates=(3e-2,),
                                full_learning_rates=(1e-2, 3e-2)))
    assert one.settings["val_examples"] == 6 and one.singles[0].learning_rate == 3e-2


def test_float64_grid_with_lanes_equals_one_at_a_time(tmp_path):
    """Lanes with their own learning rate and seed compute what each run computes alone."""
    def table(out):
        data = json.loads((out / "results.json").read_text())
        return [{k: r[k] for k in ("name", "accuracy", "mean_reward", "rewards", "tokens", "learning_rate", "seed")}
                | {"val": r["val"]["rewards"]} for r in data["runs"]], data["rows"]

    run_sweep(grid_config(tmp_path / "one", dtype="float64", layers="-1", lanes=1))
    run_sweep(grid_config(tmp_path / "all", dtype="float64", layers="-1", lanes=4))
    runs_one, rows_one = table(tmp_path / "one")
    runs_all, rows_all = table(tmp_path / "all")
    assert runs_one == runs_all
    keep = ("layer", "single", "contribution", "selected_learning_rate", "single_ci_low", "single_ci_high")
    assert [{k: r[k] for k in keep} for r in rows_one] == [{k: r[k] for k in keep} for r in rows_all]


# ------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("overrides, message", [
    (dict(learning_rates=()), "learning_rates is empty"),
    (dict(learning_rates=(1e-3, 0.0)), "finite number > 0"),
    (dict(learning_rates=(-1e-3,)), "finite number > 0"),
    (dict(learning_rates=(math.nan,)), "finite number > 0"),
    (dict(learning_rates=(1e-3, 1e-3)), "a rate twice"),
    (dict(seeds=0), "seeds must be an integer >= 1"),
    (dict(seeds=1.5), "seeds must be an integer >= 1"),
    (dict(val_size=0), "val_size must be an integer >= 1"),
    (dict(full_learning_rates=()), "full_learning_rates is empty"),
    (dict(full_learning_rates=(1e-3, -1e-3)), "finite number > 0.*in full_learning_rates"),
    (dict(full_learning_rates=(1e-3, 1e-3)), "full_learning_rates has a rate twice"),
])
def test_bad_grid_settings(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_sweep(grid_config(tmp_path / "bad", **overrides))
    assert not (tmp_path / "bad").exists()  # refused before anything is written


@pytest.mark.parametrize("flags, message", [
    (["--learning-rates", ""], "learning_rates is empty"),
    (["--learning-rates", "1e-3,0"], "finite number > 0"),
    (["--learning-rates", "1e-3,-2e-4"], "finite number > 0"),
    (["--learning-rates", "1e-3,fast"], "'fast' is not a number"),
    (["--learning-rates", "1e-3,1e-3"], "a rate twice"),
    (["--seeds", "0"], "seeds must be >= 1"),
    (["--val-size", "0"], "val_size must be >= 1"),
    (["--full-learning-rates", "1e-5,0"], "finite number > 0"),
])
def test_cli_rejects_bad_grid_flags(tmp_path, capsys, flags, message):
    argv = ["sweep", "--model", "tiny", "--out", str(tmp_path / "s"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and flags[0] in err
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------ divergence

def test_a_diverged_rate_is_recorded_and_never_selected(tmp_path):
    """At 1e30 every run diverges (Full alone, the layers as lanes of one wave): those runs are recorded as
    diverged, the lanes still training go on resumed from their checkpoints, and each arm selects 1e-2,
    its runs exactly those of a sweep that never had the diverging rate."""
    out = tmp_path / "grid"
    result = run_sweep(grid_config(out, dtype="float64", learning_rates=(1e-2, 1e30), lanes=8))
    assert result.selected_learning_rates == {report.FULL: 1e-2, 1: 1e-2, 3: 1e-2}
    diverged = sorted(r.name for r in result.diverged)
    assert diverged == sorted(f"{arm}-lr1e+30-seed{seed}" for arm in ("full", "layer-1", "layer-3") for seed in (42, 43))
    data = json.loads((out / "results.json").read_text())
    assert sorted(data["diverged_runs"]) == diverged
    assert all("diverged" in r["diverged"] and r["correct"] == [] for r in data["runs"] if r["name"] in diverged)
    assert "diverged and was never selected" in (out / "report.md").read_text()

    plain = run_sweep(grid_config(tmp_path / "plain", dtype="float64", learning_rates=(1e-2,), lanes=8))
    def by_arm(runs):
        return {(r.mode, r.layer, r.seed): (r.rewards, r.tokens) for r in runs if r.learning_rate == 1e-2}
    assert by_arm(result.runs) == by_arm(plain.runs)
    # a rerun loads the diverged runs as they are: nothing trains again
    again = run_sweep(grid_config(out, dtype="float64", learning_rates=(1e-2, 1e30), lanes=8))
    assert sorted(r.name for r in again.diverged) == diverged


def test_an_arm_that_diverges_at_every_rate_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"Full diverged at every learning rate \(1e\+30\)"):
        run_sweep(grid_config(tmp_path / "grid", learning_rates=(1e30,), seeds=1, layers="1"))
