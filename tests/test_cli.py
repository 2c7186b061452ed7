"""End to end through the command line on the embedded default model."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from onelayer_fast.cli import main
from onelayer_fast.trainer import GRPOConfig
from onelayer_fast.models import load_model

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


def test_every_flag_has_help_and_the_config_fields_round_trip():
    """Each generated flag says what it does (not just its default), and parsing the defaults rebuilds the
    default configs exactly: the CLI and the dataclasses cannot drift apart."""
    import argparse

    from onelayer_fast.cli import build_parser, config_from_args
    from onelayer_fast.trainer import RunSpec

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            text = (action.help or "").split("(default:")[0].strip()
            assert text, f"{name} {action.option_strings} has no help"
    args = parser.parse_args(["train"])
    assert config_from_args(GRPOConfig, args) == GRPOConfig()
    assert config_from_args(RunSpec, args) == RunSpec()
    args = parser.parse_args(["train", "--epsilon-high", "0.28", "--max-grad-norm", "none", "--layer", "-1"])
    config, run = config_from_args(GRPOConfig, args), config_from_args(RunSpec, args)
    assert (config.epsilon_high, config.max_grad_norm, run.layer) == (0.28, None, -1)
    assert main(["train", "--loss-type", "ppo"]) == 2  # choices come from the config's metadata


def test_bool_fields_become_on_off_flags():
    import argparse
    from dataclasses import dataclass, field

    from onelayer_fast.cli import add_dataclass_flags, config_from_args

    @dataclass
    class Knobs:
        mask_truncated: bool = field(default=False, metadata={"help": "drop truncated completions from the loss"})
        scale: float | None = field(default=None, metadata={"help": "a scale"})

    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, Knobs)
    assert config_from_args(Knobs, parser.parse_args([])) == Knobs()
    assert config_from_args(Knobs, parser.parse_args(["--mask-truncated", "--scale", "2"])) == Knobs(True, 2.0)
    assert config_from_args(Knobs, parser.parse_args(["--no-mask-truncated"])) == Knobs(False)


def test_eval_keeps_an_explicit_max_new_tokens(monkeypatch):
    """`--max-new-tokens N` reaches the evaluation as given (it used to pass through an `or`)."""
    import importlib

    evaluate_module = importlib.import_module("onelayer_fast.evaluate")  # the package re-exports the function
    seen = {}

    def spy(model, tokenizer, task, examples, batch_size, max_new_tokens, **kwargs):
        seen["max_new_tokens"] = max_new_tokens
        return evaluate_module.EvalResult(accuracy=0.0, mean_reward=0.0, n=len(examples), seconds=0.0)

    monkeypatch.setattr(evaluate_module, "evaluate", spy)
    assert main(["eval", "--model", "tiny", "--eval-size", "2", "--max-new-tokens", "1", "--device", "cpu"]) == 0
    assert seen == {"max_new_tokens": 1}
