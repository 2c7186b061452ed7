"""Algorithm presets (GRPO, Dr. GRPO, GiGPO) and advantages of multi-turn episodes.

Presets (what `apply_algorithm` sets on a config):
    grpo     nothing: the config's own knobs, whose defaults are TRL's (loss_type "dapo", scale_rewards "group")
    dr_grpo  scale_rewards "none", loss_type "dr_grpo" (Dr. GRPO: no std division, no length normalization)
    gigpo    episode + step advantages (below); scale_rewards follows gigpo_norm ("mean" -> "none",
             "std" -> "group") so the logged config says how advantages were scaled

Episodes come as step records (group g, trajectory i, step t, observation o_t, reward r_t); a group
is the G trajectories started from the same start state.
    episode return   R_i = sum_t r_t
    GRPO / Dr. GRPO  A(step) = group-normalized R_i (TRL semantics, `scale_rewards`), same for every step of i
    GiGPO (Feng et al. 2025, "Group-in-Group Policy Optimization for LLM Agent Training"):
      A_E(i)   = (R_i - mean_group R) / F          F = 1 ("mean") or std_group(R) + 1e-4 ("std")
      R_t      = sum_{k >= t} gamma^(k - t) r_k    discounted return from step t within its trajectory
      anchor group of a step = every step of the same group (any trajectory, any t) whose observation
               is identical to its own
      A_S(t)   = (R_t - mean_anchor R) / F         0 for an anchor group of one step
      A(t)     = A_E(i) + omega * A_S(t)
    std is Bessel's (as torch.std and TRL); a group whose values are all equal gets exactly 0.
"""
from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .kernels.grpo_loss import STD_EPS, group_advantages

ALGORITHMS = ("grpo", "dr_grpo", "gigpo")
GIGPO_NORMS = ("mean", "std")

# Loss knobs each algorithm fixes; gigpo's scale_rewards depends on gigpo_norm (see algorithm_settings).
_PRESETS: dict[str, dict[str, object]] = {
    "grpo": {},
    "dr_grpo": {"scale_rewards": "none", "loss_type": "dr_grpo"},
    "gigpo": {},
}


def algorithm_settings(algo: str, gigpo_norm: str = "mean") -> dict[str, object]:
    """The config fields `algo` overrides, e.g. {"scale_rewards": "none", "loss_type": "dr_grpo"}."""
    if algo not in ALGORITHMS:
        raise ValueError(f"algo must be one of {ALGORITHMS}, got {algo!r}")
    if gigpo_norm not in GIGPO_NORMS:
        raise ValueError(f"gigpo_norm must be one of {GIGPO_NORMS}, got {gigpo_norm!r}")
    settings = dict(_PRESETS[algo])
    if algo == "gigpo":
        settings["scale_rewards"] = "none" if gigpo_norm == "mean" else "group"
    return settings


def apply_algorithm(config):
    """A copy of a GRPOConfig (any dataclass with `algo`, `gigpo_norm`) with its algorithm's settings applied.

    The preset wins over values set by hand: `algo="dr_grpo"` with `scale_rewards="group"` is not Dr. GRPO.
    """
    return dataclasses.replace(config, **algorithm_settings(config.algo, getattr(config, "gigpo_norm", "mean")))


@dataclass(frozen=True)
class StepRecord:
    """One environment step of one trajectory."""

    group: int  # start state: trajectories of the same group are compared
    trajectory: int  # which trajectory of the group (unique within the group)
    index: int  # step number t within the trajectory, from 0
    observation: str  # the observation the action was taken in (the anchor-state key)
    reward: float  # r_t


def _trajectories(steps: Sequence[StepRecord]) -> dict[tuple[int, int], list[int]]:
    """(group, trajectory) -> positions of its steps in `steps`, ordered by step index."""
    by_trajectory: dict[tuple[int, int], list[int]] = defaultdict(list)
    for position, step in enumerate(steps):
        by_trajectory[(step.group, step.trajectory)].append(position)
    for key, positions in by_trajectory.items():
        positions.sort(key=lambda p: steps[p].index)
        indices = [steps[p].index for p in positions]
        if indices != list(range(len(indices))):
            raise ValueError(f"trajectory {key} (group, trajectory) must have steps 0..{len(indices) - 1}, got {indices}")
    return by_trajectory


def discounted_returns(steps: Sequence[StepRecord], gamma: float) -> Tensor:
    """(N,) R_t = sum_{k >= t} gamma^(k - t) r_k within each step's trajectory, in the order of `steps`."""
    returns = torch.zeros(len(steps), dtype=torch.float64)
    for positions in _trajectories(steps).values():
        running = 0.0
        for position in reversed(positions):
            running = steps[position].reward + gamma * running
            returns[position] = running
    return returns


def normalize_by_key(values: Tensor, keys: Sequence[Hashable], scale: bool) -> Tensor:
    """values (N,) centered on the mean of their key's group; divided by its std + 1e-4 when `scale`.

    Groups of one value, and groups whose values are all equal, give exactly 0.
    """
    out = torch.zeros_like(values)
    members: dict[Hashable, list[int]] = defaultdict(list)
    for position, key in enumerate(keys):
        members[key].append(position)
    for positions in members.values():
        if len(positions) < 2:
            continue
        index = torch.tensor(positions)
        group = values[index]
        std = group.std()
        if torch.isclose(std, torch.zeros_like(std)):
            continue
        centered = group - group.mean()
        out[index] = centered / (std + STD_EPS) if scale else centered
    return out


