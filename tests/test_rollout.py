"""Rollout sampling: a group's prompt prefilled once (shared KV cache) samples what per-row prefill samples."""
from __future__ import annotations

import pytest
import torch

from onelayer_fast.rollout import grouped_prompts, sample_completions, shared_prompt_cache

pytestmark = pytest.mark.usefixtures("torch_single_thread")

GROUP_SIZE = 3
PROMPT_LENGTHS = [6, 2, 4, 1]  # per group, left-padded to 6; the last group's prompt is one token
PAD, EOS = 0, 1


def grouped_batch(vocab: int, lengths=PROMPT_LENGTHS) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    mask = (torch.arange(width) >= width - torch.tensor(lengths).unsqueeze(1)).long()
    ids = torch.randint(2, vocab, (len(lengths), width)) * mask + PAD * (1 - mask)
    return ids.repeat_interleave(GROUP_SIZE, 0), mask.repeat_interleave(GROUP_SIZE, 0)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_shared_prefill_cache_holds_the_per_row_keys_and_values(arch, tiny_model):
    model = tiny_model(arch)
    ids, mask = grouped_batch(model.config.vocab_size)
    cache = shared_prompt_cache(model, ids, mask, GROUP_SIZE)
    assert cache is not None and cache.get_seq_length() == ids.shape[1] - 1
    # the reference: every row prefilled on its own, positions as generate assigns them
    from transformers import DynamicCache

    head, head_mask = ids[:, :-1], mask[:, :-1]
    positions = (head_mask.cumsum(-1) - 1).masked_fill(head_mask == 0, 1)
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=head, attention_mask=head_mask, position_ids=positions, cache=reference, use_cache=True)
    real = head_mask.bool()  # padded slots hold whatever the pad token computes; nothing attends to them
    for shared_layer, ref_layer in zip(cache.layers, reference.layers):
        for got, want in ((shared_layer.keys, ref_layer.keys), (shared_layer.values, ref_layer.values)):
            got, want = got.transpose(1, 2)[real], want.transpose(1, 2)[real]  # (real tokens, heads, dim)
            assert got.abs().max() > 0.1
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_shared_prefill_samples_what_per_row_prefill_samples(arch, tiny_model):
    model = tiny_model(arch)
    ids, mask = grouped_batch(model.config.vocab_size)
    kwargs = dict(max_completion_length=7, eos_token_id=EOS, pad_token_id=PAD)
    greedy_plain = sample_completions(model, ids, mask, do_sample=False, **kwargs)
    greedy_shared = sample_completions(model, ids, mask, do_sample=False, group_size=GROUP_SIZE, **kwargs)
    for plain, shared in zip(greedy_plain, greedy_shared):
        assert torch.equal(plain, shared)
    # Sampling draws the same random numbers in the same order; logits agree to float rounding, so the
    # same seed gives the same tokens.
    torch.manual_seed(7)
    sampled_plain = sample_completions(model, ids, mask, temperature=0.9, **kwargs)
    torch.manual_seed(7)
    sampled_shared = sample_completions(model, ids, mask, temperature=0.9, group_size=GROUP_SIZE, **kwargs)
    assert torch.equal(sampled_plain[0], sampled_shared[0])
    # the group's rows sampled independently: not all copies of one another
    assert any(not torch.equal(g[0], g[1]) for g in sampled_shared[0].view(-1, GROUP_SIZE, 7))


def test_shared_prefill_applies_only_to_prompt_groups(tiny_model):
    model = tiny_model("qwen2")
    ids, mask = grouped_batch(model.config.vocab_size)
    assert grouped_prompts(ids, mask, GROUP_SIZE)
    assert shared_prompt_cache(model, ids, mask, 1) is None  # no groups
    assert shared_prompt_cache(model, ids[:-1], mask[:-1], GROUP_SIZE) is None  # not whole groups
    mixed = ids.clone()
    mixed[4, -1] = (mixed[4, -1] + 1) % model.config.vocab_size  # row 4 leaves group 1
    assert not grouped_prompts(mixed, mask, GROUP_SIZE)
    assert shared_prompt_cache(model, mixed, mask, GROUP_SIZE) is None
    single = ids[:, -1:], mask[:, -1:]  # one prompt token: nothing to prefill before generate's first step
    assert shared_prompt_cache(model, *single, GROUP_SIZE) is None
    # and sample_completions still works on all of these (plain prefill)
    out, out_mask = sample_completions(model, mixed, mask, 3, EOS, PAD, group_size=GROUP_SIZE)
    assert out.shape == out_mask.shape == (mixed.shape[0], 3)


@pytest.mark.parametrize("capacity", [0, 3, 64])
def test_lane_kv_cache_buffer_equals_concatenation(capacity):
    """The lane decoder's preallocated KV buffer returns what concatenating every update gives, whether it
    has room from the start (capacity 64), must grow once (3) or grows at every step (0); repeat_rows
    repeats each row in place."""
    from onelayer_fast.rollout import _KeyValues

    torch.manual_seed(3)
    cache, keys, values = _KeyValues(capacity), [], []
    for width in (5, 1, 1, 2, 1):
        k, v = torch.randn(3, 2, width, 4), torch.randn(3, 2, width, 4)
        keys.append(k)
        values.append(v)
        got_k, got_v = cache.update(k, v, 0)
        assert torch.equal(got_k, torch.cat(keys, dim=-2)) and torch.equal(got_v, torch.cat(values, dim=-2))
    cache.repeat_rows(2)
    k, v = torch.randn(6, 2, 1, 4), torch.randn(6, 2, 1, 4)
    got_k, got_v = cache.update(k, v, 0)
    assert torch.equal(got_k, torch.cat([torch.cat(keys, dim=-2).repeat_interleave(2, dim=0), k], dim=-2))
    assert torch.equal(got_v, torch.cat([torch.cat(values, dim=-2).repeat_interleave(2, dim=0), v], dim=-2))
