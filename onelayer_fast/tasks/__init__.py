"""Verifiable tasks: prompts and rewards. Tasks know nothing of torch or models.

A task is an object with
    name: str
    sample(rng, n, split="train") -> list[Example]   n examples of `split` ("train", "val" or "test"; "eval"
                                                    is the old name of "test") drawn with `rng`
                                                    (random.Random); no prompt is in two splits
    reward_funcs: list[RewardFunc]                  each (completion_text, example) -> float
    reward_weights: list[float]                     how the reward functions are summed
    correct(completion_text, example) -> bool       the task's real measure (exact match, tests pass, ...)

`rewards.score(task, completions, examples)` sums the weighted reward functions into one reward per
completion, the one the trainer optimizes and the evaluator reports. base.py holds the shared pieces.

Splits: train for RL, val for choosing hyper-parameters (`val_examples`), test for reported numbers
(`eval_examples`; exactly the split called "eval" before val existed, so numbers reported on it stand).
"""
from __future__ import annotations

from .base import (
    SPLIT_ALIASES,
    SPLITS,
    TEST_SHARE,
    VAL_SHARE,
    Example,
    RewardFunc,
    Splits,
    Task,
    assign_split,
    check_split,
    eval_examples,
    iter_jsonl_lines,
    parse_jsonl_object,
    read_jsonl_examples,
    split_by_key,
    split_examples,
    split_of,
    val_examples,
)

__all__ = [
    "SPLIT_ALIASES",
    "SPLITS",
    "TEST_SHARE",
    "VAL_SHARE",
    "Example",
    "RewardFunc",
    "Splits",
    "Task",
    "assign_split",
    "check_split",
    "eval_examples",
    "get_task",
    "iter_jsonl_lines",
    "parse_jsonl_object",
    "read_jsonl_examples",
    "split_by_key",
    "split_examples",
    "split_of",
    "val_examples",
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
    value as a row, so the file is read once through the shared bounded, object-only reader first (errors
    name file:line); JsonlTask then splits by prompt (base.split_by_key), duplicates never crossing splits."""
    from .jsonl import JsonlTask

    read_jsonl_examples(path, _prompt_answer_line)
    return JsonlTask(path)


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
