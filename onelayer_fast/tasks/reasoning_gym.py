"""Tasks `rg:<dataset>` backed by reasoning-gym's procedural generators (offline, seeded).

    task = get_task("rg:gsm_symbolic")
    task = get_task("rg:basic_arithmetic:max_terms=2,max_digits=2")   # dataset config after a second colon
    task = ReasoningGymTask("basic_arithmetic", config={"operators": ["+", "-"]})

Prompts. `Example.prompt` is the user's message: the dataset's question, then an instruction that asks
for the final answer between <answer> and </answer> tags. Tasks know nothing of tokenizers; wrapping
the message in the tokenizer's chat template (where it has one) is rollout's job.

Splits. The train, val and test splits draw from three generators with disjoint seed ranges
(reasoning-gym seeds item `idx` of a dataset with `seed + idx`), and each keeps only the questions that
`assign_split` puts in it, so a question can never be in two splits, even if two generators produced
it. Test keeps the question-hash range [0, eval_share) (0.5) and its generator: it is the split that
was called "eval" before val existed, unchanged. Val takes the next `val_share` (0.1) of the hash
range out of what was train, and a generator of its own.

Reward. The dataset's own scorer, `dataset.score_answer(answer=..., entry=...)`, on the answer
extracted from the completion (weight 1), plus a small format reward (`format_weight`, 0.1) for one
well-formed answer between the tags (`answer_tags`).
"""
from __future__ import annotations

import importlib.util
import json
import random
import re
from typing import Any

from .base import VAL_SHARE, Example, Splits, assign_split, check_split

PREFIX = "rg:"
INSTRUCTION = "Give only the final answer, between <answer> and </answer> tags."
# Item idx of a split's generator uses Random(seed + idx) with idx < pool_size: offsets that differ by more
# than any pool keep the splits' seed ranges apart (test keeps the offset it had as the eval split).
EVAL_SEED_OFFSET = 10**7
SEED_OFFSETS = {"train": 0, "test": EVAL_SEED_OFFSET, "val": 2 * EVAL_SEED_OFFSET}
INSTALL_HINT = "pip install reasoning-gym` or `pip install 'onelayer_fast[real]'"

_TAGGED = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def require_reasoning_gym():
    """The reasoning_gym module, or an ImportError that says how to install it."""
    if importlib.util.find_spec("reasoning_gym") is None:
        raise ImportError(f"reasoning-gym tasks ({PREFIX}<dataset>) need the `reasoning-gym` package, which is "
                          f"not installed; install it with `{INSTALL_HINT}`")
    import reasoning_gym

    return reasoning_gym


def extract_answer(completion: str, reference: str = "") -> str | None:
    """The answer a completion gives.

    The last `<answer>...</answer>` span if there is one; otherwise, when the reference answer is a
    number, the last number in the completion (commas dropped); otherwise its last non-empty line.
    None for a completion with nothing to extract.
    """
    tagged = _TAGGED.findall(completion)
    if tagged:
        return tagged[-1].strip()
    if _NUMBER.fullmatch(reference.strip()):
        numbers = _NUMBER.findall(completion)
        return numbers[-1].replace(",", "") if numbers else None
    lines = [line.strip() for line in completion.splitlines() if line.strip()]
    return lines[-1] if lines else None


def answer_tags(completion: str, example: Example) -> float:
    """Format reward: 1 when the completion gives one well-formed answer between <answer> tags.

    Well-formed: exactly one tagged span, non-empty, and a number when the reference answer is one.
    Any non-empty span is not enough: SmolLM2 under full-parameter GRPO learned to echo the instruction
    ("between <answer> and </answer> tags"), which earns the format reward with " and " as its answer and
    drove its accuracy to 0.
    """
    spans = [span.strip() for span in _TAGGED.findall(completion)]
    if len(spans) != 1 or not spans[0]:
        return 0.0
    if _NUMBER.fullmatch(example.answer.strip()):
        return 1.0 if _NUMBER.fullmatch(spans[0]) else 0.0
    return 1.0


