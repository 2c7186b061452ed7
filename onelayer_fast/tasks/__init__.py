"""Verifiable tasks: prompts and rewards. Tasks know nothing of torch or models.

A task is an object with
    name: str
    sample(rng, n) -> list[Example]            n training examples drawn with `rng` (random.Random)
    reward_funcs: list[RewardFunc]             each (completion_text, example) -> float
    reward_weights: list[float]                how the reward functions are summed
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    meta: dict = field(default_factory=dict, compare=False)


RewardFunc = Callable[[str, Example], float]


class Task(Protocol):
    name: str
    reward_funcs: list[RewardFunc]
    reward_weights: list[float]

    def sample(self, rng, n: int) -> list[Example]: ...


def get_task(name: str, path: str | None = None) -> Task:
    from .arithmetic import ArithmeticTask
    from .jsonl import JsonlTask

    if name == "arithmetic":
        return ArithmeticTask()
    if name == "jsonl":
        if path is None:
            raise ValueError("task 'jsonl' needs a path to a local JSONL file (--task-path)")
        return JsonlTask(path)
    raise ValueError(f"unknown task {name!r}; tasks: arithmetic, jsonl")
