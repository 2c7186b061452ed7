"""RolloutBatch: the one record from rollout to update states its grouping once and refuses what is wrong."""
from __future__ import annotations

import pytest
import torch

from onelayer_fast.batch import RolloutBatch, first_mixed_group, packing_problem

G = 3


def fields(rows: int = 6, prompt: int = 4, completion: int = 5) -> dict:
    prompt_ids = torch.randint(1, 50, (rows // G, prompt)).repeat_interleave(G, 0)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[::G][0, 0] = 0  # left padding in group 0
    prompt_mask = prompt_mask[::G].repeat_interleave(G, 0)
    completion_mask = (torch.arange(completion) < torch.randint(1, completion + 1, (rows, 1))).long()
    return dict(prompt_ids=prompt_ids * prompt_mask, prompt_mask=prompt_mask,
                completion_ids=torch.randint(1, 50, (rows, completion)) * completion_mask,
                completion_mask=completion_mask, rewards=torch.rand(rows))


def test_grouped_batch_and_its_views():
    f = fields()
    batch = RolloutBatch(**f, group_size=G)
    assert batch.batch_size == 6 and batch.prompt_length == 4
    assert torch.equal(batch.input_ids, torch.cat([f["prompt_ids"], f["completion_ids"]], dim=1))
    assert torch.equal(batch.attention_mask, torch.cat([f["prompt_mask"], f["completion_mask"]], dim=1))
    assert batch.packing_problem is None
    moved = batch.to("cpu")
    assert moved.group_size == G and torch.equal(moved.rewards, batch.rewards)


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f.update(rewards=torch.rand(5)), "rewards must have shape"),
    (lambda f: f.update(completion_ids=torch.zeros(5, 5, dtype=torch.long)), "completion_ids and completion_mask"),
    (lambda f: f.update(completion_ids=f["completion_ids"][:5], completion_mask=f["completion_mask"][:5]),
     "6 prompt rows but 5 completion rows"),
    (lambda f: f.update(prompt_mask=f["prompt_mask"][:, :3]), "prompt_ids and prompt_mask"),
    (lambda f: f["prompt_ids"].__setitem__((4, -1), 99), r"group 1 \(rows 3..5\) holds different prompts"),
])
def test_bad_batches_are_refused(mutate, message):
    f = fields()
    mutate(f)
    with pytest.raises(ValueError, match=message):
        RolloutBatch(**f, group_size=G)


def test_rows_without_groups_need_advantages():
    f = fields()
    with pytest.raises(ValueError, match="needs per-row advantages"):
        RolloutBatch(**f)
    with pytest.raises(ValueError, match="advantages must have shape"):
        RolloutBatch(**f, advantages=torch.zeros(4))
    with pytest.raises(ValueError, match="whole groups"):
        RolloutBatch(**f, group_size=4)
    assert RolloutBatch(**f, advantages=torch.randn(6)).group_size is None


def test_first_mixed_group_and_packing_problem():
    f = fields()
    assert first_mixed_group(f["prompt_ids"], f["prompt_mask"], G) is None
    f["prompt_ids"][4, -1] += 1
    assert first_mixed_group(f["prompt_ids"], f["prompt_mask"], G) == 1
    assert "left-padded" in packing_problem(f["prompt_mask"].flip(1), f["completion_mask"])
    holes = f["completion_mask"].clone()
    holes[0] = torch.tensor([1, 0, 1, 0, 0])
    assert "1 up to and including EOS" in packing_problem(f["prompt_mask"], holes)
