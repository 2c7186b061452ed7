"""Less work per token: shared-prompt groups and padding-free packing of a rollout batch.

The padded layout runs every row as [left-padded prompt | completion padded to C]: each row recomputes
its group's prompt in every layer, and pad tokens cost as much as real ones. Two packed layouts drop
that work and give the same loss and gradients (tests/test_packing.py):

    "packed"         each row's real prompt + real completion tokens become one segment; segments are
                     laid side by side in a few packed rows (token budget), attention block-diagonal
                     causal, position ids restarting at 0 per segment.
    "shared_prompt"  one segment per group of G rows with the same prompt:
                     [prompt | completion 1 | ... | completion G]; the prompt runs once, each completion
                     attends to the prompt and causally to its own tokens only (never to a sibling) and
                     continues the prompt's positions (P, P+1, ...). Gradients of all G completions flow
                     back into the one prompt computation through its keys and values.

A segment is a run of tokens of one packed row; within it, `branch` 0 marks tokens every later token
may see (a whole sequence in "packed", the prompt in "shared_prompt") and branch k > 0 the k-th
completion of a group. Token q attends to token k of the same row iff

    segment[k] == segment[q]  and  k <= q  and  (branch[k] == 0 or branch[k] == branch[q])
    [and position[q] - position[k] < sliding_window, for sliding-attention layers]

which reproduces, key for key, what the padded layout lets each real token see. The mask is handed to
the layers as a 4-D (rows, 1, L, L) tensor in the format of the model's attention implementation (bool
"may attend" for sdpa, as transformers' own mask builders give it; additive 0 / finfo.min for eager).
It is the exact masked path: SDPA computes the full L x L scores of each packed row. A varlen kernel
(flash-attn `flash_attn_varlen_func` for "packed", a prompt + own-completion cascade for
"shared_prompt") would skip the masked blocks; it is not implemented here (flash_attention_* raises).

Cost on CPU (bench `step` shape, 1 thread): the dense masked scores make a "shared_prompt" row's
attention about twice the padded layout's (`layout_stats` attention_share), but attention is a few % of
the step and the matmuls shrink with the token share, so the step still gets faster.

Host-side planning (`build_layout`) is plain Python over per-row lengths (well under 1 ms for 16 rows).
It is the piece to swap for the C++ planner (`onelayer_fast.planner`): `plan_rows(lengths, budget)` <->
`planner.plan_microbatches(lengths, budget, "largest_first")` (one packed row per micro-batch; row
order does not matter here); the index loop of `build_layout` <-> a planner op returning the same
`PackedLayout` fields (token gather index, position / segment / branch ids, state and target indices).
`planner.pack` covers one contiguous run per padded row, so it needs a two-span variant (left-padded
prompt + right-padded completion) and branch ids for shared groups; `PackedLayout` stays the contract.

Requirements (checked): prompts left-padded with at least one real token, completion masks a prefix
of ones (1 up to and including EOS, 0 after), as rollout.py produces them. Completion tokens with mask
0 are dropped, never computed.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .policy import FullModelPolicy, OneLayerPolicy, PrefixCache, decoder_of, layer_types, run_layer

LAYOUTS = ("auto", "padded", "packed", "shared_prompt")
PACKED_LAYOUTS = ("packed", "shared_prompt")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def resolve_layout(layout: str, batch: Any, config: Any, device: torch.device, group_size: int | None) -> str:
    """The layout to run: `layout` itself, or for "auto" "shared_prompt" where it is measured faster and
    applies, else "padded".

    "auto" picks "shared_prompt" on CPU (bench `step`, `step-varlen` and `sweep`: faster in each, same loss and
    gradients) for batches of whole groups with one prompt per group (the trainer's single-turn rollouts) on an
    sdpa / eager model. Elsewhere it runs "padded": on CUDA, because the dense masked path has not been timed
    against flash-attn's padded kernels on a GPU yet; for multi-turn episode rows, whose prompts differ.
    """
    check_layout(layout)
    if layout != "auto":
        return layout
    if device.type != "cpu" or group_size is None or group_size < 2:
        return "padded"
    if (getattr(config, "_attn_implementation", None) or "eager") not in ("sdpa", "eager"):
        return "padded"
    if getattr(batch, "advantages", None) is not None:  # episode rows, not prompt groups
        return "padded"
    try:
        _check_batch(batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
        check_shared_prompts(batch.prompt_ids, batch.prompt_mask, group_size)
    except ValueError:
        return "padded"
    return "shared_prompt"


# --------------------------------------------------------------------------------------------------
# host-side planning
# --------------------------------------------------------------------------------------------------
@dataclass
class PackedLayout:
    """Where every computed token of a packed batch comes from and where its state goes.

    S packed rows of L tokens (the last ones of a row may be row padding: segment -1, token_mask 0).
    """

    kind: str  # "packed" | "shared_prompt"
    input_ids: Tensor  # (S, L) token ids
    position_ids: Tensor  # (S, L) rotary positions, restarting per segment
    segment_ids: Tensor  # (S, L) segment index within the batch, -1 on row padding
    branch_ids: Tensor  # (S, L) 0: seen by the whole segment; k > 0: the k-th completion of a group
    token_mask: Tensor  # (S, L) 1 for real tokens, 0 for row padding
    state_index: Tensor  # (N,) flat index into S * L: the state that predicts each real completion token
    target_index: Tensor  # (N,) flat index into B * C: that token's place in the (B, C) completion layout
    batch_size: int  # B
    completion_length: int  # C
    padded_tokens: int  # B * (P + C): what the padded, unshared layout computes per layer

    @property
    def computed_tokens(self) -> int:
        """Tokens every layer runs on, row padding included."""
        return self.input_ids.numel()

    @property
    def real_tokens(self) -> int:
        return int(self.token_mask.sum())


def _check_batch(prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor) -> None:
    if prompt_ids.dim() != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_ids and prompt_mask must be (batch, prompt_tokens) of one shape, got "
                         f"{tuple(prompt_ids.shape)} and {tuple(prompt_mask.shape)}")
    if completion_ids.dim() != 2 or completion_mask.shape != completion_ids.shape:
        raise ValueError(f"completion_ids and completion_mask must be (batch, completion_tokens) of one shape, got "
                         f"{tuple(completion_ids.shape)} and {tuple(completion_mask.shape)}")
    if completion_ids.shape[0] != prompt_ids.shape[0]:
        raise ValueError(f"{prompt_ids.shape[0]} prompt rows but {completion_ids.shape[0]} completion rows")
    pm, cm = prompt_mask.bool(), completion_mask.bool()
    # left padding: once a row's prompt starts, it does not stop; at least one real token (it predicts
    # the first completion token)
    if pm.shape[1] == 0 or not bool(pm[:, -1].all()) or not torch.equal(pm, pm.int().cummax(dim=1).values.bool()):
        raise ValueError("packed layouts need left-padded prompts with at least one real token per row "
                         "(prompt_mask of the form 0...01...1)")
    # prefix completion masks: 1 up to and including EOS, 0 after
    if not torch.equal(cm, cm.int().cummin(dim=1).values.bool()):
        raise ValueError("packed layouts need completion masks of the form 1...10...0 (1 up to and including EOS)")


def check_shared_prompts(prompt_ids: Tensor, prompt_mask: Tensor, group_size: int) -> None:
    """Rows come in groups of `group_size` consecutive rows with identical prompts (ids and mask)."""
    rows = prompt_ids.shape[0]
    if group_size < 1 or rows % group_size != 0:
        raise ValueError(f"layout 'shared_prompt' needs the batch ({rows} rows) to be whole groups of "
                         f"group_size={group_size} rows")
    ids = (prompt_ids * prompt_mask.to(prompt_ids.dtype)).view(rows // group_size, group_size, -1)
    mask = prompt_mask.view(rows // group_size, group_size, -1)
    same = (ids == ids[:, :1]).all(dim=2) & (mask == mask[:, :1]).all(dim=2)
    if not bool(same.all()):
        bad = int((~same).any(dim=1).nonzero()[0])
        first, last = bad * group_size, (bad + 1) * group_size - 1
        raise ValueError(f"layout 'shared_prompt' needs the {group_size} rows of each group to share one prompt, but "
                         f"group {bad} (rows {first}..{last}) holds different prompts; "
                         "use layout 'packed' or 'padded' for such batches")


def plan_rows(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """First-fit decreasing: segment indices per packed row, each row at most `token_budget` tokens.

    Rows are ascending index lists, ordered by their first segment; deterministic (ties: lower index).
    Swappable for `planner.plan_microbatches(lengths, token_budget, "largest_first")`.
    """
    if any(n > token_budget for n in lengths):
        raise ValueError(f"token_budget {token_budget} is smaller than the longest segment ({max(lengths)} tokens)")
    rows: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, load in enumerate(loads):
            if load + lengths[i] <= token_budget:
                rows[r].append(i)
                loads[r] += lengths[i]
                break
        else:
            rows.append([i])
            loads.append(lengths[i])
    rows = [sorted(r) for r in rows]
    return sorted(rows, key=lambda r: r[0])


def build_layout(batch: Any, layout: str, group_size: int | None = None, token_budget: int | None = None,
                 pad_token_id: int = 0) -> PackedLayout:
    """Plan a packed layout of `batch` (prompt_ids, prompt_mask, completion_ids, completion_mask: (B, P), (B, C)).

    layout: "packed" (one segment per row) or "shared_prompt" (one segment per group of `group_size` rows).
    token_budget: most tokens per packed row; default max(P + C, longest segment), so that no packed
    row attends over more keys than needed to hold its longest segment or a padded row.
    """
    if layout not in PACKED_LAYOUTS:
        raise ValueError(f"build_layout plans one of {PACKED_LAYOUTS}, got {layout!r}")
    prompt_ids, prompt_mask = batch.prompt_ids, batch.prompt_mask
    completion_ids, completion_mask = batch.completion_ids, batch.completion_mask
    _check_batch(prompt_ids, prompt_mask, completion_ids, completion_mask)
    rows, prompt_width = prompt_ids.shape
    completion_width = completion_ids.shape[1]
    if layout == "shared_prompt":
        if group_size is None:
            raise ValueError("layout 'shared_prompt' needs group_size (completions per prompt)")
        check_shared_prompts(prompt_ids, prompt_mask, group_size)
    else:
        group_size = 1
    prompt_lens = prompt_mask.bool().sum(1).tolist()
    completion_lens = completion_mask.bool().sum(1).tolist()

    # Built on the host (a few hundred small slice writes), moved to the batch's device once at the end.
    device = prompt_ids.device
    prompt_ids, completion_ids = prompt_ids.cpu(), completion_ids.cpu()
    # Segments: per group, the prompt once, then each row's completion (one row per group in "packed").
    # pieces: (token ids, first position, branch, row or -1 for the prompt)
    segments: list[list[tuple[Tensor, int, int, int]]] = []
    for g in range(rows // group_size):
        first = g * group_size
        p = prompt_lens[first]
        pieces = [(prompt_ids[first, prompt_width - p:], 0, 0, -1)]
        for k in range(group_size):
            row = first + k
            branch = k + 1 if layout == "shared_prompt" else 0
            pieces.append((completion_ids[row, : completion_lens[row]], p, branch, row))
        segments.append(pieces)
    lengths = [sum(t.numel() for t, *_ in pieces) for pieces in segments]
    budget = max(prompt_width + completion_width, max(lengths)) if token_budget is None else int(token_budget)
    plan = plan_rows(lengths, budget)
    width = max(sum(lengths[s] for s in row) for row in plan)

    shape = (len(plan), width)
    input_ids = torch.full(shape, pad_token_id, dtype=prompt_ids.dtype)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    branch_ids = torch.zeros(shape, dtype=torch.long)
    state_index: list[Tensor] = []
    target_index: list[Tensor] = []
    for r, row_segments in enumerate(plan):
        offset = 0
        for s in row_segments:
            prompt_last = None  # flat index of the segment's last prompt token
            for ids, start, branch, row in segments[s]:
                n = ids.numel()
                span = slice(offset, offset + n)
                input_ids[r, span] = ids
                position_ids[r, span] = torch.arange(start, start + n)
                segment_ids[r, span] = s
                branch_ids[r, span] = branch
                flat = r * width + offset
                if row < 0:
                    prompt_last = flat + n - 1
                elif n:
                    # token j of the completion is predicted by token j - 1, its first by the last prompt token
                    state_index.append(torch.cat([torch.tensor([prompt_last]), torch.arange(flat, flat + n - 1)]))
                    target_index.append(torch.arange(row * completion_width, row * completion_width + n))
                offset += n
    empty = torch.zeros(0, dtype=torch.long)
    return PackedLayout(
        kind=layout,
        input_ids=input_ids.to(device),
        position_ids=position_ids.to(device),
        segment_ids=segment_ids.to(device),
        branch_ids=branch_ids.to(device),
        token_mask=(segment_ids >= 0).long().to(device),
        state_index=(torch.cat(state_index) if state_index else empty).to(device),
        target_index=(torch.cat(target_index) if target_index else empty).to(device),
        batch_size=rows,
        completion_length=completion_width,
        padded_tokens=rows * (prompt_width + completion_width),
    )


def layout_stats(layout: PackedLayout) -> dict[str, float]:
    """Work of a packed layout relative to the padded, unshared one (per layer, same for every layer).

    token_share: tokens computed (row padding included) / B * (P + C).
    attention_share: query-key scores computed (dense L x L per packed row, as the masked SDPA path does) /
    B * (P + C)^2. A varlen kernel would compute only the allowed pairs: allowed_pair_share.
    """
    rows, width = layout.input_ids.shape
    padded_width = layout.padded_tokens // layout.batch_size
    real = layout.token_mask.bool()
    allowed = int((allowed_pairs(layout)[:, 0] & real[:, :, None] & real[:, None, :]).sum())  # real pairs only
    return {
        "padded_tokens": layout.padded_tokens,
        "computed_tokens": layout.computed_tokens,
        "real_tokens": layout.real_tokens,
        "token_share": layout.computed_tokens / layout.padded_tokens,
        "attention_share": rows * width * width / (layout.batch_size * padded_width * padded_width),
        "allowed_pair_share": allowed / (layout.batch_size * padded_width * padded_width),
        "packed_rows": rows,
        "packed_row_length": width,
    }


def token_share(batch: Any, layout: str, group_size: int | None = None, token_budget: int | None = None) -> float:
    """Share of tokens computed by `layout` compared with the padded, unshared layout (1.0 for "padded")."""
    check_layout(layout)
    if layout == "padded":
        return 1.0
    return layout_stats(build_layout(batch, layout, group_size, token_budget))["token_share"]


# --------------------------------------------------------------------------------------------------
# attention masks
# --------------------------------------------------------------------------------------------------
def allowed_pairs(layout: PackedLayout, sliding_window: int | None = None) -> Tensor:
    """(S, 1, L, L) bool: query q may attend to key k (see the module docstring)."""
    width = layout.input_ids.shape[1]
    seg, br, pos = layout.segment_ids, layout.branch_ids, layout.position_ids
    idx = torch.arange(width, device=seg.device)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (idx[:, None] >= idx[None, :])
    allowed &= (br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None])
    if sliding_window is not None:
        allowed &= (pos[:, :, None] - pos[:, None, :]) < sliding_window
    return allowed.unsqueeze(1)


def layout_masks(config: Any, layout: PackedLayout, dtype: torch.dtype) -> dict[str, Tensor]:
    """Per layer type, the 4-D mask in the format of the model's attention implementation."""
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        raise NotImplementedError(
            f"packed layouts run on attention implementations 'sdpa' and 'eager' (exact masked path); the model "
            f"uses {impl!r}. Use layout='padded', or load the model with attn_implementation='sdpa'"
        )
    types = set(layer_types(config))
    masks = {}
    for kind in types:
        window = getattr(config, "sliding_window", None) if kind == "sliding_attention" else None
        if kind not in ("full_attention", "sliding_attention"):
            raise NotImplementedError(f"packed layouts do not support layer type {kind!r}")
        allowed = allowed_pairs(layout, window)
        if impl == "eager":  # eager adds the mask to the scores
            masks[kind] = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
                ~allowed, torch.finfo(dtype).min)
        else:  # sdpa: boolean "may attend", as transformers' create_causal_mask gives it
            masks[kind] = allowed
    return masks


