"""Lanes: many single-layer runs trained at once on one shared frozen model.

A lane is one single-layer run: (target layer, learning rate, seed). Each lane owns a trainable copy of
its layer (and, in the trainer, its optimizer state, rollouts, log and checkpoints); every frozen weight
exists once. The reference policy of a lane is the shared original layer itself: lanes never edit the
shared model, so no reference copy is needed, unless the reference moves (TRL's sync_ref_model): then
`own_references=True` gives each lane its own reference copy of its layer, which the trainer mixes with the
lane's layer (update.StepControls).

Rows are laid out lane by lane, in `LanePolicy.lanes` order: deepest target layer first. With that order
the rows each layer works on are contiguous slices of the batch:

    prefix (no autograd) at layer j: the lanes whose layer is above j       -> the first rows
    suffix at layer j:               the lanes whose layer is j or below    -> the last rows, of which
                                     the lanes training j come first (their own copies), the rest
                                     run through the shared layer j in one call

so a step over n lanes costs, per layer, one shared call plus one call per lane that trains that layer,
instead of n separate runs each calling every layer. Each lane's rows see exactly the computation they
would see alone (tests/test_lanes.py holds a lane inside a batch to the same layer's OneLayerPolicy).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .batch import RolloutBatch
from .layout import Layout, PackedLayout, PaddedLayout, build_layout, resolve_layout
from .policy import PrefixCache, _LayerStackPolicy, run_layers


@dataclass(frozen=True)
class Lane:
    """One single-layer run among many. learning_rate / seed None: the run's config decides."""

    layer: int
    learning_rate: float | None = None
    seed: int | None = None

    def describe(self) -> str:
        parts = [f"layer {self.layer}"]
        if self.learning_rate is not None:
            parts.append(f"lr {self.learning_rate:g}")
        if self.seed is not None:
            parts.append(f"seed {self.seed}")
        return ", ".join(parts)


def resolve_lanes(lanes: Sequence[Lane], num_layers: int) -> list[Lane]:
    """Lanes with layer indices in 0..num_layers-1 (negative ones count from the top); ValueError for no
    lanes, a layer out of range, or the same lane twice."""
    if len(lanes) < 1:
        raise ValueError("at least one lane is needed")
    resolved = []
    for lane in lanes:
        if not isinstance(lane, Lane):
            raise ValueError(f"lanes must be Lane objects, got {lane!r}")
        if not isinstance(lane.layer, int) or isinstance(lane.layer, bool):
            raise ValueError(f"lane layer must be an integer decoder-layer index, got {lane.layer!r}")
        if not -num_layers <= lane.layer < num_layers:
            raise ValueError(f"lane layer {lane.layer} is out of range for a model with {num_layers} decoder layers "
                             f"(valid: {-num_layers}..{num_layers - 1})")
        if lane.learning_rate is not None and not lane.learning_rate > 0:
            raise ValueError(f"lane learning_rate must be > 0, got {lane.learning_rate}")
        resolved.append(replace(lane, layer=lane.layer % num_layers))
    seen: set[Lane] = set()
    for lane in resolved:
        if lane in seen:
            raise ValueError(f"duplicate lane ({lane.describe()}): two lanes would train identically")
        seen.add(lane)
    return resolved


def execution_order(lanes: Sequence[Lane]) -> list[int]:
    """Indices of `lanes`, deepest layer first (stable): the row order of a lane batch."""
    return sorted(range(len(lanes)), key=lambda k: -lanes[k].layer)


def _rows(value: Any, start: int, stop: int) -> Any:
    """Rows start:stop of a per-row tensor (mask, rotary table); None and batch-broadcast tensors pass through."""
    if value is None or not isinstance(value, Tensor) or value.shape[0] == 1:
        return value
    return value[start:stop]


