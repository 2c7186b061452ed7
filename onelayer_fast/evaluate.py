"""Greedy evaluation of a model on a task's held-out examples: the one evaluator a sweep uses for Base,
Full and every Single(i), so their scores differ only by the weights.

    result = evaluate(model, tokenizer, task, eval_examples(task, 200, seed=0))
    result.accuracy      # mean of task.correct(completion, example)
    result.mean_reward   # mean of the weighted reward sum the trainer optimizes (tasks.rewards.score)
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .episodes import is_environment_task, run_episodes
from .rollout import encode_prompts, sample_completions
from .tasks import Example, Task
from .tasks.rewards import score

DEFAULT_MAX_NEW_TOKENS = 512  # GRPOConfig.max_completion_length's default (TRL's)


@dataclass(frozen=True)
class EvalResult:
    accuracy: float  # share of examples with task.correct(completion, example)
    mean_reward: float  # mean over examples of sum_k weight_k * reward_func_k(completion, example)
    n: int  # examples evaluated
    seconds: float  # wall-clock time of the evaluation
    # Per example, in the order of the examples given: what a paired bootstrap over problems resamples.
    correct: tuple[int, ...] = ()  # 1 where task.correct
    rewards: tuple[float, ...] = ()  # the weighted reward sum

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):  # a stub without parameters
        return torch.device("cpu")


def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions of a batch of prompts: left padding, KV cache (HF generate), cut at the first EOS."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, _device_of(model))
    completion_ids, _ = sample_completions(
        model, prompt_ids, prompt_mask, max_new_tokens, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )  # tokens after the first EOS are already replaced by padding
    return tokenizer.batch_decode(completion_ids, skip_special_tokens=True)


def _check_eval_args(examples: list[Example], batch_size: int, max_new_tokens: int) -> None:
    if not examples:
        raise ValueError("evaluate needs at least one example")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")


def _scored(task: Task, completions: list[str], examples: list[Example], seconds: float) -> EvalResult:
    """Accuracy (task.correct) and mean reward (the trainer's weighted reward sum) of one completion per example."""
    correct = tuple(int(bool(task.correct(c, e))) for c, e in zip(completions, examples))
    rewards = torch.from_numpy(score(task, completions, examples))  # torch's float32 mean, as before
    return EvalResult(accuracy=sum(correct) / len(examples), mean_reward=float(rewards.mean()), n=len(examples),
                      seconds=seconds, correct=correct, rewards=tuple(float(r) for r in rewards.tolist()))


def evaluate(
    model,
    tokenizer,
    task: Task,
    examples: list[Example],
    batch_size: int = 64,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = True,
) -> EvalResult:
    """Greedy-decode every example once and score it with the task.

    Examples are batched in order of prompt length (less left padding); the result does not depend on
    the order of `examples`. Environment tasks (episodes.is_environment_task: `make_env`, `prompt`) play
    one greedy episode per example instead, each turn's action at most max_new_tokens tokens. Raises ValueError for no examples or a batch_size / max_new_tokens < 1.
    """
    _check_eval_args(examples, batch_size, max_new_tokens)
    if is_environment_task(task):  # multi-turn: make_env() -> env with reset / step
        return _evaluate_environment(model, tokenizer, task, examples, batch_size, max_new_tokens, progress)
    started = time.perf_counter()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))  # stable: ties keep input order
    completions: list[str] = [""] * len(examples)
    with tqdm(total=len(examples), desc="eval", unit="ex", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            texts = greedy_completions(model, tokenizer, [examples[i].prompt for i in chunk], max_new_tokens)
            for i, text in zip(chunk, texts):
                completions[i] = text
            bar.update(len(chunk))
    return _scored(task, completions, examples, time.perf_counter() - started)


def _evaluate_environment(model, tokenizer, task, examples, batch_size, max_new_tokens, progress) -> EvalResult:
    """One greedy episode per example (`episodes.run_episodes`, num_generations=1, do_sample=False);
    the transcript (one action per line) is what task.correct and the reward functions score."""
    started = time.perf_counter()
    transcripts: list[str] = []
    with tqdm(total=len(examples), desc="eval episodes", unit="ep", disable=not progress, leave=False) as bar:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            episodes = run_episodes(model, tokenizer, task, chunk, num_generations=1,
                                    max_completion_length=max_new_tokens, do_sample=False, device=_device_of(model))
            transcripts.extend(episodes.transcripts)
            bar.update(len(chunk))
    return _scored(task, transcripts, examples, time.perf_counter() - started)


def evaluate_lanes(policy, tokenizer, task: Task, examples: list[Example], batch_size: int = 64,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, progress: bool = True) -> list[EvalResult]:
    """`evaluate` for every lane of a LanePolicy at once (one EvalResult per lane, in policy.lanes order):
    each batch of `batch_size` examples runs once per lane in one greedy generation (rollout.generate_lanes).
    Each lane's `seconds` is its share of the wall time. Single-turn tasks only."""
    from .rollout import generate_lanes

    _check_eval_args(examples, batch_size, max_new_tokens)
    if is_environment_task(task):
        raise ValueError(f"lanes evaluate single-turn tasks; {task.name!r} is an environment task")
    started = time.perf_counter()
    lanes = policy.num_lanes
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
    completions = [[""] * len(examples) for _ in range(lanes)]
    device = policy.lm_head_weight.device
    with tqdm(total=len(examples), desc=f"eval {lanes} lanes", unit="ex", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            prompt_ids, prompt_mask = encode_prompts(tokenizer, [examples[i].prompt for i in chunk], device)
            ids, _ = generate_lanes(policy, prompt_ids.repeat(lanes, 1), prompt_mask.repeat(lanes, 1), max_new_tokens,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
            for k in range(lanes):
                for i, text in zip(chunk, texts[k * len(chunk):(k + 1) * len(chunk)]):
                    completions[k][i] = text
            bar.update(len(chunk))
    seconds = (time.perf_counter() - started) / lanes
    return [_scored(task, lane_completions, examples, seconds) for lane_completions in completions]
