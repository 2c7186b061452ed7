"""onelayer_fast as the update engine of TRL's GRPOTrainer: `OneLayerGRPOTrainer` (the `[trl]` extra; import it
from `onelayer_fast.trl`, which also brings in lanes, `trl_lanes.py`).

    from onelayer_fast.trl import OneLayerGRPOTrainer
    trainer = OneLayerGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=data, layer=12)
    trainer.train()

TRL keeps what it does well: the dataset, reward functions, generation (HF `generate` or vLLM as configured),
advantages, logging, callbacks and the Trainer loop. The update runs through onelayer_fast:
- only layer `layer` trains (the optimizer holds its parameters alone);
- the frozen prefix (embeddings + layers below `layer`) is not run again after HF generation: hooks keep the states
  generation computed on its way (KV cache: the prompts' prefill, then one position per step); otherwise (vLLM,
  no KV cache, multi-turn tools) it runs once per generation batch, under no_grad. Its output rides along in the
  batch (shuffled and split with it) and feeds the old log-probs, the reference log-probs and every iteration's
  loss;
- the reference policy is a frozen copy of the original layer alone: TRL's full reference model is never loaded
  (beta > 0), and `sync_ref_model` mixes one layer;
- the loss is onelayer_fast's `grpo_loss` (chunked lm_head log-probs, or the fused Triton kernels on CUDA),
  scaled as TRL scales each loss type under gradient accumulation;
- checkpoints hold the one layer (`layer.safetensors` + `meta.json`, what `onelayer-fast merge` and `load_layer`
  read) next to the Trainer's optimizer and scheduler state, and resume from there.

Like TRL's own training forward, the loss forward counts positions 0 ... T - 1 on every row, over its left padding
(generation counts from the first real token; with rotary attention, which sees relative positions only, both give
the same states up to float32 rounding).
Several processes (`accelerate launch --num_processes N script.py`, or torchrun): accelerate's data parallel, as
TRL runs it. Each process generates and trains on its share of the batch; the loss runs the policy's own modules,
never the DDP wrapper (DDP's reducer is then never armed, and TRL's generation unwraps the model as before), so
`training_step` averages the trained layer's gradients across processes itself, as DDP would, once per optimizer
step before Trainer clips. The logged loss metrics and adaptive entropy control's window are reduced across
processes as TRL reduces them; the loss is scaled per process as TRL scales it.
What this trainer does not cover raises a clear error at construction:
PEFT, multimodal inputs, DeepSpeed, FSDP and other sharded or model-parallel setups, and top_entropy_quantile < 1
with several processes (TRL takes that quantile over every process's tokens).

Lanes (several single-layer runs at once on one shared frozen model): `layer=[Lane(12), Lane(8, learning_rate=3e-6)]`
(or `layer=[12, 8]`) builds a `onelayer_fast.trl_lanes.LaneGRPOTrainer`, where each lane trains as its own
single-layer run would on the same rollouts (one generation per lane; see that module).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .checkpoint import load_layer, read_meta, save_layer_weights
from .distributed import World
from .kernels.grpo_loss import LossConfig
from .layout import PaddedLayout
from .loss import BACKENDS, grpo_loss, masked_token_logprobs
from .policy import OneLayerPolicy, decoder_of
from .update import SEQUENCE_LEVEL_ROW_METRICS, TOKEN_MEAN_METRICS, EntropyControl, entropy_sum_and_count

SUPPORTED_TRL_VERSIONS = ("1.16",)  # major.minor releases whose GRPOTrainer internals this module was checked against
PREFIX_KEY = "onelayer_prefix_hidden"  # the batch entry holding the prefix output (B, P + C, H)
# TRL GRPOConfig fields that are LossConfig fields under the same name
TRL_LOSS_KNOBS = ("use_bias_correction_kl", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos",
                  "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "off_policy_mask_threshold",
                  "top_entropy_quantile", "entropy_coef")
OLD_PENDING_KEY = "onelayer_old_logps_pending"  # (B,) bool: old log-probs still to be taken at first use

try:
    import trl
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("onelayer_fast.trl needs TRL: pip install 'onelayer_fast[trl]' "
                      f"(TRL {', '.join(v + '.x' for v in SUPPORTED_TRL_VERSIONS)})") from error


def check_trl_version(version: str | None = None) -> None:
    """RuntimeError unless `version` (default: the installed TRL) is one this module supports."""
    version = trl.__version__ if version is None else version
    if ".".join(version.split(".")[:2]) not in SUPPORTED_TRL_VERSIONS:
        raise RuntimeError(f"onelayer_fast.trl supports TRL {', '.join(v + '.x' for v in SUPPORTED_TRL_VERSIONS)}, "
                           f"found TRL {version}: it overrides GRPOTrainer internals that change between releases. "
                           f"Install a supported one: pip install 'trl=={SUPPORTED_TRL_VERSIONS[-1]}.*'")


def loss_config_from_trl(args: GRPOConfig, max_completion_length: int | None = None) -> LossConfig:
    """The LossConfig of TRL's GRPOConfig: the same knobs under the same names (TRL's `epsilon` is `epsilon_low`)."""
    return LossConfig(
        beta=args.beta, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon if args.epsilon_high is None else args.epsilon_high,
        delta=args.delta, loss_type=args.loss_type, temperature=args.temperature,
        max_completion_length=max_completion_length or args.max_completion_length,
        importance_sampling_level=args.importance_sampling_level,
        **{name: getattr(args, name) for name in TRL_LOSS_KNOBS},
    )


def _unsupported(args: GRPOConfig, kwargs: dict[str, Any]) -> str | None:
    if kwargs.get("peft_config") is not None:
        return "peft_config: OneLayerGRPOTrainer trains one layer itself, not an adapter"
    if args.deepspeed:
        return f"DeepSpeed (deepspeed={args.deepspeed!r}): {_DATA_PARALLEL_ONLY}"
    if args.fsdp:
        return f"FSDP (fsdp={args.fsdp!r}): {_DATA_PARALLEL_ONLY}"
    if args.world_size > 1 and args.top_entropy_quantile < 1.0:
        # TRL takes the entropy quantile over every process's tokens (a gather inside its loss); onelayer_fast's
        # loss takes it over the rows it holds
        return (f"top_entropy_quantile < 1 with {args.world_size} processes (TRL's quantile spans every process's "
                "tokens); train it in one process or keep every token (top_entropy_quantile=1)")
    return None


# What several processes may be: accelerate's plain data parallel (DDP: each process holds the whole model and
# its gradients are averaged, which `average_gradients` does here), not sharded or model-parallel setups.
_DATA_PARALLEL_ONLY = ("several processes are supported as plain data parallel (DDP: `accelerate launch "
                       "--num_processes N` or torchrun) only; the loss runs the policy's own modules, not a "
                       "DeepSpeed / FSDP / tensor-parallel wrapper")
_DATA_PARALLEL_TYPES = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA",
                        "MULTI_XPU", "MULTI_HPU")  # accelerate's DistributedType values that wrap the model in DDP


def unsupported_parallelism(trainer: GRPOTrainer) -> str | None:
    """Why the built trainer's accelerate setup is not one this module supports (an accelerate config can turn on
    DeepSpeed or FSDP without the GRPOConfig saying so), or None."""
    if trainer.is_deepspeed_enabled:
        return f"DeepSpeed: {_DATA_PARALLEL_ONLY}"
    if trainer.is_fsdp_enabled:
        return f"FSDP: {_DATA_PARALLEL_ONLY}"
    kind = str(getattr(trainer.accelerator.distributed_type, "value", trainer.accelerator.distributed_type))
    if kind not in _DATA_PARALLEL_TYPES:
        return f"accelerate's {kind}: {_DATA_PARALLEL_ONLY}"
    parallelism = getattr(trainer.accelerator, "parallelism_config", None)
    if parallelism is not None and any(getattr(parallelism, f"{name}_enabled", False)
                                       for name in ("dp_shard", "tp", "cp", "sp")):
        return f"accelerate's parallelism_config {parallelism}: {_DATA_PARALLEL_ONLY}"
    return None


def average_gradients(parameters: Sequence[Tensor], world_size: int) -> None:
    """Each parameter's gradient becomes its mean over the `world_size` processes of accelerate's default process
    group (`World.all_reduce_gradients(average=True)`): what DDP's reducer does, done here because the loss runs
    the policy's own modules, never DDP's forward, so DDP never arms its reducer. Every rank must call it with
    the same parameters in the same order."""
    if world_size <= 1:
        return
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise RuntimeError(f"{world_size} processes but no torch.distributed process group: launch with "
                           "`accelerate launch` or torchrun")
    parameters = list(parameters)
    world = World(rank=torch.distributed.get_rank(), size=world_size, device=parameters[0].device,
                  backend=torch.distributed.get_backend(),
                  resume_hint="rerun with resume_from_checkpoint to continue from the last checkpoint")
    world.all_reduce_gradients(parameters, average=True)


# The loss metrics TRL logs, and what each is a mean over: TRL reduces every one across processes as
# sum(value * weight) / sum(weight) (its `global_masked_mean`), with the completion tokens as weights, or the
# rows where the metric has one value per row (vespo's weight; the clip ratios at sequence level): the split the
# engine's own data-parallel reduction makes (update.TOKEN_MEAN_METRICS, update.SEQUENCE_LEVEL_ROW_METRICS).
LOSS_METRICS = ("entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "cispo_clip_ratio", "vespo/phi_seq_mean")


class SyncReferenceLayers(TrainerCallback):
    """TRL's reference syncing with one-layer references: every `ref_model_sync_steps` optimizer steps each
    reference layer becomes alpha * trained layer + (1 - alpha) * reference layer (TRL's SyncRefModelCallback
    timing and formula; everything else in TRL's reference equals the policy, so only these layers change).
    pairs: (reference layer, trained layer), one per trained layer (one, or one per lane)."""

    def __init__(self, pairs: Sequence[tuple[torch.nn.Module, torch.nn.Module]]):
        self.pairs = list(pairs)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.ref_model_sync_steps == 0:
            alpha = args.ref_model_mixup_alpha
            with torch.no_grad():
                for reference, trained in self.pairs:
                    for ref, cur in zip(reference.parameters(), trained.parameters(), strict=True):
                        ref.mul_(1.0 - alpha).add_(cur, alpha=alpha)


class _GenerationCapture:
    """The prefix output as HF `generate` computes it anyway: while installed, hooks record the token ids
    entering the embedding, the attention mask of the first call and the states entering the target layer.
    With a KV cache that is one prefill call over the prompts, then one position per decoding step, so the
    records cover every position but the last sampled token (which generation never feeds back)."""

    def __init__(self, decoder: torch.nn.Module, layer_index: int):
        self.ids: list[Tensor] = []
        self.states: list[Tensor] = []
        self.prompt_mask: Tensor | None = None
        self.calls = 0
        self._handles = [
            decoder.register_forward_pre_hook(self._on_decoder, with_kwargs=True),
            decoder.embed_tokens.register_forward_pre_hook(self._on_embed),
            decoder.layers[layer_index].register_forward_pre_hook(self._on_layer, with_kwargs=True),
        ]

    def _on_decoder(self, module, args, kwargs) -> None:
        self.calls += 1
        if self.calls == 1:
            self.prompt_mask = kwargs.get("attention_mask")

    def _on_embed(self, module, args) -> None:
        self.ids.append(args[0])

    def _on_layer(self, module, args, kwargs) -> None:
        self.states.append(args[0] if args else kwargs["hidden_states"])

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def prefix_for(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor | None:
        """The prefix output (B, T, H) over these rows, or None unless the records are exactly one KV-cache
        generation of these rows: the same rows in the same order, the same prompt padding, the same tokens at
        every attended position. Generation positions count from each row's first real token, the training
        forward's from 0: with rotary attention (relative positions) both give the same states up to rounding.
        A completion that ran to the limit ends with the one token generation never fed back: its state is
        filled in with its neighbour's, which is harmless because causal attention lets only that position see
        it, and that position's output predicts no completion token."""
        counts = {len(self.ids), len(self.states), self.calls}
        if len(counts) != 1 or not self.states:
            return None
        prompt_mask = self.prompt_mask
        if prompt_mask is None:  # HF generate leaves out an all-ones mask: prompts without padding (every
            prompt_mask = torch.ones_like(self.ids[0])  # row the same length, as one process's share may be)
        if not isinstance(prompt_mask, Tensor):
            return None
        if any(t.shape[1] != 1 for t in self.ids[1:]) or any(t.shape[1] != 1 for t in self.states[1:]):
            return None  # several prefills (multi-turn tools, chunked prefill) or no KV cache
        ids, states = torch.cat(self.ids, dim=1), torch.cat(self.states, dim=1)
        rows, length = input_ids.shape
        prompt_length = prompt_mask.shape[1]
        if ids.shape[0] != rows or states.shape[:2] != ids.shape or prompt_mask.shape[0] != rows \
                or not prompt_length <= length <= ids.shape[1] + 1:
            return None
        if not torch.equal(prompt_mask.bool(), attention_mask[:, :prompt_length].bool()):
            return None
        covered = min(length, ids.shape[1])
        attended = attention_mask[:, :covered].bool()
        if not torch.equal(ids[:, :covered][attended], input_ids[:, :covered][attended]):
            return None
        if length > covered:
            states = torch.cat([states, states[:, -1:]], dim=1)
        return states[:, :length]


class OneLayerGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer (same arguments) with one trainable layer, `layer`, and onelayer_fast's update.

    loss_backend: onelayer_fast.loss.BACKENDS ("auto": Triton kernels on CUDA once their self-check passed,
    chunked PyTorch on CPU). See the module docstring for what changes and what does not.
    """

    def __new__(cls, *args, layer=None, **kwargs):
        """`OneLayerGRPOTrainer(..., layer=[...])` (lanes: Lane objects or layer indices) is a LaneGRPOTrainer
        (onelayer_fast.trl_lanes, a subclass, registered here when `onelayer_fast.trl` imports it); Python then
        runs its __init__ with the same arguments."""
        if cls is OneLayerGRPOTrainer and isinstance(layer, (list, tuple)):
            if not _LANE_TRAINER:
                raise ImportError("lanes need onelayer_fast.trl_lanes: import OneLayerGRPOTrainer from onelayer_fast.trl")
            cls = _LANE_TRAINER[0]
        return super().__new__(cls)

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, *positional, layer: int,
                 loss_backend: str = "auto", **kwargs):
        if isinstance(layer, (list, tuple)) and not isinstance(self, tuple(_LANE_TRAINER)):
            # __new__ builds a LaneGRPOTrainer for OneLayerGRPOTrainer(..., layer=[...]) itself; a subclass keeps
            # its class and trains one layer
            raise NotImplementedError(f"{type(self).__name__} trains one layer; for lanes (a list of layers) "
                                      "call OneLayerGRPOTrainer itself or subclass onelayer_fast.trl_lanes.LaneGRPOTrainer")
        self._build_trl(model, reward_funcs, args, positional, kwargs, loss_backend)
        self.policy = OneLayerPolicy(self.model, layer)  # freezes every other parameter: TRL's optimizer skips them
        if self.args.sync_ref_model:
            self.add_callback(SyncReferenceLayers([(self.policy.reference_layer, self.policy.target_layer)]))
        self._prefix_stash: tuple[Tensor, Tensor, Tensor] | None = None
        self._capture: _GenerationCapture | None = None
        self.prefix_passes = 0  # prefix forwards run here, beyond the states captured from generation
        self._generating = self._old_logps_pending = False

    def _build_trl(self, model, reward_funcs, args: GRPOConfig | None, positional: tuple, kwargs: dict[str, Any],
                   loss_backend: str, check_more: Callable[[GRPOConfig], None] | None = None) -> None:
        """Check the settings (`check_more`: a subclass's own checks, before anything loads) and build TRL's
        GRPOTrainer without its full reference model; the one-layer policy is the caller's to add."""
        check_trl_version()
        if loss_backend not in BACKENDS:
            raise ValueError(f"loss_backend must be one of {BACKENDS}, got {loss_backend!r}")
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = GRPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-OneLayerGRPO")
        if (reason := _unsupported(args, kwargs)) is not None:
            raise NotImplementedError(f"OneLayerGRPOTrainer does not support {reason}")
        if check_more is not None:
            check_more(args)
        self._loss_config = loss_config_from_trl(args)  # checks the loss knobs before anything loads
        self.loss_backend = loss_backend
        # TRL loads a full reference model when beta != 0 (and refuses sync_ref_model when beta == 0): the
        # one-layer reference replaces it, so TRL is built as if beta were 0 and the knobs restored after.
        beta, sync = args.beta, args.sync_ref_model
        args.beta, args.sync_ref_model = 0.0, False
        try:
            GRPOTrainer.__init__(self, model, reward_funcs, args, *positional, **kwargs)
        finally:
            args.beta, args.sync_ref_model = beta, sync
        self.beta = beta
        if (reason := unsupported_parallelism(self)) is not None:
            raise NotImplementedError(f"OneLayerGRPOTrainer does not support {reason}")
        if sync and beta == 0.0:
            raise ValueError("sync_ref_model=True needs beta > 0: without the KL term there is no reference to sync")
        self._old_logps_from_first_use = self.args.gradient_accumulation_steps % self.args.steps_per_generation == 0

    # ---- the prefix, computed once per generation batch -------------------------------------------------
    def _layout(self, input_ids: Tensor, attention_mask: Tensor, completion_length: int) -> PaddedLayout:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return PaddedLayout(input_ids, attention_mask, completion_start=input_ids.shape[1] - completion_length,
                            position_ids=positions)

    def _prefix(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The prefix output over these rows: the one already taken for them in this generation step (captured
        from HF generation, or computed), else a new prefix forward."""
        stash = self._prefix_stash
        if stash is not None and stash[0].shape == input_ids.shape and torch.equal(stash[0], input_ids) \
                and torch.equal(stash[1], attention_mask):
            return stash[2]
        hidden = None if self._capture is None else self._capture.prefix_for(input_ids, attention_mask)
        if hidden is None:
            layout = self._layout(input_ids, attention_mask, 1)
            hidden = self.policy.prefix_layout(layout).hidden
            self.prefix_passes += 1
        self._prefix_stash = (input_ids, attention_mask, hidden)
        return hidden

    def _completion_states(self, prefix_hidden: Tensor, input_ids: Tensor, attention_mask: Tensor,
                           completion_length: int, reference: bool = False) -> Tensor:
        layout = self._layout(input_ids, attention_mask, completion_length)
        cache = self.policy.cache_around(layout, prefix_hidden)
        return self.policy.completion_states(cache, reference=reference)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """TRL calls this at generation time for the old log-probs (num_iterations > 1): through the cached
        prefix and the trained layer, on the policy (TRL's reference model is never built).

        When no optimizer step can fall between generation and the first use of every micro-batch (the
        gradient-accumulation steps are a multiple of steps_per_generation, as with TRL's default), the old
        log-probs are the first iteration's own log-probs: this returns a placeholder and the first loss call
        fills it in (`_compute_loss`), which saves a whole pass."""
        if any(value is not None for value in multimodal.values()) or compute_entropy or compute_aux_loss:
            raise NotImplementedError("OneLayerGRPOTrainer: multimodal inputs, entropies at generation time and MoE "
                                      "aux losses are not supported")
        prefix = self._prefix(input_ids, attention_mask)
        if self._generating and self._old_logps_from_first_use and not self._sampling_correction:
            self._old_logps_pending = True
            return torch.full((input_ids.shape[0], logits_to_keep), math.nan, device=input_ids.device), None, None
        hidden = self._completion_states(prefix, input_ids, attention_mask, logits_to_keep)
        logps = self._masked_logprobs(hidden, input_ids[:, -logits_to_keep:], attention_mask[:, -logits_to_keep:])
        return logps, None, None

    def _masked_logprobs(self, hidden: Tensor, completion_ids: Tensor, mask: Tensor) -> Tensor:
        """(B, C) float32 log-probs at the unmasked completion tokens, 0 elsewhere (`masked_token_logprobs`: where
        the weights agree, e.g. the reference layer before the first step, they equal the loss's to the bit, as
        TRL's do)."""
        return masked_token_logprobs(hidden, self.policy.lm_head_weight, completion_ids, mask,
                                     temperature=self.temperature, backend=self.loss_backend).float()

    def _generate(self, prompts):
        """TRL's sampling, unchanged; with HF generation the prefix states it computes are kept for the update
        (`_GenerationCapture`), which then runs no prefix forward of its own."""
        capture = _GenerationCapture(self.policy.decoder, self.policy.layer_index)
        try:
            return super()._generate(prompts)
        finally:
            capture.close()
            self._capture = capture

    def _generate_and_score_completions(self, inputs):
        beta, self.beta = self.beta, 0.0  # TRL's reference pass needs its reference model: ours runs below
        self._prefix_stash, self._capture, self._generating, self._old_logps_pending = None, None, True, False
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self.beta, self._generating = beta, False
        if self._old_logps_pending:  # one flag per row, so that it is shuffled and split with the batch
            output[OLD_PENDING_KEY] = torch.ones(output["completion_ids"].shape[0], dtype=torch.bool,
                                                 device=output["completion_ids"].device)
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        with torch.no_grad():
            prefix = self._prefix(input_ids, attention_mask)
            if self.beta != 0.0:
                length = output["completion_ids"].shape[1]
                hidden = self._completion_states(prefix, input_ids, attention_mask, length, reference=True)
                mask = output["completion_mask"]
                if "tool_mask" in output:
                    mask = mask * output["tool_mask"]
                output["ref_per_token_logps"] = self._masked_logprobs(hidden, output["completion_ids"], mask)
        output[PREFIX_KEY] = prefix
        self._prefix_stash = self._capture = None  # the batch carries it from here
        return output

    # ---- several processes: the gradient averaging DDP would do ----------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer trains, in the same order on every process (the gradients `training_step`
        averages across processes)."""
        return [p for p in self.policy.target_layer.parameters() if p.requires_grad]

    def training_step(self, model, inputs, num_items_in_batch=None):
        """TRL's step (the backward included). The loss ran the policy's own modules, not the DDP wrapper, so DDP
        never all-reduced: after the accumulation window's last backward, before Trainer clips and steps, the
        gradients are averaged across processes here (DDP's mean), which makes every process's update the same."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            average_gradients(self.trainable_parameters(), self.accelerator.num_processes)
        return loss

    def _world_loss_metrics(self, metrics: dict[str, Tensor], mask: Tensor,
                            process_means: dict[str, float] | None = None) -> dict[str, float]:
        """The loss metrics TRL logs (LOSS_METRICS, kl only with beta > 0) over every process's rows, reduced as
        TRL reduces them (one collective for all): weighted by the tokens of `mask`, or by its rows for a
        metric with one value per row; `process_means` are averaged over the processes as they are."""
        wanted = [n for n in LOSS_METRICS if n != "kl" or self.beta != 0.0]
        process_means = process_means or {}
        if self.accelerator.num_processes == 1:
            return {**{n: float(metrics[n]) for n in wanted if n in metrics},
                    **{n: float(v) for n, v in process_means.items()}}
        sequence = self._loss_config.importance_sampling_level == "sequence"
        tokens, rows = float(mask.sum()), float(mask.shape[0])
        # (value * weight, weight, present) for every wanted metric, present or not: the collective has the same
        # shape on every process whatever each one's loss path computed
        entries = []
        for name in wanted:
            per_row = name not in TOKEN_MEAN_METRICS or (sequence and name in SEQUENCE_LEVEL_ROW_METRICS)
            weight = rows if per_row else tokens
            entries.append((float(metrics[name]) * weight, weight, 1.0) if name in metrics else (0.0, 0.0, 0.0))
        entries += [(float(value), 1.0, 1.0) for value in process_means.values()]
        totals = self.accelerator.reduce(torch.tensor(entries, dtype=torch.float64, device=self.accelerator.device),
                                         reduction="sum")
        values = (totals[:, 0] / totals[:, 1].clamp(min=1.0)).tolist()
        present = (totals[:, 2] > 0).tolist()
        return {name: value for name, value, keep in zip([*wanted, *process_means], values, present) if keep}

    # ---- the loss --------------------------------------------------------------------------------------
    @property
    def _sampling_correction(self) -> bool:
        """TRL's vLLM importance-sampling correction is on: TRL's generation step then takes the old log-probs
        (never at first use) and the ratio pi_old / pi_vLLM from them, which the loss multiplies in."""
        return bool(self.use_vllm and self.vllm_importance_sampling_correction)

    def _loss_scale(self, mask: Tensor, inputs: dict[str, Any], mode: str) -> float:
        """TRL's loss over onelayer_fast's for this micro-batch. onelayer_fast normalizes within the micro-batch;
        TRL divides by the gradient-accumulation steps, and for dapo / cispo / vespo by the tokens of the whole
        generation batch (rescaled to one accumulation window)."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self._loss_config.loss_type not in ("dapo", "cispo", "vespo"):
            return 1.0 / accumulation
        normalizer = float(inputs["num_items_in_batch"].clamp(min=1.0)) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * accumulation / self.args.steps_per_generation
        return max(1.0, float(mask.sum())) / normalizer

    def _compute_loss(self, model, inputs):
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        advantages = inputs["advantages"]
        if advantages.dim() != 1:
            raise NotImplementedError("OneLayerGRPOTrainer takes one advantage per completion (shape (B,))")
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        hidden = self._completion_states(inputs[PREFIX_KEY], input_ids, attention_mask, completion_ids.shape[1])
        mode = "train" if self.model.training else "eval"
        scale = self._loss_scale(mask, inputs, mode)
        config = self._loss_config
        if self.args.use_adaptive_entropy:
            config = dataclasses.replace(config, entropy_coef=self._entropy_control().applied())
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if getattr(config, "entropy_coef", 0.0) and scale != 1.0 / accumulation:
            # TRL's entropy bonus is a per-token mean divided by the accumulation steps alone, whatever the loss
            # type: pre-divide the coefficient by the policy term's extra scale so that scaling the whole loss
            # leaves the bonus as TRL has it.
            config = dataclasses.replace(config, entropy_coef=config.entropy_coef / (scale * accumulation))
        old_logps = inputs.get("old_per_token_logps")
        pending = inputs.get(OLD_PENDING_KEY)
        first_use = pending is not None and bool(pending.any())
        sampling_weights = inputs.get("importance_sampling_ratio") if self._sampling_correction else None
        result = grpo_loss(hidden, self.policy.lm_head_weight, completion_ids, mask, advantages=advantages,
                           old_logps=None if first_use else old_logps, ref_logps=inputs.get("ref_per_token_logps"),
                           config=config, backend=self.loss_backend, sampling_weights=sampling_weights,
                           sampling_logps=inputs.get("sampling_per_token_logps"), entropy_metric=True)
        if first_use:  # the weights have not moved since generation: these are the old log-probs (in place:
            old_logps.copy_(result.token_logps)  # the same micro-batch dict comes back every iteration)
            pending.zero_()
        self._log_loss_metrics(result.metrics, mode, mask)
        if self.args.use_adaptive_entropy and mode == "train":
            self._adapt_entropy(hidden, completion_ids, mask, config, result.metrics)
        if mode == "train" and self.accelerator.sync_gradients and \
                (self.args.use_adaptive_entropy or self.args.entropy_coef != 0.0):
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        return result.loss * scale

    # ---- adaptive entropy control ----------------------------------------------------------------------
    # The controller's state lives in TRL's own attributes (entropy_coef, _last_world_entropy,
    # _entropy_window_stats), so that TRL's checkpoint code saves and restores it.
    def _entropy_control(self) -> EntropyControl:
        a = self.args
        return EntropyControl(coef=self.entropy_coef, adaptive=True, minimum=a.entropy_coef_min,
                              maximum=a.entropy_coef_max, delta=a.entropy_coef_delta, target=a.entropy_target,
                              last_entropy=self._last_world_entropy)

    def _adapt_entropy(self, hidden: Tensor, completion_ids: Tensor, mask: Tensor, config: LossConfig,
                       metrics: dict[str, Tensor]) -> None:
        """TRL's window: the entropy sum and token count of every micro-batch of the accumulation window, over
        the tokens the loss acts on; at the optimizer-step boundary the coefficient moves for the next step.
        Over every unmasked token that is the loss's own entropy metric times the tokens; only an entropy subset
        (top_entropy_quantile < 1) needs its entropies taken again."""
        if config.top_entropy_quantile >= 1.0 and "entropy" in metrics:
            count = mask.sum().double()
            stats = torch.stack([metrics["entropy"].double() * count.clamp(min=1.0), count])
        else:
            stats = entropy_sum_and_count(hidden.detach(), self.policy.lm_head_weight, completion_ids, mask, config)
        window = self._entropy_window_stats
        self._entropy_window_stats = stats if window is None else window + stats
        if self.accelerator.sync_gradients:
            # every process's window: the mean entropy over all their tokens, as TRL reduces it
            total, count = self.accelerator.reduce(self._entropy_window_stats, reduction="sum").tolist()
            control = self._entropy_control()
            control.update(total / max(1.0, count))
            self.entropy_coef, self._last_world_entropy = control.coef, control.last_entropy
            self._entropy_window_stats = None

    def _log_loss_metrics(self, metrics: dict[str, Tensor], mode: str, mask: Tensor) -> None:
        """The metrics TRL's own loss logs, under its names, where onelayer_fast computes them, over every
        process's rows (`_world_loss_metrics`; `mask`: the tokens the loss acts on here)."""
        for name, value in self._world_loss_metrics(metrics, mask).items():
            self._metrics[mode][name].append(value)

    # ---- one-layer checkpoints -------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The trained layer (`layer.safetensors` + `meta.json`) and the tokenizer, not the whole model."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save_layer_weights(output_dir, self.policy.target_layer, self.policy.layer_index,
                           len(decoder_of(self.model).layers), step=self.state.global_step,
                           metadata={"trainer": "onelayer_fast.trl.OneLayerGRPOTrainer", "trl_version": trl.__version__})
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        meta = read_meta(resume_from_checkpoint)
        if meta["mode"] != "single" or meta["layer"] != self.policy.layer_index:
            raise ValueError(f"checkpoint {resume_from_checkpoint} trained layer {meta['layer']}, this trainer "
                             f"trains layer {self.policy.layer_index}")
        load_layer(self.model if model is None else model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


# The lanes trainer (a subclass, in trl_lanes.py) registers itself here: this module cannot import it back.
_LANE_TRAINER: list[type] = []


def register_lane_trainer(trainer_class: type) -> None:
    """What `OneLayerGRPOTrainer(..., layer=[...])` builds."""
    _LANE_TRAINER[:] = [trainer_class]


__all__ = ["OneLayerGRPOTrainer", "SUPPORTED_TRL_VERSIONS", "check_trl_version", "loss_config_from_trl"]
