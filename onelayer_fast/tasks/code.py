"""Python programming problems from a local JSONL file, rewarded by running their tests in the sandbox.

Each line is {"prompt": ..., "tests": "assert f(1) == 2\\n...", "entry_point": "f" (optional)}. For a
completion, the sandbox (`onelayer_fast.sandbox.run_python(solution, tests=...)`) runs the solution (the
completion, markdown fences stripped) and then the tests, as two separate programs in one interpreter,
both sent through a pipe and never written to a file. The reward is 1.0 when the tests ran to their end
and the process exited cleanly within the time limit, else 0.0. Whether the tests ran to their end is
told by a per-run secret marker that the sandbox's bootstrap writes to a pipe of its own after they
return, and that user code cannot read (see the sandbox's module docstring for how, and for the limits):
a completion that calls `sys.exit(0)` or `os._exit(0)` before the tests, or reads its own source, its
frames or the process memory to find the marker, gets 0. What still gets through is what the tests let
through: an object whose `__eq__` is always True, or a check too weak to tell a right answer from a
wrong one.

The code task refuses to start when the machine offers no kernel isolation (no bubblewrap, no user
namespaces) unless ONELAYER_FAST_UNSAFE_SANDBOX=1 (or `allow_unsafe_sandbox=True`) accepts the risk.

HumanEval-style prompts (a signature and docstring the model continues) work too: when an
`entry_point` is given, the completion does not define it and the prompt does, the prompt is put in
front of the completion.

Cost: rewards run one sandboxed `python -I -S` process per completion, sequentially (the trainer calls
reward functions one completion at a time): namespace set-up and an interpreter start-up per completion
(about 50-100 ms) plus the tests' own run time, so seconds for a batch of 64, and up to `timeout_s` for
each completion that loops forever. `correct()` on a completion that was just rewarded costs nothing:
results are cached by solution and tests.
"""
from __future__ import annotations

import random
import re
from collections import OrderedDict
from pathlib import Path

from ..sandbox import check_backend, run_python
from .base import Example, parse_jsonl_object, read_jsonl_examples, split_by_key

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

    def __init__(self, path: str | Path, timeout_s: float = 5.0, memory_mb: int = 512, cache_size: int = 4096,
                 allow_unsafe_sandbox: bool = False):
        self.path, self.timeout_s, self.memory_mb, self.cache_size = Path(path), timeout_s, memory_mb, cache_size
        self.allow_unsafe_sandbox = allow_unsafe_sandbox
        self.examples: list[Example] = read_jsonl_examples(path, self._parse_line, what="problem")
        # Train/val/test by the prompt's stable hash, duplicates in one split (base.split_by_key).
        self.splits = split_by_key(self.examples, lambda e: e.prompt, what="prompt", source=f"task file {self.path}")
        # Before any training starts: no kernel isolation and no opt-in is an error now, not mid-run.
        self.sandbox_backend = check_backend(allow_unsafe_sandbox)
        self.reward_funcs = [self.tests_reward]
        self.reward_weights = [1.0]
        self._results: OrderedDict[tuple[str, str], bool] = OrderedDict()

    @staticmethod
    def _parse_line(path: Path, number: int, line: str) -> Example:
        where = f"{path}:{number}"
        row = parse_jsonl_object(path, number, line, ("prompt", "tests"))
        prompt, tests = str(row["prompt"]), str(row["tests"])
        if not prompt.strip() or not tests.strip():
            raise ValueError(f"{where}: 'prompt' and 'tests' must not be empty")
        entry_point = row.get("entry_point")
        return Example(prompt=prompt, answer=tests, meta={"entry_point": entry_point, "line": number})

    def solution(self, completion: str, example: Example) -> str:
        """The code the sandbox runs before the tests: the completion, markdown fences stripped, with the
        prompt put in front when it continues the prompt's function (HumanEval style)."""
        code = strip_code_fences(completion)
        entry_point = example.meta.get("entry_point")
        defines = rf"\bdef\s+{re.escape(entry_point)}\s*\(" if entry_point else None
        if defines and not re.search(defines, code) and re.search(defines, example.prompt):
            code = example.prompt + code  # HumanEval style: the completion continues the prompt's function
        return code

    def program(self, completion: str, example: Example) -> str:
        """Solution and tests as one script, for reading or for running by hand (the reward runs them
        apart, see the module docstring)."""
        return f"{self.solution(completion, example).rstrip()}\n\n\n{example.answer.rstrip()}\n"

    def passes(self, completion: str, example: Example) -> bool:
        key = (self.solution(completion, example), example.answer)
        if key in self._results:
            self._results.move_to_end(key)
            return self._results[key]
        result = run_python(
            key[0], timeout_s=self.timeout_s, memory_mb=self.memory_mb,
            tests=example.answer, allow_unsafe=self.allow_unsafe_sandbox,
        )
        passed = result.passed and result.tests_passed is True
        self._results[key] = passed
        if len(self._results) > self.cache_size:
            self._results.popitem(last=False)
        return passed

    def tests_reward(self, completion: str, example: Example) -> float:
        return 1.0 if self.passes(completion, example) else 0.0

    def correct(self, completion: str, example: Example) -> bool:
        return self.passes(completion, example)

    def sample(self, rng: random.Random, n: int, split: str = "train") -> list[Example]:
        pool = self.splits.pool(split)  # checks the name; an empty val split (a tiny file) is an error
        return [rng.choice(pool) for _ in range(n)]