# --------------------------------------------------------------------------------------------------
# running the model on a packed layout
# --------------------------------------------------------------------------------------------------
@dataclass
class PackedCache:
    """`prefix` of a packed batch: the PrefixCache over the packed rows (OneLayerPolicy), or None (full mode)."""

    layout: PackedLayout
    prefix: PrefixCache | None


def _packed_inputs(decoder: nn.Module, config: Any, layout: PackedLayout, embeds: Tensor) -> PrefixCache:
    return PrefixCache(
        hidden=embeds,
        attention_mask=layout.token_mask,
        position_ids=layout.position_ids,
        position_embeddings=decoder.rotary_emb(embeds, layout.position_ids),
        masks=layout_masks(config, layout, embeds.dtype),
    )


def packed_prefix(policy: nn.Module, layout: PackedLayout) -> PackedCache:
    """OneLayerPolicy.prefix on the packed rows (embed + layers[:i], no autograd); FullModelPolicy: nothing."""
    if isinstance(policy, FullModelPolicy):
        return PackedCache(layout, None)
    if not isinstance(policy, OneLayerPolicy):
        raise NotImplementedError(
            f"packed layouts support OneLayerPolicy and FullModelPolicy, not {type(policy).__name__}")
    decoder = policy.decoder
    with torch.no_grad():
        cache = _packed_inputs(decoder, policy.model.config, layout, decoder.embed_tokens(layout.input_ids))
        hidden = cache.hidden
        for j in range(policy.layer_index):
            hidden = run_layer(decoder.layers[j], hidden, cache, policy.layer_types[j])
        cache.hidden = hidden
    return PackedCache(layout, cache)


