"""bench/run.py stays runnable: quick step and grpo_loss benchmarks of every contender, validated by their own checks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_quick(workload: str, tmp_path: Path) -> dict:
    """Run `bench/run.py <workload> --quick`, require exit 0 (its own checks passed), return its JSON."""
    out = tmp_path / f"{workload}.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), workload, "--quick", "--wait-idle", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_quick_step_benchmark_runs_and_checks_itself(tmp_path):
    assert {"onelayer_fast", "full", "naive_trl"} <= set(run_quick("step", tmp_path)["contenders"])


@pytest.mark.slow
def test_quick_grpo_loss_benchmark_runs_and_cross_checks(tmp_path):
    record = run_quick("grpo_loss", tmp_path)
    contenders = record["contenders"]
    assert {"onelayer_fast", "materialized"} <= set(contenders)
    assert all(c["valid"] and c["gflop_per_s"] > 0 for c in contenders.values())
    assert any("onelayer_fast:" in line and "[MATCH]" in line for line in record["crosscheck"])
    if "liger" not in contenders:
        assert "liger" in record["skipped"]
