"""Prompts and answers from a local JSONL file: one {"prompt": ..., "answer": ...} object per line."""
from __future__ import annotations

import json
import random
from pathlib import Path

from .base import Example, split_by_key
from .arithmetic import exact_match


class JsonlTask:
    name = "jsonl"

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"task file {path} does not exist")
        self.examples: list[Example] = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            prompt = row.get("prompt", row.get("question"))
            if prompt is None or "answer" not in row:
                raise ValueError(f"{path}:{number}: each line needs 'prompt' (or 'question') and 'answer'")
            self.examples.append(Example(prompt=str(prompt), answer=str(row["answer"]).strip()))
        if not self.examples:
            raise ValueError(f"task file {path} holds no examples")
        self.reward_funcs = [exact_match]
        self.reward_weights = [1.0]

        # By the prompt's stable hash (train/val/test, duplicates in one split; see base.split_by_key).
        self.splits = split_by_key(self.examples, lambda e: e.prompt, what="prompt", source=f"task file {path}")

    def correct(self, completion: str, example: Example) -> bool:
        return exact_match(completion, example) == 1.0

    def sample(self, rng: random.Random, n: int, split: str = "train") -> list[Example]:
        pool = self.splits.pool(split)  # checks the name; an empty val split (a tiny file) is an error
        return [rng.choice(pool) for _ in range(n)]