def _full_decoder(model: nn.Module, layout: PackedLayout) -> Tensor:
    """Every layer of `model` on the packed rows (full mode): (S, L, H) after the final norm."""
    decoder = decoder_of(model)
    cache = _packed_inputs(decoder, model.config, layout, decoder.embed_tokens(layout.input_ids))
    hidden = cache.hidden
    for layer, kind in zip(decoder.layers, layer_types(model.config)):
        hidden = run_layer(layer, hidden, cache, kind)
    return decoder.norm(hidden)


def unpack_states(states: Tensor, layout: PackedLayout) -> Tensor:
    """states (S, L, H) over the packed rows -> (B, C, H): the state predicting each completion token, zeros
    where the completion mask is 0 (the loss ignores those; no gradient reaches them)."""
    hidden = states.shape[-1]
    picked = states.reshape(-1, hidden).index_select(0, layout.state_index)
    out = states.new_zeros(layout.batch_size * layout.completion_length, hidden)
    return out.index_copy(0, layout.target_index, picked).view(layout.batch_size, layout.completion_length, hidden)


def packed_completion_states(policy: nn.Module, cache: PackedCache, reference: bool = False) -> Tensor:
    """(B, C, H) states that predict the completion tokens, computed on the packed layout."""
    if cache.prefix is not None:
        return unpack_states(policy.suffix(cache.prefix, reference=reference), cache.layout)
    if reference:
        if policy.reference_model is None:
            raise ValueError("this FullModelPolicy was built with keep_reference=False")
        with torch.no_grad():
            return unpack_states(_full_decoder(policy.reference_model, cache.layout), cache.layout)
    return unpack_states(_full_decoder(policy.model, cache.layout), cache.layout)
