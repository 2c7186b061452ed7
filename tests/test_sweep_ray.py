"""Sweeps on Ray (`--executor ray`): the same table as the local executor, a job whose worker dies is retried
and resumes, and clear errors without Ray or without a reachable cluster.

The tests that need Ray share one local cluster (2 CPUs, started once for the module: Ray starts slowly)
and skip when Ray is not installed; the error tests for a missing Ray run without it."""
from __future__ import annotations

import csv
import functools
import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

from onelayer_fast.cli import main
from onelayer_fast.executors import CRASH_MARKER_ENV, ExecutorError, Job, RayExecutor
from onelayer_fast.sweep import LOCK_NAME, SweepConfig, run_sweep
from onelayer_fast.trainer import GRPOConfig

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install 'onelayer_fast[ray]')")

# Base, Full and one wave of two lanes (layers 1 and 3 of the tiny preset's 4): three jobs, in float64.
GRPO = dict(max_steps=2, per_device_train_batch_size=4, num_generations=2, max_completion_length=3,
            num_iterations=1, beta=0.0, learning_rate=1e-2)
WAVE = "wave 1/1: layer-1, layer-3"
DETERMINISTIC = ("layer", "base", "full", "single", "contribution", "single_tokens", "full_tokens",
                 "base_reward", "full_reward", "single_reward", "selected_learning_rate", "n_seeds",
                 "single_ci_low", "single_ci_high", "contribution_ci_low", "contribution_ci_high", "p_recovers_80")
RUN_KEYS = ("name", "mode", "layer", "accuracy", "mean_reward", "n", "steps", "tokens", "learning_rate", "seed",
            "correct", "rewards", "val", "diverged")
CLI = ["sweep", "--model", "tiny", "--task", "arithmetic", "--layers", "1,-1", "--eval-size", "8",
       "--metric", "mean_reward", "--steps", "2", "--batch-size", "4", "--num-generations", "2",
       "--max-completion-length", "3", "--num-iterations", "1", "--beta", "0", "--learning-rate", "1e-2",
       "--dtype", "float64", "--lanes", "2", "--no-progress"]


def config(out: Path, **overrides) -> SweepConfig:
    values = dict(model="tiny", out=str(out), task="arithmetic", layers="1,-1", eval_size=8, metric="mean_reward",
                  grpo=GRPOConfig(**GRPO), progress=False, dtype="float64", lanes=2, save_steps=1)
    return SweepConfig(**{**values, **overrides})


