"""Verifiable tasks: prompts and rewards. Tasks know nothing of torch or models.

A task is an object with
    name: str
    sample(rng, n, split="train") -> list[Example]   n examples of `split` ("train" or "eval") drawn with
                                                    `rng` (random.Random); the two splits never overlap
    reward_funcs: list[RewardFunc]                  each (completion_text, example) -> float
    reward_weights: list[float]                     how the reward functions are summed
    correct(completion_text, example) -> bool       the task's real measure (exact match, tests pass, ...)

`rewards.score(task, completions, examples)` sums the weighted reward functions into one reward per
completion, the one the trainer optimizes and the evaluator reports. base.py holds the shared pieces.
"""
from __future__ import annotations

from .base import (
    SPLITS,
    Example,
    RewardFunc,
    Task,
    check_split,
    eval_examples,
    parse_jsonl_object,
    read_jsonl_examples,
    split_of,
)

__all__ = [
    "SPLITS",
    "Example",
    "RewardFunc",
    "Task",
    "check_split",
    "eval_examples",
    "get_task",
    "parse_jsonl_object",
    "read_jsonl_examples",
    "split_of",
]


def get_task(name: str, path: str | None = None) -> Task:
    from .arithmetic import ArithmeticTask
    from .code import CodeTask
    from .jsonl import JsonlTask
    from .math_jsonl import MathJsonlTask

    file_tasks = {"jsonl": JsonlTask, "jsonl-math": MathJsonlTask, "code": CodeTask}
    if name == "arithmetic":
        return ArithmeticTask()
    if name == "agent":
        from .agent import AgentTask

        return AgentTask()
    if name.startswith("rg:"):
        from .reasoning_gym import task_from_name

        return task_from_name(name)
    if name in file_tasks:
        if path is None:
            raise ValueError(f"task {name!r} needs a path to a local JSONL file (--task-path)")
        return file_tasks[name](path)
    raise ValueError(f"unknown task {name!r}; tasks: arithmetic, agent, jsonl, jsonl-math, code, rg:<dataset>")
