"""`RolloutBatch`: the one record that travels from rollout to update.

Rows are completions. Single-turn rollouts come in groups: `group_size` consecutive rows share one
prompt (GRPO's num_generations), and the loss normalizes `rewards` within each group. Multi-turn
episode rows (one row per environment step) have no such grouping: `group_size` is None and
`advantages` holds each row's advantage, computed where the rewards were known (advantages.py).
Whoever builds the batch states the grouping once; nothing downstream re-derives it from the tensors.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


def first_mixed_group(prompt_ids: Tensor, prompt_mask: Tensor, group_size: int) -> int | None:
    """The first group of `group_size` consecutive rows whose prompts differ (real tokens or mask), or None when
    every group shares one prompt. The rows must be whole groups (prompt_ids.shape[0] % group_size == 0)."""
    rows = prompt_ids.shape[0]
    ids = (prompt_ids * prompt_mask.to(prompt_ids.dtype)).view(rows // group_size, group_size, -1)
    mask = prompt_mask.view(rows // group_size, group_size, -1)
    same = (ids == ids[:, :1]).all(dim=2) & (mask == mask[:, :1]).all(dim=2)
    return None if bool(same.all()) else int((~same).any(dim=1).nonzero()[0])


def check_prompt_groups(prompt_ids: Tensor, prompt_mask: Tensor, group_size: int) -> None:
    """Raise ValueError unless the rows are whole groups of `group_size` consecutive copies of one prompt."""
    rows = prompt_ids.shape[0]
    if group_size < 1 or rows % group_size != 0:
        raise ValueError(f"the batch ({rows} rows) must be whole groups of group_size={group_size} rows")
    bad = first_mixed_group(prompt_ids, prompt_mask, group_size)
    if bad is not None:
        first, last = bad * group_size, (bad + 1) * group_size - 1
        raise ValueError(f"the {group_size} rows of each group must share one prompt, but group {bad} "
                         f"(rows {first}..{last}) holds different prompts")


def packing_problem(prompt_mask: Tensor, completion_mask: Tensor) -> str | None:
    """Why the rows cannot be packed (layout.py), or None: packed layouts need left-padded prompts with at
    least one real token per row (it predicts the first completion token) and completion masks of the form
    1...10...0 (1 up to and including EOS), as rollout.py produces them."""
    pm, cm = prompt_mask.bool(), completion_mask.bool()
    if pm.shape[1] == 0 or not bool(pm[:, -1].all()) or not torch.equal(pm, pm.int().cummax(dim=1).values.bool()):
        return ("packed layouts need left-padded prompts with at least one real token per row "
                "(prompt_mask of the form 0...01...1)")
    if not torch.equal(cm, cm.int().cummin(dim=1).values.bool()):
        return "packed layouts need completion masks of the form 1...10...0 (1 up to and including EOS)"
    return None


@dataclass
class RolloutBatch:
    """Sampled completions, their rewards, and how the rows are grouped.

    group_size: G when the rows are groups of G consecutive completions of one prompt (checked once, here);
    None for rows without prompt groups (multi-turn episode steps), which must then carry `advantages`.
    advantages: (B,) per-row advantages used as given by the loss (then `rewards` are only reported).
    """

    prompt_ids: Tensor  # (B, P) left-padded
    prompt_mask: Tensor  # (B, P)
    completion_ids: Tensor  # (B, C)
    completion_mask: Tensor  # (B, C) 1 up to and including EOS
    rewards: Tensor  # (B,)
    group_size: int | None = None
    advantages: Tensor | None = None  # (B,)

    def __post_init__(self) -> None:
        if self.prompt_ids.dim() != 2 or self.prompt_mask.shape != self.prompt_ids.shape:
            raise ValueError(f"prompt_ids and prompt_mask must be (batch, prompt_tokens) of one shape, got "
                             f"{tuple(self.prompt_ids.shape)} and {tuple(self.prompt_mask.shape)}")
        if self.completion_ids.dim() != 2 or self.completion_mask.shape != self.completion_ids.shape:
            raise ValueError(f"completion_ids and completion_mask must be (batch, completion_tokens) of one shape, "
                             f"got {tuple(self.completion_ids.shape)} and {tuple(self.completion_mask.shape)}")
        rows = self.prompt_ids.shape[0]
        if self.completion_ids.shape[0] != rows:
            raise ValueError(f"{rows} prompt rows but {self.completion_ids.shape[0]} completion rows")
        if self.rewards.shape != (rows,):
            raise ValueError(f"rewards must have shape ({rows},), got {tuple(self.rewards.shape)}")
        if self.advantages is not None and self.advantages.shape != (rows,):
            raise ValueError(f"advantages must have shape ({rows},), got {tuple(self.advantages.shape)}")
        if self.group_size is None:
            if self.advantages is None:
                raise ValueError("a RolloutBatch without group_size needs per-row advantages")
        else:
            check_prompt_groups(self.prompt_ids, self.prompt_mask, self.group_size)

    @property
    def batch_size(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def prompt_length(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids.to(self.prompt_ids.dtype)], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask.to(self.prompt_mask.dtype)], dim=1)

    @cached_property
    def packing_problem(self) -> str | None:
        """Why the rows cannot run in a packed layout, or None (computed once per batch)."""
        return packing_problem(self.prompt_mask, self.completion_mask)

    def to(self, device: torch.device | str) -> "RolloutBatch":
        moved = {name: getattr(self, name).to(device) for name in
                 ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "rewards")}
        advantages = None if self.advantages is None else self.advantages.to(device)
        return RolloutBatch(**moved, group_size=self.group_size, advantages=advantages)


def truncated_rows(completion_ids: Tensor, completion_mask: Tensor, end_token_ids) -> Tensor:
    """(B,) True for the rows whose completion was cut off: its last unmasked token is none of `end_token_ids`
    (EOS, and pad as TRL counts it), so it ran into max_completion_length. Masks are 1...10...0 (rollout.py);
    a row without tokens is not truncated (it has nothing to mask)."""
    lengths = completion_mask.sum(dim=1).long()
    last = completion_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    ends = torch.tensor(sorted({int(t) for t in end_token_ids if t is not None}), dtype=last.dtype, device=last.device)
    return ~torch.isin(last, ends) & (lengths > 0)


def mask_truncated(batch: RolloutBatch, end_token_ids) -> tuple[RolloutBatch, Tensor]:
    """TRL's mask_truncated_completions: (the batch with the completion mask of every truncated row zeroed, so
    those rows count in neither the loss nor its token normalizers, the truncated rows (B,) bool). Their rewards
    (and advantages) stay: they still take part in the group statistics, as in TRL."""
    truncated = truncated_rows(batch.completion_ids, batch.completion_mask, end_token_ids)
    mask = batch.completion_mask * (~truncated).unsqueeze(1).to(batch.completion_mask.dtype)
    return dataclasses.replace(batch, completion_mask=mask), truncated