def table(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return [{k: row[k] for k in DETERMINISTIC} for row in csv.DictReader(f)]


def scores(out: Path) -> dict:
    """What results.json must hold the same under either executor: every run's scores, and the statistics."""
    data = json.loads((out / "results.json").read_text())
    return {"runs": [{k: run[k] for k in RUN_KEYS} for run in data["runs"]], "bootstrap": data["bootstrap"],
            "rows": [{k: row[k] for k in DETERMINISTIC} for row in data["rows"]], "best": data["best_layer"],
            "selected": data["selected_learning_rates"]}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory) -> Path:
    """The sweep with the local executor, one thread (as the Ray workers run with num_cpus=1)."""
    out = tmp_path_factory.mktemp("local") / "sweep"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_sweep(config(out))
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local 2-CPU Ray cluster for the module; yields the path of the crash marker its workers watch
    (executors.CRASH_MARKER_ENV: the workers inherit the environment the cluster starts with)."""
    ray = pytest.importorskip("ray")
    marker = tmp_path_factory.mktemp("crash") / "crash.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CRASH_MARKER_ENV, str(marker))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield marker
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------------- no Ray needed

def test_executor_ray_without_ray_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` -> ImportError, installed or not
    out = tmp_path / "sweep"
    assert main(CLI + ["--out", str(out), "--executor", "ray"]) == 2
    assert "pip install 'onelayer_fast[ray]'" in capsys.readouterr().err
    with pytest.raises(ExecutorError, match=r"pip install 'onelayer_fast\[ray\]'"):
        run_sweep(config(out, executor="ray"))
    assert not out.exists()  # refused before the directory, its lock or a model


@pytest.mark.parametrize("flags, message", [
    (["--ray-address", "127.0.0.1:6379"], "--ray-address is for --executor ray"),
    (["--executor", "dask"], "invalid choice: 'dask'"),
    (["--executor", "ray", "--ray-max-retries", "-1"], "ray_max_retries must be an integer >= 0"),
    (["--executor", "ray", "--ray-gpus-per-job", "1", "--device", "cpu"], "jobs would hold GPUs they do not use"),
])
def test_executor_flag_errors(tmp_path, capsys, flags, message):
    assert main(CLI + ["--out", str(tmp_path / "sweep")] + flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


# ------------------------------------------------------------------------------------------- Ray

@needs_ray
def test_an_unreachable_ray_address_is_an_error(tmp_path, capsys):
    port = closed_port()
    ray_flags = ["--out", str(tmp_path / "sweep"), "--executor", "ray", "--ray-address"]
    assert main(CLI + ray_flags + [f"127.0.0.1:{port}"]) == 2
    assert f"cannot reach the Ray cluster at --ray-address 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(CLI + ray_flags + ["nowhere"]) == 2
    assert "is not host:port" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


@needs_ray
def test_ray_sweep_gives_the_local_table(ray_cluster, local_reference, tmp_path, capsys):
    out = tmp_path / "sweep"
    result = run_sweep(config(out, executor="ray", progress=True))
    printed = capsys.readouterr()
    assert table(out) == table(local_reference) and scores(out) == scores(local_reference)
    assert [r.name for r in result.runs] == ["base", "full", "layer-1", "layer-3"]
    for name in ("full", "layer-1", "layer-3"):  # the workers wrote each run's files into the sweep directory
        assert (out / "runs" / name / "result.json").is_file() and (out / "runs" / name / "latest").is_file()
    # Progress: one bar over the three jobs, and each job's name as it finishes.
    assert "3 job(s)" in printed.out and "/3" in printed.err
    for job in ("base", "full", WAVE):
        assert f"sweep: finished {job}\n" in printed.out
    # The driver held the lock (its pid is in the file) and let it go; the jobs never took it.
    assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
    # A rerun (either executor) finds every run done and only rewrites the tables.
    run_sweep(config(out))
    assert table(out) == table(local_reference)


@needs_ray
def test_cli_sweep_on_ray(ray_cluster, local_reference, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(CLI + ["--out", str(out), "--save-steps", "1", "--executor", "ray", "--ray-cpus-per-job", "1",
                       "--ray-max-retries", "2"]) == 0
    assert "1 CPU(s) each, retried up to 2 time(s) when a worker dies; 3 job(s)" in capsys.readouterr().out
    assert table(out) == table(local_reference) and scores(out) == scores(local_reference)


@needs_ray
def test_a_job_whose_worker_dies_is_retried_and_resumes(ray_cluster, local_reference, tmp_path):
    out = tmp_path / "sweep"
    marker = ray_cluster
    # The worker of the lane wave dies (os._exit) once layer 1 has checkpointed step 1 of 2.
    marker.write_text(json.dumps({"job": WAVE, "after": str(out / "runs" / "layer-1" / "checkpoint-000001")}))
    try:
        run_sweep(config(out, executor="ray", ray_max_retries=1))
        assert not marker.exists() and Path(f"{marker}.claimed").is_file(), "the worker did not die"
    finally:
        marker.unlink(missing_ok=True)
    crash = json.loads(Path(f"{marker}.claimed").read_text())
    assert crash["pid"] != os.getpid()  # a Ray worker died, not this process
    # The retry resumed from the checkpoint the dead worker left (checkpoints appear whole, by a rename):
    # step 1 was not trained and saved again.
    assert (out / "runs" / "layer-1" / "checkpoint-000001" / "meta.json").stat().st_mtime <= crash["time"]
    assert table(out) == table(local_reference) and scores(out) == scores(local_reference)


@needs_ray
def test_a_job_error_is_raised_as_the_job_raised_it(ray_cluster):
    with RayExecutor(num_cpus=1) as executor:
        with pytest.raises(ValueError, match="invalid literal for int"):
            executor.run([Job("bad", functools.partial(int, "x"))], on_done=lambda job, value: None)
        seen = []
        executor.run([Job("one", functools.partial(int, "1")), Job("two", functools.partial(int, "2"))],
                     on_done=lambda job, value: seen.append((job.name, value)))
        assert sorted(seen) == [("one", 1), ("two", 2)]


@needs_ray
def test_a_worker_that_dies_past_max_retries_fails_the_sweep_which_then_resumes(ray_cluster, local_reference,
                                                                                 tmp_path, torch_single_thread):
    out = tmp_path / "sweep"
    marker = ray_cluster
    marker.write_text(json.dumps({"job": WAVE, "after": str(out / "runs" / "layer-1" / "checkpoint-000001")}))
    try:
        with pytest.raises(RuntimeError, match=f"job '{WAVE}' failed on Ray"):
            run_sweep(config(out, executor="ray", ray_max_retries=0))
    finally:
        marker.unlink(missing_ok=True)
    assert not (out / "runs" / "layer-1" / "result.json").exists() and not (out / "results.csv").exists()
    # The lock is free again, and the local executor resumes what Ray left.
    run_sweep(config(out))
    assert table(out) == table(local_reference) and scores(out) == scores(local_reference)
