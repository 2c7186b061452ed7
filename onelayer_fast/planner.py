"""Host-side planning for padding-free packing and GiGPO anchor states (C++ extension `onelayer_fast._planner`).

    plan_microbatches(lengths, token_budget)   token-budgeted, balanced micro-batches of sequence indices
    pack(lengths, microbatch)                  cu_seqlens, position ids and the gather / unpack indices of one
                                               micro-batch of a padded (B, T) layout
    pack_layout(prompt_lens, completion_lens, prompt_width, completion_width, group_size, token_budget)
                                               packed rows of a [left-padded prompt | right-padded completion]
                                               batch, one segment per row or per shared-prompt group: token
                                               gather index, position / segment / branch ids, state and target
                                               indices (`layout.build_layout` makes them a PackedLayout)
    anchor_groups(group_ids, observations)     GiGPO anchor-state id of each step

Each op is a thin typed wrapper over `csrc/planner.cpp`, which validates its inputs (ValueError for bad values,
TypeError for non-integer lengths or ids); beside each is a pure-Python reference `<op>_ref` that defines the
result exactly (same tie-breaking) and that the tests and `bench/test_planner_bench.py` compare against.
`pack_tokens` / `unpack_tokens` apply a `PackedBatch` to tensors.

There is no silent Python fallback: when the extension was not built, calling an op raises ImportError
saying how to build it.
"""
from __future__ import annotations

import heapq
import importlib
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

METHODS = ("largest_first", "karmarkar_karp")
PADDING_SIDES = ("right", "left")

_BUILD_HINT = (
    "the C++ planner extension onelayer_fast._planner is not built. Build it with `pip install -e .` in the "
    "repository root (needs a C++17 compiler such as g++ or clang++; pybind11 comes from the build requirements); "
    "there is no Python fallback"
)


def _ext():
    try:
        return importlib.import_module(f"{__package__}._planner")
    except ImportError as error:
        raise ImportError(f"{_BUILD_HINT} ({error})") from error


def extension_available() -> bool:
    """True when the compiled planner can be imported (for skips and diagnostics, never for a fallback)."""
    try:
        _ext()
    except ImportError:
        return False
    return True


def _host(values: Any) -> Any:
    """Tensors leave autograd and the device (a CUDA tensor of lengths costs one copy and sync); rest as is."""
    return values.detach().cpu() if isinstance(values, Tensor) else values


# --------------------------------------------------------------------------------------------------
# plan_microbatches
# --------------------------------------------------------------------------------------------------


def plan_microbatches(lengths: Sequence[int] | Tensor, token_budget: int, method: str = "karmarkar_karp",
                      group_ids: Sequence[int] | Tensor | None = None) -> list[list[int]]:
    """Balanced micro-batches under a token budget.

    lengths: (N,) non-negative tokens per sequence; token_budget: most tokens per micro-batch;
    method: "karmarkar_karp" (largest differencing; the default: the tighter spread and often one micro-batch
    fewer) or "largest_first" (LPT: a few times faster, spread at most the largest sequence or group);
    group_ids: (N,) optional, keeps the sequences of a group (e.g. the completions of a shared prompt) in one
    micro-batch.
    Returns lists of sequence indices (ascending), heaviest micro-batch first; every index appears exactly
    once and every micro-batch sums to at most `token_budget`. The count is the fewest the method finds
    (see `plan_microbatches_ref`). Deterministic: ties go to the lower index.
    """
    return _ext().plan_microbatches(_host(lengths), int(token_budget), method,
                                    None if group_ids is None else _host(group_ids))


def _largest_first_ref(weights: list[int], k: int, budget: int) -> list[list[int]] | None:
    """LPT: by decreasing weight (ties: lower index) into the least-loaded of k bins (ties: lower bin)."""
    heap = [(0, b) for b in range(k)]
    bins: list[list[int]] = [[] for _ in range(k)]
    for u in sorted(range(len(weights)), key=lambda u: (-weights[u], u)):
        load, b = heap[0]
        if load + weights[u] > budget:
            return None
        bins[b].append(u)
        heapq.heapreplace(heap, (load + weights[u], b))
    return bins


