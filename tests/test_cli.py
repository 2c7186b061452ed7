"""End to end through the command line on the embedded default model."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from onelayer_fast.cli import main
from onelayer_fast.trainer import GRPOConfig
from onelayer_fast.presets import load_model

TRAIN = ["train", "--model", "tiny", "--task", "arithmetic", "--layer", "2", "--steps", "3", "--batch-size", "8",
         "--num-generations", "4", "--max-completion-length", "6", "--learning-rate", "1e-3", "--num-iterations", "2",
         "--beta", "0.04"]


def test_train_then_merge(tmp_path):
    run = tmp_path / "run"
    assert main(TRAIN + ["--output-dir", str(run)]) == 0
    lines = (run / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert main(["merge", "--model", "tiny", "--checkpoint", str(run), "--out", str(tmp_path / "merged")]) == 0
    merged, _ = load_model(str(tmp_path / "merged"))
    base, _ = load_model("tiny", seed=GRPOConfig.seed)  # the seed the run was trained with
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all(k.startswith("model.layers.2.") for k in changed)


def test_bad_layer_exits_with_a_clear_message(tmp_path, capsys):
    assert main(["train", "--model", "tiny", "--layer", "9", "--output-dir", str(tmp_path)]) == 2
    assert "out of range" in capsys.readouterr().err


def test_console_script_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "onelayer_fast.cli"] + TRAIN[:-4] + ["--steps", "1", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "done: 1 steps" in result.stdout
