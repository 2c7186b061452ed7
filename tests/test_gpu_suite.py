"""`python -m bench gpu-suite` (bench/gpu_suite.py) on a machine without a GPU: without CUDA it refuses (exit 2,
nothing written); with torch.cuda faked and a fake part runner, its plan: which commands in which order, each part's
time limit within the budget, the suite JSON (GPU name and date in its name, each part's outcome and the files it
wrote), a failing or timed-out part making it exit 1. The real part runner on tiny commands."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import cli, gpu_suite, harness, report
from bench.workloads import WORKLOADS

REPO = Path(__file__).resolve().parent.parent
DAY = "2026-12-01"


def test_without_cuda_it_says_so_and_exits_2_before_anything_else(monkeypatch, tmp_path, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def runner(argv, limit):
        raise AssertionError(f"ran {argv} without CUDA")

    out_dir = tmp_path / "results"
    assert gpu_suite.main(["--out-dir", str(out_dir)], runner=runner) == 2
    assert cli.main(["gpu-suite", "--out-dir", str(out_dir)]) == 2  # the command line's way in
    err = capsys.readouterr().err
    assert err.count("python -m bench gpu-suite needs CUDA") == 2 and "Nothing was run" in err
    assert not out_dir.exists()  # nothing written, not even the directory


def test_the_real_entry_point_without_cuda_exits_2(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU even where there is one
    proc = subprocess.run([sys.executable, "-m", "bench", "gpu-suite", "--out-dir", str(tmp_path / "r")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "gpu-suite needs CUDA" in proc.stderr and not (tmp_path / "r").exists()


class FakeGpuMachine:
    """torch.cuda faked as one NVIDIA H200; a clock that only the fake runner moves; the runner records each command
    with its time limit, writes the files the real part would (a JUnit XML, the benchmarks' JSONs) and answers
    with the exit code scripted for the part (None: it ran out of time, and used its whole limit)."""

    def __init__(self, monkeypatch, codes: dict[str, int | None] | None = None, seconds: float = 30.0):
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
        monkeypatch.setattr(report, "device_info", lambda device="cpu": {"device": "NVIDIA H200, 139 GiB (fake)",
                                                                          "gpu_name": "NVIDIA H200"})
        self.codes, self.seconds, self.now, self.calls = codes or {}, seconds, 1000.0, []

    def clock(self) -> float:
        return self.now

    def runner(self, argv: list[str], limit: float) -> dict:
        name = "pytest-gpu" if "pytest" in argv else argv[argv.index("bench") + 1]
        self.calls.append((name, argv, limit))
        code = self.codes.get(name, 0)
        self.now += limit if code is None else self.seconds
        if name == "pytest-gpu":
            junit = next(a.split("=", 1)[1] for a in argv if a.startswith("--junitxml="))
            Path(junit).write_text('<testsuites><testsuite tests="12" failures="0" errors="0" skipped="1"/>'
                                   "</testsuites>")
        else:
            base = Path(argv[argv.index("--out") + 1])
            for shape_set in harness.shape_sets(WORKLOADS[name], "--quick" in argv, "cuda"):
                record = {"description": f"{name} {shape_set}", "contenders": {"onelayer_fast": {
                    "median_s": 0.1, "floor_tflop_per_s": 400.0, "kernel_tflop_per_s": 600.0, "working_mib": 9.0,
                    "kernel_flops_definition": "triton: 6 x unmasked tokens x hidden x vocab", "valid": True}},
                    "ratios": {}, "targets": [], "crosscheck": [], "skipped": {"materialized": "not on CUDA"}}
                report.result_path(base, shape_set).write_text(json.dumps(record))
        return {"exit_code": code, "timed_out": code is None, "tail": [f"{name} output"]}

    def run(self, *argv: str) -> int:
        return gpu_suite.main(list(argv), runner=self.runner, clock=self.clock, today=DAY)


def test_the_plan_runs_tests_then_benchmarks_within_the_budget_and_writes_one_record(monkeypatch, tmp_path, capsys):
    machine = FakeGpuMachine(monkeypatch)
    assert machine.run("--out-dir", str(tmp_path)) == 0
    names = [name for name, _, _ in machine.calls]
    assert names == ["pytest-gpu", "grpo_loss", "step"]  # the tests first; sweep has no CUDA path: not run
    pytest_argv, loss_argv, step_argv = (argv for _, argv, _ in machine.calls)
    assert pytest_argv[1:5] == ["-m", "pytest", "-m", "gpu"] and pytest_argv[-1] == "tests"
    for argv, name, repeats in ((loss_argv, "grpo_loss", "10"), (step_argv, "step", "2")):
        assert argv[1:6] == ["-m", "bench", name, "--device", "cuda"] and "--quick" not in argv
        assert argv[argv.index("--repeats") + 1] == repeats and argv[argv.index("--rounds") + 1] == "1"
        assert argv[argv.index("--wait-idle") + 1] == "0"
        assert argv[argv.index("--out") + 1] == str(tmp_path / f"{name}-h200.json")
    # Budget: under 8 minutes in all; each part its share plus what the parts before it left (each used 30 s)
    assert gpu_suite.SUITE_BUDGET_S < 8 * 60
    plan = gpu_suite.suite_plan("h200", DAY, tmp_path)
    assert sum(p.budget_s for p in plan) == gpu_suite.SUITE_BUDGET_S
    shares = {p.name: p.budget_s for p in plan}
    limits = [limit for _, _, limit in machine.calls]
    assert limits == [pytest.approx(shares["pytest-gpu"]),
                      pytest.approx(gpu_suite.SUITE_BUDGET_S - 30 - shares["step"] - shares["sweep"]),
                      pytest.approx(gpu_suite.SUITE_BUDGET_S - 60 - shares["sweep"])]

    record = json.loads((tmp_path / f"gpu-suite-h200-{DAY}.json").read_text())
    assert (record["gpu"], record["device_tag"], record["date"], record["passed"]) == ("NVIDIA H200", "h200", DAY, True)
    assert record["total_s"] == pytest.approx(90.0) and record["budget_s"] == gpu_suite.SUITE_BUDGET_S
    parts = {p["name"]: p for p in record["parts"]}
    assert list(parts) == ["pytest-gpu", "grpo_loss", "step", "sweep"]
    assert [p["outcome"] for p in record["parts"]] == ["passed", "passed", "passed", "skipped"]
    assert "no CUDA path" in parts["sweep"]["reason"]
    assert all(parts[n]["seconds"] == pytest.approx(30.0) and parts[n]["exit_code"] == 0 for n in names)
    assert parts["pytest-gpu"]["outputs"][0]["summary"] == {"tests": 12, "failures": 0, "errors": 0, "skipped": 1}
    assert [o["path"] for o in parts["grpo_loss"]["outputs"]] == [str(tmp_path / "grpo_loss-h200-h3584-v151936.json")]
    assert [Path(o["path"]).name for o in parts["step"]["outputs"]] == ["step-h200-qwen2.5-0.5b.json",
                                                                         "step-h200-qwen2.5-1.5b.json"]
    summary = parts["grpo_loss"]["outputs"][0]["summary"]
    assert summary["contenders"]["onelayer_fast"]["kernel_tflop_per_s"] == 600.0 and summary["skipped"]
    out = capsys.readouterr().out
    assert "pytest-gpu: passed in 30.0 s" in out and "step: passed in 30.0 s" in out and "wrote " in out


def test_a_failing_or_timed_out_part_fails_the_suite_and_the_rest_still_runs(monkeypatch, tmp_path, capsys):
    machine = FakeGpuMachine(monkeypatch, codes={"pytest-gpu": 1, "grpo_loss": None})
    assert machine.run("--out-dir", str(tmp_path)) == 1
    assert [name for name, _, _ in machine.calls] == ["pytest-gpu", "grpo_loss", "step"]
    step_limit = machine.calls[2][2]
    assert step_limit == pytest.approx(dict((p.name, p.budget_s) for p in gpu_suite.suite_plan("h200", DAY, tmp_path))
                                       ["step"])  # grpo_loss used all it could, never the step's share
    record = json.loads((tmp_path / f"gpu-suite-h200-{DAY}.json").read_text())
    assert record["passed"] is False
    assert [p["outcome"] for p in record["parts"]] == ["failed (exit 1)", "timed out", "passed", "skipped"]
    assert record["parts"][0]["output_tail"] == ["pytest-gpu output"]
    assert "gpu-suite on NVIDIA H200: FAILED" in capsys.readouterr().out


def test_quick_and_a_smaller_budget(monkeypatch, tmp_path):
    machine = FakeGpuMachine(monkeypatch, seconds=5.0)
    assert machine.run("--out-dir", str(tmp_path), "--quick", "--budget", "235") == 0
    (_, _, first), (_, loss_argv, _), (_, step_argv, _) = machine.calls
    assert first == pytest.approx(gpu_suite.PYTEST_BUDGET_S / 2)  # the shares scale with the budget
    assert "--quick" in loss_argv and loss_argv[loss_argv.index("--repeats") + 1] == "3"
    assert step_argv[step_argv.index("--repeats") + 1] == "1"
    record = json.loads((tmp_path / f"gpu-suite-h200-{DAY}-quick.json").read_text())
    assert record["quick"] and record["budget_s"] == 235.0


def test_part_runner_streams_keeps_the_tail_and_stops_a_part_at_its_limit(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # never passed on: the GPU tests would skip, benchmarks time it
    code = "import os, sys; print('hello'); print(os.environ.get('TRITON_INTERPRET')); sys.exit(3)"
    result = gpu_suite.run_part([sys.executable, "-c", code], timeout=60)
    assert result == {"exit_code": 3, "timed_out": False, "tail": ["hello", "None"]}
    assert "hello" in capsys.readouterr().out  # streamed through
    t0 = time.monotonic()
    sleeper = "import time; print('started', flush=True); time.sleep(60)"
    result = gpu_suite.run_part([sys.executable, "-c", sleeper], timeout=1.0)
    assert result["timed_out"] and result["exit_code"] != 0 and result["tail"] == ["started"]
    assert time.monotonic() - t0 < 30
