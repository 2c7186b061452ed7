"""Layer sweeps: contribution math, layer specs, an end-to-end sweep through the CLI on the `tiny`
preset, resume after a kill, and refusing a directory made with other settings."""
from __future__ import annotations

import csv
import importlib.util
import json
import shutil

import pytest

from onelayer_fast import sweep as sweep_module
from onelayer_fast.cli import main
from onelayer_fast.sweep import CSV_COLUMNS, SweepConfig, contribution, middle_layers, parse_layers, run_sweep
from onelayer_fast.lane_trainer import LaneTrainer
from onelayer_fast.trainer import GRPOConfig, GRPOTrainer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# 2 training steps of 2 prompts x 2 generations, 3-token completions, 8 eval examples: seconds per run.
# mean_reward as the metric: a random-init model scores 0 accuracy everywhere (Full == Base).
TRAIN_FLAGS = dict(max_steps=2, per_device_train_batch_size=4, num_generations=2, max_completion_length=3,
                   num_iterations=1, beta=0.0, learning_rate=1e-2)
CLI = ["sweep", "--model", "tiny", "--task", "arithmetic", "--layers", "1,-1", "--eval-size", "8",
       "--metric", "mean_reward", "--steps", "2", "--batch-size", "4", "--num-generations", "2",
       "--max-completion-length", "3", "--num-iterations", "1", "--beta", "0", "--learning-rate", "1e-2"]


def sweep_config(out, **overrides) -> SweepConfig:
    """The same sweep as the CLI command above."""
    grpo = GRPOConfig(**{**TRAIN_FLAGS, **overrides.pop("grpo", {})})
    values = dict(model="tiny", out=str(out), task="arithmetic", layers="1,-1", eval_size=8, metric="mean_reward",
                  grpo=grpo, progress=False)
    values.update(overrides)
    return SweepConfig(**values)


def deterministic(result_json: dict) -> list[dict]:
    """What a rerun must reproduce exactly: every run's scores and training size (not its timings)."""
    keys = ("name", "mode", "layer", "accuracy", "mean_reward", "n", "steps", "tokens")
    return [{k: run[k] for k in keys} for run in result_json["runs"]] + [
        {k: row[k] for k in ("layer", "base", "full", "single", "contribution")} for row in result_json["rows"]]


@pytest.fixture
def spy(monkeypatch):
    """Records (mode, layer, step at start) of every run a GRPOTrainer or LaneTrainer (one entry per lane, by
    ascending layer) starts training, and counts evaluations (one per lane for a lane evaluation)."""
    calls = {"train": [], "evaluate": 0}
    train, lanes_train = GRPOTrainer.train, LaneTrainer.train
    evaluate, evaluate_lanes = sweep_module.evaluate, sweep_module.evaluate_lanes

    def spy_train(self):
        calls["train"].append((self.run.mode, self.run.layer if self.run.mode == "single" else None, self.step))
        return train(self)

    def spy_lanes_train(self):
        calls["train"].extend(sorted(("single", lane.layer, step) for lane, step in zip(self.policy.lanes, self.steps)))
        return lanes_train(self)

    def spy_evaluate(*args, **kwargs):
        calls["evaluate"] += 1
        return evaluate(*args, **kwargs)

    def spy_evaluate_lanes(policy, *args, **kwargs):
        calls["evaluate"] += policy.num_lanes
        return evaluate_lanes(policy, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "train", spy_train)
    monkeypatch.setattr(LaneTrainer, "train", spy_lanes_train)
    monkeypatch.setattr(sweep_module, "evaluate", spy_evaluate)
    monkeypatch.setattr(sweep_module, "evaluate_lanes", spy_evaluate_lanes)
    return calls


@pytest.fixture(scope="module")
def cli_sweep(tmp_path_factory):
    """One uninterrupted sweep through the command line: (out dir, printed output)."""
    out = tmp_path_factory.mktemp("cli") / "sweep"
    assert main(CLI + ["--out", str(out)]) == 0
    return out


# ------------------------------------------------------------------------------------------- math

@pytest.mark.parametrize("single, base, full, expected", [
    (0.5, 0.2, 0.8, 0.5),
    (0.8, 0.2, 0.8, 1.0),
    (0.2, 0.2, 0.8, 0.0),
    (0.1, 0.2, 0.6, -0.25),  # a layer that makes things worse
    (0.9, 0.2, 0.6, 1.75),  # better than full
    (0.1, 0.4, 0.2, 1.5),  # full below base: the ratio still says "1.5x full's change"
])
def test_contribution(single, base, full, expected):
    assert contribution(single, base, full) == pytest.approx(expected)


@pytest.mark.parametrize("base", [0.0, 0.3])
def test_contribution_is_undefined_when_full_equals_base(base):
    assert contribution(0.5, base, base) is None


# ------------------------------------------------------------------------------------- layer specs

