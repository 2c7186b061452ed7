"""A layer sweep with its single-layer runs as lanes gives the table and the checkpoints of one run at a
time, and survives a kill -9."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from onelayer_fast.sweep import SweepConfig, plan_lanes, run_sweep
from onelayer_fast.trainer import GRPOConfig

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# The reference loss backend is the one that keeps float64 (the chunked one computes in float32).
GRPO = dict(max_steps=3, per_device_train_batch_size=4, num_generations=2, max_completion_length=4,
            num_iterations=2, beta=0.04, learning_rate=1e-2, temperature=0.9)
DETERMINISTIC = ("layer", "base", "full", "single", "contribution", "single_tokens", "full_tokens",
                 "base_reward", "full_reward", "single_reward")


def config(out: Path, lanes, dtype: str = "float64", **grpo) -> SweepConfig:
    return SweepConfig(model="tiny", out=str(out), task="arithmetic", layers="all", eval_size=8, metric="mean_reward",
                       grpo=GRPOConfig(**{**GRPO, **grpo}), progress=False, dtype=dtype, lanes=lanes, save_steps=1)


def table(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return [{k: row[k] for k in DETERMINISTIC} for row in csv.DictReader(f)]


def final_weights(out: Path, layer: int) -> dict[str, torch.Tensor]:
    run = out / "runs" / f"layer-{layer}"
    return load_file(str(run / (run / "latest").read_text().strip() / "layer.safetensors"))


def test_float64_sweep_with_lanes_equals_one_at_a_time(tmp_path, relative_error):
    alone = run_sweep(config(tmp_path / "one", lanes=1))
    together = run_sweep(config(tmp_path / "four", lanes=4))
    assert table(tmp_path / "one") == table(tmp_path / "four")
    assert len(together.singles) == 4 and all(r.steps == 3 for r in together.singles)
    for layer in range(4):
        a, b = final_weights(tmp_path / "four", layer), final_weights(tmp_path / "one", layer)
        assert sorted(a) == sorted(b)
        for name in a:
            assert a[name].dtype == torch.float64
            assert relative_error(a[name], b[name]) < 1e-9, (layer, name)
    # the lanes trained: their layers are not the base model's
    from onelayer_fast.models import load_model

    base, _ = load_model("tiny", seed=GRPO.get("seed", GRPOConfig.seed), dtype=torch.float64)
    for layer in range(4):
        trained = final_weights(tmp_path / "four", layer)
        original = base.model.layers[layer].state_dict()
        assert any(relative_error(trained[n], original[n]) > 1e-4 for n in trained), layer


def test_plan_lanes():
    assert plan_lanes(4, runs=10, per_lane_mib=5.0, budget_mib=None) == plan_lanes(4, 10, 5.0, 1e9)
    plan = plan_lanes("auto", runs=10, per_lane_mib=100.0, budget_mib=350.0)
    assert (plan.lanes, plan.waves) == (3, 4) and "4 wave(s) of up to 3 lane(s)" in plan.describe(10)
    assert plan_lanes("auto", runs=10, per_lane_mib=100.0, budget_mib=10.0).lanes == 1  # always at least one
    assert plan_lanes("auto", runs=3, per_lane_mib=1.0, budget_mib=1e6).lanes == 3
    assert (plan_lanes(1, 5, 1.0, None).lanes, plan_lanes(1, 5, 1.0, None).waves) == (1, 5)



def test_lane_memory_counts_each_prompt_once_per_group_in_the_shared_prompt_layout():
    """The shared-prompt layout runs a group's prompt once: the estimate drops by the prompt activations of
    (group - 1) rows of every group, exactly, while the KV cache (every row holds the prompt) stays."""
    from onelayer_fast.models import load_model
    from onelayer_fast.policy import decoder_of
    from onelayer_fast.sweep import lane_memory_mib

    model, _ = load_model("tiny", seed=0)
    config = model.config
    grpo = GRPOConfig(per_device_train_batch_size=12, num_generations=4, max_completion_length=7)
    padded = lane_memory_mib(model, grpo, prompt_tokens=11)
    shared = lane_memory_mib(model, grpo, prompt_tokens=11, shared_prompt=True)
    layers = len(decoder_of(model).layers)
    per_token = layers * (8 * config.hidden_size + 4 * config.intermediate_size) * 4 / 2**20
    assert padded - shared == pytest.approx((12 - 3) * 11 * per_token, rel=1e-12)
    one_per_group = GRPOConfig(per_device_train_batch_size=12, num_generations=1, max_completion_length=7)
    assert lane_memory_mib(model, one_per_group, 11, shared_prompt=True) == lane_memory_mib(model, one_per_group, 11)

@pytest.mark.parametrize("lanes", [0, -1, "many", 2.5, True])
def test_bad_lanes_setting(tmp_path, lanes):
    with pytest.raises(ValueError, match="lanes must be"):
        run_sweep(config(tmp_path / "bad", lanes=lanes))


def test_cli_rejects_bad_lanes(tmp_path, capsys):
    from onelayer_fast.cli import main

    assert main(["sweep", "--model", "tiny", "--out", str(tmp_path / "s"), "--lanes", "0"]) == 2
    assert "expected a number >= 1 or auto" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_9_during_a_lanes_sweep_then_rerun_gives_the_same_table(tmp_path):
    flags = ["--model", "tiny", "--task", "arithmetic", "--layers", "all", "--eval-size", "8", "--metric",
             "mean_reward", "--max-steps", "6", "--per-device-train-batch-size", "4", "--num-generations", "2",
             "--max-completion-length", "4", "--learning-rate", "1e-2", "--save-steps", "1", "--lanes", "4",
             "--no-progress"]
    command = [sys.executable, "-m", "onelayer_fast.cli", "sweep", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run([*command, "--out", str(reference)], check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    lanes = [killed / "runs" / f"layer-{i}" for i in range(4)]
    while not any((lane / "checkpoint-000003").is_dir() for lane in lanes):  # mid-way through the lanes
        assert process.poll() is None and time.monotonic() < deadline, "the sweep ended before it could be killed"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "results.csv").exists()
    subprocess.run([*command, "--out", str(killed)], check=True, env=env, capture_output=True)
    assert table(killed) == table(reference)
