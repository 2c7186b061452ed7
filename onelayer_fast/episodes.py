"""Multi-turn rollouts: G episodes per start state in an environment task, flattened into one RolloutBatch.

An environment task is a Task that also has
    make_env() -> env          env.reset(example) -> observation; env.step(action_text) -> (observation, reward, done)
    prompt(observation) -> str the text the model sees on a turn
(`tasks/agent.py` is one). Every turn samples one completion (the action, at most
max_completion_length tokens) for each still-running episode in one batched `sample_completions`
call. Each step becomes one row of the batch: that turn's prompt + the sampled action tokens, with
its per-step advantage (GiGPO, or the episode's group-normalized return for GRPO / Dr. GRPO).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .advantages import StepRecord, advantages_for, episode_returns
from .batch import RolloutBatch
from .rollout import encode_prompts, sample_completions
from .tasks import Example


def is_environment_task(task) -> bool:
    return callable(getattr(task, "make_env", None)) and callable(getattr(task, "prompt", None))


@dataclass
class Episodes:
    """The steps of E = len(examples) * G episodes; episode e = group e // G, trajectory e % G."""

    steps: list[StepRecord]  # in row order: turn by turn, running episodes in episode order
    prompts: list[str]  # (N,) the prompt of each step
    completion_ids: Tensor  # (N, C) padded with pad_token_id
    completion_mask: Tensor  # (N, C)
    transcripts: list[str]  # (E,) the decoded actions, one per line (newlines inside one made spaces)
    success: list[bool]  # (E,) task.correct(transcript, example)
    num_generations: int

    @property
    def returns(self) -> Tensor:
        """(E,) undiscounted return of each episode, in episode order."""
        return episode_returns(self.steps)

    @property
    def lengths(self) -> Tensor:
        """(E,) turns each episode took."""
        counts = torch.zeros(len(self.transcripts), dtype=torch.long)
        for step in self.steps:
            counts[step.group * self.num_generations + step.trajectory] += 1
        return counts


@torch.no_grad()
def run_episodes(
    model, tokenizer, task, examples: list[Example], num_generations: int, max_completion_length: int,
    temperature: float = 1.0, top_p: float = 1.0, do_sample: bool = True, device: torch.device | None = None,
) -> Episodes:
    """Play num_generations episodes from each example's start state; every turn is one batched generate."""
    device = device or next(model.parameters()).device
    episodes = len(examples) * num_generations
    envs = [task.make_env() for _ in range(episodes)]
    observations = [env.reset(examples[e // num_generations]) for e, env in enumerate(envs)]
    turns = [0] * episodes
    lines: list[list[str]] = [[] for _ in range(episodes)]
    running = list(range(episodes))
    steps: list[StepRecord] = []
    prompts: list[str] = []
    rows: list[tuple[Tensor, Tensor]] = []
    while running:
        turn_prompts = [task.prompt(observations[e]) for e in running]
        prompt_ids, prompt_mask = encode_prompts(tokenizer, turn_prompts, device)
        completion_ids, completion_mask = sample_completions(
            model, prompt_ids, prompt_mask, max_completion_length, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, temperature=temperature, top_p=top_p, do_sample=do_sample,
        )
        actions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        still_running = []
        for row, e in enumerate(running):
            observation, reward, done = envs[e].step(actions[row])
            steps.append(StepRecord(group=e // num_generations, trajectory=e % num_generations, index=turns[e],
                                    observation=observations[e], reward=float(reward)))
            prompts.append(turn_prompts[row])
            rows.append((completion_ids[row], completion_mask[row]))
            lines[e].append(actions[row].replace("\n", " "))  # one action per transcript line
            observations[e] = observation
            turns[e] += 1
            if not done:
                still_running.append(e)
        running = still_running
    width = max(ids.shape[0] for ids, _ in rows)
    all_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long, device=device)
    all_mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for r, (ids, mask) in enumerate(rows):
        all_ids[r, : ids.shape[0]] = ids
        all_mask[r, : mask.shape[0]] = mask
    transcripts = ["\n".join(l) for l in lines]
    success = [task.correct(t, examples[e // num_generations]) for e, t in enumerate(transcripts)]
    return Episodes(steps, prompts, all_ids, all_mask, transcripts, success, num_generations)


def episode_batch(tokenizer, episodes: Episodes, config, device: torch.device) -> RolloutBatch:
    """One RolloutBatch whose rows are all the steps, with per-step advantages for `config.algo`.

    `rewards` holds each step's own reward r_t; the loss uses `advantages` only.
    """
    prompt_ids, prompt_mask = encode_prompts(tokenizer, episodes.prompts, device)
    rewards = torch.tensor([s.reward for s in episodes.steps], dtype=torch.float32, device=device)
    advantages = advantages_for(config, episodes.steps).to(device)
    return RolloutBatch(prompt_ids, prompt_mask, episodes.completion_ids, episodes.completion_mask, rewards,
                        group_size=None, advantages=advantages)
