"""Lanes inside TRL's GRPOTrainer: `OneLayerGRPOTrainer(..., layer=[Lane(...), ...])` (the `[trl]` extra).

    from onelayer_fast.lanes import Lane
    from onelayer_fast.trl import OneLayerGRPOTrainer
    trainer = OneLayerGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=data,
                                  layer=[Lane(12), Lane(8, learning_rate=3e-6)])   # or layer=[12, 8]
    trainer.train()
    trainer.lane_layer(k)   # lane k's trained layer (k: the position in the given list)

Each lane is one single-layer run: it behaves as its own `OneLayerGRPOTrainer(..., layer=lane.layer)` run with
the lane's learning rate would on the same rollouts. One shared frozen model (`LanePolicy`: a trainable copy of
each lane's layer, the shared original layer as every lane's reference):
- generation: TRL's own `_generate_and_score_completions` runs once per lane per generation batch, with the
  lane's trainable copy standing in for its layer in the model (restored afterwards, exceptions included), so
  each lane samples from its own policy and gets TRL's rewards and advantages within its own groups; the cost
  is one generation per lane;
- the batch: lane by lane (LanePolicy order: deepest layer first), every row tagged with its lane; the prefix
  (embeddings + layers below each lane's layer) runs once per generation batch for every lane's rows together,
  and so do the reference states (beta > 0) and, when needed, the old-policy states; their log-probs are
  taken per lane over the lane's unmasked tokens, as a single run takes them (the same float32 rounding);
- the split into steps_per_generation micro-batches is lane-stratified: one permutation of a lane's rows (one
  draw of the size TRL's shuffle draws for a single run) orders every lane's rows, and every micro-batch takes
  the same slice of each lane, so each lane's micro-batches hold the rows its single run's would;
- the loss is the sum over lanes of onelayer_fast's loss on the lane's rows, each scaled as a single run's
  (`OneLayerGRPOTrainer._loss_scale`, with the lane's own token counts for dapo / cispo / vespo): each lane's
  parameters get only their own gradient;
- the optimizer holds one parameter group per lane (two with weight decay: Trainer exempts biases and norms)
  at the lane's learning rate (args.learning_rate when None); the Trainer's scheduler scales every group;
  gradients are clipped per lane to args.max_grad_norm where Trainer clips (`_clip_grad_norm`: the model's
  own parameters, which hold no lane's, are never clipped), and the logged grad_norm is the norm over every
  lane's gradient before clipping (`lane{k}/grad_norm`: each lane's);
- logging: TRL's metrics (averaged over lanes) and per lane `lane{k}/reward`, `lane{k}/reward_std`,
  `lane{k}/loss`, `lane{k}/kl`, `lane{k}/entropy`, `lane{k}/grad_norm`, `lane{k}/learning_rate`, ...;
- checkpoints: one directory per lane (`lane-{k}-layer-{L}/layer.safetensors` + `meta.json`, what
  `onelayer-fast merge` and `checkpoint.load_layer` read) and `lanes.json`; resuming loads every lane back
  and refuses a checkpoint of other lanes;
- sync_ref_model gives each lane its own reference copy of its layer, mixed with the lane's layer on TRL's
  schedule.

Random numbers (what a lane's `seed` means here): generation samples from the torch random stream. Lanes without
a seed all start their generation from the same stream state, the one the generation batch began with (the
state a single run would sample from), and the stream then continues from where the first of them left it: the
first unseeded lane's sampling is its single run's draw for draw, and the other unseeded lanes share its random
numbers (common random numbers). A lane with `seed=s` samples from its own stream instead, reseeded at every
generation batch from (s, optimizer step, micro-step), which resumes alike. The data order (TRL's sampler,
seeded by args.seed) is the same for every lane: all lanes train on the same prompts.
Several processes (`accelerate launch` / torchrun, plain data parallel) work as for one layer: each process
generates its share, every lane's gradients are averaged across processes (`training_step`), each lane's loss
metrics are reduced over the processes; the shared model, which trains nothing, is never wrapped in DDP.
Not supported (a clear error): vLLM (its weights would have to be synced once per lane), adaptive entropy
control (one controller per lane), a given optimizer, multimodal inputs, and what OneLayerGRPOTrainer does not
support. HF generation with a lane's layer swapped in runs the model as it is: no prefix states are captured
from it (each generation batch runs one prefix forward over every lane's rows).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

# .trl_trainer first: without TRL it raises the ImportError that says how to install it
from .trl_trainer import (
    LOSS_METRICS,
    OLD_PENDING_KEY,
    PREFIX_KEY,
    OneLayerGRPOTrainer,
    SyncReferenceLayers,
    register_lane_trainer,
)
from .checkpoint import load_lane_layer, save_layer_weights
from .lanes import Lane, LaneCache, LanePolicy, resolve_lanes
from .layout import PaddedLayout
from .loss import grpo_loss
from .policy import decoder_of

import trl
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

LANE_KEY = "onelayer_lane"  # (rows,) long: the lane (position in the given list) of each row
LANE_ITEMS_KEY = "onelayer_lane_items"  # (rows,): TRL's num_items_in_batch of the row's lane (its loss tokens)
LANES_FILE = "lanes.json"  # in a checkpoint: the lanes and their directories
# OneLayerGRPOTrainer methods a LaneGRPOTrainer inherits as they are (they do not touch the one-layer policy);
# every other method OneLayerGRPOTrainer defines is overridden here (tests/test_trl_lanes.py checks it).
INHERITED = ("_layout", "_loss_scale", "_log_loss_metrics", "_masked_logprobs",
             "_build_trl",  # the checks and TRL's construction, before any policy exists
             "_entropy_control", "_adapt_entropy",  # these two: only OneLayerGRPOTrainer._compute_loss calls them
             "training_step", "_world_loss_metrics")  # these two: through trainable_parameters / given the rows
# Per-row entries of TRL's generation output: how a lane's rows are padded to the lanes' common width.
_PADDED = {"prompt_ids": "left", "prompt_mask": "left", "completion_ids": "right", "completion_mask": "right",
           "old_per_token_logps": "right", "sampling_per_token_logps": "right", "tool_mask": "right"}
_LOGGED_GENERATION = ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length")


# ---------------------------------------------------------------------------------------- lanes
def as_lanes(layer: Sequence[Lane | int]) -> list[Lane]:
    """`layer=[...]` as Lane objects (an int i is Lane(i)); ValueError for an empty list or another kind of item.
    Ranges and duplicates are checked by `resolve_lanes` once the model's layer count is known."""
    if isinstance(layer, (int, Lane)) and not isinstance(layer, bool):  # LaneGRPOTrainer(..., layer=3): one lane
        layer = [layer]
    if isinstance(layer, (str, bytes)) or not isinstance(layer, Sequence):
        raise ValueError(f"layer must be a list of lanes (Lane objects or layer indices), got {layer!r}")
    lanes = []
    for item in layer:
        if isinstance(item, Lane):
            lanes.append(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            lanes.append(Lane(item))
        else:
            raise ValueError(f"lanes must be Lane objects or layer indices, got {item!r}")
    if not lanes:
        raise ValueError("layer=[]: at least one lane is needed")
    for lane in lanes:
        if lane.seed is not None and (not isinstance(lane.seed, int) or isinstance(lane.seed, bool) or lane.seed < 0):
            raise ValueError(f"a lane seed must be a non-negative int (its own sampling stream), got {lane.seed!r}")
    return lanes


def lane_directory(k: int, lane: Lane) -> str:
    """Lane k's directory inside a checkpoint."""
    return f"lane-{k}-layer-{lane.layer}"


def lane_generation_seed(seed: int, step: int, micro_step: int) -> int:
    """The seed of a seeded lane's sampling at one generation batch: mixed (SeedSequence) so that nearby lane seeds
    and steps give unrelated streams."""
    return int(np.random.SeedSequence([seed, step, micro_step]).generate_state(1, dtype=np.uint64)[0])


class _RandomState:
    """The torch random state HF sampling draws from: the CPU generator and, on CUDA, the device's."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.index = (device.index if device.index is not None else torch.cuda.current_device()) if self.cuda else None

    def get(self) -> tuple[Tensor, Tensor | None]:
        return torch.get_rng_state(), (torch.cuda.get_rng_state(self.index) if self.cuda else None)

    def set(self, state: tuple[Tensor, Tensor | None]) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.index)

    def seed(self, value: int) -> None:
        torch.default_generator.manual_seed(value)
        if self.cuda:
            torch.cuda.default_generators[self.index].manual_seed(value)


# ---------------------------------------------------------------------------------------- batches
def _pad_columns(x: Tensor, width: int, side: str, value: float) -> Tensor:
    missing = width - x.shape[1]
    if missing == 0:
        return x
    return nn.functional.pad(x, (missing, 0) if side == "left" else (0, missing), value=value)


def stack_lane_outputs(outputs: Sequence[dict[str, Any]], lane_ids: Sequence[int], pad_token_id: int) -> dict[str, Any]:
    """One generation batch from TRL's per-lane outputs (in row order): prompts left-padded and completions
    right-padded to the lanes' common widths (masked, so no row's result changes), each row tagged with its lane
    (LANE_KEY) and its lane's loss-token count (LANE_ITEMS_KEY); num_items_in_batch is the sum over lanes."""
    keys = set(outputs[0])
    if any(set(o) != keys for o in outputs):
        raise RuntimeError(f"the lanes' generation outputs hold different entries: {[sorted(o) for o in outputs]}")
    if unknown := sorted(keys - set(_PADDED) - {"advantages", "num_items_in_batch"}):
        raise NotImplementedError(f"lanes do not support the generation entries {unknown} (multimodal inputs, "
                                  "vLLM importance sampling)")
    pad_values = {"prompt_ids": pad_token_id, "completion_ids": pad_token_id, "tool_mask": 1}
    batch: dict[str, Any] = {}
    for key in sorted(keys & set(_PADDED)):
        width = max(o[key].shape[1] for o in outputs)
        batch[key] = torch.cat([_pad_columns(o[key], width, _PADDED[key], pad_values.get(key, 0)) for o in outputs])
    batch["advantages"] = torch.cat([o["advantages"] for o in outputs])
    rows = [o["advantages"].shape[0] for o in outputs]
    device = batch["advantages"].device
    batch[LANE_KEY] = torch.cat([torch.full((n,), k, dtype=torch.long, device=device) for k, n in zip(lane_ids, rows)])
    items = [o["num_items_in_batch"].reshape(()).float() for o in outputs]
    batch[LANE_ITEMS_KEY] = torch.cat([item.expand(n) for item, n in zip(items, rows)])
    batch["num_items_in_batch"] = torch.stack(items).sum()
    return batch


