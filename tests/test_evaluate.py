"""The greedy evaluator: exact accuracy and reward on stub models with known answers, batching and
padding independence on a real tiny model, greedy episodes on an environment task."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from onelayer_fast.evaluate import EvalResult, evaluate, greedy_completions
from onelayer_fast.models import CharTokenizer, load_model
from onelayer_fast.tasks import Example, eval_examples, get_task

pytestmark = pytest.mark.usefixtures("torch_single_thread")


class ScriptedModel(nn.Module):
    """Answers each prompt with reply(prompt_text), then EOS, then junk the evaluator must cut off.

    Returns what HF generate returns: the left-padded prompt ids followed by the new tokens, finished
    rows padded with pad_token_id. Records every call's keyword arguments.
    """

    def __init__(self, tokenizer: CharTokenizer, reply):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # gives the evaluator a device to read
        self.tokenizer, self.reply = tokenizer, reply
        self.calls: list[dict] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **kwargs):
        self.calls.append(dict(kwargs, input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens))
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            tokens = self.tokenizer.encode(self.reply(prompt)) + [eos_token_id] + self.tokenizer.encode("99")
            rows.append(tokens[:max_new_tokens])
        width = max(len(r) for r in rows)
        new = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            new[i, : len(r)] = torch.tensor(r)
        return torch.cat([input_ids, new], dim=1)


ANSWERS = {"1+1=": "2", "10+20=": "30", "7-9=": "-2", "50+50=": "100"}


def arithmetic_examples() -> list[Example]:
    return [Example(prompt, answer) for prompt, answer in ANSWERS.items()]


def test_accuracy_and_reward_are_exact():
    tokenizer = CharTokenizer()
    # Right on three of four; the wrong answer "x0" has one digit in two characters.
    model = ScriptedModel(tokenizer, lambda p: "x0" if p == "10+20=" else ANSWERS[p])
    result = evaluate(model, tokenizer, get_task("arithmetic"), arithmetic_examples(), batch_size=3,
                      max_new_tokens=8, progress=False)
    assert isinstance(result, EvalResult)
    assert result.accuracy == 0.75 and result.n == 4
    # reward = exact_match + 0.2 * digits_only: three times 1.2 ("-2" has one digit in two: 1 + 0.1), once 0.1.
    assert result.mean_reward == pytest.approx((1.2 + 0.1 + 1.1 + 1.2) / 4, abs=1e-6)
    assert result.seconds >= 0
    # Two generate calls (3 + 1 prompts), greedy with the KV cache, prompts left-padded.
    assert [c["input_ids"].shape[0] for c in model.calls] == [3, 1]
    first = model.calls[0]
    assert first["do_sample"] is False and first["use_cache"] is True and first["max_new_tokens"] == 8
    assert (first["attention_mask"][:, -1] == 1).all() and (first["attention_mask"][:, 0] == 0).any()


def test_result_does_not_depend_on_order_or_batch_size():
    tokenizer = CharTokenizer()
    model = ScriptedModel(tokenizer, lambda p: "x0" if p == "7-9=" else ANSWERS[p])
    task = get_task("arithmetic")
    results = [evaluate(model, tokenizer, task, examples, batch_size=size, max_new_tokens=8, progress=False)
               for examples, size in [(arithmetic_examples(), 64), (arithmetic_examples()[::-1], 1)]]
    assert [(r.accuracy, r.mean_reward, r.n) for r in results] == [(results[0].accuracy, results[0].mean_reward, 4)] * 2
    assert results[0].accuracy == 0.75


def test_completions_are_cut_at_eos():
    tokenizer = CharTokenizer()
    model = ScriptedModel(tokenizer, lambda p: "ok")
    assert greedy_completions(model, tokenizer, ["a", "bcd"], max_new_tokens=6) == ["ok", "ok"]


def test_batched_greedy_equals_one_by_one_on_a_tiny_model():
    model, tokenizer = load_model("tiny", seed=3)
    prompts = [e.prompt for e in eval_examples(get_task("arithmetic"), 6, seed=1)] + ["1+1="]
    batched = greedy_completions(model, tokenizer, prompts, max_new_tokens=5)
    single = [greedy_completions(model, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == single


def test_environment_task_plays_greedy_episodes():
    task = get_task("agent")
    examples = eval_examples(task, 6, seed=0)
    tokenizer = CharTokenizer()

    def oracle(prompt: str) -> str:
        at, key, door = re.match(r"at (\d+); key at (\S+); door at (\d+)", prompt).groups()
        target = int(door) if key == "-" else int(key)
        if int(at) != target:
            return "right" if target > int(at) else "left"
        return "open" if key == "-" else "pick"

    solved = evaluate(ScriptedModel(tokenizer, oracle), tokenizer, task, examples, batch_size=4, max_new_tokens=6,
                      progress=False)
    assert (solved.accuracy, solved.mean_reward, solved.n) == (1.0, 1.0, 6)
    stuck = evaluate(ScriptedModel(tokenizer, lambda p: "wait"), tokenizer, task, examples, max_new_tokens=6,
                     progress=False)
    assert (stuck.accuracy, stuck.mean_reward) == (0.0, 0.0)


@pytest.mark.parametrize("kwargs, message", [(dict(examples=[]), "at least one"), (dict(batch_size=0), ">= 1")])
def test_bad_arguments(kwargs, message):
    tokenizer = CharTokenizer()
    args = dict(examples=arithmetic_examples(), batch_size=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        evaluate(ScriptedModel(tokenizer, lambda p: "1"), tokenizer, get_task("arithmetic"), progress=False, **args)