def _karmarkar_karp_ref(weights: list[int], k: int, budget: int) -> list[list[int]] | None:
    """k-way largest differencing on dense k-tuples of (sum, members) slots.

    A tuple is k slots sorted by (sum desc, empty last), stably; members is a nested pair tree (None = empty
    slot) so a merge never copies member lists. Repeatedly merge the two tuples of largest spread (max - min
    sum; ties: lower id, new tuples get the next ids) slot j with slot k - 1 - j.
    """
    def order(slot: tuple[int, Any]) -> tuple[int, bool]:
        return (-slot[0], slot[1] is None)

    tuples = {u: [(w, u)] + [(0, None)] * (k - 1) for u, w in enumerate(weights)}
    heap = [(-(t[0][0] - t[-1][0]), u) for u, t in tuples.items()]
    heapq.heapify(heap)
    next_id = len(weights)
    while len(heap) > 1:
        a = tuples.pop(heapq.heappop(heap)[1])
        b = tuples.pop(heapq.heappop(heap)[1])
        merged = []
        for (sa, ma), (sb, mb) in zip(a, reversed(b)):
            merged.append((sa + sb, mb if ma is None else ma if mb is None else (ma, mb)))
        merged.sort(key=order)
        tuples[next_id] = merged
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), next_id))
        next_id += 1
    bins = []
    for total, members in tuples[heap[0][1]]:
        if total > budget:
            return None
        if members is not None:
            flat, stack = [], [members]
            while stack:
                node = stack.pop()
                if isinstance(node, tuple):
                    stack.extend(node)
                else:
                    flat.append(node)
            bins.append(flat)
    return bins