def _episode_table(steps: Sequence[StepRecord]) -> tuple[list[tuple[int, int]], Tensor]:
    """Trajectory keys sorted by (group, trajectory) and their undiscounted returns (T,)."""
    by_trajectory = _trajectories(steps)
    keys = sorted(by_trajectory)
    returns = torch.tensor([sum(steps[p].reward for p in by_trajectory[k]) for k in keys], dtype=torch.float64)
    return keys, returns


def episode_returns(steps: Sequence[StepRecord]) -> Tensor:
    """(T,) undiscounted return of each trajectory, ordered by (group, trajectory)."""
    return _episode_table(steps)[1].float()


def normalize_then_sum(rewards_per_func: Tensor, weights, group_size: int) -> Tensor:
    """(B,) advantages of TRL's multi_objective_aggregation "normalize_then_sum" (GDPO) from rewards_per_func
    (B, K), one column per reward function, rows in groups of `group_size`:

        n_k = (r_k - mean_group(r_k)) / (std_group(r_k) + 1e-4)     each function within each group
        R   = sum_k weights[k] * n_k
        A   = (R - mean(R)) / (std(R) + 1e-4)                      over the whole batch

    whatever scale_rewards says (TRL's formula; "sum_then_normalize", the default, sums first and leaves the
    normalization to the loss: `group_advantages`). Bessel stds; a function constant within a group gives 0
    there exactly, and a batch whose R are all equal gives 0 (never rounding noise divided by 1e-4).
    """
    rows, funcs = rewards_per_func.shape
    if len(weights) != funcs:
        raise ValueError(f"{funcs} reward functions but {len(weights)} reward weights")
    if group_size < 2 or rows % group_size != 0:
        raise ValueError(f"normalize_then_sum needs whole groups of >= 2 rows, got {rows} rows in groups of "
                         f"{group_size}")
    grouped = rewards_per_func.view(-1, group_size, funcs)
    std = grouped.std(dim=1, keepdim=True)
    normalized = (grouped - grouped.mean(dim=1, keepdim=True)) / (std + STD_EPS)
    normalized = torch.where(torch.isclose(std, torch.zeros_like(std)), torch.zeros_like(normalized), normalized)
    weight = torch.as_tensor(weights, dtype=rewards_per_func.dtype, device=rewards_per_func.device)
    summed = (normalized.reshape(rows, funcs) * weight).sum(dim=1)
    batch_std = summed.std()
    if rows < 2 or bool(torch.isclose(batch_std, torch.zeros_like(batch_std))):
        return torch.zeros_like(summed)
    return (summed - summed.mean()) / (batch_std + STD_EPS)


def episode_advantages(steps: Sequence[StepRecord], scale_rewards: str = "group") -> Tensor:
    """(N,) GRPO / Dr. GRPO on episodes: each step gets its trajectory's group-normalized return.

    The normalization is TRL's (`group_advantages`): scale_rewards "group", "batch" or "none".
    """
    keys, returns = _episode_table(steps)
    sizes = Counter(group for group, _ in keys)
    group_size = next(iter(sizes.values()), 0)
    if set(sizes.values()) != {group_size} or group_size < 2:
        raise ValueError(f"episode advantages need the same number (>= 2) of trajectories per group, got {dict(sizes)}")
    advantages, _ = group_advantages(returns, group_size, scale_rewards)
    of_trajectory = dict(zip(keys, advantages.tolist()))
    return torch.tensor([of_trajectory[(s.group, s.trajectory)] for s in steps], dtype=torch.float32)


def gigpo_advantages(steps: Sequence[StepRecord], gamma: float = 0.95, omega: float = 1.0, norm: str = "mean") -> Tensor:
    """(N,) GiGPO advantage A_E + omega * A_S of each step, in the order of `steps` (see the module doc)."""
    if norm not in GIGPO_NORMS:
        raise ValueError(f"norm must be one of {GIGPO_NORMS}, got {norm!r}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if len(steps) == 0:
        return torch.zeros(0)
    scale = norm == "std"
    keys, returns = _episode_table(steps)
    episode = normalize_by_key(returns, [group for group, _ in keys], scale)
    of_trajectory = dict(zip(keys, episode.tolist()))
    a_e = torch.tensor([of_trajectory[(s.group, s.trajectory)] for s in steps], dtype=torch.float64)
    a_s = normalize_by_key(discounted_returns(steps, gamma), [(s.group, s.observation) for s in steps], scale)
    return (a_e + omega * a_s).float()


def advantages_for(config, steps: Sequence[StepRecord]) -> Tensor:
    """(N,) per-step advantages for a GRPOConfig's algorithm (gigpo, or episode-broadcast grpo / dr_grpo)."""
    if config.algo == "gigpo":
        return gigpo_advantages(steps, config.gigpo_gamma, config.gigpo_omega, config.gigpo_norm)
    return episode_advantages(steps, config.scale_rewards)