def _take_rows(value: Any, index: Tensor) -> Any:
    if value is None or (isinstance(value, Tensor) and value.dim() == 0):
        return value
    if isinstance(value, Tensor):
        return value[index.to(value.device)]
    return [value[i] for i in index.tolist()]


def lane_stratified_split(batch: dict[str, Any], num_lanes: int, chunks: int) -> list[dict[str, Any]]:
    """A lane batch (rows lane by lane, equal counts) shuffled and split into `chunks` micro-batches as TRL
    shuffles and splits a single run's: one permutation of a lane's rows (torch.randperm, the one draw TRL's
    shuffle makes) orders every lane's rows, and micro-batch i takes the same slice of every lane, lanes in the
    batch's order, so each lane's rows of a micro-batch are its single run's and contiguous."""
    rows = batch[LANE_KEY].shape[0]
    per_lane = rows // num_lanes
    if per_lane * num_lanes != rows or per_lane % chunks != 0:
        raise ValueError(f"{rows} rows of {num_lanes} lanes do not split into {chunks} equal micro-batches per lane")
    permutation = torch.randperm(per_lane)
    size = per_lane // chunks
    micro_batches = []
    for i in range(chunks):
        take = permutation[i * size:(i + 1) * size]
        index = torch.cat([lane * per_lane + take for lane in range(num_lanes)])
        micro_batches.append({key: _take_rows(value, index) for key, value in batch.items()})
    return micro_batches


