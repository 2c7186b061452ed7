"""How a rollout batch is laid out for the layers: padded, packed, or shared-prompt.

Every layout answers the same four questions for the policy's one loop over decoder layers (policy.py):
the flat input ids, the position ids, the attention mask of each layer type in the format of the model's
attention implementation, and where the states that predict the completion tokens are.

The padded layout runs every row as [left-padded prompt | completion padded to C]: each row recomputes
its group's prompt in every layer, and pad tokens cost as much as real ones. Two packed layouts drop
that work and give the same loss and gradients (tests/test_layout.py):

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

Cost: the dense masked scores make a "shared_prompt" row's attention up to about twice the padded layout's
(`layout_stats` attention_share), while the matmuls, most of a step, shrink with the token share.

Host-side planning (`build_layout`) runs in the C++ planner (`onelayer_fast.planner`, csrc/planner.cpp): only
the per-row prompt and completion lengths go to the host; one `planner.pack_layout` call plans the segments
into packed rows (the micro-batches of `plan_microbatches(segment_lengths, token_budget, "largest_first")`:
fewest rows, balanced loads; rows ordered by their first segment) and returns every index of the layout:
token gather index into the [prompt | completion] batch, position / segment / branch ids, state and target
indices. The token gather itself runs on the batch's device. `planner.pack_layout_ref` is the same in
Python and defines the result; tests/test_planner.py holds the C++ op to it, tests/test_layout.py every
`PackedLayout` field built through either. There is no Python fallback: without the built extension
`build_layout` raises ImportError saying how to build it.

Requirements (checked, batch.packing_problem): prompts left-padded with at least one real token, completion
masks a prefix of ones (1 up to and including EOS, 0 after), as rollout.py produces them. Completion tokens
with mask 0 are dropped, never computed. "shared_prompt" runs the batch's own prompt groups
(`RolloutBatch.group_size`, checked when the batch was made).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from . import planner
from .batch import RolloutBatch

try:  # transformers >= 4.53 builds masks per attention implementation
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
except ImportError:  # pragma: no cover - exercised only on old transformers
    create_causal_mask = create_sliding_window_causal_mask = None

LAYOUTS = ("auto", "padded", "packed", "shared_prompt")
PACKED_LAYOUTS = ("packed", "shared_prompt")


class Layout(Protocol):
    """What the policy's layer loop needs from a layout (PaddedLayout, PackedLayout)."""

    input_ids: Tensor  # (rows, L)
    position_ids: Tensor  # (rows, L)

    def attention_masks(self, config: Any, embeds: Tensor) -> dict[str, Any]:
        """Per layer type ("full_attention", "sliding_attention"), the mask the decoder layers take."""

    def completion_states(self, states: Tensor) -> Tensor:
        """(rows, L, H) states over the layout -> (B, C, H): the state that predicts each completion token."""


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def layer_types(config: Any) -> list[str]:
    return list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions as `generate` counts them for left-padded prompts: cumsum(mask) - 1, clamped at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _mask_kwargs_name() -> str:
    # transformers renamed `past_key_values` to `cache` in the mask builders during 5.x.
    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


# --------------------------------------------------------------------------------------------------
# padded
# --------------------------------------------------------------------------------------------------
class PaddedLayout:
    """Rows as given: (B, T) ids and attention mask, masks built by transformers for the model's attention
    implementation. With `completion_start` = P (prompts of width P, then completions), the states at
    P - 1 ... T - 2 predict the completion tokens. `position_ids` default to `generate`'s count over the mask
    (`position_ids_from_mask`); TRL's training forward passes none, so the model counts 0 ... T - 1 on every row
    (`trl.py` passes that, to match it)."""

    def __init__(self, input_ids: Tensor, attention_mask: Tensor | None = None, completion_start: int | None = None,
                 position_ids: Tensor | None = None):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        if position_ids is not None and position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} != input_ids shape {tuple(input_ids.shape)}")
        self.position_ids = position_ids_from_mask(attention_mask) if position_ids is None else position_ids
        self.completion_start = completion_start

    @classmethod
    def of_batch(cls, batch: RolloutBatch) -> "PaddedLayout":
        return cls(batch.input_ids, batch.attention_mask, completion_start=batch.prompt_length)

    def attention_masks(self, config: Any, embeds: Tensor) -> dict[str, Any]:
        kwargs = {"config": config, "inputs_embeds": embeds, "attention_mask": self.attention_mask,
                  "position_ids": self.position_ids, _mask_kwargs_name(): None}
        masks = {"full_attention": create_causal_mask(**kwargs)}
        if "sliding_attention" in layer_types(config):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks

    def completion_states(self, states: Tensor) -> Tensor:
        if self.completion_start is None:
            raise ValueError("this padded layout was built from ids alone; it does not know where completions start")
        return states[:, self.completion_start - 1 : -1]


