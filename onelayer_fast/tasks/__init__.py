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
    iter_jsonl_lines,
    parse_jsonl_object,
    read_jsonl_examples,
    split_by_key,
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
    "iter_jsonl_lines",
    "parse_jsonl_object",
    "read_jsonl_examples",
    "split_by_key",
    "split_of",
]


def _prompt_answer_line(path, number: int, line: str) -> Example:
    """A `jsonl` task line as JsonlTask reads it ('prompt', else 'question', and 'answer'), checked."""
    row = parse_jsonl_object(path, number, line, ("answer",))
    prompt = row.get("prompt", row.get("question"))
    if prompt is None:
        raise ValueError(f"{path}:{number}: each line needs 'prompt' (or 'question') and 'answer'")
    return Example(prompt=str(prompt), answer=str(row["answer"]).strip())


def _jsonl_task(path: str) -> Task:
    """JsonlTask with the checks every file task gets. JsonlTask reads its file whole and takes any JSON
    value as a row, and for a small file moves one example into eval even when a duplicate of its prompt
    stays in train; so the file is read once through the shared bounded, object-only reader first (errors
    name file:line), and the splits are redone by prompt so that duplicates never cross them."""
    from .jsonl import JsonlTask

    read_jsonl_examples(path, _prompt_answer_line)
    task = JsonlTask(path)
    task.splits = split_by_key(task.examples, lambda e: e.prompt, what="prompt", source=f"task file {path}")
    return task


def get_task(name: str, path: str | None = None) -> Task:
    from .arithmetic import ArithmeticTask
    from .code import CodeTask
    from .math_jsonl import MathJsonlTask

    file_tasks = {"jsonl": _jsonl_task, "jsonl-math": MathJsonlTask, "code": CodeTask}
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
