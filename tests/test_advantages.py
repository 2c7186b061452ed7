"""Algorithm presets and episode advantages: GiGPO on a hand-computed example, GRPO broadcast."""
from __future__ import annotations

import math
import random

import pytest
import torch

from onelayer_fast.advantages import (
    StepRecord,
    apply_algorithm,
    discounted_returns,
    episode_advantages,
    gigpo_advantages,
)
from onelayer_fast.trainer import GRPOConfig

pytestmark = pytest.mark.usefixtures("torch_single_thread")

EPS = 1e-4  # added to every std, as in TRL's advantages
GAMMA = 0.5


def S(group, trajectory, index, observation, reward):
    return StepRecord(group, trajectory, index, observation, float(reward))


# Group 0 (3 trajectories) and group 1 (2 trajectories). Observation "A" occurs in both groups, but
# anchor states never cross groups.
#   g0 t0: A(0) B(1)          return 1   discounted R: 0.5, 1
#   g0 t1: A(0) C(0) B(1)     return 1                 0.25, 0.5, 1
#   g0 t2: A(0) A(0)          return 0                 0, 0          (budget ran out)
#   g1 t0: A(1)               return 1                 1
#   g1 t1: A(0) D(0)          return 0                 0, 0
STEPS = [
    S(0, 0, 0, "A", 0), S(0, 0, 1, "B", 1),
    S(0, 1, 0, "A", 0), S(0, 1, 1, "C", 0), S(0, 1, 2, "B", 1),
    S(0, 2, 0, "A", 0), S(0, 2, 1, "A", 0),
    S(1, 0, 0, "A", 1),
    S(1, 1, 0, "A", 0), S(1, 1, 1, "D", 0),
]
RETURNS = [0.5, 1, 0.25, 0.5, 1, 0, 0, 1, 0, 0]

# Mean-normalized pieces. Episode: group 0 returns (1, 1, 0), mean 2/3; group 1 (1, 0), mean 1/2.
EPISODE_MEAN = [1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3, -2 / 3, -2 / 3, 0.5, -0.5, -0.5]
# Step: anchor (g0, A) holds R = 0.5, 0.25, 0, 0 (mean 0.1875); (g0, B) holds 1, 1 (constant: 0);
# (g0, C) and (g1, D) are singletons (0); (g1, A) holds 1, 0 (mean 0.5).
STEP_MEAN = [0.3125, 0, 0.0625, 0, 0, -0.1875, -0.1875, 0.5, -0.5, 0]
# Std-normalized: Bessel std of each group / anchor group, plus EPS.
STD_G0 = math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2)  # returns (1, 1, 0)
STD_PAIR = math.sqrt(0.5 ** 2 * 2 / 1)  # any pair (1, 0)
STD_A0 = math.sqrt((0.3125 ** 2 + 0.0625 ** 2 + 2 * 0.1875 ** 2) / 3)  # anchor (g0, A)
EPISODE_STD = [v / (STD_G0 + EPS) for v in EPISODE_MEAN[:7]] + [v / (STD_PAIR + EPS) for v in EPISODE_MEAN[7:]]
STEP_STD = [
    0.3125 / (STD_A0 + EPS), 0, 0.0625 / (STD_A0 + EPS), 0, 0, -0.1875 / (STD_A0 + EPS), -0.1875 / (STD_A0 + EPS),
    0.5 / (STD_PAIR + EPS), -0.5 / (STD_PAIR + EPS), 0,
]


def test_discounted_returns():
    assert torch.allclose(discounted_returns(STEPS, GAMMA), torch.tensor(RETURNS, dtype=torch.float64))


@pytest.mark.parametrize("norm, episode, step", [("mean", EPISODE_MEAN, STEP_MEAN), ("std", EPISODE_STD, STEP_STD)])
@pytest.mark.parametrize("omega", [1.0, 0.5])
def test_gigpo_advantages_hand_computed(assert_close, norm, episode, step, omega):
    expected = torch.tensor([e + omega * s for e, s in zip(episode, step)])
    assert_close(gigpo_advantages(STEPS, gamma=GAMMA, omega=omega, norm=norm), expected, rtol=1e-5, atol=1e-6)
    # One advantage per step, in the caller's order, whatever that order is.
    order = list(range(len(STEPS)))
    random.Random(1).shuffle(order)
    shuffled = gigpo_advantages([STEPS[i] for i in order], gamma=GAMMA, omega=omega, norm=norm)
    assert_close(shuffled, expected[order], rtol=1e-5, atol=1e-6)


