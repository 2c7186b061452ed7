"""Sampling completions with HF `generate` (KV cache) and building completion masks."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

from .batch import first_mixed_group
from .layout import attention_mask_for, position_ids_from_mask
from .sampling import greedy_tokens, keyed_uniform, sample_tokens


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


# ------------------------------------------------------------------------------------------------ lanes
class _KeyValues:
    """The keys and values one decoder layer has seen for one block of rows: what its attention appends to
    (the one cache method the decoder layers call is `update`).

    They live in a buffer with room for `capacity` positions, so that a decode step writes its one new
    position in place instead of concatenating (which copies the whole cache at every step: quadratic in
    the completion length); attention reads a view of the filled part.
    """

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self.length = 0
        self.keys: Tensor | None = None  # (rows, heads, room, head_dim) buffers
        self.values: Tensor | None = None

    def _grow(self, keys: Tensor, values: Tensor, room: int) -> None:
        """New buffers like `keys` / `values` with `room` positions, holding what is filled so far."""
        old_keys, old_values = self.keys, self.values
        self.keys = keys.new_empty(*keys.shape[:-2], room, keys.shape[-1])
        self.values = values.new_empty(*values.shape[:-2], room, values.shape[-1])
        if old_keys is not None:
            self.keys[..., :self.length, :] = old_keys[..., :self.length, :]
            self.values[..., :self.length, :] = old_values[..., :self.length, :]

    def update(self, keys: Tensor, values: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        end = self.length + keys.shape[-2]
        room = 0 if self.keys is None else self.keys.shape[-2]
        if end > room:
            self._grow(keys, values, max(end, self.capacity, 2 * room))
        self.keys[..., self.length:end, :] = keys
        self.values[..., self.length:end, :] = values
        self.length = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def keep_rows(self, index: Tensor) -> None:
        """Only the rows `index` (those still decoding) from now on."""
        self.keys = self.keys.index_select(0, index)
        self.values = self.values.index_select(0, index)

    def repeat_rows(self, times: int) -> None:
        # the whole buffer, room included: one copy, and the repeated rows keep room to decode into
        self.keys = self.keys.repeat_interleave(times, dim=0)
        self.values = self.values.repeat_interleave(times, dim=0)


class _LaneDecoder:
    """The forward of a LanePolicy's model with a KV cache per (layer, block of rows): at layer j the rows of
    the lanes that train j run through their own copies, every other row through the shared layer j."""

    def __init__(self, policy, rows_per_lane: int, positions: int = 0):
        self.policy = policy
        self.positions = positions  # the KV caches' room: prompt width + new tokens
        # lane k's rows are starts[k]:starts[k+1]; lanes lose rows as they finish (keep_rows)
        self.starts = [k * rows_per_lane for k in range(policy.num_lanes + 1)]
        decoder = policy.decoder
        self.cache_name = cache_argument(policy.model)  # the layers take the cache under the model's name for it
        self.impl = getattr(policy.model.config, "_attn_implementation", None) or "eager"
        if self.impl not in ("sdpa", "eager"):
            raise NotImplementedError(f"lane generation runs on attention implementations 'sdpa' and 'eager'; "
                                      f"the model uses {self.impl!r}")
        self.window = getattr(policy.model.config, "sliding_window", None)
        self.caches = [dict() for _ in decoder.layers]

    def repeat_rows(self, times: int) -> None:
        """Every cached block repeated row by row (a group's prompt prefill shared by its rows)."""
        self.starts = [start * times for start in self.starts]
        for per_layer in self.caches:
            for kv in per_layer.values():
                kv.repeat_rows(times)

    def keep_rows(self, keep: Tensor) -> None:
        """Drop the rows where `keep` (over the current rows) is False from every cached block, so that rows
        which finished stop costing compute; each block keeps its own rows' share of `keep`."""
        starts = self.starts
        for j, per_layer in enumerate(self.caches):
            own = self.policy.lanes_at(j)
            a, b = starts[own.start], starts[own.stop]
            for block, kv in per_layer.items():
                if block == "shared":
                    kept = torch.cat([keep[:a], keep[b:]]) if own else keep
                else:
                    kept = keep[starts[block]:starts[block + 1]]
                kv.keep_rows(kept.nonzero().squeeze(1))
        counts = [int(keep[starts[k]:starts[k + 1]].sum()) for k in range(len(starts) - 1)]
        self.starts = [0]
        for count in counts:
            self.starts.append(self.starts[-1] + count)

    def _masks(self, allowed: Tensor, key_positions: Tensor, query_positions: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
        masks = {}
        for kind in set(self.policy.layer_types):
            kind_allowed = allowed
            if kind == "sliding_attention" and self.window is not None:
                kind_allowed = allowed & ((query_positions[:, None, :, None] - key_positions[:, None, None, :]) < self.window)
            elif kind not in ("full_attention", "sliding_attention"):
                raise NotImplementedError(f"lane generation does not support layer type {kind!r}")
            masks[kind] = attention_mask_for(kind_allowed, self.impl, dtype)
        return masks

    def forward(self, ids: Tensor, allowed: Tensor, positions: Tensor, key_positions: Tensor) -> Tensor:
        """ids (R, q) new tokens; allowed (R, 1, q, keys) which keys each may see; positions (R, q) theirs and
        key_positions (R, keys) all keys'. Returns the normed hidden state of each row's last new token."""
        policy, starts = self.policy, self.starts
        hidden = policy.decoder.embed_tokens(ids)
        cos, sin = policy.decoder.rotary_emb(hidden, positions)
        masks = self._masks(allowed, key_positions, positions, hidden.dtype)
        for j, layer in enumerate(policy.decoder.layers):
            kind = policy.layer_types[j]
            own = policy.lanes_at(j)
            inputs = (hidden, masks[kind], cos, sin, positions)
            if not own:
                hidden = self._call(layer, j, "shared", *inputs)
                continue
            # The lanes training j hold rows a:b; every other row runs through the shared layer j in one call.
            a, b = starts[own.start], starts[own.stop]
            spans = [s for s in (slice(0, a), slice(b, hidden.shape[0])) if s.start < s.stop]
            parts = [self._call(policy.lane_layers[k], j, k, *(x[starts[k]:starts[k + 1]] for x in inputs))
                     for k in own if starts[k] < starts[k + 1]]  # a lane whose rows all finished is skipped
            if spans:
                take = (lambda x: x[spans[0]]) if len(spans) == 1 else (lambda x: torch.cat([x[s] for s in spans]))
                shared = self._call(layer, j, "shared", *(take(x) for x in inputs))
                parts = [shared[:a], *parts, shared[a:]]
            hidden = torch.cat(parts)
        return policy.decoder.norm(hidden[:, -1])

    def _call(self, module, j: int, block, hidden: Tensor, mask: Tensor, cos: Tensor, sin: Tensor, positions: Tensor) -> Tensor:
        kv = self.caches[j].get(block)
        if kv is None:
            kv = self.caches[j][block] = _KeyValues(self.positions)
        out = module(hidden, attention_mask=mask, position_ids=positions, position_embeddings=(cos, sin),
                     use_cache=True, **{self.cache_name: kv})
        return out[0] if isinstance(out, tuple) else out


@dataclass(frozen=True)
class DrawKeys:
    """What keys each sampled token's random draw (sampling.keyed_uniform): every lane's seed and the step;
    a row's prompt group and place in it come from where it sits among its lane's rows."""

    seeds: tuple[int, ...]  # one per lane, in the lane batch's order
    step: int
    # the step-wide index of the rows' first prompt group: a data-parallel rank samples the groups
    # first_group, first_group + 1, ... of the step, and draws what one process sampling them all would draw
    first_group: int = 0


@torch.no_grad()
def generate_lanes(policy, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int, eos_token_id: int,
                   pad_token_id: int, keys: DrawKeys | None = None, temperature: float = 1.0, top_p: float = 1.0,
                   group_size: int = 1) -> tuple[Tensor, Tensor]:
    """Completions of every lane of a LanePolicy at once: rows laid out lane by lane (policy.lanes order),
    the same number per lane; keys=None decodes greedily. -> completion_ids (R, C) padded with pad_token_id,
    completion_mask (R, C).

    Each token is drawn by inverse-CDF sampling from keyed_uniform(lane seed, step, group, row in group,
    position), so a lane gets the tokens it would get alone, wherever its rows sit. Groups of `group_size`
    rows with one prompt prefill it once (the KV cache is then repeated to the group's rows). A row that
    samples EOS leaves the batch (and the KV caches) at once, so decoding costs what the unfinished rows need.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    rows_total = prompt_ids.shape[0]
    lanes = policy.num_lanes
    if rows_total % lanes != 0:
        raise ValueError(f"{rows_total} rows do not split evenly into {lanes} lanes")
    rows = rows_total // lanes
    if keys is not None and len(keys.seeds) != lanes:
        raise ValueError(f"{lanes} lanes need {lanes} seeds, got {len(keys.seeds)}")
    device = prompt_ids.device
    shared = group_size > 1 and rows % group_size == 0 and grouped_prompts(prompt_ids, prompt_mask, group_size)
    repeat = group_size if shared else 1
    decoder = _LaneDecoder(policy, rows // repeat, prompt_ids.shape[1] + max_new_tokens)
    # prefill: each real prompt token sees the real tokens up to it; a padding query sees itself only, so no
    # attention row is empty (its output is never read)
    ids, mask = prompt_ids[::repeat], prompt_mask[::repeat].bool()
    width = ids.shape[1]
    positions = position_ids_from_mask(mask)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    allowed = (causal & mask[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device)
    state = decoder.forward(ids, allowed[:, None], positions, positions)
    if repeat > 1:
        decoder.repeat_rows(repeat)
        state = state.repeat_interleave(repeat, dim=0)
        mask, positions = prompt_mask.bool(), position_ids_from_mask(prompt_mask)
    weight = policy.lm_head_weight
    alive = torch.arange(rows_total, device=device)  # the rows still decoding, by their index in the batch
    if keys is not None:
        seed = torch.tensor(keys.seeds, device=device).repeat_interleave(rows)
        group, in_group = (alive % rows) // group_size + keys.first_group, alive % group_size
    next_position = mask.long().sum(-1)
    completion_ids = torch.full((rows_total, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        logits = state @ weight.T
        if keys is None:
            token = greedy_tokens(logits)
        else:
            token = sample_tokens(logits, keyed_uniform(seed, keys.step, group, in_group, t), temperature, top_p)
        completion_ids[alive, t] = token
        done = token == eos_token_id
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        if bool(done.any()):  # finished rows leave the batch: no lane pays for another's long completions
            keep = ~done
            decoder.keep_rows(keep)
            alive, token, state, mask, positions, next_position = (
                x[keep] for x in (alive, token, state, mask, positions, next_position))
            if keys is not None:
                seed, group, in_group = seed[keep], group[keep], in_group[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        query = next_position[:, None]
        positions = torch.cat([positions, query], dim=1)
        next_position = next_position + 1
        state = decoder.forward(token[:, None], mask[:, None, None, :], query, positions)
    completion_ids = completion_ids[:, :t + 1]
    completion_mask = completion_mask_after_eos(completion_ids, eos_token_id)
    return completion_ids.masked_fill(completion_mask == 0, pad_token_id), completion_mask


class _WholeModel:
    """A model as generate_lanes sees a LanePolicy of one lane that trains no layer copy of its own: every row
    runs through the model's own layers (which hold the policy being trained: OneLayerPolicy trains its layer in
    place, FullModelPolicy every weight)."""

    num_lanes = 1
    lane_layers = ()

    def __init__(self, model):
        from .layout import layer_types
        from .policy import decoder_of, lm_head_weight_of

        self.model = model
        self.decoder = decoder_of(model)
        self.layer_types = layer_types(model.config)
        self.lm_head_weight = lm_head_weight_of(model)

    def lanes_at(self, j: int) -> range:
        return range(0)


@torch.no_grad()
def sample_keyed(model, prompt_ids: Tensor, prompt_mask: Tensor, max_completion_length: int, eos_token_id: int,
                 pad_token_id: int, keys: DrawKeys, temperature: float = 1.0, top_p: float = 1.0,
                 group_size: int = 1) -> tuple[Tensor, Tensor]:
    """`sample_completions` with keyed draws: each token from keyed_uniform(seed, step, group, row in group,
    position) (keys: one seed; first_group the step-wide index of these rows' first group), so a prompt
    group's completions are the same whichever process, and whichever batch, samples it. -> completion_ids
    (B, C) padded with pad_token_id, completion_mask (B, C); C is the longest completion (at most
    max_completion_length)."""
    if len(keys.seeds) != 1:
        raise ValueError(f"sample_keyed takes one seed, got {len(keys.seeds)}")
    was_training = model.training
    model.eval()
    try:
        return generate_lanes(_WholeModel(model), prompt_ids, prompt_mask, max_completion_length, eos_token_id,
                              pad_token_id, keys=keys, temperature=temperature, top_p=top_p, group_size=group_size)
    finally:
        model.train(was_training)