def _fewest_bins_ref(weights: list[int], budget: int, balance) -> list[list[int]]:
    """The smallest k (locally) for which `balance` fits: from a lower bound, gallop up 1, 2, 4, ..., bisect back.

    Lower bound: ceil(total / budget), and one bin per unit heavier than budget / 2. k = len(weights) always fits.
    """
    n_units = len(weights)
    heavy = sum(1 for w in weights if w > budget - w)
    k = min(n_units, max(1, -(-sum(weights) // budget), heavy))
    infeasible, step = k - 1, 1
    best = balance(weights, k, budget)
    while best is None:
        infeasible, k, step = k, min(n_units, k + step), step * 2
        best = balance(weights, k, budget)
    feasible = k
    while feasible - infeasible > 1:
        mid = infeasible + (feasible - infeasible) // 2
        plan = balance(weights, mid, budget)
        if plan is None:
            infeasible = mid
        else:
            feasible, best = mid, plan
    return best


def plan_microbatches_ref(lengths: Sequence[int], token_budget: int, method: str = "karmarkar_karp",
                          group_ids: Sequence[int] | None = None) -> list[list[int]]:
    """Pure-Python reference of `plan_microbatches` (same result; checks only what the algorithm needs)."""
    lengths = [int(x) for x in lengths]
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if group_ids is None:
        units = [[i] for i in range(len(lengths))]
    else:
        unit_of: dict[int, int] = {}
        units = []
        for i, g in enumerate(group_ids):
            u = unit_of.setdefault(int(g), len(units))
            if u == len(units):
                units.append([])
            units[u].append(i)
    weights = [sum(lengths[i] for i in unit) for unit in units]
    if max(weights) > token_budget:
        raise ValueError(f"a sequence or group has {max(weights)} tokens, more than token_budget = {token_budget}")
    balance = _largest_first_ref if method == "largest_first" else _karmarkar_karp_ref
    batches = [sorted(i for u in b for i in units[u]) for b in _fewest_bins_ref(weights, token_budget, balance)]
    batches = [b for b in batches if b]
    return sorted(batches, key=lambda b: (-sum(lengths[i] for i in b), b[0]))


# --------------------------------------------------------------------------------------------------
# pack
# --------------------------------------------------------------------------------------------------


class PackedBatch(NamedTuple):
    """One micro-batch of a padded (B, T) layout, packed: m sequences, `total` tokens.

    cu_seqlens   (m + 1,) int32   cumulative sequence lengths (flash-attn varlen convention)
    position_ids (total,) int64   0..L-1 within each sequence
    gather_index (total,) int64   flat index b * T + t of each packed token in the padded layout
    unpack_index (m, T)   int64   packed index of each position of the micro-batch's rows, -1 at pads
    max_seqlen   int              longest sequence of the micro-batch
    """

    cu_seqlens: Tensor
    position_ids: Tensor
    gather_index: Tensor
    unpack_index: Tensor
    max_seqlen: int


def pack(lengths: Sequence[int] | Tensor, microbatch: Sequence[int] | Tensor, padded_len: int | None = None,
         padding_side: str = "right") -> PackedBatch:
    """Packing indices of the sequences `microbatch` (in that order) of a padded (len(lengths), T) layout.

    T = padded_len (default max(lengths)); sequence b occupies t in [0, L_b) with right padding, [T - L_b, T)
    with left padding.
    """
    cu, pos, gather, unpack, max_seqlen = _ext().pack(
        _host(lengths), _host(microbatch), -1 if padded_len is None else int(padded_len), padding_side)
    return PackedBatch(torch.from_numpy(cu), torch.from_numpy(pos), torch.from_numpy(gather),
                       torch.from_numpy(unpack), int(max_seqlen))


def pack_ref(lengths: Sequence[int], microbatch: Sequence[int], padded_len: int | None = None,
             padding_side: str = "right") -> PackedBatch:
    """Pure-Python reference of `pack`."""
    lengths = [int(x) for x in lengths]
    width = max(lengths) if padded_len is None else int(padded_len)
    cu, pos, gather = [0], [], []
    unpack = [[-1] * width for _ in microbatch]
    for r, b in enumerate(int(b) for b in microbatch):
        start = width - lengths[b] if padding_side == "left" else 0
        for t in range(lengths[b]):
            unpack[r][start + t] = len(pos)
            pos.append(t)
            gather.append(b * width + start + t)
        cu.append(len(pos))
    return PackedBatch(torch.tensor(cu, dtype=torch.int32), torch.tensor(pos, dtype=torch.int64),
                       torch.tensor(gather, dtype=torch.int64),
                       torch.tensor(unpack, dtype=torch.int64).reshape(len(unpack), width),
                       max(lengths[int(b)] for b in microbatch))


def pack_tokens(padded: Tensor, packed: PackedBatch) -> Tensor:
    """padded: (B, T, *rest) -> (total, *rest), the micro-batch's tokens without padding."""
    return padded.reshape(-1, *padded.shape[2:]).index_select(0, packed.gather_index.to(padded.device))


def unpack_tokens(values: Tensor, packed: PackedBatch, fill: float = 0) -> Tensor:
    """values: (total, *rest) -> (m, T, *rest), rows in micro-batch order, `fill` at pads."""
    index = packed.unpack_index.to(values.device)
    out = values.new_full((*index.shape, *values.shape[1:]), fill)
    valid = index >= 0
    out[valid] = values[index[valid]]
    return out


# --------------------------------------------------------------------------------------------------
# pack_layout
# --------------------------------------------------------------------------------------------------


class LayoutIndex(NamedTuple):
    """Host-side indices of a packed layout of a (B, P + C) [prompt | completion] batch: S rows of L tokens.

    token_index  (S, L) int64  flat index b * (P + C) + t of each token, -1 on row padding
    position_ids (S, L) int64  rotary positions, 0 at each segment's first token (0 on row padding)
    segment_ids  (S, L) int64  segment index (row, or shared-prompt group), -1 on row padding
    branch_ids   (S, L) int64  0: seen by the whole segment; k + 1: the k-th completion of a group
    state_index  (N,)   int64  flat index into S * L of the state that predicts each real completion token
    target_index (N,)   int64  that token's flat index b * C + t in the (B, C) completion layout
    """

    token_index: Tensor
    position_ids: Tensor
    segment_ids: Tensor
    branch_ids: Tensor
    state_index: Tensor
    target_index: Tensor


def pack_layout(prompt_lens: Sequence[int] | Tensor, completion_lens: Sequence[int] | Tensor, prompt_width: int,
                completion_width: int, group_size: int | None = None, token_budget: int | None = None) -> LayoutIndex:
    """Packed rows of a batch of B rows [prompt left-padded to P | completion right-padded to C].

    prompt_lens, completion_lens: (B,) real tokens per row (prompts at least 1, every row of a group the same).
    group_size: None packs one segment per row (layout "packed": prompt + completion, branch 0); G shares each
    group of G consecutive rows' prompt (layout "shared_prompt": the prompt once, then the G completions with
    branch ids 1..G, positions continuing the prompt's).
    token_budget: most tokens per packed row, default max(P + C, the longest segment).
    Rows are the micro-batches of `plan_microbatches(segment_lengths, token_budget, "largest_first")`, ordered
    by their first segment, segments ascending within a row.
    """
    arrays = _ext().pack_layout(_host(prompt_lens), _host(completion_lens), prompt_width, completion_width,
                                group_size, token_budget)
    return LayoutIndex(*(torch.from_numpy(a) for a in arrays))


def pack_layout_ref(prompt_lens: Sequence[int], completion_lens: Sequence[int], prompt_width: int,
                    completion_width: int, group_size: int | None = None,
                    token_budget: int | None = None) -> LayoutIndex:
    """Pure-Python reference of `pack_layout`: the same indices from a plain loop; it defines the result."""
    prompt_lens = [int(x) for x in prompt_lens]
    completion_lens = [int(x) for x in completion_lens]
    shared = group_size is not None
    group = int(group_size) if shared else 1
    rows, row_width = len(prompt_lens), prompt_width + completion_width
    # Segments: per group, the prompt once (taken from the group's first row), then each row's completion.
    # pieces: (first flat index into the [prompt | completion] layout, tokens, first position, branch, row or
    # -1 for the prompt)
    segments: list[list[tuple[int, int, int, int, int]]] = []
    for g in range(rows // group):
        first = g * group
        p = prompt_lens[first]
        pieces = [(first * row_width + prompt_width - p, p, 0, 0, -1)]
        for k in range(group):
            row = first + k
            pieces.append((row * row_width + prompt_width, completion_lens[row], p, k + 1 if shared else 0, row))
        segments.append(pieces)
    lengths = [sum(piece[1] for piece in pieces) for pieces in segments]
    budget = max(row_width, max(lengths)) if token_budget is None else int(token_budget)
    if budget < max(lengths):
        raise ValueError(f"token_budget = {budget} is smaller than the longest segment ({max(lengths)} tokens)")
    plan = sorted(plan_microbatches_ref(lengths, budget, "largest_first"), key=lambda r: r[0])
    width = max(sum(lengths[s] for s in row) for row in plan)

    shape = (len(plan), width)
    token_index = torch.full(shape, -1, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    branch_ids = torch.zeros(shape, dtype=torch.long)
    state_index: list[Tensor] = []
    target_index: list[Tensor] = []
    for r, row_segments in enumerate(plan):
        offset = 0
        for s in row_segments:
            prompt_last = -1  # flat index of the segment's last prompt token
            for start, n, position, branch, row in segments[s]:
                span = slice(offset, offset + n)
                token_index[r, span] = torch.arange(start, start + n)
                position_ids[r, span] = torch.arange(position, position + n)
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
    return LayoutIndex(token_index, position_ids, segment_ids, branch_ids,
                       torch.cat(state_index) if state_index else empty,
                       torch.cat(target_index) if target_index else empty)


# --------------------------------------------------------------------------------------------------
# anchor_groups
# --------------------------------------------------------------------------------------------------


def anchor_groups(group_ids: Sequence[int] | Tensor, observations: Sequence[str] | Sequence[int] | Tensor) -> Tensor:
    """(N,) int64 GiGPO anchor id of each step: dense 0..K-1 in first-seen order of (group, observation).

    group_ids: (N,) ints; observations: (N,) strings (compared exactly) or integer hashes. Steps of one
    group with identical observations share an id, across trajectories and step indices, which is the
    anchor grouping of `advantages.gigpo_advantages`.
    """
    return torch.from_numpy(_ext().anchor_groups(_host(group_ids), _host(observations)))


def anchor_groups_ref(group_ids: Sequence[int], observations: Sequence[Hashable]) -> list[int]:
    """Pure-Python reference of `anchor_groups`."""
    if len(group_ids) != len(observations):
        raise ValueError(f"group_ids and observations differ in size: {len(group_ids)} vs {len(observations)}")
    ids: dict[tuple[int, Hashable], int] = {}
    return [ids.setdefault((int(g), o), len(ids)) for g, o in zip(group_ids, observations)]