def parse_name(name: str) -> tuple[str, dict[str, Any]]:
    """`rg:<dataset>[:key=value,...]` -> (dataset, config). Values are JSON (numbers, true/false, lists)
    or else plain strings: `rg:basic_arithmetic:max_terms=2,operators=["+","-"]`."""
    if not name.startswith(PREFIX) or len(name) == len(PREFIX):
        raise ValueError(f"a reasoning-gym task name is {PREFIX}<dataset>[:key=value,...], got {name!r}")
    dataset, _, spec = name[len(PREFIX):].partition(":")
    config: dict[str, Any] = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", spec)):  # commas inside [...] belong to a list
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{name!r}: expected key=value in the dataset config, got {item!r}")
        try:
            config[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            config[key.strip()] = value
    return dataset, config


class ReasoningGymTask:
    """One reasoning-gym dataset as a Task; deterministic given the sampling rng and `seed`."""

    def __init__(self, dataset: str, config: dict[str, Any] | None = None, seed: int = 0,
                 pool_size: int = 100_000, eval_share: float = 0.5, instruction: str = INSTRUCTION,
                 format_weight: float = 0.1, name: str | None = None, val_share: float = VAL_SHARE):
        rg = require_reasoning_gym()
        from reasoning_gym.factory import DATASETS

        if dataset not in DATASETS:
            raise ValueError(f"unknown reasoning-gym dataset {dataset!r}; datasets: {', '.join(sorted(DATASETS))}")
        if pool_size > EVAL_SEED_OFFSET:
            raise ValueError(f"pool_size must be <= {EVAL_SEED_OFFSET} (keeps the splits' seeds apart), got {pool_size}")
        if not (0 < eval_share and 0 < val_share and eval_share + val_share < 1):
            raise ValueError(f"eval_share and val_share must be > 0 and leave train a share of the questions, "
                             f"got {eval_share} and {val_share}")
        self.config = dict(config or {})
        spec = ",".join(f"{key}={json.dumps(value)}" for key, value in self.config.items())
        self.name = name or PREFIX + dataset + (f":{spec}" if spec else "")
        # eval_share: the test split's share of the question-hash range (its old name, kept for callers)
        self.dataset_name, self.pool_size, self.eval_share, self.val_share = dataset, pool_size, eval_share, val_share
        self.instruction = instruction
        try:
            # `size` bounds the item index (gsm_symbolic draws its template of every index up front)
            generators = {split: rg.create_dataset(dataset, seed=seed + offset, size=pool_size, **self.config)
                          for split, offset in SEED_OFFSETS.items()}
        except (TypeError, AssertionError) as error:  # unknown config field, or the config's own validate()
            raise ValueError(f"reasoning-gym dataset {dataset!r} rejected config {self.config}: {error}") from error
        self.datasets = Splits(generators, source=self.name, what="question")  # also answers "eval"
        self.reward_funcs = [self.accuracy, answer_tags]
        self.reward_weights = [1.0, format_weight]

    def make(self, entry: dict[str, Any]) -> Example:
        return Example(prompt=f"{entry['question']}\n\n{self.instruction}", answer=str(entry["answer"]),
                       meta={"entry": entry})

    def accuracy(self, completion: str, example: Example) -> float:
        """The dataset's own score of the extracted answer (1.0 for the right answer)."""
        answer = extract_answer(completion, example.answer)
        return float(self.datasets["train"].score_answer(answer=answer, entry=example.meta["entry"]))

    def correct(self, completion: str, example: Example) -> bool:
        return self.accuracy(completion, example) == 1.0

    def sample(self, rng: random.Random, n: int, split: str = "train") -> list[Example]:
        """n items of `split`: random indices into that split's generator, kept when assign_split agrees."""
        split = check_split(split)
        dataset = self.datasets[split]
        examples: list[Example] = []
        for _ in range(max(1000, 100 * n)):
            if len(examples) == n:
                return examples
            entry = dataset[rng.randrange(self.pool_size)]
            if assign_split(entry["question"], self.eval_share, self.val_share) == split:
                examples.append(self.make(entry))
        if len(examples) < n:
            raise RuntimeError(f"{self.name}: found only {len(examples)} of {n} {split} questions; "
                               "does the dataset generate (almost) one question only?")
        return examples


def task_from_name(name: str) -> ReasoningGymTask:
    dataset, config = parse_name(name)
    return ReasoningGymTask(dataset, config=config, name=name)
