"""What every task is made of: the Example record, the Task protocol, the stable train/val/test split
and the JSONL readers. Task modules import these from here; the package re-exports them.

Splits. Every task has three disjoint splits, disjoint by content (one prompt is never in two):
"train" (RL prompts), "val" (choosing hyper-parameters) and "test" (the reported numbers). Most tasks
assign a prompt by the stable hash of its content (`assign_split`): test is the hash range
[0, TEST_SHARE), val [TEST_SHARE, TEST_SHARE + VAL_SHARE), train the rest. "test" is exactly the split
that was called "eval" before val existed (val was carved out of train), so every evaluation reported
on "eval" stays valid; "eval" is still accepted everywhere as an alias of "test".
"""
from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

SPLITS = ("train", "val", "test")
# Older names still accepted wherever a split is named: "eval" is the former two-way held-out split,
# which is the test split unchanged.
SPLIT_ALIASES = {"eval": "test"}
# Hash ranges of the splits: test [0, TEST_SHARE) (the former eval split, unchanged), val the next
# VAL_SHARE (carved out of what was train, so training prompts change only by losing these), train the rest.
TEST_SHARE = 0.1
VAL_SHARE = 0.1


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


def check_split(split: str) -> str:
    """The canonical name of `split` (one of SPLITS; the alias "eval" gives "test"), else a ValueError."""
    split = SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        names = ", ".join(repr(s) for s in SPLITS + tuple(SPLIT_ALIASES))
        raise ValueError(f"split must be one of {names} ('eval' is the old name of 'test'), got {split!r}")
    return split


def _hash_fraction(key: str) -> float:
    """A stable number in [0, 1) from a string key (same on every machine and Python run)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def split_of(key: str, eval_share: float = TEST_SHARE) -> str:
    """The former two-way assignment: "eval" for a key in the test range [0, eval_share), else "train".

    Kept for callers that check held-out membership; its "train" also holds the val keys. New code
    wants `assign_split`, which tells the three splits apart.
    """
    return "eval" if _hash_fraction(key) < eval_share else "train"


def assign_split(key: str, test_share: float = TEST_SHARE, val_share: float = VAL_SHARE) -> str:
    """The stable train/val/test assignment of a string key: test [0, test_share), val the next
    `val_share` of the hash range, train the rest. Its test keys are exactly split_of's "eval" keys."""
    fraction = _hash_fraction(key)
    if fraction < test_share:
        return "test"
    return "val" if fraction < test_share + val_share else "train"


class Splits(dict):
    """split name -> pool (examples, start states, generators), keyed by SPLITS.

    Also answers the alias "eval" (-> "test") for older callers, and `pool(split)` refuses an empty pool
    with an error that names `source` and the split (a small file can leave val empty).
    """

    def __init__(self, pools: dict, source: object = "task", what: str = "example"):
        super().__init__(pools)
        self.source, self.what = source, what

    def __missing__(self, split: str):
        if split in SPLIT_ALIASES:
            return self[SPLIT_ALIASES[split]]
        raise KeyError(split)

    def pool(self, split: str) -> list:
        split = check_split(split)
        pool = self[split]
        if not pool:
            raise ValueError(f"{self.source} has no {split} examples: too few distinct {self.what}s for train, "
                             f"val and test (val gets one only when 2 or more are left outside test, as train "
                             f"keeps one); add {self.what}s")
        return pool


def split_examples(task: Task, n: int, seed: int = 0, split: str = "test") -> list[Example]:
    """Up to n distinct examples of `split`, the same for a given (task, n, seed, split)."""
    rng = random.Random(seed)
    seen: dict[str, Example] = {}
    for _ in range(20):
        for example in task.sample(rng, n, split=split):
            seen.setdefault(example.prompt, example)
        if len(seen) >= n:
            break
    return list(seen.values())[:n]


def eval_examples(task: Task, n: int, seed: int = 0) -> list[Example]:
    """Up to n distinct held-out (test split) examples, the same for a given (task, n, seed): what every
    evaluation reports, unchanged since the test split was called "eval"."""
    return split_examples(task, n, seed, split="test")


def val_examples(task: Task, n: int, seed: int = 0) -> list[Example]:
    """Up to n distinct validation examples, the same for a given (task, n, seed): for choosing
    hyper-parameters without looking at the test split."""
    return split_examples(task, n, seed, split="val")


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

    Needs at least 2, so that both the train and the test split get one.
    """
    path = Path(path)
    examples = [parse_line(path, number, line) for number, line in iter_jsonl_lines(path)]
    if len(examples) < 2:
        raise ValueError(f"task file {path} holds {len(examples)} {what}(s); it needs at least 2 so that "
                         f"both the train and the test split get one")
    return examples


def _move_last_key(source: list[Example], target: list[Example],
                   key: Callable[[Example], str]) -> tuple[list[Example], list[Example]]:
    """The last key of `source` moves to `target` with all its duplicates (file order kept in both)."""
    moved = key(source[-1])
    return [e for e in source if key(e) != moved], target + [e for e in source if key(e) == moved]


def split_by_key(examples: list[Example], key: Callable[[Example], str], what: str = "prompt",
                 source: object = "task file") -> Splits:
    """Train/val/test split by the stable hash of `key(example)`, so equal keys (duplicates) share a split.

    Test is computed exactly as the former two-way "eval" split, so it has not changed: the keys that
    hash into the test range; when there are none, the last other key; and when every key hashes
    there, the last one goes to train instead. Val is then carved out of the rest by hash. A small
    file may leave train or val empty: train then takes val's last key, and val takes train's last key
    when train has 2 distinct keys or more. Train and test are never empty (fewer than 2 distinct keys
    is an error naming `source`); val is empty only when fewer than 2 distinct keys are left outside
    test (always for 2 distinct keys; with more, only when all but one hash into test), and sampling
    from it is then an error. A key moves with all its duplicates, so the splits never share a key.
    """
    train: list[Example] = []
    test: list[Example] = []
    for example in examples:
        (test if assign_split(key(example)) == "test" else train).append(example)
    if not test and train:
        train, test = _move_last_key(train, test, key)
    if not train and test:
        test, train = _move_last_key(test, train, key)
    if not train or not test:
        raise ValueError(f"{source} has a single distinct {what}; it needs at least 2 for both train and test "
                         "(equal ones always share a split)")
    # A key moved to train from test above hashes into the test range; it stays in train.
    val = [e for e in train if assign_split(key(e)) == "val"]
    train = [e for e in train if assign_split(key(e)) != "val"]
    if not train:
        val, train = _move_last_key(val, train, key)
    if not val and len({key(e) for e in train}) >= 2:
        train, val = _move_last_key(train, val, key)
    return Splits({"train": train, "val": val, "test": test}, source=source, what=what)


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
