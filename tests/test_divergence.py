"""Divergence: a non-finite loss, gradient norm or weight, or rewards too large to train on, stop training with a
DivergenceError before the optimizer steps on them (or right after a step that broke the weights), and nothing
is saved from the bad state: the last good checkpoint keeps its bytes and a rerun resumes from it."""
from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest
import torch

import onelayer_fast as olf
from onelayer_fast import checkpoint
from onelayer_fast.batch import RolloutBatch
from onelayer_fast.kernels.grpo_loss import LossConfig
from onelayer_fast.lane_trainer import LaneRun, LaneTrainer
from onelayer_fast.lanes import Lane, LanePolicy, stack_batches
from onelayer_fast.models import load_model
from onelayer_fast.tasks import Example
from onelayer_fast.tasks.arithmetic import ArithmeticTask
from onelayer_fast.trainer import GRPOConfig, GRPOTrainer, RunSpec
from onelayer_fast.update import DivergenceError, UpdateConfig, grpo_update, lanes_update

pytestmark = pytest.mark.usefixtures("torch_single_thread")

GROUP = 3


# ---------------------------------------------------------------------------------------- the update
def random_batch(vocab: int, generator: torch.Generator, groups: int = 2, scale: float = 1.0) -> RolloutBatch:
    rows = groups * GROUP
    prompt_ids = torch.randint(1, vocab, (groups, 5), generator=generator).repeat_interleave(GROUP, 0)
    completion_ids = torch.randint(1, vocab, (rows, 4), generator=generator)
    rewards = torch.randn(rows, generator=generator) * scale
    return RolloutBatch(prompt_ids, torch.ones_like(prompt_ids), completion_ids, torch.ones_like(completion_ids),
                        rewards, group_size=GROUP)


def update_config(scale_rewards: str = "none") -> UpdateConfig:
    return UpdateConfig(loss=LossConfig(scale_rewards=scale_rewards), num_iterations=2, max_grad_norm=1.0)


def single(tiny_model, lr: float = 1e-3):
    model = tiny_model("qwen2")
    policy = olf.OneLayerPolicy(model, layer=1)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=lr)
    return model, policy, optimizer


def trained_copy(policy) -> list[torch.Tensor]:
    return [p.detach().clone() for p in policy.trainable_parameters()]


def test_a_sane_update_passes(tiny_model):
    model, policy, optimizer = single(tiny_model)
    before = trained_copy(policy)
    history = grpo_update(policy, optimizer, random_batch(model.config.vocab_size, torch.Generator().manual_seed(0)),
                          update_config())
    assert all(math.isfinite(h["grad_norm"]) and h["grad_norm"] > 0 for h in history)
    assert any(not torch.equal(a, b) for a, b in zip(before, trained_copy(policy)))


@pytest.mark.parametrize("reward", [math.nan, math.inf, -math.inf, 1e30, -3e19])
@pytest.mark.parametrize("scale_rewards", ["none", "group"])
def test_bad_rewards_stop_before_any_step(tiny_model, reward, scale_rewards):
    model, policy, optimizer = single(tiny_model)
    generator = torch.Generator().manual_seed(1)
    batch = random_batch(model.config.vocab_size, generator)
    batch.rewards[torch.randint(0, batch.batch_size, (1,), generator=generator)] = reward
    before = trained_copy(policy)
    with pytest.raises(DivergenceError, match=r"the rewards of layer 1 are (not finite|too large)"):
        grpo_update(policy, optimizer, batch, update_config(scale_rewards))
    assert all(torch.equal(a, b) for a, b in zip(before, trained_copy(policy)))
    assert not optimizer.state  # never stepped


def test_large_finite_rewards_below_the_limit_train(tiny_model):
    # 1e18: its square (1e36) still fits float32, so the advantages and the clipped update are fine.
    model, policy, optimizer = single(tiny_model)
    batch = random_batch(model.config.vocab_size, torch.Generator().manual_seed(2), scale=1e18)
    history = grpo_update(policy, optimizer, batch, update_config("group"))
    assert all(math.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in history)


