"""What every task is made of: the Example record, the Task protocol, the stable train/eval split and
the JSONL readers. Task modules import these from here; the package re-exports them.
"""
from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

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


# A JSONL line longer than this is refused: no task prompt is megabytes long, and reading one whole would
# make a corrupt or wrong file (a binary, one giant line) cost memory and minutes before failing anyway.
MAX_LINE_BYTES = 1 << 20


def _check_task_file(path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"task file {path} is a directory, not a JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")


def iter_jsonl_lines(path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line of a UTF-8 JSONL file; errors name file:line.

    Lines end at "\n" only (as JSON Lines says), and a line over `max_line_bytes` is refused after
    reading at most that much of it.
    """
    path = Path(path)
    _check_task_file(path)
    with path.open("rb") as file:
        for number in itertools.count(1):
            chunk = file.readline(max_line_bytes + 1)
            if not chunk:
                return
            if len(chunk) > max_line_bytes and not chunk.endswith(b"\n"):
                raise ValueError(f"{path}:{number}: line longer than {max_line_bytes} bytes; "
                                 "each line must be one JSON object (is this a JSONL file?)")
            try:
                text = chunk.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{number}: not UTF-8 text (bad byte at offset {error.start})") from None
            if number == 1:
                text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
            if text.strip():
                yield number, text


def read_jsonl_examples(path, parse_line: Callable[[object, int, str], Example], what: str = "example") -> list[Example]:
    """Examples from a local JSONL file, one `parse_line(path, line_number, line)` per non-empty line.

    Needs at least 2, so that both the train and the eval split get one.
    """
    path = Path(path)
    examples = [parse_line(path, number, line) for number, line in iter_jsonl_lines(path)]
    if len(examples) < 2:
        raise ValueError(f"task file {path} holds {len(examples)} {what}(s); it needs at least 2 so that "
                         f"both the train and the eval split get one")
    return examples


def split_by_key(examples: list[Example], key: Callable[[Example], str], what: str = "prompt",
                 source: object = "task file") -> dict[str, list[Example]]:
    """Train/eval split by the stable hash of `key(example)`, so equal keys (duplicates) share a split.

    A small file may leave one split empty: then the other split's last key moves over with all its
    duplicates, so the splits still never share a key. Fewer than 2 distinct keys is an error naming
    `source` (one key cannot be in both splits).
    """
    splits: dict[str, list[Example]] = {split: [] for split in SPLITS}
    for example in examples:
        splits[split_of(key(example))].append(example)
    for empty, full in (("eval", "train"), ("train", "eval")):
        if not splits[empty] and splits[full]:
            moved = key(splits[full][-1])
            splits[empty] = [e for e in splits[full] if key(e) == moved]
            splits[full] = [e for e in splits[full] if key(e) != moved]
    if not splits["train"] or not splits["eval"]:
        raise ValueError(f"{source} has a single distinct {what}; it needs at least 2 for both train and eval "
                         "(equal ones always share a split)")
    return splits


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