# ---------------------------------------------------------------------------------------- callbacks
class _ZeroLaneGradients(TrainerCallback):
    """Trainer calls `model.zero_grad()` after each optimizer step; the lanes' layers are not in the model (the
    shared model stays untouched), so their gradients are dropped here, right after the step that used them."""

    def __init__(self, policy: LanePolicy):
        self.policy = policy

    def _zero(self) -> None:
        for layer in self.policy.lane_layers:
            layer.zero_grad(set_to_none=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self._zero()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._zero()


# ---------------------------------------------------------------------------------------- the trainer
class LaneGRPOTrainer(OneLayerGRPOTrainer):
    """Several single-layer runs in one TRL GRPOTrainer loop; built by `OneLayerGRPOTrainer(..., layer=[...])`.

    layer: Lane objects (`onelayer_fast.lanes.Lane(layer, learning_rate=None, seed=None)`) or layer indices.
    `lane k` is the k-th of them everywhere (metrics, checkpoint directories, `lane_layer(k)`). See the module
    docstring for what each lane shares and what it owns.
    """

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, *positional,
                 layer: Sequence[Lane | int], loss_backend: str = "auto", **kwargs):
        lanes = as_lanes(layer)

        def check_lanes(args: GRPOConfig) -> None:
            if (reason := _unsupported_with_lanes(args, kwargs)) is not None:
                raise NotImplementedError(f"OneLayerGRPOTrainer with lanes does not support {reason}")
            if isinstance(model, nn.Module):  # bad lanes fail before TRL builds anything
                resolve_lanes(lanes, len(decoder_of(model).layers))

        self._build_trl(model, reward_funcs, args, positional, kwargs, loss_backend, check_lanes)
        sync = self.args.sync_ref_model
        self.lanes: list[Lane] = resolve_lanes(lanes, len(decoder_of(self.model).layers))  # the given order
        # sync_ref_model moves each lane's reference: then each lane needs its own copy of its original layer.
        self.policy = LanePolicy(self.model, self.lanes, own_references=sync)  # freezes the shared model
        self._position = {k: p for p, k in enumerate(self.policy.order)}  # lane k -> its place in policy order
        if sync:
            self.add_callback(SyncReferenceLayers(list(zip(self.policy.reference_layers, self.policy.lane_layers,
                                                           strict=True))))
        self.add_callback(_ZeroLaneGradients(self.policy))
        self._generating = self._old_logps_requested = False

    @property
    def num_lanes(self) -> int:
        return len(self.lanes)

    def lane_layer(self, k: int) -> nn.Module:
        """Lane k's trainable layer (k: its position in the given list)."""
        return self.policy.lane_layers[self._position[k]]

    # ---- generation: TRL's, once per lane, through the lane's own layer ----------------------------------
    @contextlib.contextmanager
    def lane_in_model(self, k: int) -> Iterator[nn.Module]:
        """Lane k's trainable layer in its layer's place in the model, so that whatever runs the model (HF
        generate) runs lane k's policy; the shared layer is back on exit, exceptions included."""
        layers, index = self.policy.decoder.layers, self.lanes[k].layer
        shared, own = layers[index], self.lane_layer(k)
        was_training = own.training
        own.train(shared.training)
        layers[index] = own
        try:
            yield own
        finally:
            layers[index] = shared
            own.train(was_training)

    def _generate(self, prompts):
        # TRL's sampling as it is: OneLayerGRPOTrainer's generation hooks assume its one target layer.
        return GRPOTrainer._generate(self, prompts)

    def _generate_lanes(self, inputs: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
        """TRL's generation, scoring and advantages once per lane (given order), each with the lane's layer in
        the model and the lane's random stream (module docstring); TRL's reference pass is skipped (beta 0 while
        it runs), and its old log-probs are placeholders filled in by `_attach_states`."""
        random = _RandomState(self.accelerator.device)
        start, carry_on = random.get(), None
        micro_step = self._step % max(1, self.args.gradient_accumulation_steps)
        outputs = []
        beta, self.beta = self.beta, 0.0
        self._generating, self._old_logps_requested = True, False
        try:
            for k, lane in enumerate(self.lanes):
                if lane.seed is None:
                    random.set(start)
                else:
                    random.seed(lane_generation_seed(lane.seed, self.state.global_step, micro_step))
                with self.lane_in_model(k):
                    # a copy of each row: TRL may write a rollout's extra fields into them
                    outputs.append(GRPOTrainer._generate_and_score_completions(self, [dict(x) for x in inputs]))
                if lane.seed is None and carry_on is None:
                    carry_on = random.get()
                for name in _LOGGED_GENERATION:  # TRL just appended lane k's value
                    if values := self._metrics[mode].get(name):
                        self._metrics[mode][f"lane{k}/{name}"].append(values[-1])
        finally:
            self.beta, self._generating = beta, False
            random.set(start if carry_on is None else carry_on)
        return outputs

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """TRL asks for old log-probs while a lane generates: a placeholder here, filled in once every lane has
        generated, in one pass over all lanes (`_attach_states`), or at first use."""
        if not self._generating:
            raise RuntimeError("LaneGRPOTrainer takes log-probs through its LanePolicy; TRL's per-model pass runs "
                               "only for the old log-probs at generation time")
        if any(value is not None for value in multimodal.values()) or compute_entropy or compute_aux_loss:
            raise NotImplementedError("OneLayerGRPOTrainer: multimodal inputs, entropies at generation time and MoE "
                                      "aux losses are not supported")
        self._old_logps_requested = True
        return torch.full((input_ids.shape[0], logits_to_keep), math.nan, device=input_ids.device), None, None

    def _lane_layout(self, input_ids: Tensor, attention_mask: Tensor, completion_length: int) -> PaddedLayout:
        # Positions 0 ... T - 1 on every row, as TRL's training forward (and OneLayerGRPOTrainer) count them.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return PaddedLayout(input_ids, attention_mask, completion_start=input_ids.shape[1] - completion_length,
                            position_ids=positions)

    def _row_starts(self, rows: int) -> list[int]:
        per_lane = rows // self.num_lanes
        return [p * per_lane for p in range(self.num_lanes + 1)]

    @torch.no_grad()
    def _attach_states(self, batch: dict[str, Any]) -> None:
        """The prefix output of every lane's rows (one LanePolicy pass: each row up to its lane's layer), and
        from it the reference log-probs (beta > 0) and the old log-probs TRL asked for."""
        completion_ids = batch["completion_ids"]
        input_ids = torch.cat([batch["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        layout = self._lane_layout(input_ids, attention_mask, completion_ids.shape[1])
        starts = self._row_starts(input_ids.shape[0])
        cache = self.policy.prefix_layout(layout, starts)
        if self.beta != 0.0:
            loss_mask = batch["completion_mask"] * batch.get("tool_mask", 1)
            batch["ref_per_token_logps"] = self._lane_logprobs(self.policy.completion_states(cache, reference=True),
                                                               completion_ids, loss_mask, starts)
        if self._old_logps_requested:
            if self._old_logps_from_first_use:  # no optimizer step before first use: the first loss pass has them
                batch[OLD_PENDING_KEY] = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            else:
                batch["old_per_token_logps"] = self._lane_logprobs(self.policy.completion_states(cache),
                                                                   completion_ids, batch["completion_mask"], starts)
        batch[PREFIX_KEY] = torch.cat(cache.hidden)

    def _lane_logprobs(self, hidden: Tensor, completion_ids: Tensor, mask: Tensor, starts: Sequence[int]) -> Tensor:
        """(rows, C) float32 log-probs at each lane's unmasked tokens, 0 elsewhere, one call per lane over the
        tokens the lane's loss takes its log-probs over (as OneLayerGRPOTrainer does for one run): where the
        weights agree (a lane's reference before its first step) they agree to the bit, and a zero KL gradient
        stays zero instead of rounding noise that Adam would turn into a whole step."""
        return torch.cat([self._masked_logprobs(hidden[a:b], completion_ids[a:b], mask[a:b])
                          for a, b in zip(starts[:-1], starts[1:])])

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        outputs = self._generate_lanes(inputs, mode)
        order = self.policy.order  # rows lane by lane, deepest layer first: the LanePolicy layout
        batch = stack_lane_outputs([outputs[k] for k in order], order, self._tokenizer.pad_token_id)
        self._attach_states(batch)
        return batch

    def _prepare_inputs(self, generation_batch):
        """TRL's buffering (a new generation batch every steps_per_generation * num_iterations micro-steps),
        with the lane-stratified split in place of TRL's shuffle and split."""
        if not self.model.training:  # evaluation: no buffering, no split
            return self._generate_and_score_completions(generation_batch)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            self._buffered_inputs = lane_stratified_split(batch, self.num_lanes, self.args.steps_per_generation)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    # ---- the loss: each lane's single-run loss, summed ----------------------------------------------------
    def _compute_loss(self, model, inputs):
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        advantages = inputs["advantages"]
        if advantages.dim() != 1:
            raise NotImplementedError("OneLayerGRPOTrainer takes one advantage per completion (shape (B,))")
        starts = self._row_starts(completion_ids.shape[0])
        expected = torch.tensor(self.policy.order, device=completion_ids.device).repeat_interleave(starts[1])
        if not torch.equal(inputs[LANE_KEY], expected):  # the loss slices rows by position: they must be in place
            raise RuntimeError("a lane micro-batch must hold its lanes' rows lane by lane, in equal numbers")
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        layout = self._lane_layout(input_ids, attention_mask, completion_ids.shape[1])
        prefix = inputs[PREFIX_KEY]
        # prefix stands in for the embeddings: only its dtype, device and shape count for positions and masks
        cache = LaneCache(inputs=self.policy._layer_inputs(layout, prefix),
                          hidden=[prefix[starts[p]:starts[p + 1]] for p in range(self.num_lanes)], row_starts=starts)
        for layer in self.policy.lane_layers:  # as the model's own layer would be (dropout, checkpointing)
            layer.train(self.model.training)
        hidden = self.policy.completion_states(cache)
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        old_logps, ref_logps = inputs.get("old_per_token_logps"), inputs.get("ref_per_token_logps")
        sampling_logps = inputs.get("sampling_per_token_logps")  # a rollout_func's: the off-policy mask reads them
        pending = inputs.get(OLD_PENDING_KEY)
        total = None
        for p, k in enumerate(self.policy.order):
            rows = slice(starts[p], starts[p + 1])  # basic slices: views, so the in-place fill below sticks
            lane_mask = mask[rows]
            scale = self._loss_scale(lane_mask, {"num_items_in_batch": inputs[LANE_ITEMS_KEY][starts[p]]}, mode)
            config = self._loss_config
            if getattr(config, "entropy_coef", 0.0) and scale != 1.0 / accumulation:
                # as OneLayerGRPOTrainer: TRL's entropy bonus is divided by the accumulation steps alone
                config = dataclasses.replace(config, entropy_coef=config.entropy_coef / (scale * accumulation))
            first_use = pending is not None and bool(pending[rows].any())
            result = grpo_loss(hidden[rows], self.policy.lm_head_weight, completion_ids[rows], lane_mask,
                               advantages=advantages[rows],
                               old_logps=None if first_use or old_logps is None else old_logps[rows],
                               ref_logps=None if ref_logps is None else ref_logps[rows], config=config,
                               backend=self.loss_backend,
                               sampling_logps=None if sampling_logps is None else sampling_logps[rows],
                               entropy_metric=True)
            if first_use:  # the weights have not moved since generation: these are the lane's old log-probs
                old_logps[rows].copy_(result.token_logps)
                pending[rows].zero_()
            lane_loss = result.loss * scale
            self._log_lane_loss(k, result.metrics, float(lane_loss.detach()) * accumulation, mode, lane_mask)
            total = lane_loss if total is None else total + lane_loss
        if mode == "train" and self.accelerator.sync_gradients and self.args.entropy_coef != 0.0:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)  # as TRL logs it
        return total

    def _log_lane_loss(self, k: int, metrics: dict[str, Tensor], loss: float, mode: str, mask: Tensor) -> None:
        """Lane k's loss metrics under `lane{k}/...`, and under TRL's names (averaged over the lanes there), over
        every process's rows of the lane (`mask`: the lane's loss tokens here; the loss: the processes' mean, as
        Trainer logs its loss)."""
        values = self._world_loss_metrics(metrics, mask, process_means={"loss": loss})
        self._metrics[mode][f"lane{k}/loss"].append(values.pop("loss"))
        for name in LOSS_METRICS:
            if name in values:
                self._metrics[mode][name].append(values[name])
                self._metrics[mode][f"lane{k}/{name}"].append(values[name])

    # ---- optimizer and clipping: per lane ---------------------------------------------------------------
    def _prepare_for_training(self, *args, **kwargs):
        """Trainer's preparation, with the shared model prepared as accelerate prepares a model that trains
        nothing (device placement and mixed-precision autocast, no DDP wrapper): it holds no lane's parameters.
        accelerate already leaves such a model unwrapped on GPUs; on CPU processes (gloo) it would wrap it, and
        DDP refuses a module without trainable parameters. The lanes' gradients are averaged by training_step."""
        prepare_model = self.accelerator.prepare_model
        self.accelerator.prepare_model = lambda model, device_placement=None, evaluation_mode=False: prepare_model(
            model, device_placement=device_placement, evaluation_mode=True)
        try:
            return super()._prepare_for_training(*args, **kwargs)
        finally:
            del self.accelerator.prepare_model  # the class's method again

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every lane's trainable layer, lanes in the given order (the same on every process): the gradients
        `training_step` averages across processes (the shared model trains nothing, so accelerate does not wrap
        it in DDP)."""
        return [p for k in range(self.num_lanes) for p in self.lane_layer(k).parameters() if p.requires_grad]

    def lane_parameter_groups(self) -> list[dict[str, Any]]:
        """One parameter group per lane at its learning rate (two with weight decay, split as Trainer splits:
        no decay for biases and norms), tagged `lane`."""
        groups = []
        for k, lane in enumerate(self.lanes):
            layer = self.lane_layer(k)
            lr = self.args.learning_rate if lane.learning_rate is None else lane.learning_rate
            if self.args.weight_decay == 0.0:
                groups.append({"params": list(layer.parameters()), "lr": lr, "weight_decay": 0.0, "lane": k})
                continue
            decay = set(self.get_decay_parameter_names(layer))
            named = list(layer.named_parameters())
            groups.append({"params": [p for n, p in named if n in decay], "lr": lr,
                           "weight_decay": self.args.weight_decay, "lane": k})
            groups.append({"params": [p for n, p in named if n not in decay], "lr": lr, "weight_decay": 0.0, "lane": k})
        return [group for group in groups if group["params"]]

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            from transformers import trainer as hf_trainer

            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            is_factory = getattr(hf_trainer, "is_optimizer_factory", lambda _: False)
            if is_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
                raise NotImplementedError(f"optim={self.args.optim!r} builds its own parameter groups; lanes need "
                                          "one group per lane (use an optimizer that takes parameter groups, "
                                          "e.g. adamw_torch)")
            self.optimizer = optimizer_cls(self.lane_parameter_groups(), **optimizer_kwargs)
        return self.optimizer

    def _lane_grad_norms(self, max_norm: float | None) -> Tensor:
        """Each lane's gradient norm before clipping (clipped to `max_norm` on its own when given); the norm over
        every lane's gradient comes back, what Trainer logs as grad_norm."""
        self.accelerator.unscale_gradients()  # fp16 loss scaling, once per step (a no-op otherwise)
        norms = []
        for k in range(self.num_lanes):
            params = [p for p in self.lane_layer(k).parameters() if p.grad is not None]
            if max_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            norms.append(norm.detach().float().cpu())
            self._metrics["train"][f"lane{k}/grad_norm"].append(float(norm))
            group = next(g for g in self.optimizer.param_groups if g.get("lane") == k)
            self._metrics["train"][f"lane{k}/learning_rate"].append(float(group["lr"]))  # what it steps with now
        return torch.stack(norms).pow(2).sum().sqrt()

    def _clip_grad_norm(self, model):
        """Trainer's clipping point: each lane clipped to max_grad_norm on its own (one lane's large gradient
        never shrinks another's step); the model's own parameters hold no lane's and are left alone."""
        return self._lane_grad_norms(self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        return self._lane_grad_norms(None) if grad_norm is None else grad_norm

    # ---- checkpoints: one directory per lane ----------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Each lane's layer (`lane-{k}-layer-{L}/layer.safetensors` + `meta.json`), `lanes.json` (written last:
        its presence means every lane is complete) and the tokenizer; not the shared model."""
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        if not self.args.should_save:
            return
        num_layers = len(self.policy.decoder.layers)
        entries = []
        for k, lane in enumerate(self.lanes):
            directory = lane_directory(k, lane)
            save_layer_weights(output_dir / directory, self.lane_layer(k), lane.layer, num_layers,
                               step=self.state.global_step,
                               metadata={"trainer": "onelayer_fast.trl_lanes.LaneGRPOTrainer",
                                         "trl_version": trl.__version__, "lane": dataclasses.asdict(lane),
                                         "lane_index": k})
            entries.append({"directory": directory, "lane": dataclasses.asdict(lane)})
        record = {"lanes": entries, "step": self.state.global_step, "num_layers": num_layers}
        (output_dir / LANES_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(output_dir))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Every lane's layer back from a lanes checkpoint; ValueError, before anything is copied, unless it
        holds exactly these lanes (layers, learning rates, seeds, in this order) and every lane file is intact."""
        path = Path(resume_from_checkpoint)
        file = path / LANES_FILE
        if not file.is_file():
            raise ValueError(f"checkpoint {path} is not a lanes checkpoint (no {LANES_FILE}); this trainer trains "
                             f"lanes {[lane.describe() for lane in self.lanes]}")
        try:
            entries = json.loads(file.read_text(encoding="utf-8"))["lanes"]
            saved = [Lane(**entry["lane"]) for entry in entries]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"checkpoint file {file} is corrupt: {error}") from None
        if saved != self.lanes:
            raise ValueError(f"checkpoint {path} trained the lanes {[lane.describe() for lane in saved]}, this "
                             f"trainer trains {[lane.describe() for lane in self.lanes]}: resume with the same lanes "
                             "in the same order")
        # Every lane is read (and checked: digests, layer, keys, shapes) into a scratch copy before any lane's
        # live layer changes, so a bad lane leaves them all as they were.
        staged = []
        for k, entry in enumerate(entries):
            scratch = copy.deepcopy(self.lane_layer(k))
            load_lane_layer(scratch, path / entry["directory"], self.lanes[k].layer)
            staged.append(scratch.state_dict())
        with torch.no_grad():
            for k, tensors in enumerate(staged):
                for key, value in self.lane_layer(k).state_dict().items():
                    value.copy_(tensors[key])

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    # ---- one-layer helpers that do not apply to lanes --------------------------------------------------
    def _prefix(self, input_ids, attention_mask):
        raise NotImplementedError("lanes take the prefix through their LanePolicy (_attach_states)")

    def _completion_states(self, *args, **kwargs):
        raise NotImplementedError("lanes take completion states through their LanePolicy")


def _unsupported_with_lanes(args: GRPOConfig, kwargs: dict[str, Any]) -> str | None:
    if getattr(args, "use_adaptive_entropy", False):
        return "use_adaptive_entropy (one controller per lane is not implemented)"
    if getattr(args, "use_vllm", False):
        return "use_vllm (vLLM holds one copy of the weights: each lane's layer would have to be synced into it " \
               "before the lane generates)"
    optimizers = kwargs.get("optimizers")
    if optimizers is not None and optimizers[0] is not None:
        return "a given optimizer (lanes build theirs: one parameter group per lane)"
    return None


register_lane_trainer(LaneGRPOTrainer)

__all__ = ["LANE_KEY", "Lane", "LaneGRPOTrainer", "as_lanes", "lane_directory", "lane_stratified_split",
           "stack_lane_outputs"]