def test_nan_loss_stops_before_the_step(tiny_model):
    model, policy, optimizer = single(tiny_model)
    with torch.no_grad():  # a frozen layer below the trained one breaks: its states, and the loss, are nan
        model.model.layers[0].mlp.down_proj.weight[0, 0] = math.nan
    before = trained_copy(policy)
    with pytest.raises(DivergenceError, match="the loss of layer 1 is nan; lower --learning-rate"):
        grpo_update(policy, optimizer, random_batch(model.config.vocab_size, torch.Generator().manual_seed(3)),
                    update_config())
    assert all(torch.equal(a, b) for a, b in zip(before, trained_copy(policy)))


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_gradient_norm_stops_before_the_step(tiny_model, bad):
    model, policy, optimizer = single(tiny_model)
    generator = torch.Generator().manual_seed(4)
    params = policy.trainable_parameters()
    victim = params[int(torch.randint(0, len(params), (1,), generator=generator))]
    victim.register_hook(lambda grad: grad + bad)  # an overflow in the backward pass
    before = trained_copy(policy)
    with pytest.raises(DivergenceError, match=f"the gradient norm of layer 1 is {bad}"):
        grpo_update(policy, optimizer, random_batch(model.config.vocab_size, generator), update_config())
    assert all(torch.equal(a, b) for a, b in zip(before, trained_copy(policy)))
    assert not optimizer.state


@pytest.mark.parametrize("lr", [1e20, 1e30, 1e37])  # weights still finite, but their squares overflow float32
def test_weights_broken_by_the_step_are_caught(tiny_model, lr):
    model, policy, optimizer = single(tiny_model, lr=lr)
    with pytest.raises(DivergenceError, match=r"the weights of layer 1 diverged .*lower --learning-rate"):
        grpo_update(policy, optimizer, random_batch(model.config.vocab_size, torch.Generator().manual_seed(5)),
                    update_config())


def test_full_mode_names_the_model(tiny_model):
    model = tiny_model("qwen2")
    policy = olf.FullModelPolicy(model, keep_reference=False)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e30)
    with pytest.raises(DivergenceError, match="the weights of the model diverged"):
        grpo_update(policy, optimizer, random_batch(model.config.vocab_size, torch.Generator().manual_seed(6)),
                    update_config())


def test_negative_max_grad_norm_is_refused():
    with pytest.raises(ValueError, match="max_grad_norm"):
        UpdateConfig(max_grad_norm=-1.0)


@pytest.mark.parametrize("cause", ["lr", "rewards"])
def test_lanes_name_the_diverged_lane(tiny_model, cause):
    model = tiny_model("qwen2")
    policy = LanePolicy(model, [Lane(0), Lane(2)])
    optimizers = [torch.optim.AdamW(policy.trainable_parameters(k), lr=1e-3) for k in range(2)]
    generator = torch.Generator().manual_seed(7)
    batches = [random_batch(model.config.vocab_size, generator) for _ in range(2)]
    bad = int(torch.randint(0, 2, (1,), generator=generator))
    if cause == "lr":
        optimizers[bad].param_groups[0]["lr"] = 1e30
    else:
        batches[bad].rewards[0] = 1e30
    layer = policy.lanes[bad].layer
    before = [[p.detach().clone() for p in policy.trainable_parameters(k)] for k in range(2)]
    what = "weights" if cause == "lr" else "rewards"
    with pytest.raises(DivergenceError, match=f"the {what} of lane {bad} \\(layer {layer}\\)") as caught:
        lanes_update(policy, optimizers, stack_batches(batches), update_config())
    assert caught.value.lanes == (bad,)
    if cause == "rewards":  # found before anything ran: no lane moved
        for k in range(2):
            assert all(torch.equal(a, b) for a, b in zip(before[k], policy.trainable_parameters(k)))


