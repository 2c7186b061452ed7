"""Train/val/test splits (issue 15): every task type has three splits, disjoint by content and stable;
"test" is exactly the former two-way "eval" split (held to expectations frozen from the code before val
existed), "eval" stays its alias, and val is carved out of what was train."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from itertools import combinations
from pathlib import Path

import pytest

from onelayer_fast.tasks import (
    SPLITS,
    TEST_SHARE,
    VAL_SHARE,
    Example,
    assign_split,
    check_split,
    eval_examples,
    get_task,
    split_by_key,
    split_of,
    val_examples,
)

HAVE_RG = importlib.util.find_spec("reasoning_gym") is not None
KINDS = ["arithmetic", "jsonl", "jsonl-math", "code", "agent", "rg:basic_arithmetic"]
FILE_ROWS = {
    "jsonl": lambda: [{"prompt": f"{i}*3=", "answer": str(3 * i)} for i in range(60)],
    "jsonl-math": lambda: [{"question": f"What is {i} + {i + 1}?", "answer": f"#### {2 * i + 1}"} for i in range(60)],
    "code": lambda: [{"prompt": f"Write f{i}", "tests": f"assert f{i}() == {i}"} for i in range(60)],
}

# Computed with the code before the val split existed (the two-way train/eval split), on the files of
# FILE_ROWS: eval_examples(task, n, seed=0) prompts, or the sha256 of them joined by newlines. Held here so
# that every number reported on "eval" so far stays comparable to what "test" reports now.
FROZEN_EVAL = {
    "arithmetic": (20, ["40+70=", "33+70=", "28+18=", "12-25=", "76+89=", "15+38=", "35+12=", "17-14=", "5+26=",
                        "99+5=", "61+89=", "87-66=", "63+69=", "18-77=", "6+60=", "70-24=", "3+29=", "55-3=",
                        "32+45=", "86+95="]),
    "jsonl": (20, ["47*3=", "5*3=", "45*3=", "53*3=", "32*3=", "58*3="]),
    "jsonl-math": (20, ["What is 51 + 52?", "What is 6 + 7?", "What is 39 + 40?", "What is 20 + 21?"]),
    "code": (20, ["Write f50", "Write f12", "Write f41", "Write f55", "Write f28"]),
    "agent": (20, ["at 3; key at 4; door at 0; has key: no. act:", "at 0; key at 3; door at 1; has key: no. act:",
                   "at 3; key at 0; door at 4; has key: no. act:", "at 4; key at 0; door at 2; has key: no. act:",
                   "at 3; key at 2; door at 0; has key: no. act:", "at 3; key at 0; door at 1; has key: no. act:",
                   "at 1; key at 4; door at 0; has key: no. act:", "at 0; key at 4; door at 2; has key: no. act:"]),
    "rg:basic_arithmetic": (16, "d00211f4c7eb9f3cbc90416f9298349f5ae154df232d1902f67e8095bdd89672"),
}
ARITH_EVAL_300_SHA = "a0c1688f9a457f699737f079780db63e428ca345801a77ae8b86ad670cad6bbd"
JSONL_EVAL_SPLIT = ["5*3=", "32*3=", "45*3=", "47*3=", "53*3=", "58*3="]  # the file-ordered eval pool


def sha(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def prompts(examples: list[Example]) -> list[str]:
    return [e.prompt for e in examples]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def make_task(tmp_path, monkeypatch):
    """kind -> a fresh task of that kind; file tasks read the same file (FILE_ROWS) every time."""
    def make(kind: str):
        if kind.startswith("rg:") and not HAVE_RG:
            pytest.skip("reasoning-gym not installed: pip install reasoning-gym")
        if kind in FILE_ROWS:
            path = tmp_path / f"{kind}.jsonl"
            if not path.exists():
                write_jsonl(path, FILE_ROWS[kind]())
            return get_task(kind, str(path))
        return get_task(kind)

    # Building a code task checks the sandbox; a machine without namespaces opts in (no code runs here).
    from onelayer_fast.sandbox import UNSAFE_ENV, backend

    if backend() == "none":
        monkeypatch.setenv(UNSAFE_ENV, "1")
    return make


def hash_key(kind: str, example: Example) -> str:
    """The string each task hashes to place an example in a split."""
    if kind == "jsonl-math":
        return example.meta["question"]
    if kind == "agent":
        meta = example.meta
        return f"agent:5:a{meta['agent']}k{meta['key']}d{meta['door']}"
    if kind.startswith("rg:"):
        return example.meta["entry"]["question"]
    return example.prompt


def legacy_two_way(keys: list[str]) -> tuple[list[int], list[int]]:
    """Indices of (train, eval) as the two-way split made them before val existed: a copy of the old
    base.split_by_key (checked against it then), to hold the new test split to on any small file."""
    def held_out(key: str) -> bool:
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64 < 0.1

    splits = {"train": [i for i, k in enumerate(keys) if not held_out(k)],
              "eval": [i for i, k in enumerate(keys) if held_out(k)]}
    for empty, full in (("eval", "train"), ("train", "eval")):
        if not splits[empty] and splits[full]:
            moved = keys[splits[full][-1]]
            splits[empty] = [i for i in splits[full] if keys[i] == moved]
            splits[full] = [i for i in splits[full] if keys[i] != moved]
    return splits["train"], splits["eval"]


# ------------------------------------------------------------------------------------ every task type

@pytest.mark.parametrize("kind", KINDS)
def test_three_splits_disjoint_nonempty_and_stable(kind, make_task):
    task = make_task(kind)
    drawn = {split: task.sample(random.Random(0), 300, split=split) for split in SPLITS}
    sets = {split: {e.prompt for e in examples} for split, examples in drawn.items()}
    assert all(sets.values()), {split: len(s) for split, s in sets.items()}
    for a, b in combinations(SPLITS, 2):
        assert sets[a].isdisjoint(sets[b]), (a, b, sets[a] & sets[b])
    # Each example sits where its hash puts it; test and val keys are split_of's old "eval" and "train".
    test_share = getattr(task, "eval_share", TEST_SHARE)
    for split, examples in drawn.items():
        for example in examples:
            key = hash_key(kind, example)
            assert assign_split(key, test_share, VAL_SHARE) == split
            assert split_of(key, test_share) == ("eval" if split == "test" else "train")
    # Stable: a fresh task gives the same examples; "eval" is "test" under its old name.
    fresh = make_task(kind)
    for split in SPLITS:
        assert prompts(fresh.sample(random.Random(0), 300, split=split)) == prompts(drawn[split])
    assert prompts(task.sample(random.Random(3), 40, split="eval")) == prompts(task.sample(random.Random(3), 40, split="test"))
    held_out = eval_examples(task, 30, seed=1)
    validation = val_examples(task, 30, seed=1)
    assert prompts(validation) == prompts(val_examples(fresh, 30, seed=1)) and len(set(prompts(validation))) == len(validation)
    assert all(assign_split(hash_key(kind, e), test_share, VAL_SHARE) == "val" for e in validation)
    assert not {e.prompt for e in validation} & {e.prompt for e in held_out}


@pytest.mark.parametrize("kind", KINDS)
def test_test_split_is_the_former_eval_split(kind, make_task):
    task = make_task(kind)
    n, expected = FROZEN_EVAL[kind]
    got = prompts(eval_examples(task, n, seed=0))
    assert (sha(got) if isinstance(expected, str) else got) == expected
    if kind == "arithmetic":
        assert sha(prompts(eval_examples(task, 300, seed=0))) == ARITH_EVAL_300_SHA
    if kind == "jsonl":
        assert prompts(task.splits["test"]) == JSONL_EVAL_SPLIT and task.splits["eval"] is task.splits["test"]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_split_names(kind, make_task):
    task = make_task(kind)
    for bad in ("validation", "Test", "", "train "):
        with pytest.raises(ValueError, match=r"split must be one of 'train', 'val', 'test', 'eval'.*got"):
            task.sample(random.Random(0), 1, split=bad)


def test_split_names_and_shares():
    assert SPLITS == ("train", "val", "test") and VAL_SHARE == 0.1 and TEST_SHARE == 0.1
    assert [check_split(s) for s in ("train", "val", "test", "eval")] == ["train", "val", "test", "test"]
    with pytest.raises(ValueError, match="'eval' is the old name of 'test'"):
        check_split("valid")


# ----------------------------------------------------------------------------------------- file tasks

def test_train_only_loses_val_prompts(make_task):
    task = make_task("jsonl")
    keys = [row["prompt"] for row in FILE_ROWS["jsonl"]()]
    legacy_train, legacy_eval = legacy_two_way(keys)
    index = {split: [keys.index(e.prompt) for e in pool] for split, pool in task.splits.items()}
    assert index["test"] == legacy_eval
    assert sorted(index["train"] + index["val"]) == legacy_train and index["val"]


def test_small_files_keep_test_and_never_split_a_prompt():
    """Random small files (2 to 6 distinct prompts from every hash range, with duplicates): test is the
    old eval split, train and val share out the old train side, a prompt's copies stay together."""
    rng = random.Random(15)
    by_range = {split: [p for p in (f"{i}*3=" for i in range(100)) if assign_split(p) == split] for split in SPLITS}
    for _ in range(400):
        chosen: set[str] = set()
        distinct = rng.randint(2, 6)
        while len(chosen) < distinct:
            chosen.add(rng.choice(by_range[rng.choice(SPLITS)]))
        keys = sorted(chosen) + [rng.choice(sorted(chosen)) for _ in range(rng.randint(0, 4))]
        rng.shuffle(keys)
        splits = split_by_key([Example(k, str(i)) for i, k in enumerate(keys)], lambda e: e.prompt)
        index = {split: [int(e.answer) for e in splits[split]] for split in SPLITS}
        legacy_train, legacy_eval = legacy_two_way(keys)
        assert index["test"] == legacy_eval, keys
        assert sorted(index["train"] + index["val"]) == legacy_train, keys
        assert all(pool == sorted(pool) for pool in index.values())  # file order kept
        assert index["train"] and index["test"]
        owners = {keys[i]: split for split, pool in index.items() for i in pool}
        assert all(keys[i] in owners and owners[keys[i]] == split for split, pool in index.items() for i in pool)
        # Val is empty only when fewer than 2 distinct prompts are left outside test.
        assert bool(index["val"]) == (len({keys[i] for i in legacy_train}) >= 2), keys