@dataclass
class LaneCache:
    """A PrefixCache over the rows of all lanes: `hidden[k]` is the input of lane k's layer for its rows,
    `row_starts[k]:row_starts[k + 1]` its rows of the layout."""

    inputs: PrefixCache  # layout, rotary tables, masks over every row (hidden None)
    hidden: list[Tensor]
    row_starts: list[int]

    @property
    def layout(self) -> Layout:
        return self.inputs.layout

    def rows(self, start: int, stop: int) -> PrefixCache:
        """The layer inputs (positions, rotary tables, masks) of layout rows start:stop."""
        c = self.inputs
        cos, sin = c.position_embeddings
        return PrefixCache(layout=_RowSlice(c.layout, start, stop), position_embeddings=(_rows(cos, start, stop),
                           _rows(sin, start, stop)), masks={k: _rows(m, start, stop) for k, m in c.masks.items()},
                           hidden=None)


class _RowSlice:
    """Rows start:stop of a layout, as far as run_layers needs it (position ids)."""

    def __init__(self, layout: Layout, start: int, stop: int):
        self.position_ids = _rows(layout.position_ids, start, stop)


class LanePolicy(_LayerStackPolicy):
    """Several single-layer runs of one model: a trainable copy of each lane's layer, everything else shared.

    policy = LanePolicy(model, [Lane(3), Lane(1, learning_rate=1e-5), Lane(1, learning_rate=3e-5)])
    policy.lanes                     # execution order (deepest layer first): the row order of its batches
    cache = policy.prefix_lanes(batch, layout="padded")   # batch rows laid out lane by lane, equal per lane
    states = policy.completion_states(cache)              # (rows, C, H)
    ref = policy.completion_states(cache, reference=True)  # through the shared original layers
    """

    def __init__(self, model: nn.Module, lanes: Sequence[Lane], lane_layers: Sequence[nn.Module] | None = None,
                 own_references: bool = False, reference_layers: Sequence[nn.Module] | None = None):
        super().__init__(model)
        num_layers = len(self.decoder.layers)
        resolved = resolve_lanes(lanes, num_layers)
        order = execution_order(resolved)
        self.order = order  # self.lanes[k] is lanes[order[k]] (resolved)
        self.lanes: list[Lane] = [resolved[k] for k in order]
        model.requires_grad_(False)
        if lane_layers is None:  # a fresh copy of each lane's layer, trainable
            copies = [copy.deepcopy(self.decoder.layers[lane.layer]).requires_grad_(True) for lane in self.lanes]
        else:  # modules shared with another LanePolicy over the same lanes (see `subset`)
            if len(lane_layers) != len(lanes):
                raise ValueError(f"{len(lanes)} lanes but {len(lane_layers)} lane layers")
            copies = [lane_layers[k] for k in order]
        self.lane_layers = nn.ModuleList(copies)
        # Each lane's own frozen reference (a copy of its original layer), or None: the shared original layers.
        self.reference_layers: nn.ModuleList | None = None
        if reference_layers is not None:
            if len(reference_layers) != len(lanes):
                raise ValueError(f"{len(lanes)} lanes but {len(reference_layers)} reference layers")
            self.reference_layers = nn.ModuleList([reference_layers[k] for k in order])
        elif own_references:
            self.reference_layers = nn.ModuleList(
                [copy.deepcopy(self.decoder.layers[lane.layer]).requires_grad_(False).eval() for lane in self.lanes])

    def subset(self, indices: Sequence[int]) -> "LanePolicy":
        """A LanePolicy over lanes[indices] that shares this one's model, lane and reference layers (no copies)."""
        refs = None if self.reference_layers is None else [self.reference_layers[k] for k in indices]
        return LanePolicy(self.model, [self.lanes[k] for k in indices], [self.lane_layers[k] for k in indices],
                          reference_layers=refs)

    @property
    def num_lanes(self) -> int:
        return len(self.lanes)

    def trainable_parameters(self, lane: int) -> list[nn.Parameter]:
        return list(self.lane_layers[lane].parameters())

    def lanes_above(self, j: int) -> int:
        """How many lanes (a prefix of `lanes`) train a layer above j."""
        return sum(lane.layer > j for lane in self.lanes)

    def lanes_at(self, j: int) -> range:
        """The lanes (contiguous in `lanes`) that train layer j."""
        first = self.lanes_above(j)
        return range(first, first + sum(lane.layer == j for lane in self.lanes))

    # ------------------------------------------------------------------------------------ layouts
    def layout_of(self, batch: RolloutBatch, layout: str = "padded", pad_token_id: int = 0) -> tuple[Layout, list[int]]:
        """The layout of a lane batch and the first layout row of each lane. Packed rows never mix lanes:
        each lane's rows are planned on their own, then the packed rows are stacked."""
        rows_per_lane = _rows_per_lane(batch, self.num_lanes)
        kind = resolve_layout(layout, batch, self.model.config, self.lm_head_weight.device)
        if kind == "padded":
            return PaddedLayout.of_batch(batch), [k * rows_per_lane for k in range(self.num_lanes + 1)]
        parts = [build_layout(lane_rows(batch, k, rows_per_lane), kind, pad_token_id=pad_token_id)
                 for k in range(self.num_lanes)]
        starts = [0]
        for part in parts:
            starts.append(starts[-1] + part.input_ids.shape[0])
        return stack_packed(parts, pad_token_id), starts

    # ------------------------------------------------------------------------------------ passes
    def prefix_lanes(self, batch: RolloutBatch, layout: str = "padded") -> LaneCache:
        built, starts = self.layout_of(batch, layout)
        return self.prefix_layout(built, starts)

    @torch.no_grad()
    def prefix_layout(self, layout: Layout, row_starts: Sequence[int]) -> LaneCache:
        """embed + layers[:i_k] for the rows of each lane k, without autograd: the rows of lanes with deeper
        layers (the first rows) keep going after the others have stopped."""
        if len(row_starts) != self.num_lanes + 1:
            raise ValueError(f"row_starts needs {self.num_lanes + 1} entries, got {len(row_starts)}")
        embeds = self.decoder.embed_tokens(layout.input_ids)
        inputs = self._layer_inputs(layout, embeds)
        cache = LaneCache(inputs=inputs, hidden=[None] * self.num_lanes, row_starts=list(row_starts))
        hidden = embeds
        for k in self.lanes_at(0):
            cache.hidden[k] = embeds[row_starts[k]:row_starts[k + 1]]
        for j in range(self.lanes[0].layer):
            active = row_starts[self.lanes_above(j)]
            hidden = run_layers(self.decoder, self.layer_types, hidden[:active], cache.rows(0, active), j, j + 1)
            for k in self.lanes_at(j + 1):
                cache.hidden[k] = hidden[row_starts[k]:row_starts[k + 1]]
        return cache

    def suffix(self, cache: LaneCache, reference: bool = False) -> Tensor:
        """Every lane's layer (its trainable copy, or with `reference=True` its own reference copy when the
        lanes have them, else the shared original) and the frozen layers above it, then the final norm:
        (layout rows, L, H) over all lanes."""
        starts = cache.row_starts
        firsts = self.reference_layers if reference else self.lane_layers  # None: the shared original layers
        hidden = None  # the rows of the lanes that have started, which are the last rows
        with torch.set_grad_enabled(torch.is_grad_enabled() and not reference):
            for j in range(self.lanes[-1].layer, len(self.decoder.layers)):
                own = self.lanes_at(j)
                if own:
                    hidden = torch.cat([cache.hidden[k] for k in own] + ([] if hidden is None else [hidden]))
                if hidden is None:
                    continue
                first = starts[self.num_lanes] - hidden.shape[0]
                if firsts is None or not own:
                    hidden = run_layers(self.decoder, self.layer_types, hidden, cache.rows(first, starts[-1]), j, j + 1)
                    continue
                outputs = []
                for k in own:
                    rows = slice(starts[k] - first, starts[k + 1] - first)
                    outputs.append(run_layers(self.decoder, self.layer_types, hidden[rows], cache.rows(starts[k], starts[k + 1]),
                                              j, j + 1, first_layer=firsts[k]))
                shared_start = starts[own[-1] + 1]
                if shared_start < starts[-1]:
                    outputs.append(run_layers(self.decoder, self.layer_types, hidden[shared_start - first:],
                                              cache.rows(shared_start, starts[-1]), j, j + 1))
                hidden = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
            return self.decoder.norm(hidden)

    def completion_states(self, cache: LaneCache, reference: bool = False) -> Tensor:
        return cache.layout.completion_states(self.suffix(cache, reference=reference))


