"""Tasks: split hygiene and determinism, answer extraction and rewards, file errors, the code task."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from onelayer_fast.tasks import assign_split, eval_examples, get_task, split_of
from onelayer_fast.tasks.arithmetic import ArithmeticTask
from onelayer_fast.tasks.code import strip_code_fences
from onelayer_fast.tasks.math_jsonl import answers_match, extract_answer, parse_number

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def math_rows(n: int) -> list[dict]:
    return [{"question": f"What is {i} + {i + 1}?", "answer": f"{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1}"} for i in range(n)]


@pytest.fixture
def math_task(tmp_path):
    return get_task("jsonl-math", str(write_jsonl(tmp_path / "math.jsonl", math_rows(60))))


# ----------------------------------------------------------------------------------------- splits

@pytest.mark.parametrize("kind", ["arithmetic", "jsonl", "jsonl-math"])
def test_splits_disjoint_and_deterministic(kind, tmp_path):
    if kind == "arithmetic":
        task = ArithmeticTask()
    elif kind == "jsonl":
        rows = [{"prompt": f"{i}*3=", "answer": str(3 * i)} for i in range(60)]
        task = get_task("jsonl", str(write_jsonl(tmp_path / "t.jsonl", rows)))
    else:
        task = get_task("jsonl-math", str(write_jsonl(tmp_path / "m.jsonl", math_rows(60))))
    train = task.sample(random.Random(1), 400, split="train")
    held_out = task.sample(random.Random(1), 100, split="eval")
    assert {e.prompt for e in train}.isdisjoint({e.prompt for e in held_out})
    assert task.sample(random.Random(7), 50) == task.sample(random.Random(7), 50)
    assert task.sample(random.Random(7), 50, split="eval") == task.sample(random.Random(7), 50, split="eval")
    assert task.sample(random.Random(7), 50) != task.sample(random.Random(8), 50)
    # "test" is the held-out split's name now; "eval", its old name, gives the same examples.
    assert task.sample(random.Random(7), 50, split="test") == task.sample(random.Random(7), 50, split="eval")
    with pytest.raises(ValueError, match="split"):
        task.sample(random.Random(0), 1, split="testing")


def test_math_split_follows_question_hash(math_task):
    assert set(math_task.splits) == {"train", "val", "test"}
    for split, pool in math_task.splits.items():
        assert pool and all(assign_split(e.meta["question"]) == split for e in pool)


def test_small_file_still_gets_both_splits(tmp_path):
    # 3 questions: the hash split almost surely leaves eval empty; one question moves over, with its duplicate.
    rows = math_rows(3) + [math_rows(3)[-1]]
    task = get_task("jsonl-math", str(write_jsonl(tmp_path / "m.jsonl", rows)))
    train_questions = {e.meta["question"] for e in task.splits["train"]}
    eval_questions = {e.meta["question"] for e in task.splits["eval"]}
    assert train_questions and eval_questions and train_questions.isdisjoint(eval_questions)
    assert sum(len(pool) for pool in task.splits.values()) == 4


def train_prompts(n: int) -> list[str]:
    """n prompts that the stable hash puts in the train split."""
    return [p for p in (f"{i}*3=" for i in range(100)) if split_of(p) == "train"][:n]


@pytest.mark.parametrize("kind", ["jsonl", "jsonl-math"])
def test_duplicates_never_cross_splits(kind, tmp_path):
    # Every prompt hashes to train, so the eval split must borrow one: all copies of the last move together.
    first, last = train_prompts(2)
    key = "prompt" if kind == "jsonl" else "question"
    rows = [{key: first, "answer": "1"}, {key: last, "answer": "2"}, {key: last, "answer": "2"}]
    task = get_task(kind, str(write_jsonl(tmp_path / "t.jsonl", rows)))
    train, held_out = ([e.prompt for e in task.splits[s]] for s in ("train", "eval"))
    assert set(train).isdisjoint(held_out) and len(train) + len(held_out) == 3
    assert sorted(len(pool) for pool in (train, held_out)) == [1, 2]


def test_jsonl_task_file_errors(tmp_path):
    good = {"prompt": "1*3=", "answer": "3"}
    with pytest.raises(ValueError, match=r"l\.jsonl:2: expected a JSON object, got list"):
        get_task("jsonl", str(write_jsonl(tmp_path / "l.jsonl", [good, "[1, 2]"])))
    with pytest.raises(ValueError, match=r"n\.jsonl:2: expected a JSON object, got int"):
        get_task("jsonl-math", str(write_jsonl(tmp_path / "n.jsonl", [math_rows(1)[0], "7"])))
    with pytest.raises(ValueError, match=r"single distinct prompt"):
        get_task("jsonl", str(write_jsonl(tmp_path / "d.jsonl", [good, good])))
    (tmp_path / "b.jsonl").write_bytes(json.dumps(good).encode() + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"b\.jsonl:2: not UTF-8"):
        get_task("jsonl", str(tmp_path / "b.jsonl"))
    with pytest.raises(ValueError, match="is a directory"):
        get_task("code", str(tmp_path))
    # A byte-order mark and CRLF line ends are fine (in the files read by the shared reader).
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(r).encode() for r in math_rows(2)))
    assert len(get_task("jsonl-math", str(tmp_path / "bom.jsonl")).examples) == 2


def test_line_length_bound(tmp_path):
    from onelayer_fast.tasks import iter_jsonl_lines

    path = tmp_path / "t.jsonl"
    path.write_bytes(b"1234\n\n12345\n123456\n")
    lines = iter_jsonl_lines(path, max_line_bytes=5)
    assert [next(lines), next(lines)] == [(1, "1234\n"), (3, "12345\n")]  # blank lines skipped, numbers kept
    with pytest.raises(ValueError, match=r"t\.jsonl:4: line longer than 5 bytes"):
        next(lines)
    path.write_bytes(b"12345\n123456")  # the last line without its newline counts the same
    with pytest.raises(ValueError, match=r"t\.jsonl:2: line longer than 5 bytes"):
        list(iter_jsonl_lines(path, max_line_bytes=5))
    path.write_bytes(b"12345\n12345")
    assert [number for number, _ in iter_jsonl_lines(path, max_line_bytes=5)] == [1, 2]


def test_eval_examples(math_task):
    first = eval_examples(math_task, 4, seed=3)
    assert first == eval_examples(math_task, 4, seed=3)
    assert len({e.prompt for e in first}) == len(first) == min(4, len(math_task.splits["eval"]))
    assert all(split_of(e.meta["question"]) == "eval" for e in first)
    arithmetic = eval_examples(ArithmeticTask(), 20, seed=0)
    assert len({e.prompt for e in arithmetic}) == 20
    assert all(split_of(e.prompt) == "eval" for e in arithmetic)


# ----------------------------------------------------------------------------------- arithmetic

def test_arithmetic_rewards():
    task = ArithmeticTask()
    example = task.make(37, "+", 58)
    assert task.correct(" 95\n", example) and not task.correct("96", example)
    assert [f(" 95", example) for f in task.reward_funcs] == [1.0, 1.0]
    assert [f("9x", example) for f in task.reward_funcs] == [0.0, 0.5]


# ------------------------------------------------------------------------------------ jsonl-math

@pytest.mark.parametrize(
    "text, expected",
    [
        ("so 1000 + 234 = 1234\n#### 1,234", "1,234"),
        ("#### $1,234.00 dollars", "1,234.00"),
        ("The answer is \\boxed{\\frac{3}{4}}.", "3/4"),
        ("first \\boxed{2}, then \\boxed{-\\dfrac{1}{2}}", "-1/2"),
        ("\\boxed{18 \\text{ dollars}}", "18"),
        ("\\boxed{1{,}000}", "1,000"),
        ("We get 3 apples, then 4 more, so 7.", "7"),
        ("It costs -5 now, down from 10-3", "3"),
        ("no numbers here", None),
        ("#### ", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_numeric_comparison():
    assert parse_number("1,234") == parse_number("1234.0") == 1234
    assert parse_number("3/4") == parse_number("0.75") == parse_number(".75")
    assert parse_number("1/0") is None and parse_number("abc") is None
    assert answers_match("1,234", "1234") and answers_match("42.0", "42") and answers_match("50%", "50")
    assert answers_match("0.3333333", "1/3") and not answers_match("0.33", "1/3")
    assert not answers_match("41", "42") and not answers_match(None, "42")
    assert answers_match("B", " B ") and not answers_match("B", "C")  # non-numeric gold: text match


def test_math_rewards(tmp_path):
    rows = [
        {"question": "How many marbles?", "answer": "He has 1000 + 234 = 1234 marbles.\n#### 1,234"},
        {"question": "What share is left?", "answer": "\\boxed{3/4}"},
        {"question": "How many km?", "answer": "12.5"},
    ]
    task = get_task("jsonl-math", str(write_jsonl(tmp_path / "m.jsonl", rows)))
    marbles, share, km = task.examples
    assert (marbles.answer, share.answer, km.answer) == ("1,234", "3/4", "12.5")
    reward = task.reward_funcs[0]
    cases = [
        (marbles, "1000 + 234 = 1234\n#### 1,234", 1.0),
        (marbles, "#### 1234", 1.0),
        (marbles, "He has \\boxed{1234} marbles", 1.0),
        (marbles, "#### 1,243", 0.0),
        (share, "One quarter is eaten, so 0.75 is left.", 1.0),  # last-number fallback, decimal vs fraction
        (share, "So \\boxed{\\frac{3}{4}}", 1.0),
        (share, "\\boxed{0.75} of 8 slices", 1.0),  # boxed wins over the later number
        (share, "\\boxed{1/4}", 0.0),
        (km, "2.5 km a day for 5 days is 12.50", 1.0),
        (km, "2.5 km a day for 5 days is 12.50 km, about 13", 0.0),  # the last number counts
        (km, "I don't know", 0.0),
    ]
    for example, completion, expected in cases:
        assert reward(completion, example) == expected, (completion, example.answer)
        assert task.correct(completion, example) == (expected == 1.0)
    assert task.reward_weights == [1.0]


def test_math_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_task("jsonl-math", str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="needs a path"):
        get_task("jsonl-math")
    bad_json = write_jsonl(tmp_path / "bad.jsonl", [math_rows(1)[0], "{not json"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        get_task("jsonl-math", str(bad_json))
    no_answer = write_jsonl(tmp_path / "fields.jsonl", [math_rows(1)[0], {"question": "q"}])
    with pytest.raises(ValueError, match=r"fields\.jsonl:2: missing field\(s\) \['answer'\]"):
        get_task("jsonl-math", str(no_answer))
    unparsable = write_jsonl(tmp_path / "gold.jsonl", [{"question": "q", "answer": "   "}])
    with pytest.raises(ValueError, match=r"gold\.jsonl:1: no final answer"):
        get_task("jsonl-math", str(unparsable))
    with pytest.raises(ValueError, match="at least 2"):
        get_task("jsonl-math", str(write_jsonl(tmp_path / "one.jsonl", math_rows(1))))
    with pytest.raises(ValueError, match="single distinct question"):
        get_task("jsonl-math", str(write_jsonl(tmp_path / "dup.jsonl", math_rows(1) * 3)))


def test_unknown_task_lists_all():
    with pytest.raises(ValueError, match="unknown task") as error:
        get_task("chess")
    assert all(name in str(error.value) for name in ("arithmetic", "jsonl", "jsonl-math", "code"))


# ------------------------------------------------------------------------------------------ code

@pytest.fixture(autouse=True)
def _code_task_runs_without_isolation_too(monkeypatch):
    """These tests check the code task's rewards, not its isolation (tests/test_sandbox_escapes.py does): on a
    machine that cannot create namespaces they opt in to the unsafe sandbox instead of failing."""
    from onelayer_fast.sandbox import UNSAFE_ENV, backend

    if backend() == "none":
        monkeypatch.setenv(UNSAFE_ENV, "1")


@pytest.fixture
def code_task(tmp_path):
    rows = [
        {"prompt": "Write `add(a, b)` returning a + b.", "tests": "assert add(2, 3) == 5\nassert add(-1, 1) == 0", "entry_point": "add"},
        {"prompt": "def double(x):\n    \"\"\"Return 2 * x.\"\"\"\n", "tests": "assert double(4) == 8", "entry_point": "double"},
    ]
    return get_task("code", str(write_jsonl(tmp_path / "code.jsonl", rows)))


def test_strip_code_fences():
    assert strip_code_fences("def f(): pass") == "def f(): pass"
    assert strip_code_fences("Here:\n```python\nx = 1\n```\nDone.") == "x = 1\n"
    assert strip_code_fences("```\ny = 2\n```") == "y = 2\n"
    assert strip_code_fences("```text\nusage\n```\n```py\nz = 3\n```") == "z = 3\n"  # a python block wins
    assert strip_code_fences("```python\nw = 4\n") == "w = 4\n"  # truncated: no closing fence


def test_code_rewards(code_task):
    add, double = code_task.examples
    reward = code_task.reward_funcs[0]
    good = "def add(a, b):\n    return a + b\n"
    fenced = "Sure! Here is the function:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\nIt adds two numbers."
    wrong = "def add(a, b):\n    return a - b\n"
    assert reward(good, add) == 1.0 and code_task.correct(good, add)
    assert reward(fenced, add) == 1.0
    assert reward(wrong, add) == 0.0 and not code_task.correct(wrong, add)
    assert reward("this is not python", add) == 0.0
    for hack in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"):  # exit before the tests run
        assert reward(hack, add) == 0.0
    assert reward("    return 2 * x\n", double) == 1.0  # HumanEval style: continues the prompt's function
    assert reward("    return x + 1\n", double) == 0.0


def test_code_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        get_task("code", str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="needs a path"):
        get_task("code")
    row = {"prompt": "p", "tests": "assert True"}
    with pytest.raises(ValueError, match=r"c\.jsonl:2: missing field\(s\) \['tests'\]"):
        get_task("code", str(write_jsonl(tmp_path / "c.jsonl", [row, {"prompt": "q"}])))
    with pytest.raises(ValueError, match=r"d\.jsonl:1: not valid JSON"):
        get_task("code", str(write_jsonl(tmp_path / "d.jsonl", ["[1, 2"])))
    with pytest.raises(ValueError, match="at least 2"):
        get_task("code", str(write_jsonl(tmp_path / "e.jsonl", [row])))


# -------------------------------------------------------------------------------- sample files

def test_example_files_load():
    math_task = get_task("jsonl-math", str(EXAMPLES / "math.jsonl"))
    assert 5 <= len(math_task.examples) <= 8 and all(pool for pool in math_task.splits.values())
    code_task = get_task("code", str(EXAMPLES / "code.jsonl"))
    assert 4 <= len(code_task.examples) <= 6 and all(pool for pool in code_task.splits.values())
    # Each sample problem is solvable (its tests are right): one reference solution per entry point.
    solutions = {
        "add": "def add(a, b):\n    return a + b\n",
        "is_palindrome": "def is_palindrome(s):\n    return s.lower() == s.lower()[::-1]\n",
        "count_vowels": "def count_vowels(s):\n    return sum(ch in 'aeiouAEIOU' for ch in s)\n",
        "second_largest": "def second_largest(xs):\n    v = sorted(set(xs))\n    return v[-2] if len(v) > 1 else None\n",
        "fizz": "    return 'Fizz' * (n % 3 == 0) + 'Buzz' * (n % 5 == 0) or str(n)\n",
    }
    program = "\n".join(code_task.program(solutions[e.meta["entry_point"]], e) for e in code_task.examples)
    from onelayer_fast.sandbox import run_python

    result = run_python(program, timeout_s=10.0)
    assert result.passed, result.stderr