def file_rows(kind: str, texts: list[str]) -> list[dict]:
    field = {"jsonl": "prompt", "jsonl-math": "question", "code": "prompt"}[kind]
    extra = {"jsonl": {"answer": "1"}, "jsonl-math": {"answer": "#### 1"}, "code": {"tests": "assert True"}}[kind]
    return [{field: text, **extra} for text in texts]


@pytest.mark.parametrize("kind", ["jsonl", "jsonl-math", "code"])
def test_two_distinct_prompts_leave_val_empty(kind, make_task, tmp_path):
    # Both hash into train: test borrows the last row's prompt (both copies), train keeps the other,
    # nothing is left for val.
    path = write_jsonl(tmp_path / "two.jsonl", file_rows(kind, ["0*3=", "1*3=", "0*3="]))
    task = get_task(kind, str(path))
    key = (lambda e: e.meta["question"]) if kind == "jsonl-math" else (lambda e: e.prompt)
    assert {split: [key(e) for e in task.splits[split]] for split in SPLITS} == {
        "train": ["1*3="], "val": [], "test": ["0*3=", "0*3="]}
    assert prompts(task.sample(random.Random(0), 5, split="test")) == [task.splits["test"][0].prompt] * 5
    for call in (lambda: task.sample(random.Random(0), 1, split="val"), lambda: val_examples(task, 4)):
        with pytest.raises(ValueError, match=r"task file .*two\.jsonl has no val examples"):
            call()


