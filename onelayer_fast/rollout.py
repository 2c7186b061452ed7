"""Sampling completions with HF `generate` (KV cache) and building completion masks."""
from __future__ import annotations

import inspect

import torch
from torch import Tensor

from .batch import first_mixed_group


def encode_prompts(tokenizer, prompts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-padded prompt ids and mask (B, P).

    With a tokenizer that has a chat template (an instruct model), each prompt becomes one user turn
    followed by the generation prompt. Tasks stay tokenizer-free, and the trainer, the evaluator and
    the episode runner all see the same formatting because they all come through here.
    """
    if getattr(tokenizer, "chat_template", None):
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                   for p in prompts]
    encoded = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


def completion_mask_after_eos(completion_ids: Tensor, eos_token_id: int) -> Tensor:
    """1 for every token up to and including the first EOS, 0 after it (TRL's convention)."""
    is_eos = completion_ids == eos_token_id
    length = completion_ids.shape[1]
    first_eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), torch.full_like(is_eos[:, 0], length, dtype=torch.long))
    positions = torch.arange(length, device=completion_ids.device).unsqueeze(0)
    return (positions <= first_eos.unsqueeze(1)).long()


def cache_argument(model) -> str:
    """The name under which `model` (and its `generate`) takes a KV cache: `cache` since transformers 5.x
    renamed it, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def grouped_prompts(prompt_ids: Tensor, prompt_mask: Tensor, group_size: int) -> bool:
    """True when the rows are whole groups of `group_size` (>= 2) consecutive copies of one prompt: the
    grouping a RolloutBatch's group_size states (batch.first_mixed_group)."""
    if group_size < 2 or prompt_ids.shape[0] % group_size != 0:
        return False
    return first_mixed_group(prompt_ids, prompt_mask, group_size) is None


@torch.no_grad()
def shared_prompt_cache(model, prompt_ids: Tensor, prompt_mask: Tensor, group_size: int):
    """The KV cache of all prompt tokens but the last, computed once per group and repeated to every row;
    None (plain generate) when the rows are not prompt groups or the prompt has a single token.

    The G rows of a group would otherwise each prefill the same prompt. `generate` continues from this cache
    (it feeds the last prompt token, then samples as usual); positions are what generate assigns
    (cumsum(mask) - 1, padding at 1), so the cache holds the same keys and values as a per-row prefill.
    """
    from transformers import DynamicCache

    if prompt_ids.shape[1] < 2 or not grouped_prompts(prompt_ids, prompt_mask, group_size):
        return None
    ids, mask = prompt_ids[::group_size, :-1], prompt_mask[::group_size, :-1]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_argument(model): cache})
    cache.batch_repeat_interleave(group_size)
    return cache


@torch.no_grad()
def sample_completions(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    max_completion_length: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    group_size: int = 1,
) -> tuple[Tensor, Tensor]:
    """-> completion_ids (B, C) padded with pad_token_id, completion_mask (B, C).

    group_size: rows come in groups of this many consecutive copies of one prompt (GRPO's num_generations);
    then each prompt is prefilled once and its KV cache shared by the group (see shared_prompt_cache).
    """
    was_training = model.training
    model.eval()
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample else {}
    cache = shared_prompt_cache(model, prompt_ids, prompt_mask, group_size)
    output = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=max_completion_length,
        do_sample=do_sample,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
        **({cache_argument(model): cache} if cache is not None else {}),
        **sampling,
    )
    model.train(was_training)
    completion_ids = output[:, prompt_ids.shape[1]:]
    mask = completion_mask_after_eos(completion_ids, eos_token_id)
    completion_ids = completion_ids.masked_fill(mask == 0, pad_token_id)
    return completion_ids, mask
