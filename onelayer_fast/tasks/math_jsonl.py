"""Math word problems from a local JSONL file in GSM8K layout, rewarded by numeric answer match.

Each line is {"question": ..., "answer": ...}; the answer is a GSM8K solution ending in `#### 42`, or
holds a `\\boxed{...}`, or is a bare number ("42", "1,234", "3/4", "0.75"). The same extraction reads
the final answer of a model's completion:

1. the text after the last `####` (its first number, if it has one);
2. otherwise the content of the last `\\boxed{...}` (LaTeX `\\frac{a}{b}`, `{,}`, `\\$`, `\\%` and
   `\\text{...}` cleaned up);
3. otherwise the last number anywhere in the text.

Two answers match when both parse as numbers equal within a relative tolerance (`1,234` == `1234.0`,
`3/4` == `0.75`, `50%` == `50`); an answer that is not a number (rare in GSM8K) must match the gold
text exactly after whitespace is removed.
"""
from __future__ import annotations

import random
import re
from fractions import Fraction
from pathlib import Path

from .base import Example, parse_jsonl_object, read_jsonl_examples, split_by_key

# A number as written in text: optional sign, digits with optional thousands commas, optional
# decimals, optionally a fraction "a/b". Thousands groups are tried first so "1,234" is one number.
_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?"
_NUMBER_RE = re.compile(
    r"(?<![\w.])"  # not inside a word or after a decimal point
    rf"(?=[-+]?\.?\d)({_NUMBER}(?:\s*/\s*(?=\.?\d){_NUMBER})?)"
)
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")


def numbers_in(text: str) -> list[str]:
    """The numbers written in `text`, in order, as strings ("1,234", "-3/4", "0.5")."""
    text = text.replace("\u2212", "-")  # unicode minus sign
    return [match.group(1) for match in _NUMBER_RE.finditer(text)]


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), with nested braces; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for index in range(brace, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : index]
    return None  # unbalanced (e.g. a truncated completion): no boxed answer


def clean_latex(text: str) -> str:
    """`\\frac{3}{4}` -> `3/4`, `1{,}000` -> `1,000`; drops `$`, `%`, `\\!`, `\\,` and `\\text{}` wrappers."""
    text = _TEXT_RE.sub(r" \1 ", text)
    text = _FRAC_RE.sub(r"(\1)/(\2)", text)
    for old, new in (("{,}", ","), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\$", ""), ("$", ""),
                     ("\\%", ""), ("%", ""), ("\\left", ""), ("\\right", "")):
        text = text.replace(old, new)
    # Parentheses that wrap a bare number (from the \frac rewrite above) are not needed to parse it.
    text = re.sub(r"\(\s*([-+]?[\d.,]+)\s*\)", r"\1", text)
    return text.strip()


def extract_answer(text: str) -> str | None:
    """The final answer written in `text` (see the module docstring for the order); None if none."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        first_line = tail.splitlines()[0] if tail else ""
        found = numbers_in(clean_latex(first_line))
        return found[0] if found else (first_line.strip() or None)
    boxed = last_boxed(text)
    if boxed is not None:
        cleaned = clean_latex(boxed)
        if parse_number(cleaned) is not None:
            return cleaned
        found = numbers_in(cleaned)
        return found[0] if len(found) == 1 else (cleaned or None)
    found = numbers_in(text)
    return found[-1] if found else None


def parse_number(text: str) -> Fraction | None:
    """Exact value of "1,234", "1234.0", "-3/4", "+.5", "50%"; None for anything that is not one number."""
    text = text.strip().replace("\u2212", "-").replace(",", "").replace(" ", "").rstrip("%").rstrip(".")
    if not text:
        return None
    try:
        return Fraction(text)  # accepts "3/4", "-0.75", "1e3"; exact, so 0.1 + 0.2 issues never arise
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str | None, gold: str, rel_tol: float = 1e-6) -> bool:
    """Numeric equality within `rel_tol` (relative to max(1, |gold|)) when both are numbers, else text equality."""
    if predicted is None:
        return False
    a, b = parse_number(predicted), parse_number(gold)
    if a is not None and b is not None:
        return abs(a - b) <= rel_tol * max(1, abs(b))
    return "".join(predicted.split()) == "".join(gold.split())


class MathJsonlTask:
    """GSM8K-style math: reward 1.0 when the completion's final answer equals the gold answer, else 0.0."""

    name = "jsonl-math"

    def __init__(self, path: str | Path, prompt_template: str = "{question}", rel_tol: float = 1e-6):
        if "{question}" not in prompt_template:
            raise ValueError(f"prompt_template must contain '{{question}}', got {prompt_template!r}")
        self.path, self.prompt_template, self.rel_tol = Path(path), prompt_template, rel_tol
        self.examples: list[Example] = read_jsonl_examples(path, self._parse_line)
        # Train/val/test by question (the prompt is the template around it): a question asked twice is
        # in one split only.
        self.splits = split_by_key(self.examples, lambda e: e.meta["question"], what="question",
                                   source=f"task file {self.path}")
        self.reward_funcs = [self.answer_reward]
        self.reward_weights = [1.0]

    def _parse_line(self, path: Path, number: int, line: str) -> Example:
        where = f"{path}:{number}"
        row = parse_jsonl_object(path, number, line, ("question", "answer"))
        question, solution = str(row["question"]).strip(), str(row["answer"])
        if not question:
            raise ValueError(f"{where}: empty 'question'")
        gold = extract_answer(solution)
        if gold is None:
            raise ValueError(
                f"{where}: no final answer found in 'answer' {solution[-80:]!r}; "
                f"expected '... #### 42', '\\boxed{{42}}' or a number"
            )
        return Example(
            prompt=self.prompt_template.format(question=question),
            answer=gold,
            meta={"question": question, "solution": solution, "line": number},
        )

    def answer_reward(self, completion: str, example: Example) -> float:
        return 1.0 if answers_match(extract_answer(completion), example.answer, self.rel_tol) else 0.0

    def correct(self, completion: str, example: Example) -> bool:
        return self.answer_reward(completion, example) == 1.0

    def sample(self, rng: random.Random, n: int, split: str = "train") -> list[Example]:
        pool = self.splits.pool(split)  # checks the name; an empty val split (a tiny file) is an error
        return [rng.choice(pool) for _ in range(n)]
