"""What every task is made of: the Example record, the Task protocol, the stable train/eval split and
the JSONL readers. Task modules import these from here; the package re-exports them.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Callable, Protocol

SPLITS = ("train", "eval")


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

    def sample(self, rng: random.Random, n: int, split: str = "train") -> list[Example]: ...

    def correct(self, completion: str, example: Example) -> bool: ...


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def split_of(key: str, eval_share: float = 0.1) -> str:
    """A stable train/eval assignment from a string key (same on every machine and Python run)."""
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return "eval" if digest / 2**64 < eval_share else "train"


def eval_examples(task: Task, n: int, seed: int = 0) -> list[Example]:
    """Up to n distinct held-out examples, the same for a given (task, n, seed)."""
    rng = random.Random(seed)
    seen: dict[str, Example] = {}
    for _ in range(20):
        for example in task.sample(rng, n, split="eval"):
            seen.setdefault(example.prompt, example)
        if len(seen) >= n:
            break
    return list(seen.values())[:n]


def read_jsonl_examples(path, parse_line: Callable[[object, int, str], Example], what: str = "example") -> list[Example]:
    """Examples from a local JSONL file, one `parse_line(path, line_number, line)` per non-empty line.

    Needs at least 2, so that both the train and the eval split get one.
    """
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    with path.open(encoding="utf-8") as file:
        examples = [parse_line(path, number, line) for number, line in enumerate(file, start=1) if line.strip()]
    if len(examples) < 2:
        raise ValueError(f"task file {path} holds {len(examples)} {what}(s); it needs at least 2 so that "
                         f"both the train and the eval split get one")
    return examples


def parse_jsonl_object(path, number: int, line: str, required: tuple[str, ...]) -> dict:
    """One JSONL line as a dict holding every `required` key; errors name the file and line."""
    import json

    where = f"{path}:{number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [key for key in required if key not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; each line needs " + " and ".join(f"'{k}'" for k in required))
    return row