# --------------------------------------------------------------------------------------------------
# packed and shared-prompt: host-side planning
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

    def attention_masks(self, config: Any, embeds: Tensor) -> dict[str, Tensor]:
        """Per layer type, the 4-D mask in the format of the model's attention implementation."""
        impl = getattr(config, "_attn_implementation", None) or "eager"
        if impl not in ("sdpa", "eager"):
            raise NotImplementedError(
                f"packed layouts run on attention implementations 'sdpa' and 'eager' (exact masked path); the model "
                f"uses {impl!r}. Use layout='padded', or load the model with attn_implementation='sdpa'"
            )
        masks = {}
        for kind in set(layer_types(config)):
            if kind not in ("full_attention", "sliding_attention"):
                raise NotImplementedError(f"packed layouts do not support layer type {kind!r}")
            window = getattr(config, "sliding_window", None) if kind == "sliding_attention" else None
            masks[kind] = attention_mask_for(allowed_pairs(self, window), impl, embeds.dtype)
        return masks

    def completion_states(self, states: Tensor) -> Tensor:
        """states (S, L, H) over the packed rows -> (B, C, H): the state predicting each completion token, zeros
        where the completion mask is 0 (the loss ignores those; no gradient reaches them)."""
        hidden = states.shape[-1]
        picked = states.reshape(-1, hidden).index_select(0, self.state_index)
        out = states.new_zeros(self.batch_size * self.completion_length, hidden)
        return out.index_copy(0, self.target_index, picked).view(self.batch_size, self.completion_length, hidden)


def build_layout(batch: RolloutBatch, layout: str, token_budget: int | None = None, pad_token_id: int = 0) -> PackedLayout:
    """Plan a packed layout of `batch` (prompt_ids, prompt_mask, completion_ids, completion_mask: (B, P), (B, C)).

    layout: "packed" (one segment per row) or "shared_prompt" (one segment per prompt group of
    `batch.group_size` rows). token_budget: most tokens per packed row; default max(P + C, longest segment),
    so that no packed row attends over more keys than needed to hold its longest segment or a padded row.
    """
    if layout not in PACKED_LAYOUTS:
        raise ValueError(f"build_layout plans one of {PACKED_LAYOUTS}, got {layout!r}")
    problem = batch.packing_problem
    if problem is not None:
        raise ValueError(problem)
    shared_group = None  # "packed": one segment per row, no branches
    if layout == "shared_prompt":
        if batch.group_size is None:
            raise ValueError("layout 'shared_prompt' needs prompt groups (a RolloutBatch with group_size); "
                             "use layout 'packed' or 'padded' for rows without them")
        shared_group = batch.group_size
    prompt_ids, prompt_mask = batch.prompt_ids, batch.prompt_mask
    completion_ids, completion_mask = batch.completion_ids, batch.completion_mask
    rows, prompt_width = prompt_ids.shape
    completion_width = completion_ids.shape[1]
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


def attention_mask_for(allowed: Tensor, impl: str, dtype: torch.dtype) -> Tensor:
    """A bool (rows, 1, queries, keys) "may attend" tensor in the format the attention implementation takes:
    itself for sdpa (as transformers' create_causal_mask gives it), additive 0 / finfo.min for eager."""
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return allowed


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


def token_share(batch: RolloutBatch, layout: str, token_budget: int | None = None) -> float:
    """Share of tokens computed by `layout` compared with the padded, unshared layout (1.0 for "padded")."""
    check_layout(layout)
    if layout == "padded":
        return 1.0
    return layout_stats(build_layout(batch, layout, token_budget))["token_share"]


# --------------------------------------------------------------------------------------------------
# choosing a layout
# --------------------------------------------------------------------------------------------------
def auto_layout(config: Any, device: torch.device, grouped: bool) -> str:
    """What "auto" runs for rows that come in prompt groups (`grouped`) on `device`, before looking at a batch:
    "shared_prompt" on CPU, where the bench (`step`, `step-varlen`, `sweep`) measured it faster with the same
    loss and gradients, on an sdpa / eager model; elsewhere "padded": on CUDA, where the dense masked path
    has no measurement against the padded kernels (README.md, Performance); for rows without prompt groups."""
    if device.type != "cpu" or not grouped:
        return "padded"
    if (getattr(config, "_attn_implementation", None) or "eager") not in ("sdpa", "eager"):
        return "padded"
    return "shared_prompt"


def resolve_layout(layout: str, batch: RolloutBatch, config: Any, device: torch.device) -> str:
    """The layout to run: `layout` itself, or for "auto" what `auto_layout` picks for this batch's groups,
    "padded" where the batch cannot be packed."""
    check_layout(layout)
    if layout != "auto":
        return layout
    kind = auto_layout(config, device, grouped=batch.group_size is not None)
    return "padded" if kind == "shared_prompt" and batch.packing_problem is not None else kind


def make_layout(batch: RolloutBatch, layout: str, config: Any, device: torch.device) -> Layout:
    """The layout object `layout` (or what "auto" resolves to) for `batch`."""
    kind = resolve_layout(layout, batch, config, device)
    return PaddedLayout.of_batch(batch) if kind == "padded" else build_layout(batch, kind)