# ----------------------------------------------------------------------------------------- the trainers
def small_config(out, **overrides) -> tuple[GRPOConfig, RunSpec]:
    run_fields = {"output_dir", "layer", "save_steps", "save_total_limit"}
    values = dict(output_dir=str(out), layer=1, max_steps=2, per_device_train_batch_size=4, num_generations=2,
                  max_completion_length=4, learning_rate=1e-2, save_steps=1, scale_rewards="none",
                  lr_scheduler_type="constant")  # resume-vs-straight: a decaying schedule depends on max_steps
    values.update(overrides)
    return (GRPOConfig(**{k: v for k, v in values.items() if k not in run_fields}),
            RunSpec(**{k: v for k, v in values.items() if k in run_fields}))


def snapshot(*dirs: Path) -> dict[str, bytes]:
    """Every file's bytes (checkpoints, `latest`, log.jsonl)."""
    return {str(p): p.read_bytes() for d in dirs for p in sorted(Path(d).rglob("*")) if p.is_file()}


def rewarding(value: float, after_calls: int) -> ArithmeticTask:
    """The arithmetic task (same name, so a resume accepts it), whose reward turns to `value` after `after_calls`."""
    calls = {"n": 0}

    def reward(completion: str, example: Example) -> float:
        calls["n"] += 1
        return value if calls["n"] > after_calls else random.random()  # a signal in every group

    task = ArithmeticTask()
    task.reward_funcs, task.reward_weights = [reward], [1.0]
    return task


def interrupt_next_step(trainer) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    trainer.train_step = interrupted


def test_huge_learning_rate_from_the_start_saves_nothing(tmp_path):
    model, tokenizer = load_model("tiny")
    task = rewarding(0.0, after_calls=10**9)  # rewards that differ, so the first step moves the weights
    trainer = GRPOTrainer(model, tokenizer, task, *small_config(tmp_path, learning_rate=1e30))
    with pytest.raises(DivergenceError, match=r"training diverged at step 1: the weights of layer 1 .*--learning-rate"):
        trainer.train()
    assert checkpoint.latest_checkpoint(tmp_path) is None
    assert not (tmp_path / "log.jsonl").exists() or (tmp_path / "log.jsonl").read_text() == ""
    with pytest.raises(DivergenceError):  # a diverged trainer goes no further
        trainer.train()
    interrupt_next_step(trainer)
    with pytest.raises(KeyboardInterrupt):  # and its Ctrl-C handler saves nothing
        trainer.train()
    assert checkpoint.latest_checkpoint(tmp_path) is None