# ---------------------------------------------------------------------------------------- batches
def _rows_per_lane(batch: RolloutBatch, num_lanes: int) -> int:
    group = batch.group_size or 1
    if batch.batch_size % (num_lanes * group) != 0:
        raise ValueError(f"a lane batch holds the same number of whole prompt groups for each of its {num_lanes} "
                         f"lanes; got {batch.batch_size} rows in groups of {group}")
    return batch.batch_size // num_lanes


def lane_rows(batch: RolloutBatch, lane: int, rows_per_lane: int) -> RolloutBatch:
    """Lane `lane`'s rows of a lane batch."""
    rows = slice(lane * rows_per_lane, (lane + 1) * rows_per_lane)
    return RolloutBatch(batch.prompt_ids[rows], batch.prompt_mask[rows], batch.completion_ids[rows],
                        batch.completion_mask[rows], batch.rewards[rows], group_size=batch.group_size,
                        advantages=None if batch.advantages is None else batch.advantages[rows])


def stack_batches(batches: Sequence[RolloutBatch], pad_token_id: int = 0) -> RolloutBatch:
    """One lane batch from per-lane batches of equal row counts: prompts left-padded and completions
    right-padded to common widths (padding is masked, so no row's result changes)."""
    if len({b.batch_size for b in batches}) != 1 or len({b.group_size for b in batches}) != 1:
        raise ValueError("the lanes' batches must have the same number of rows and the same group_size")
    prompt_width = max(b.prompt_length for b in batches)
    completion_width = max(b.completion_ids.shape[1] for b in batches)

    def left(x: Tensor, value: int) -> Tensor:
        return nn.functional.pad(x, (prompt_width - x.shape[1], 0), value=value)

    def right(x: Tensor, value: int) -> Tensor:
        return nn.functional.pad(x, (0, completion_width - x.shape[1]), value=value)

    advantages = None if batches[0].advantages is None else torch.cat([b.advantages for b in batches])
    return RolloutBatch(torch.cat([left(b.prompt_ids, pad_token_id) for b in batches]),
                        torch.cat([left(b.prompt_mask, 0) for b in batches]),
                        torch.cat([right(b.completion_ids, pad_token_id) for b in batches]),
                        torch.cat([right(b.completion_mask, 0) for b in batches]),
                        torch.cat([b.rewards for b in batches]), group_size=batches[0].group_size, advantages=advantages)


