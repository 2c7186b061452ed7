"""Python programming problems from a local JSONL file, rewarded by running their tests in the sandbox.

Each line is {"prompt": ..., "tests": "assert f(1) == 2\\n...", "entry_point": "f" (optional)}. The
program run for a completion is

    <completion, markdown fences stripped>
    <tests>
    print(<random marker>)

and the reward is 1.0 when it exits cleanly within the time limit AND prints the marker, else 0.0. The
marker, new on every run, is what stops the cheapest reward hack: a completion that calls `sys.exit(0)`
or `os._exit(0)` before the tests would otherwise exit cleanly and "pass". (Code that reads its own
source file to find the marker, or returns an object whose `__eq__` is always True, still gets through:
tests decide what they check.)

HumanEval-style prompts (a signature and docstring the model continues) work too: when an
`entry_point` is given, the completion does not define it and the prompt does, the prompt is put in
front of the completion.

Cost: rewards run one sandboxed `python -I` process per completion, sequentially (the trainer calls
reward functions one completion at a time): an interpreter start-up per completion (tens of ms) plus
the tests' own run time, so seconds for a batch of 64, and up to `timeout_s` for each completion that
loops forever. `correct()` on a completion that was just
rewarded costs nothing: results are cached by program text.
"""
from __future__ import annotations

import random
import re
import secrets
from collections import OrderedDict
from pathlib import Path

from ..sandbox import run_python
from .base import SPLITS, Example, check_split, parse_jsonl_object, read_jsonl_examples, split_of

# ```python ... ``` (or ```py, ```python3, bare ```); the closing fence may be missing in a truncated
# completion, in which case everything after the opening fence is the code.
_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def strip_code_fences(completion: str) -> str:
    """The code in a completion: the first fenced block if there is one (preferring a python-tagged
    block), else the whole text."""
    blocks = [(match.group(1).lower(), match.group(2)) for match in _FENCE_RE.finditer(completion)]
    if not blocks:
        return completion
    for language, body in blocks:
        if language in ("python", "py", "python3"):
            return body
    return blocks[0][1]


class CodeTask:
    """Reward 1.0 when the completion passes all of the problem's tests in the sandbox, else 0.0."""

    name = "code"

    def __init__(self, path: str | Path, timeout_s: float = 5.0, memory_mb: int = 512, cache_size: int = 4096):
        self.path, self.timeout_s, self.memory_mb, self.cache_size = Path(path), timeout_s, memory_mb, cache_size
        self.examples: list[Example] = read_jsonl_examples(path, self._parse_line, what="problem")
        self.splits = self._split(self.examples)
        self.reward_funcs = [self.tests_reward]
        self.reward_weights = [1.0]
        self._results: OrderedDict[str, bool] = OrderedDict()

    @staticmethod
    def _parse_line(path: Path, number: int, line: str) -> Example:
        where = f"{path}:{number}"
        row = parse_jsonl_object(path, number, line, ("prompt", "tests"))
        prompt, tests = str(row["prompt"]), str(row["tests"])
        if not prompt.strip() or not tests.strip():
            raise ValueError(f"{where}: 'prompt' and 'tests' must not be empty")
        entry_point = row.get("entry_point")
        return Example(prompt=prompt, answer=tests, meta={"entry_point": entry_point, "line": number})

    @staticmethod
    def _split(examples: list[Example]) -> dict[str, list[Example]]:
        """Split by the prompt's stable hash; an empty split (small files) takes the other split's last
        prompt, with all its duplicates, so the splits still never overlap."""
        splits: dict[str, list[Example]] = {split: [] for split in SPLITS}
        for example in examples:
            splits[split_of(example.prompt)].append(example)
        for empty, full in (("eval", "train"), ("train", "eval")):
            if not splits[empty]:
                moved = splits[full][-1].prompt
                splits[empty] = [e for e in splits[full] if e.prompt == moved]
                splits[full] = [e for e in splits[full] if e.prompt != moved]
        if not splits["train"] or not splits["eval"]:
            raise ValueError("task file has a single distinct prompt; it needs at least 2 for both train and eval")
        return splits

    def program(self, completion: str, example: Example, marker: str = "") -> str:
        """The script the sandbox runs for this completion: solution code, the tests, then (when given)
        a line that prints `marker`, reached only if the tests ran to the end."""
        code = strip_code_fences(completion)
        entry_point = example.meta.get("entry_point")
        defines = rf"\bdef\s+{re.escape(entry_point)}\s*\(" if entry_point else None
        if defines and not re.search(defines, code) and re.search(defines, example.prompt):
            code = example.prompt + code  # HumanEval style: the completion continues the prompt's function
        program = f"{code.rstrip()}\n\n\n{example.answer.rstrip()}\n"
        return program + (f"\n\nprint({marker!r})\n" if marker else "")

    def passes(self, completion: str, example: Example) -> bool:
        key = self.program(completion, example)
        if key in self._results:
            self._results.move_to_end(key)
            return self._results[key]
        marker = f"olf-tests-done-{secrets.token_hex(16)}"
        result = run_python(self.program(completion, example, marker), timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        passed = result.passed and marker in result.stdout
        self._results[key] = passed
        if len(self._results) > self.cache_size:
            self._results.popitem(last=False)
        return passed

    def tests_reward(self, completion: str, example: Example) -> float:
        return 1.0 if self.passes(completion, example) else 0.0

    def correct(self, completion: str, example: Example) -> bool:
        return self.passes(completion, example)

    def sample(self, rng: random.Random, n: int, split: str = "train") -> list[Example]:
        check_split(split)
        pool = self.splits[split]
        return [rng.choice(pool) for _ in range(n)]