def test_gigpo_omega_zero_is_episode_only_and_errors(assert_close):
    assert_close(gigpo_advantages(STEPS, gamma=GAMMA, omega=0.0), torch.tensor(EPISODE_MEAN), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="norm"):
        gigpo_advantages(STEPS, norm="max")
    with pytest.raises(ValueError, match="steps 0..1"):
        gigpo_advantages([S(0, 0, 0, "A", 0), S(0, 0, 2, "A", 0)])


def test_grpo_broadcasts_the_episode_advantage(assert_close):
    # Group 0: returns (1, 0); group 1: (0, 0), a constant group -> exactly 0.
    steps = [S(0, 0, 0, "A", 0), S(0, 0, 1, "B", 1), S(0, 1, 0, "A", 0),
             S(1, 0, 0, "C", 0), S(1, 0, 1, "C", 0), S(1, 1, 0, "C", 0)]
    a = 0.5 / (STD_PAIR + EPS)
    assert_close(episode_advantages(steps, "group"), torch.tensor([a, a, -a, 0, 0, 0]), rtol=1e-5, atol=1e-7)
    assert_close(episode_advantages(steps, "none"), torch.tensor([0.5, 0.5, -0.5, 0, 0, 0]), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="same number"):
        episode_advantages(STEPS)  # groups of 3 and 2 trajectories


def test_algorithm_presets(tmp_path):
    base = GRPOConfig(scale_rewards="batch", loss_type="bnpo")
    assert apply_algorithm(base) == base  # grpo: the config's own knobs (TRL defaults unless set)
    dr = apply_algorithm(GRPOConfig(algo="dr_grpo", scale_rewards="group"))
    assert (dr.scale_rewards, dr.loss_type) == ("none", "dr_grpo")
    assert apply_algorithm(GRPOConfig(algo="gigpo")).scale_rewards == "none"
    assert apply_algorithm(GRPOConfig(algo="gigpo", gigpo_norm="std")).scale_rewards == "group"
    for overrides, message in [(dict(algo="ppo"), "algo"), (dict(gigpo_norm="z"), "gigpo_norm"),
                               (dict(gigpo_gamma=1.5), "gigpo_gamma"), (dict(gigpo_omega=-1.0), "gigpo_omega")]:
        with pytest.raises(ValueError, match=message):
            GRPOConfig(**overrides).validate()


def test_gigpo_needs_an_environment_task(tmp_path):
    from onelayer_fast.models import build_preset
    from onelayer_fast.tasks.arithmetic import ArithmeticTask
    from onelayer_fast.trainer import GRPOTrainer, RunSpec

    model, tokenizer = build_preset("tiny")
    with pytest.raises(ValueError, match="multi-turn"):
        GRPOTrainer(model, tokenizer, ArithmeticTask(), GRPOConfig(algo="gigpo"), RunSpec(output_dir=str(tmp_path)))


@pytest.mark.parametrize("algo", ["grpo", "dr_grpo"])
def test_grpo_on_the_agent_task_broadcasts_episode_returns(tmp_path, assert_close, algo):
    from onelayer_fast.kernels.grpo_loss import group_advantages
    from onelayer_fast.models import build_preset
    from onelayer_fast.tasks.agent import AgentTask
    from onelayer_fast.trainer import GRPOTrainer, RunSpec

    model, tokenizer = build_preset("tiny")
    config = GRPOConfig(algo=algo, per_device_train_batch_size=8, num_generations=4, max_completion_length=3)
    trainer = GRPOTrainer(model, tokenizer, AgentTask(max_turns=10, invalid_reward=-0.1), config,
                          RunSpec(output_dir=str(tmp_path), layer=1))
    batch, episodes = trainer.make_episodes(trainer.prompts_for_step(0))
    rows = len(episodes.steps)
    assert batch.advantages.shape == batch.rewards.shape == (rows,) == (int(episodes.lengths.sum()),)
    expected, _ = group_advantages(episodes.returns, 4, "none" if algo == "dr_grpo" else "group")
    per_row = expected[[s.group * 4 + s.trajectory for s in episodes.steps]]
    assert_close(batch.advantages, per_row, rtol=1e-5, atol=1e-6)
