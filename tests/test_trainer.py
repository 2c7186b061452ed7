"""The training loop: config checks, rewards, what trains, resume."""
from __future__ import annotations

import math

import pytest
import torch

from onelayer_fast.models import load_model
from onelayer_fast.rollout import completion_mask_after_eos
from onelayer_fast.tasks import Example, get_task
from onelayer_fast.tasks.arithmetic import ArithmeticTask, digits_only, exact_match
from onelayer_fast.tasks.rewards import score
from onelayer_fast.trainer import GRPOConfig, GRPOTrainer, RunSpec

RUN_FIELDS = ("output_dir", "layer", "mode", "save_steps", "save_total_limit")


def small_config(tmp_path, **overrides) -> tuple[GRPOConfig, RunSpec]:
    """(hyper-parameters, run spec) of a tiny run; overrides go to whichever of the two has the field."""
    values = dict(output_dir=str(tmp_path), layer=1, max_steps=2, per_device_train_batch_size=8, num_generations=4,
                  max_completion_length=6, learning_rate=1e-2, num_iterations=2, beta=0.04, save_steps=1)
    values.update(overrides)
    run = RunSpec(**{k: v for k, v in values.items() if k in RUN_FIELDS})
    return GRPOConfig(**{k: v for k, v in values.items() if k not in RUN_FIELDS}), run


def layer_state(model, index: int) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.model.layers[index].state_dict().items()}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(per_device_train_batch_size=6, num_generations=4), "not divisible"),
        (dict(num_generations=1, per_device_train_batch_size=4), "num_generations"),
        (dict(mode="half"), "mode"),
        (dict(max_steps=0), "max_steps"),
        (dict(learning_rate=math.nan), "--learning-rate must be a finite number > 0"),
        (dict(max_grad_norm=-1.0), "--max-grad-norm must be a finite number > 0"),
        (dict(top_p=0.0), r"--top-p must be in \(0, 1\]"),
        (dict(temperature=math.inf), "--temperature must be a finite number > 0"),
        (dict(save_total_limit=0), "--save-total-limit must be >= 1"),
    ],
)
def test_config_errors(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        for config in small_config(tmp_path, **overrides):
            config.validate()


def test_layer_out_of_range_is_a_clear_error(tmp_path):
    model, tokenizer = load_model("tiny")
    with pytest.raises(ValueError, match="out of range"):
        GRPOTrainer(model, tokenizer, ArithmeticTask(), *small_config(tmp_path, layer=7))


def test_nan_reward_is_an_error():
    task = ArithmeticTask()
    task.reward_funcs = [lambda completion, example: math.nan]
    task.reward_weights = [1.0]
    with pytest.raises(ValueError, match="NaN"):
        score(task, ["1"], [Example("1+0=", "1")])


def test_arithmetic_rewards():
    example = ArithmeticTask().make(37, "+", 58)
    assert example.prompt == "37+58=" and example.answer == "95"
    assert exact_match(" 95", example) == 1.0 and exact_match("96", example) == 0.0
    assert digits_only("9x", example) == 0.5 and digits_only("", example) == 0.0
    assert ArithmeticTask().make(3, "-", 8).answer == "-5"


def test_jsonl_task(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "2+2=", "answer": "4"}\n\n{"question": "3+3=", "answer": 6}\n')
    task = get_task("jsonl", str(path))
    assert {e.answer for e in task.examples} == {"4", "6"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="answer"):
        get_task("jsonl", str(bad))
    with pytest.raises(FileNotFoundError):
        get_task("jsonl", str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown task"):
        get_task("chess")


def test_completion_mask_covers_up_to_first_eos():
    ids = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 5, 5, 5]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert torch.equal(completion_mask_after_eos(ids, eos_token_id=1), expected)


def test_training_changes_only_the_target_layer(tmp_path):
    model, tokenizer = load_model("tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = GRPOTrainer(model, tokenizer, ArithmeticTask(), *small_config(tmp_path))
    records = trainer.train()
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.layers.1.") for k in changed), changed
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 2


@pytest.mark.parametrize("mode", ["single", "full"])
def test_resume_continues_the_run_exactly(tmp_path, mode):
    # A constant rate: a decaying schedule spans max_steps, so a run extended from 2 to 4 steps would run its
    # first steps at other rates than a 4-step run (tests/test_trl_knobs.py resumes scheduled runs).
    constant = dict(mode=mode, lr_scheduler_type="constant")
    model, tokenizer = load_model("tiny")
    straight = GRPOTrainer(model, tokenizer, ArithmeticTask(), *small_config(tmp_path / "a", max_steps=4, **constant))
    straight.train()

    model, tokenizer = load_model("tiny")
    GRPOTrainer(model, tokenizer, ArithmeticTask(), *small_config(tmp_path / "b", max_steps=2, **constant)).train()
    model, tokenizer = load_model("tiny")  # a fresh process would start from the base model again
    resumed = GRPOTrainer(model, tokenizer, ArithmeticTask(), *small_config(tmp_path / "b", max_steps=4, **constant))
    assert resumed.step == 2
    resumed.train()
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_interrupt_saves_a_checkpoint_and_the_run_resumes(tmp_path):
    calls = {"n": 0}

    def interrupt_on_third_step(completion: str, example: Example) -> float:
        calls["n"] += 1
        if calls["n"] > 2 * 8:  # two steps of 8 completions, then Ctrl-C
            raise KeyboardInterrupt
        return float(len(completion))

    task = ArithmeticTask()
    task.reward_funcs, task.reward_weights = [interrupt_on_third_step], [1.0]
    model, tokenizer = load_model("tiny")
    trainer = GRPOTrainer(model, tokenizer, task, *small_config(tmp_path, max_steps=4, save_steps=100))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    model, tokenizer = load_model("tiny")
    resumed = GRPOTrainer(model, tokenizer, ArithmeticTask(), *small_config(tmp_path, max_steps=4, save_steps=100))
    assert resumed.step == 2


def test_flash_attention_only_with_cuda_and_flash_attn(monkeypatch):
    import importlib.util

    from onelayer_fast.models import presets

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    assert presets.default_attn_implementation() == "flash_attention_2"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert presets.default_attn_implementation() == "sdpa"
