"""Word-free arithmetic prompts such as `37+58=`, rewarded by exact match of the answer."""
from __future__ import annotations

import random
from typing import Callable

from .base import Example, assign_split, check_split


def exact_match(completion: str, example: Example) -> float:
    return 1.0 if completion.strip() == example.answer else 0.0


def digits_only(completion: str, example: Example) -> float:
    """Shaped format reward: the share of answer characters that are digits (0 for an empty answer).

    A random-init model almost never hits an exact answer; this gives GRPO a gradient from the first
    step while exact match stays the task's real measure.
    """
    text = completion.strip()
    return sum(ch.isdigit() for ch in text) / len(text) if text else 0.0


class ArithmeticTask:
    """a+b and a-b with operands in [0, max_operand]; deterministic given the rng."""

    name = "arithmetic"

    def __init__(self, max_operand: int = 99, operators: str = "+-"):
        self.max_operand = max_operand
        self.operators = operators
        self.reward_funcs = [exact_match, digits_only]
        self.reward_weights = [1.0, 0.2]

    def make(self, a: int, op: str, b: int) -> Example:
        value = a + b if op == "+" else a - b
        return Example(prompt=f"{a}{op}{b}=", answer=str(value))

    def correct(self, completion: str, example: Example) -> bool:
        return exact_match(completion, example) == 1.0

    def sample(self, rng: random.Random, n: int, split: str = "train") -> list[Example]:
        """Rejection-sample problems whose stable hash puts them in `split` (see base.assign_split: 10% of
        problems are test, the former eval split, and 10% val)."""
        split = check_split(split)
        return self.sample_where(rng, n, lambda prompt: assign_split(prompt) == split)

    def sample_where(self, rng: random.Random, n: int, keep: Callable[[str], bool]) -> list[Example]:
        """n random problems whose prompt `keep` accepts, in the order the draws from `rng` produce them."""
        examples: list[Example] = []
        while len(examples) < n:
            example = self.make(rng.randint(0, self.max_operand), rng.choice(self.operators), rng.randint(0, self.max_operand))
            if keep(example.prompt):
                examples.append(example)
        return examples
