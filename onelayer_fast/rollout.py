"""Sampling completions with HF `generate` (KV cache) and building completion masks."""
from __future__ import annotations

import torch
from torch import Tensor


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
) -> tuple[Tensor, Tensor]:
    """-> completion_ids (B, C) padded with pad_token_id, completion_mask (B, C)."""
    was_training = model.training
    model.eval()
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample else {}
    output = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=max_completion_length,
        do_sample=do_sample,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
        **sampling,
    )
    model.train(was_training)
    completion_ids = output[:, prompt_ids.shape[1]:]
    mask = completion_mask_after_eos(completion_ids, eos_token_id)
    completion_ids = completion_ids.masked_fill(mask == 0, pad_token_id)
    return completion_ids, mask
