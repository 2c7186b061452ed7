"""The reward of a completion: the weighted sum of its task's reward functions, as the trainer optimizes it
and the evaluator reports it.

Torch-free like the rest of tasks/: the result is a float32 numpy array, which the trainer wraps without a
copy (`torch.from_numpy`). float32 because the rewards are float32 tensors downstream, and the rounding is
the same: each function's values are rounded to float32, multiplied by the float32 weight and summed in
float32 in the order of `task.reward_funcs`, exactly as float32 tensors would.
"""
from __future__ import annotations

import numpy as np

from .base import Example, Task


def reward_table(task: Task, completions: list[str], examples: list[Example]) -> np.ndarray:
    """Each reward function's value for each completion, unweighted: float32 (n, len(task.reward_funcs)), columns
    in the order of `task.reward_funcs` (what TRL's multi_objective_aggregation "normalize_then_sum" normalizes
    one function at a time).

    A reward function returning NaN or inf (after the float32 rounding) is an error, named in the message.
    """
    if len(completions) != len(examples):
        raise ValueError(f"score needs one example per completion, got {len(completions)} completions "
                         f"and {len(examples)} examples")
    table = np.zeros((len(completions), len(task.reward_funcs)), dtype=np.float32)
    for k, func in enumerate(task.reward_funcs):
        values = np.array([float(func(c, e)) for c, e in zip(completions, examples)], dtype=np.float32)
        if not np.isfinite(values).all():
            raise ValueError(f"reward function {getattr(func, '__name__', func)!r} returned NaN or inf")
        table[:, k] = values
    return table


def weighted_sum(table: np.ndarray, weights: list[float]) -> np.ndarray:
    """sum_k weights[k] * table[:, k] in float32, summed in column order: (n,)."""
    if table.shape[1] != len(weights):
        raise ValueError(f"{table.shape[1]} reward functions but {len(weights)} reward weights")
    rewards = np.zeros(table.shape[0], dtype=np.float32)
    for k, weight in enumerate(weights):
        rewards += np.float32(weight) * table[:, k]
    return rewards


def score(task: Task, completions: list[str], examples: list[Example]) -> np.ndarray:
    """sum_k reward_weights[k] * reward_funcs[k](completion, example), one float32 per completion: (n,).

    A reward function returning NaN or inf (after the float32 rounding) is an error, named in the message.
    """
    return weighted_sum(reward_table(task, completions, examples), task.reward_weights)
