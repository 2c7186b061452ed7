"""The key-and-door environment task and multi-turn GiGPO training on it."""
from __future__ import annotations

import math
import random

import pytest
import torch

from onelayer_fast.tasks import Example, get_task, split_of
from onelayer_fast.tasks.agent import AgentTask, StartState, optimal_actions, parse_action

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def all_examples(task: AgentTask) -> list[Example]:
    return [task.example(s) for split in ("train", "val", "eval") for s in task.starts[split]]


def test_optimal_actions_succeed_from_every_start_state():
    task = AgentTask()
    for example in all_examples(task):
        env = task.make_env()
        env.reset(example)
        actions = example.answer.split("\n")
        assert actions == optimal_actions(StartState(**example.meta))
        for turn, action in enumerate(actions):
            _, reward, done = env.step(action)
            assert done == (turn == len(actions) - 1)
        assert reward == 1.0 and env.opened
        assert task.correct(example.answer, example)


def test_observation_and_dynamics():
    task = AgentTask(size=5, max_turns=12)
    env = task.make_env()
    example = Example("", "", {"agent": 2, "key": 4, "door": 0})
    assert env.reset(example) == "at 2; key at 4; door at 0; has key: no"
    assert env.step("open") == ("at 2; key at 4; door at 0; has key: no", 0.0, False)  # no key, not at the door
    assert env.step("pick")[0] == "at 2; key at 4; door at 0; has key: no"  # not on the key
    env.step("right")
    env.step("Right.")
    assert env.step("p")[0] == "at 4; key at -; door at 0; has key: yes"
    assert env.step("r")[0].startswith("at 4;")  # the wall stops it
    assert env.turns == 6


def test_unknown_action_wastes_a_turn():
    task = AgentTask(invalid_reward=-0.1)
    env = task.make_env()
    observation = env.reset(Example("", "", {"agent": 1, "key": 0, "door": 3}))
    assert env.step("jump!") == (observation, -0.1, False)
    assert env.step("") == (observation, -0.1, False)
    assert env.turns == 2
    assert parse_action("LEFT") == "left" and parse_action("  r") == "right" and parse_action("3#Open!") == "open"
    assert parse_action("pi ck") == "pick" and parse_action("lr") is None and parse_action("123") is None


def test_budget_exhaustion_fails():
    task = AgentTask(max_turns=10)
    example = Example("", "", {"agent": 1, "key": 0, "door": 3})
    env = task.make_env()
    env.reset(example)
    for turn in range(10):
        _, reward, done = env.step("left")
        assert reward == 0.0 and done == (turn == 9)
    assert not env.opened
    with pytest.raises(RuntimeError, match="reset"):
        env.step("left")
    # Nine wasted turns leave one: too few for the 5-action solution.
    assert not task.correct("\n".join(["wait"] * 9 + optimal_actions(StartState(1, 0, 3))), example)
    with pytest.raises(ValueError, match="max_turns"):
        AgentTask(size=5, max_turns=4)


def test_splits_never_overlap_and_prompts_are_short():
    task = get_task("agent")
    assert isinstance(task, AgentTask) and task.name == "agent"
    train, held_out = set(task.starts["train"]), set(task.starts["eval"])
    val = set(task.starts["val"])
    assert train and held_out and not train & held_out
    assert val and not val & train and not val & held_out and len(train | held_out | val) == 5 * 4 * 3
    rng = random.Random(0)
    for split, starts in (("train", train), ("eval", held_out)):
        for example in task.sample(rng, 30, split=split):
            assert StartState(**example.meta) in starts
            assert split_of(f"agent:5:a{example.meta['agent']}k{example.meta['key']}d{example.meta['door']}") == split
    assert max(len(e.prompt) for e in all_examples(task)) < 60
    with pytest.raises(ValueError, match="split"):
        task.sample(rng, 1, split="testing")


def test_gigpo_training_runs_end_to_end(tmp_path):
    from onelayer_fast.models import build_preset
    from onelayer_fast.trainer import GRPOConfig, GRPOTrainer, RunSpec

    model, tokenizer = build_preset("tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = GRPOConfig(algo="gigpo", max_steps=2, per_device_train_batch_size=8, num_generations=4,
                        max_completion_length=4, learning_rate=1e-2, num_iterations=2, beta=0.04)
    run = RunSpec(output_dir=str(tmp_path), layer=2, save_steps=1)
    # A small penalty for unparseable actions gives a random model a signal to learn from.
    trainer = GRPOTrainer(model, tokenizer, AgentTask(max_turns=10, invalid_reward=-0.1), config, run)
    records = trainer.train()
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    assert all(8 <= r["rows"] <= 8 * 10 and 0.0 <= r["success_rate"] <= 1.0 for r in records)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.layers.2.") for k in changed), changed
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 2


def test_gigpo_resume_continues_the_run_exactly(tmp_path):
    from onelayer_fast.models import build_preset
    from onelayer_fast.trainer import GRPOConfig, GRPOTrainer, RunSpec

    def run(directory, max_steps):
        model, tokenizer = build_preset("tiny")
        config = GRPOConfig(algo="gigpo", max_steps=max_steps, per_device_train_batch_size=4, num_generations=2,
                            max_completion_length=3, learning_rate=1e-2)
        spec = RunSpec(output_dir=str(directory), layer=1, save_steps=1)
        trainer = GRPOTrainer(model, tokenizer, AgentTask(max_turns=9, invalid_reward=-0.1), config, spec)
        trainer.train()
        return trainer

    straight = run(tmp_path / "a", 2)
    run(tmp_path / "b", 1)
    resumed = run(tmp_path / "b", 2)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