@pytest.mark.parametrize("spec, n, expected", [
    ("all", 4, [0, 1, 2, 3]),
    (" ALL ", 2, [0, 1]),
    ("middle", 4, [1, 2]),
    ("middle", 28, list(range(9, 19))),
    ("middle", 36, list(range(12, 24))),
    ("middle", 1, [0]),
    ("middle", 2, [0, 1]),
    ("middle", 3, [1]),
    ("0,5,10-14", 28, [0, 5, 10, 11, 12, 13, 14]),
    ("-1", 28, [27]),
    ("-3--1", 28, [25, 26, 27]),
    ("0, -1, 2-3", 4, [0, 2, 3]),
    ("3,1-3,1", 4, [1, 2, 3]),  # duplicates collapse; sorted
    ("2-2", 4, [2]),
])
def test_parse_layers(spec, n, expected):
    assert parse_layers(spec, n) == expected


def test_middle_is_the_middle_third():
    for n in range(1, 100):
        layers = middle_layers(n)
        assert layers == list(range(n // 3, n - n // 3)) and layers
        assert layers[0] == n - 1 - layers[-1]  # symmetric


@pytest.mark.parametrize("spec, message", [
    ("4", "layer 4 in '4' is out of range for a model with 4 layers"),
    ("-5", "out of range"),
    ("1-7", "out of range"),
    ("3-1", "descending"),
    ("-1-0", "descending"),
    ("", "bad layer spec"),
    ("1,,2", "bad layer spec"),
    ("1-", "bad layer spec"),
    ("first", "bad layer spec"),
    ("1.5", "bad layer spec"),
])
def test_parse_layers_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_layers(spec, 4)


# ------------------------------------------------------------------------------------- end to end

def test_cli_sweep_writes_csv_json_plot(cli_sweep):
    out = cli_sweep
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
        header = rows and list(rows[0])
    assert tuple(header) == CSV_COLUMNS and header[:5] == ["layer", "base", "full", "single", "contribution"]
    assert [int(r["layer"]) for r in rows] == [1, 3]  # "1,-1" on 4 layers
    data = json.loads((out / "results.json").read_text())
    assert [run["name"] for run in data["runs"]] == ["base", "full", "layer-1", "layer-3"]
    assert data["metric"] == "mean_reward" and data["settings"]["algo"] == "grpo"
    for row, csv_row in zip(data["rows"], rows):
        expected = sweep_module.contribution(row["single"], row["base"], row["full"])
        assert row["contribution"] == expected
        assert csv_row["contribution"] == ("" if expected is None else f"{expected:.6g}")
    runs = {run["name"]: run for run in data["runs"]}
    assert runs["base"]["steps"] == 0 and runs["base"]["tokens"] == 0
    for name in ("full", "layer-1", "layer-3"):
        assert runs[name]["steps"] == 2 and runs[name]["tokens"] > 0 and runs[name]["train_seconds"] > 0
        assert runs[name]["peak_memory_mib"] > 0 and runs[name]["n"] == 8
        assert (out / "runs" / name / "result.json").is_file() and (out / "runs" / name / "latest").is_file()
    assert json.loads((out / "sweep.json").read_text())["layers"] == [1, 3]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "contribution.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_print_table_says_when_contribution_is_undefined(cli_sweep, capsys):
    # Accuracy is 0 for every run of a random-init model: Full == Base. Nothing is retrained.
    result = run_sweep(sweep_config(cli_sweep, metric="accuracy"))
    sweep_module.print_table(result)
    table = capsys.readouterr().out
    assert result.full_equals_base and all(c is None for c in result.contributions.values())
    assert "Full == Base" in table and "n/a" in table and "Single(i)" in table
    with open(cli_sweep / "results.csv", newline="") as f:
        assert [r["contribution"] for r in csv.DictReader(f)] == ["", ""]
    assert [r["contribution"] for r in json.loads((cli_sweep / "results.json").read_text())["rows"]] == [None, None]
    run_sweep(sweep_config(cli_sweep))  # put the mean_reward tables back for the other tests


def kill_at_step_1_of_layer_1(monkeypatch) -> None:
    """Ctrl-C as layer 1 is about to take its second step: the trainer saves step 1 of every lane."""
    train_step = LaneTrainer.train_step

    def killed_in_layer_1(self, active):
        if any(self.policy.lanes[k].layer == 1 and self.steps[k] == 1 for k in active):
            raise KeyboardInterrupt
        return train_step(self, active)

    monkeypatch.setattr(LaneTrainer, "train_step", killed_in_layer_1)


def test_resume_after_a_kill_runs_only_what_is_missing(cli_sweep, tmp_path, monkeypatch, spy):
    """One lane at a time (--lanes 1): layer 1, then layer 3."""
    reference = deterministic(json.loads((cli_sweep / "results.json").read_text()))
    out = tmp_path / "sweep"
    with monkeypatch.context() as patch:
        kill_at_step_1_of_layer_1(patch)
        with pytest.raises(KeyboardInterrupt):
            run_sweep(sweep_config(out, lanes=1))
    assert spy["train"] == [("full", None, 0), ("single", 1, 0)]
    assert not (out / "runs" / "layer-1" / "result.json").exists() and not (out / "results.csv").exists()

    spy["train"].clear(), spy.update(evaluate=0)
    run_sweep(sweep_config(out, lanes=1))
    # Base and Full are not redone; layer 1 resumes from its step-1 checkpoint; layer 3 starts fresh.
    assert spy["train"] == [("single", 1, 1), ("single", 3, 0)] and spy["evaluate"] == 2
    assert deterministic(json.loads((out / "results.json").read_text())) == reference

    # A lost result.json (killed during evaluation): the finished run is only re-evaluated.
    (out / "runs" / "layer-3" / "result.json").unlink()
    spy["train"].clear(), spy.update(evaluate=0)
    run_sweep(sweep_config(out, lanes=1))
    assert spy["train"] == [("single", 3, 2)] and spy["evaluate"] == 1
    assert deterministic(json.loads((out / "results.json").read_text())) == reference

    # Everything finished: nothing runs, the tables are rewritten the same.
    spy["train"].clear(), spy.update(evaluate=0)
    run_sweep(sweep_config(out, lanes=1))
    assert spy["train"] == [] and spy["evaluate"] == 0


def test_resume_after_a_kill_with_lanes(cli_sweep, tmp_path, monkeypatch, spy):
    """Both layers as lanes of one wave: the kill stops both at step 1, the rerun resumes both."""
    reference = deterministic(json.loads((cli_sweep / "results.json").read_text()))
    out = tmp_path / "sweep"
    with monkeypatch.context() as patch:
        kill_at_step_1_of_layer_1(patch)
        with pytest.raises(KeyboardInterrupt):
            run_sweep(sweep_config(out, lanes=2))
    assert spy["train"] == [("full", None, 0), ("single", 1, 0), ("single", 3, 0)]
    for name in ("layer-1", "layer-3"):
        assert (out / "runs" / name / "checkpoint-000001").is_dir() and not (out / "runs" / name / "result.json").exists()
    spy["train"].clear(), spy.update(evaluate=0)
    run_sweep(sweep_config(out, lanes=2))
    assert spy["train"] == [("single", 1, 1), ("single", 3, 1)] and spy["evaluate"] == 2
    assert deterministic(json.loads((out / "results.json").read_text())) == reference


def test_refuses_a_directory_made_with_other_settings(cli_sweep, tmp_path, spy, capsys):
    with pytest.raises(ValueError, match=r"different settings \(learning_rates: \[0\.01\] -> \[0\.02\]\)"):
        run_sweep(sweep_config(cli_sweep, grpo=dict(learning_rate=2e-2)))
    with pytest.raises(ValueError, match=r"layers: \[1, 3\] -> \[1\]"):
        run_sweep(sweep_config(cli_sweep, layers="1"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a sweep")
    with pytest.raises(ValueError, match="not a sweep directory"):
        run_sweep(sweep_config(tmp_path / "other"))
    assert main(CLI + ["--out", str(cli_sweep), "--learning-rate", "0.5"]) == 2
    assert "different settings" in capsys.readouterr().err
    assert spy["train"] == [] and spy["evaluate"] == 0


@pytest.mark.parametrize("flags, message", [
    (["--layers", "7"], "out of range"),
    (["--layers", "2-1"], "descending"),
    (["--algo", "ppo"], "algo"),
    (["--eval-size", "0"], "eval_size"),
])
def test_cli_sweep_errors_exit_2(tmp_path, capsys, flags, message):
    assert main(CLI + ["--out", str(tmp_path / "sweep")] + flags) == 2
    assert message in capsys.readouterr().err


def test_cli_eval(cli_sweep, capsys):
    assert main(["eval", "--model", "tiny", "--checkpoint", str(cli_sweep / "runs" / "layer-1"), "--eval-size", "8"]) == 0
    printed = capsys.readouterr().out
    layer_1 = json.loads((cli_sweep / "runs" / "layer-1" / "result.json").read_text())
    # The checkpoint's seed and max_completion_length are used: the same score as in the sweep.
    assert f"accuracy {layer_1['accuracy']:.4f}" in printed and f"mean reward {layer_1['mean_reward']:.4f}" in printed
    assert main(["eval", "--model", "tiny", "--checkpoint", str(cli_sweep / "nothing")]) == 2


def test_plot_is_skipped_without_matplotlib(cli_sweep, tmp_path, monkeypatch, capsys):
    out = tmp_path / "copy"
    shutil.copytree(cli_sweep, out)
    (out / "contribution.png").unlink(missing_ok=True)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = run_sweep(sweep_config(out))
    assert result.plot is None and not (out / "contribution.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_contribution_is_never_negative_zero():
    import math

    value = contribution(0.5, 0.5, 0.25)  # single == base while full fell below base
    assert value == 0.0 and math.copysign(1.0, value) == 1.0


def test_the_directory_lock_is_free_after_a_sweep(cli_sweep):
    import os

    with sweep_module.SweepLock(cli_sweep):  # raises SweepBusyError if a finished sweep still held it
        assert (cli_sweep / sweep_module.LOCK_NAME).read_text().strip() == str(os.getpid())
