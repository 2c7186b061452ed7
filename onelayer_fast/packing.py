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

Host-side planning (`build_layout`) runs in the C++ planner (`onelayer_fast.planner`, csrc/planner.cpp): only
the per-row prompt and completion lengths go to the host; one `planner.pack_layout` call plans the segments
into packed rows (the micro-batches of `plan_microbatches(segment_lengths, token_budget, "largest_first")`:
fewest rows, balanced loads; rows ordered by their first segment) and returns every index of the layout:
token gather index into the [prompt | completion] batch, position / segment / branch ids, state and target
indices. The token gather itself runs on the batch's device. `planner.pack_layout_ref` is the same in
Python (the loop this module ran before) and defines the result; tests/test_planner.py holds the C++ op to
it, tests/test_packing.py every `PackedLayout` field built through either. There is no Python fallback: without
the built extension `build_layout` raises ImportError saying how to build it.

Requirements (checked): prompts left-padded with at least one real token, completion masks a prefix
of ones (1 up to and including EOS, 0 after), as rollout.py produces them. Completion tokens with mask
0 are dropped, never computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import planner
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


def first_mixed_group(prompt_ids: Tensor, prompt_mask: Tensor, group_size: int) -> int | None:
    """The first group of `group_size` consecutive rows whose prompts differ (real tokens or mask), or None when
    every group shares one prompt. The rows must be whole groups (prompt_ids.shape[0] % group_size == 0)."""
    rows = prompt_ids.shape[0]
    ids = (prompt_ids * prompt_mask.to(prompt_ids.dtype)).view(rows // group_size, group_size, -1)
    mask = prompt_mask.view(rows // group_size, group_size, -1)
    same = (ids == ids[:, :1]).all(dim=2) & (mask == mask[:, :1]).all(dim=2)
    return None if bool(same.all()) else int((~same).any(dim=1).nonzero()[0])


def check_shared_prompts(prompt_ids: Tensor, prompt_mask: Tensor, group_size: int) -> None:
    """Rows come in groups of `group_size` consecutive rows with identical prompts (ids and mask)."""
    rows = prompt_ids.shape[0]
    if group_size < 1 or rows % group_size != 0:
        raise ValueError(f"layout 'shared_prompt' needs the batch ({rows} rows) to be whole groups of "
                         f"group_size={group_size} rows")
    bad = first_mixed_group(prompt_ids, prompt_mask, group_size)
    if bad is not None:
        first, last = bad * group_size, (bad + 1) * group_size - 1
        raise ValueError(f"layout 'shared_prompt' needs the {group_size} rows of each group to share one prompt, but "
                         f"group {bad} (rows {first}..{last}) holds different prompts; "
                         "use layout 'packed' or 'padded' for such batches")


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
    shared_group = None  # "packed": one segment per row, no branches
    if layout == "shared_prompt":
        if group_size is None:
            raise ValueError("layout 'shared_prompt' needs group_size (completions per prompt)")
        check_shared_prompts(prompt_ids, prompt_mask, group_size)
        shared_group = group_size
    # Only the lengths go to the host, in one copy (one sync for a CUDA batch); the planner's indices come
    # back to the batch's device once, and the tokens are gathered there.
    prompt_lens, completion_lens = torch.stack([prompt_mask.bool().sum(1), completion_mask.bool().sum(1)]).cpu()
    index = planner.pack_layout(prompt_lens, completion_lens, prompt_width, completion_width, shared_group,
                                token_budget)
    device = prompt_ids.device
    index = planner.LayoutIndex(*(t.to(device) for t in index))
    tokens = torch.cat([prompt_ids, completion_ids.to(prompt_ids.dtype)], dim=1).reshape(-1)
    row_padding = index.token_index < 0
    input_ids = tokens[index.token_index.clamp(min=0)].masked_fill_(row_padding, pad_token_id)
    return PackedLayout(
        kind=layout,
        input_ids=input_ids,
        position_ids=index.position_ids,
        segment_ids=index.segment_ids,
        branch_ids=index.branch_ids,
        token_mask=(~row_padding).long(),
        state_index=index.state_index,
        target_index=index.target_index,
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