@pytest.mark.parametrize("kind", ["jsonl", "jsonl-math", "code"])
def test_three_distinct_prompts_fill_every_split(kind, make_task, tmp_path):
    # All three hash into train: test borrows the last row's prompt, val the last one left in train; the
    # copies of each prompt move together.
    texts = ["0*3=", "1*3=", "2*3=", "1*3=", "0*3=", "2*3=", "2*3="]
    task = get_task(kind, str(write_jsonl(tmp_path / "three.jsonl", file_rows(kind, texts))))
    key = (lambda e: e.meta["question"]) if kind == "jsonl-math" else (lambda e: e.prompt)
    assert {split: [key(e) for e in task.splits[split]] for split in SPLITS} == {
        "train": ["1*3=", "1*3="], "val": ["0*3=", "0*3="], "test": ["2*3=", "2*3=", "2*3="]}
    for split in SPLITS:
        assert {key(e) for e in task.sample(random.Random(0), 20, split=split)} == {key(task.splits[split][0])}


def test_test_split_wins_over_val_when_all_but_one_prompt_hash_into_test(tmp_path):
    """Three prompts that all hash into test: the former eval split kept two of them and gave train the
    third, and test must not change, so val stays empty (the one case with 3 or more distinct prompts)."""
    texts = [p for p in (f"{i}*3=" for i in range(100)) if assign_split(p) == "test"][:3]
    task = get_task("jsonl", str(write_jsonl(tmp_path / "t.jsonl", file_rows("jsonl", texts))))
    assert prompts(task.splits["test"]) == texts[:2] and prompts(task.splits["train"]) == texts[2:]
    with pytest.raises(ValueError, match=r"t\.jsonl has no val examples"):
        val_examples(task, 1)