@pytest.mark.parametrize("cause", ["learning_rate", "reward 1e30", "reward inf"])
def test_divergence_keeps_the_last_good_checkpoint_and_resume_runs_from_it(tmp_path, cause):
    model, tokenizer = load_model("tiny")
    GRPOTrainer(model, tokenizer, ArithmeticTask(), *small_config(tmp_path / "run", max_steps=2)).train()
    good = snapshot(tmp_path / "run")
    assert checkpoint.latest_checkpoint(tmp_path / "run").name == "checkpoint-000002"

    model, tokenizer = load_model("tiny")
    if cause == "learning_rate":  # resumes at step 2 with the same settings, then the step size explodes
        trainer = GRPOTrainer(model, tokenizer, ArithmeticTask(), *small_config(tmp_path / "run", max_steps=4))
        trainer.optimizer.param_groups[0]["lr"] = 1e30
        error, message = DivergenceError, "step 3: the weights of layer 1 diverged"
    else:
        value = 1e30 if cause == "reward 1e30" else math.inf
        trainer = GRPOTrainer(model, tokenizer, rewarding(value, after_calls=0),
                              *small_config(tmp_path / "run", max_steps=4))
        # inf is refused where the task scores (a ValueError); 1e30 by the update, before it trains on it.
        error, message = ((DivergenceError, "step 3: the rewards of layer 1 are too large") if value < math.inf
                          else (ValueError, "NaN or inf"))
    assert trainer.step == 2
    with pytest.raises(error, match=message):
        trainer.train()
    if error is DivergenceError:  # a later Ctrl-C must not save the diverged weights either
        interrupt_next_step(trainer)
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
    assert snapshot(tmp_path / "run") == good  # the same bytes: nothing saved, nothing logged

    # A rerun resumes from the last good checkpoint and continues exactly like a run that never diverged.
    model, tokenizer = load_model("tiny")
    resumed = GRPOTrainer(model, tokenizer, ArithmeticTask(), *small_config(tmp_path / "run", max_steps=4))
    assert resumed.step == 2
    assert [r["step"] for r in resumed.train()] == [3, 4]
    model, tokenizer = load_model("tiny")
    straight = GRPOTrainer(model, tokenizer, ArithmeticTask(), *small_config(tmp_path / "straight", max_steps=4))
    straight.train()
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def lane_trainer(tmp_path, max_steps: int, task=None) -> LaneTrainer:
    model, tokenizer = load_model("tiny")
    config, _ = small_config(tmp_path, max_steps=max_steps)
    runs = [LaneRun(Lane(1), str(tmp_path / "l1")), LaneRun(Lane(3), str(tmp_path / "l3"))]
    return LaneTrainer(model, tokenizer, task or ArithmeticTask(), config, runs, save_steps=1, progress=False)


@pytest.mark.parametrize("cause", ["learning_rate", "reward 1e30"])
def test_lanes_divergence_keeps_every_lane_checkpoint(tmp_path, cause):
    lane_trainer(tmp_path, 2).train()
    dirs = (tmp_path / "l1", tmp_path / "l3")
    good = snapshot(*dirs)

    if cause == "learning_rate":
        trainer = lane_trainer(tmp_path, 4)
        bad = int(torch.randint(0, 2, (1,)))
        trainer.optimizers[bad].param_groups[0]["lr"] = 1e30
        layer = trainer.policy.lanes[bad].layer
        message = rf"step 3 \({re.escape(trainer.runs[bad].output_dir)}\): the weights of lane {bad} \(layer {layer}\)"
    else:
        trainer = lane_trainer(tmp_path, 4, rewarding(1e30, after_calls=0))
        bad, message = 0, "step 3 .*: the rewards of lane 0 \\(layer 3\\) are too large"  # deepest lane first
    assert trainer.steps == [2, 2]
    with pytest.raises(DivergenceError, match=message) as caught:
        trainer.train()
    assert caught.value.lanes[0] == bad
    interrupt_next_step(trainer)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert snapshot(*dirs) == good

    resumed = lane_trainer(tmp_path, 4)
    assert resumed.steps == [2, 2]
    records = resumed.train()
    assert [[r["step"] for r in lane] for lane in records] == [[3, 4], [3, 4]]
    straight = lane_trainer(tmp_path / "straight", 4)
    straight.train()
    for k in range(2):
        for a, b in zip(straight.policy.trainable_parameters(k), resumed.policy.trainable_parameters(k)):
            assert torch.equal(a, b), k


def test_cli_reports_divergence_without_a_traceback(tmp_path, capsys):
    from safetensors.torch import load_file

    from onelayer_fast.cli import main

    argv = ["train", "--model", "tiny", "--steps", "4", "--batch-size", "4", "--num-generations", "2",
            "--max-completion-length", "4", "--learning-rate", "1e30", "--output-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: training diverged at step" in err and "--learning-rate" in err and "Traceback" not in err, err
    # The untrained model's arithmetic reward may carry no signal at first (no step, a good checkpoint); whatever
    # was saved before the divergence is sane.
    for path in tmp_path.glob("checkpoint-*"):
        assert all(t.abs().max() < 1e19 for t in load_file(str(path / "layer.safetensors")).values())