def stack_packed(parts: Sequence[PackedLayout], pad_token_id: int = 0) -> PackedLayout:
    """The packed rows of several layouts (of one completion width) in one layout, rows padded to the
    widest (row padding: segment -1, masked like the layouts' own)."""
    width = max(p.input_ids.shape[1] for p in parts)
    completion_length = parts[0].completion_length
    if any(p.completion_length != completion_length or p.kind != parts[0].kind for p in parts):
        raise ValueError("stacked packed layouts must share kind and completion width")

    def pad(x: Tensor, value: int) -> Tensor:
        return nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    state_index, target_index = [], []
    row_offset = batch_offset = 0
    for p in parts:
        own_width = p.input_ids.shape[1]
        state_index.append((p.state_index // own_width + row_offset) * width + p.state_index % own_width)
        target_index.append(p.target_index + batch_offset * completion_length)
        row_offset += p.input_ids.shape[0]
        batch_offset += p.batch_size
    return PackedLayout(
        kind=parts[0].kind,
        input_ids=torch.cat([pad(p.input_ids, pad_token_id) for p in parts]),
        position_ids=torch.cat([pad(p.position_ids, 0) for p in parts]),
        segment_ids=torch.cat([pad(p.segment_ids, -1) for p in parts]),
        branch_ids=torch.cat([pad(p.branch_ids, 0) for p in parts]),
        token_mask=torch.cat([pad(p.token_mask, 0) for p in parts]),
        state_index=torch.cat(state_index), target_index=torch.cat(target_index),
        batch_size=batch_offset, completion_length=completion_length,
        padded_tokens=sum(p.padded_tokens for p in parts),
    )
