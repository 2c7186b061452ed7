"""The training config (TRL GRPOConfig names) and the GRPO training loop; nothing model-specific."""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .advantages import ALGORITHMS, GIGPO_NORMS, apply_algorithm, normalize_then_sum
from .episodes import Episodes, episode_batch, is_environment_task, run_episodes
from .batch import RolloutBatch, mask_truncated
from .distributed import World
from .kernels.grpo_loss import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, SCALE_REWARDS, LossConfig, group_advantages
from .layout import LAYOUTS, check_layout
from .loss import BACKENDS
from .policy import FullModelPolicy, OneLayerPolicy, decoder_of
from .rollout import DrawKeys, encode_prompts, sample_completions, sample_keyed
from .tasks import Example, Task
from .tasks.rewards import reward_table, weighted_sum
from .update import (LR_SCHEDULERS, SQUARE_SAFE, DivergenceError, EntropyControl, StepControls, UpdateConfig,
                     grpo_update, make_scheduler)

MODES = ("single", "full")
SAMPLERS = ("auto", "generate", "keyed")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def flag(name: str) -> str:
    """The command-line flag of a config field: cli.py names every field's flag with this, and errors name it."""
    return "--" + name.replace("_", "-")


def finite_positive(value: float) -> bool:
    """A usable size or rate: nan and inf compare and parse like numbers but measure nothing."""
    return math.isfinite(value) and value > 0


def option(default, help: str, choices: tuple[str, ...] | None = None, **kwargs):
    """A config field with its one-line help (shown by the CLI) and, for string knobs, its choices."""
    metadata = {"help": help, **({"choices": choices} if choices else {})}
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class GRPOConfig:
    """The hyper-parameters of a GRPO run. Names and defaults follow TRL's GRPOConfig where TRL has the knob.

    The loss knobs become a LossConfig (`loss_config()`), the update's an UpdateConfig (`update_config()`);
    where the run writes and which layer it trains are a RunSpec's, not a hyper-parameter.
    """

    num_generations: int = option(8, "completions sampled per prompt: the group that GRPO normalizes rewards in")
    per_device_train_batch_size: int = option(8, "completions per step, a multiple of --num-generations")
    max_steps: int = option(100, "training steps (each: sample a batch, then --num-iterations optimizer steps)")
    num_iterations: int = option(1, "optimizer steps on each sampled batch (TRL's mu)")
    learning_rate: float = option(1e-6, "AdamW learning rate (the peak of the --lr-scheduler-type schedule)")
    lr_scheduler_type: str = option("linear", "learning-rate schedule over the run's max_steps * num_iterations "
                                    "optimizer steps (transformers' schedules)", choices=LR_SCHEDULERS)
    warmup_steps: float = option(0, "linear warm-up from 0: optimizer steps (>= 1) or a ratio of all of them "
                                 "(in [0, 1)), as transformers reads it")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float | None = option(1.0, "clip the trained weights' gradient norm to this (None: no clipping)")
    beta: float = option(0.0, "weight of the k3 KL penalty against the reference policy (0: no reference pass)")
    epsilon: float = option(0.2, "lower clip bound of the importance ratio: 1 - epsilon")
    epsilon_high: float | None = option(None, "upper clip bound: 1 + epsilon_high (None: epsilon)")
    delta: float | None = option(None, "upper clamp of the unclipped ratio (two-sided clipping; None: off)")
    loss_type: str = option("dapo", "how per-token losses are averaged", choices=LOSS_TYPES)
    scale_rewards: str = option("group", "divide centered rewards by the group's or batch's std, or not",
                                choices=SCALE_REWARDS)
    importance_sampling_level: str = option("token", "one importance ratio per token or per sequence",
                                            choices=IMPORTANCE_SAMPLING_LEVELS)
    sapo_temperature_pos: float = option(1.0, "sapo loss: temperature of the soft gate where the advantage is > 0")
    sapo_temperature_neg: float = option(1.05, "sapo loss: temperature of the soft gate where the advantage is <= 0")
    use_bias_correction_kl: bool = option(True, "multiply the KL term by the (differentiable) importance ratio, as "
                                          "TRL does by default; changes the KL gradient even on-policy")
    temperature: float = option(1.0, "sampling temperature; log-probs are taken at the same temperature")
    top_p: float = option(1.0, "nucleus sampling threshold")
    max_completion_length: int = option(512, "most tokens sampled per completion (also the dr_grpo normalizer)")
    mask_truncated_completions: bool = option(False, "leave completions cut off at --max-completion-length (no EOS) "
                                              "out of the loss")
    sync_ref_model: bool = option(False, "move the reference toward the policy every --ref-model-sync-steps "
                                  "optimizer steps (TR-DPO; needs --beta > 0)")
    ref_model_mixup_alpha: float = option(0.6, "reference sync: reference = alpha * policy + (1 - alpha) * reference")
    ref_model_sync_steps: int = option(512, "reference sync: every this many optimizer steps")
    multi_objective_aggregation: str = option(
        "sum_then_normalize", "several reward functions: sum the weighted rewards then normalize, or normalize "
        "each within its group, sum, then normalize over the batch (GDPO)", choices=MULTI_OBJECTIVE_AGGREGATIONS)
    vespo_k_pos: float = option(2.0, "vespo loss: power exponent where the advantage is > 0")
    vespo_lambda_pos: float = option(3.0, "vespo loss: decay factor where the advantage is > 0")
    vespo_k_neg: float = option(3.0, "vespo loss: power exponent where the advantage is <= 0")
    vespo_lambda_neg: float = option(2.0, "vespo loss: decay factor where the advantage is <= 0")
    off_policy_mask_threshold: float | None = option(None, "mask sequences with negative advantage whose KL to the "
                                                     "sampling policy exceeds this (DeepSeek-V3.2; None: off)")
    top_entropy_quantile: float = option(1.0, "keep only the top this-fraction of tokens by entropy in the policy "
                                         "loss (1: all)")
    entropy_coef: float = option(0.0, "weight of the mean per-token entropy bonus (the start value with "
                                 "--use-adaptive-entropy)")
    use_adaptive_entropy: bool = option(False, "adapt --entropy-coef after each optimizer step toward "
                                        "--entropy-target (Skywork-OR1); applied only at or below the target")
    entropy_coef_min: float = option(0.0, "adaptive entropy: lower bound of the coefficient")
    entropy_coef_max: float = option(1.0, "adaptive entropy: upper bound of the coefficient")
    entropy_coef_delta: float = option(0.005, "adaptive entropy: change of the coefficient per optimizer step")
    entropy_target: float = option(0.2, "adaptive entropy: target mean per-token entropy (nats)")
    seed: int = option(42, "seed of prompts, sampling and preset initialization")
    sampler: str = option("auto", "how completions are sampled: generate (HF generate, torch's random stream), keyed "
                          "(every token from a uniform keyed by seed, step, prompt group, row and position: a group "
                          "samples the same on any data-parallel rank), auto (keyed under torchrun with several "
                          "ranks, else generate)", choices=SAMPLERS)
    loss_backend: str = option("auto", "loss implementation (auto: the Triton kernels on CUDA once their self-check "
                                       "passed, else chunked PyTorch; reference for float64)", choices=BACKENDS)
    layout: str = option("auto", "how rows run through the layers; same loss and gradients (auto: shared_prompt "
                         "on CPU for prompt groups, padded elsewhere)", choices=LAYOUTS)
    algo: str = option("grpo", "algorithm preset: dr_grpo sets scale_rewards none + loss_type dr_grpo; gigpo adds "
                       "anchor-state step advantages (environment tasks)", choices=ALGORITHMS)
    gigpo_gamma: float = option(0.95, "GiGPO: discount of the step returns compared within an anchor state")
    gigpo_omega: float = option(1.0, "GiGPO: weight of the step advantage, A = A_episode + omega * A_step")
    gigpo_norm: str = option("mean", "GiGPO: subtract the group mean (mean) or also divide by the std (std)",
                             choices=GIGPO_NORMS)

    def __post_init__(self) -> None:
        check_layout(self.layout)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {choices}, got {getattr(self, f.name)!r}")
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (GRPO compares completions in a group), got {self.num_generations}")
        if self.per_device_train_batch_size % self.num_generations != 0:
            raise ValueError(
                f"per_device_train_batch_size {self.per_device_train_batch_size} is not divisible by "
                f"num_generations {self.num_generations}"
            )
        for name in ("max_steps", "max_completion_length", "num_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not finite_positive(self.learning_rate):
            raise ValueError(f"{flag('learning_rate')} must be a finite number > 0, got {self.learning_rate}")
        # None means no clipping; a negative bound would flip the gradient (train against the reward).
        if self.max_grad_norm is not None and not finite_positive(self.max_grad_norm):
            raise ValueError(f"{flag('max_grad_norm')} must be a finite number > 0 (or none: no clipping), "
                             f"got {self.max_grad_norm}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"{flag('top_p')} must be in (0, 1], got {self.top_p}")
        if not finite_positive(self.temperature):
            raise ValueError(f"{flag('temperature')} must be a finite number > 0, got {self.temperature}")
        if not 0.0 <= self.gigpo_gamma <= 1.0:
            raise ValueError(f"gigpo_gamma must be in [0, 1], got {self.gigpo_gamma}")
        if self.gigpo_omega < 0:
            raise ValueError(f"gigpo_omega must be >= 0, got {self.gigpo_omega}")
        if not (math.isfinite(self.warmup_steps) and self.warmup_steps >= 0):
            raise ValueError(f"{flag('warmup_steps')} must be a number of steps >= 1 or a ratio in [0, 1), "
                             f"got {self.warmup_steps}")
        if self.sync_ref_model and self.beta == 0.0:
            raise ValueError(f"{flag('sync_ref_model')} needs {flag('beta')} > 0: with beta 0 there is no reference "
                             "to synchronize (as TRL refuses it); drop --sync-ref-model or set --beta")
        if not 0.0 <= self.ref_model_mixup_alpha <= 1.0:
            raise ValueError(f"{flag('ref_model_mixup_alpha')} must be in [0, 1], got {self.ref_model_mixup_alpha}")
        if self.ref_model_sync_steps < 1:
            raise ValueError(f"{flag('ref_model_sync_steps')} must be >= 1, got {self.ref_model_sync_steps}")
        # vespo_*, off_policy_mask_threshold, top_entropy_quantile and entropy_coef: LossConfig's checks (below).
        for name in ("entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{flag(name)} must be a finite number, got {getattr(self, name)}")
        if self.use_adaptive_entropy:
            if not 0.0 <= self.entropy_coef_min <= self.entropy_coef_max:
                raise ValueError(f"{flag('entropy_coef_min')} and {flag('entropy_coef_max')} must satisfy "
                                 f"0 <= min <= max, got {self.entropy_coef_min} and {self.entropy_coef_max}")
            if self.entropy_coef_delta < 0:
                raise ValueError(f"{flag('entropy_coef_delta')} must be >= 0, got {self.entropy_coef_delta}")
        self.update_config()  # the loss knobs' own checks

    def loss_config(self) -> LossConfig:
        return LossConfig(
            beta=self.beta, epsilon_low=self.epsilon,
            epsilon_high=self.epsilon if self.epsilon_high is None else self.epsilon_high, delta=self.delta,
            loss_type=self.loss_type, scale_rewards=self.scale_rewards, temperature=self.temperature,
            max_completion_length=self.max_completion_length, importance_sampling_level=self.importance_sampling_level,
            use_bias_correction_kl=self.use_bias_correction_kl, sapo_temperature_pos=self.sapo_temperature_pos,
            sapo_temperature_neg=self.sapo_temperature_neg, vespo_k_pos=self.vespo_k_pos,
            vespo_lambda_pos=self.vespo_lambda_pos, vespo_k_neg=self.vespo_k_neg, vespo_lambda_neg=self.vespo_lambda_neg,
            off_policy_mask_threshold=self.off_policy_mask_threshold, top_entropy_quantile=self.top_entropy_quantile,
            entropy_coef=self.entropy_coef,
        )

    def update_config(self) -> UpdateConfig:
        return UpdateConfig(loss=self.loss_config(), num_iterations=self.num_iterations,
                            max_grad_norm=self.max_grad_norm, loss_backend=self.loss_backend, layout=self.layout)

    @property
    def total_optimizer_steps(self) -> int:
        """Optimizer steps of the whole run: num_iterations per sampled batch (TRL's count with
        steps_per_generation 1), the length of the learning-rate schedule."""
        return self.max_steps * self.num_iterations

    def step_controls(self, optimizer: torch.optim.Optimizer, done_steps: int = 0,
                      sync_pairs: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> StepControls:
        """A run's per-optimizer-step state over `optimizer` (whose rates are the run's base rates), after
        `done_steps` training steps: the schedule, the entropy controller at its start value and, with
        sync_ref_model, the (reference, policy) parameter pairs to mix."""
        return StepControls(
            scheduler=make_scheduler(optimizer, self.lr_scheduler_type, self.warmup_steps, self.total_optimizer_steps,
                                     done_steps * self.num_iterations),
            entropy=EntropyControl(coef=self.entropy_coef, adaptive=self.use_adaptive_entropy,
                                   minimum=self.entropy_coef_min, maximum=self.entropy_coef_max,
                                   delta=self.entropy_coef_delta, target=self.entropy_target),
            optimizer_steps=done_steps * self.num_iterations,
            sync_pairs=sync_pairs if self.sync_ref_model else None,
            sync_alpha=self.ref_model_mixup_alpha, sync_every=self.ref_model_sync_steps,
        )

    def end_token_ids(self, tokenizer) -> tuple[int, ...]:
        """The tokens that end a completion (EOS, and pad as TRL counts it): what is not truncated."""
        return tuple(t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None)


def scored_batch(config: GRPOConfig, task: Task, texts: list[str], examples: list[Example], prompt_ids, prompt_mask,
                 completion_ids, completion_mask, device, lanes: int | None = None,
                 world: World | None = None) -> RolloutBatch:
    """The rollout batch of single-turn completions (rows in groups of num_generations, lane by lane): rewards
    summed over the task's weighted reward functions and, with multi_objective_aggregation
    "normalize_then_sum", TRL's per-function advantages (each lane's rows normalized on their own, as if it
    ran alone). Truncation masking is the caller's (it reports the unmasked lengths).

    lanes: the number of lanes whose rows these are (LaneTrainer); None: one run's (GRPOTrainer).
    world: these rows are one data-parallel rank's share of the step's batch (of each lane's): the
    advantages are then always computed, each lane's over every rank's rewards of that lane (all-gathered: the
    batch std of scale_rewards "batch" and the batch normalization of normalize_then_sum are the lane's whole
    batch's), and this rank's rows of them kept."""
    table = reward_table(task, texts, examples)
    rewards = torch.from_numpy(weighted_sum(table, task.reward_weights)).to(device)
    if world is not None:
        return RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, rewards,
                            group_size=config.num_generations,
                            advantages=_data_parallel_advantages(config, task, table, rewards, world, lanes).to(device))
    advantages = None
    if config.multi_objective_aggregation == "normalize_then_sum":
        per_func = torch.from_numpy(table).to(device)
        advantages = torch.cat([normalize_then_sum(part, task.reward_weights, config.num_generations)
                                for part in per_func.chunk(lanes or 1)])
    return RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, rewards,
                        group_size=config.num_generations, advantages=advantages)


def _data_parallel_advantages(config: GRPOConfig, task: Task, table, rewards: torch.Tensor, world: World,
                              lanes: int | None = None) -> torch.Tensor:
    """This rank's rows of the advantages of the whole step's batch, from every rank's rewards: with `lanes`
    lanes (rows lane by lane, the same number per lane) each lane's from its own rewards on every rank. One
    all-gather for every lane: each rank sends (rows per lane, lanes, ...), so that the gathered rows of lane k
    are its whole batch in rank order.

    Non-finite rewards: ValueError for one run (lanes None); rewards too large to train on: DivergenceError. With lanes, DivergenceError naming the lanes (their
    indices among `lanes`) for non-finite rewards or advantages too large to train on, raised on every rank alike
    (the update's own check sees only this rank's rows)."""
    run = lanes is None
    lanes = lanes or 1
    rows = rewards.shape[0] // lanes
    own = slice(world.rank * rows, (world.rank + 1) * rows)

    def gathered(x: torch.Tensor) -> torch.Tensor:
        """(lanes * rows, ...) lane by lane -> (lanes, ranks * rows, ...): each lane's rows on every rank."""
        local = x.reshape(lanes, rows, *x.shape[1:]).transpose(0, 1).contiguous()
        return world.all_gather_rows(local).transpose(0, 1)

    if config.multi_objective_aggregation == "normalize_then_sum":
        per_func = gathered(torch.from_numpy(table))
        return torch.cat([normalize_then_sum(part, task.reward_weights, config.num_generations)[own]
                          for part in per_func])
    everyone = gathered(rewards)
    if not torch.isfinite(everyone).all():  # the check the loss makes of rewards, on every rank alike
        if run:
            bad = (~torch.isfinite(everyone[0])).nonzero().flatten().tolist()
            raise ValueError(f"rewards contain NaN or inf at rows {bad} of the step's batch")
        bad = ~torch.isfinite(everyone)
        bad_lanes = tuple(bad.any(dim=1).nonzero().flatten().tolist())
        where = "; ".join(f"rows {bad[k].nonzero().flatten().tolist()} of lane {k}" for k in bad_lanes)
        raise DivergenceError(f"rewards contain NaN or inf at {where} of the step's batch; check the task's reward "
                              "functions", bad_lanes)
    if run and float(everyone.abs().max()) > SQUARE_SAFE:  # the update's check of one run's rewards, on every rank alike
        raise DivergenceError(f"the rewards of the step's batch are too large to train on (largest |reward| "
                              f"{float(everyone.abs().max()):.3g}; beyond {SQUARE_SAFE:.2g} their square overflows "
                              "float32); scale the task's rewards down")
    # as the loss computes them from rewards (loss._resolve_advantages), over each lane's whole batch
    whole = [group_advantages(lane.float(), config.num_generations, config.scale_rewards)[0] for lane in everyone]
    # the update's check of the advantages (update._check_rewards), made here on the whole batch so that every
    # rank raises alike (a rank's own rows may be within bounds while another's are not)
    peaks = [float(a.abs().max()) if a.numel() and not run else 0.0 for a in whole]
    if bad_lanes := tuple(k for k, peak in enumerate(peaks) if not peak <= SQUARE_SAFE):
        raise DivergenceError(f"the advantages of lane(s) {list(bad_lanes)} are not finite or too large to train on "
                              f"(largest |advantage| {max(peaks[k] for k in bad_lanes):.3g}, usable up to "
                              f"{SQUARE_SAFE:.2g}); scale the task's rewards down", bad_lanes)
    return torch.cat([advantages[own] for advantages in whole])


@dataclass
class RunSpec:
    """Where a run writes and what it trains: not hyper-parameters (a sweep sets these per run)."""

    output_dir: str = option("runs/grpo", "where logs and checkpoints go; a rerun resumes from here")
    mode: str = option("single", "single: one layer trains; full: every parameter trains (the baseline)",
                       choices=MODES)
    layer: int | None = option(None, "the decoder layer to train (negative counts from the top; default: middle)")
    save_steps: int = option(50, "write a checkpoint every this many steps (and at the end)")
    save_total_limit: int = option(2, "checkpoints kept; older ones are deleted")

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        # Checked here, not at the first save: a bad value would otherwise fail only after the first steps.
        for name in ("save_steps", "save_total_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ValueError(f"{flag('output_dir')} {self.output_dir} is a file, not a directory")


# Settings a resumed run may change, because they change nothing any step computes: max_steps only says where
# the run stops (extending a finished run is what resuming is for; with a decaying lr_scheduler_type the steps
# still to run follow the new length's schedule, as an HF Trainer resumed with a new max_steps does); loss_backend
# and layout are implementations
# of the same loss and gradients (equal up to float rounding). A RunSpec's output_dir, save_steps and
# save_total_limit only say where and how often checkpoints are written, and are not compared at all. Every
# other hyper-parameter, the task, the base model, the mode and the layer change the math, so a resume refuses
# a change of any of them rather than silently mixing two runs in one output_dir.
RESUMABLE_CHANGES = frozenset({"max_steps", "loss_backend", "layout"})


def run_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint's run computed with: the settings a resume must keep (see RESUMABLE_CHANGES)."""
    settings = {"mode": meta.get("mode"), "layer": meta.get("layer"), "task": meta.get("task")}
    if meta.get("base_model"):  # "" means unknown (the library's default), never a difference
        settings["base_model"] = meta["base_model"]
    config = meta.get("config") or {}
    settings.update({k: v for k, v in config.items() if k not in RESUMABLE_CHANGES})
    # A lane's own learning rate and seed (LaneTrainer) replace the shared config's; None: the config's.
    lane = (meta.get("run") or {}).get("lane") or {}
    for key in ("learning_rate", "seed"):
        if lane.get(key) is not None:
            settings[key] = lane[key]
    return settings


def check_resume(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """ValueError naming each setting (old -> new) in which the run saved at `path` differs from the one that
    would resume it. Settings one side lacks (a checkpoint written before the setting existed) are skipped."""
    old = run_settings(saved)
    new = run_settings(json.loads(json.dumps(current)))  # the form it takes on disk (tuples -> lists)
    differing = [f"{key} {old[key]!r} -> {new[key]!r}" for key in new if key in old and old[key] != new[key]]
    if differing:
        raise ValueError(f"cannot resume {path}: it was trained with other settings ({'; '.join(differing)}); "
                         "rerun with the settings it was trained with, or train into another output directory "
                         "(or pass --no-resume)")


def resolve_sampler(config: GRPOConfig, task: Task, world: World) -> str:
    """config.sampler with "auto" decided ("keyed" with several data-parallel ranks, else "generate"); ValueError
    for what data-parallel training cannot run (yet): HF generate on several ranks (a group's completions would
    depend on the rank sampling it), environment tasks, a step's prompt groups that do not split evenly."""
    sampler = config.sampler
    if sampler == "auto":
        sampler = "keyed" if world.distributed else "generate"
    if world.distributed and sampler != "keyed":
        raise ValueError(f"{flag('sampler')} {sampler} with {world.size} data-parallel ranks: a prompt group's "
                         "completions must not depend on the rank that samples it; use --sampler keyed (or auto)")
    if sampler == "keyed" and is_environment_task(task):
        raise ValueError(f"{flag('sampler')} keyed (and data-parallel training) runs single-turn tasks; {task.name!r} "
                         "is an environment task: train it in one process with --sampler generate")
    check_groups_split(config, world)
    return sampler


def check_groups_split(config: GRPOConfig, world: World, lanes: bool = False) -> None:
    """ValueError unless a step's prompt groups (each lane's, with `lanes`) split evenly across `world`'s ranks: a
    group never splits across ranks."""
    groups = config.per_device_train_batch_size // config.num_generations
    if groups % world.size != 0:
        whose, total = ("each lane's ", "a lane's step total") if lanes else ("", "the step's total")
        raise ValueError(f"{whose}{groups} prompt groups per step ({flag('per_device_train_batch_size')} "
                         f"{config.per_device_train_batch_size} / {flag('num_generations')} {config.num_generations}) "
                         f"do not split evenly across {world.size} ranks: a group never splits across ranks, so "
                         f"{whose or 'the '}groups per step must be a multiple of the number of ranks (the batch size "
                         f"here is {total} over every rank)")


def step_prompts(task: Task, seed: int, step: int, count: int) -> list[Example]:
    """The `count` training examples of step `step` of a run seeded `seed`: drawn from (seed, step) alone, so
    a resumed run, and a lane among other lanes, sees exactly the prompts it would have seen."""
    return task.sample(random.Random(seed * 1_000_003 + step), count)


class GRPOTrainer:
    """Single-layer (or full-parameter) GRPO on a task, with atomic checkpoints and resume.

    trainer = GRPOTrainer(model, tokenizer, task, GRPOConfig(max_steps=20), RunSpec("runs/x", layer=2),
                          base_model="tiny")
    trainer.train()
    """

    def __init__(self, model, tokenizer, task: Task, config: GRPOConfig, run: RunSpec | None = None,
                 base_model: str = "", resume: bool = True, progress: bool = True, world: World | None = None):
        run = run or RunSpec()
        config.validate()
        run.validate()
        config = apply_algorithm(config)  # a copy: dr_grpo / gigpo fix some loss knobs
        world = world or World()
        config = dataclasses.replace(config, sampler=resolve_sampler(config, task, world))
        # Keyed sampling runs the data-parallel code path (with one process: the reference of N ranks), and
        # HF generate the plain one: self.world is None there.
        self.world = world if config.sampler == "keyed" else None
        self.run = run
        self.update_config = config.update_config()
        self.multi_turn = is_environment_task(task)
        if self.multi_turn and config.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(f"multi_objective_aggregation {config.multi_objective_aggregation!r} needs reward "
                             f"functions; environment task {task.name!r} is scored by its environment's step rewards")
        if config.algo == "gigpo" and not self.multi_turn:
            raise ValueError(f"algo 'gigpo' needs a multi-turn environment task (with make_env), "
                             f"and task {task.name!r} is single-turn; use grpo or dr_grpo")
        self.model, self.tokenizer, self.task, self.config = model, tokenizer, task, config
        self.base_model = base_model
        self.progress = progress  # the per-step bar; a sweep turns it off with its own
        num_layers = len(decoder_of(model).layers)
        if run.mode == "single":
            layer = num_layers // 2 if run.layer is None else run.layer
            self.policy = OneLayerPolicy(model, layer=layer)
        else:
            self.policy = FullModelPolicy(model, keep_reference=config.beta != 0.0)
        self.optimizer = torch.optim.AdamW(
            self.policy.trainable_parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon, weight_decay=config.weight_decay,
        )
        self.controls = config.step_controls(self.optimizer, sync_pairs=self._reference_pairs())
        self.output_dir = Path(run.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.step = 0
        self._updating = False  # True while the weights may be ahead of self.step (inside an update)
        self._diverged = False  # once set, the live weights are bad: nothing may be saved from them
        torch.manual_seed(config.seed)
        world.resume_hint = (f"the last checkpoint in {self.output_dir} (written by rank 0 every {flag('save_steps')} "
                             "steps) stands: rerun the same command to resume every rank from it")
        if resume and (path := checkpoint.latest_checkpoint(self.output_dir)) is not None:
            self._resume(path)
        world.same_on_every_rank(self.step, "the step resumed from")

    @property
    def device(self) -> torch.device:
        return self.policy.lm_head_weight.device

    def _reference_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """(reference, policy) parameters that sync_ref_model mixes: the one-layer reference and the trained
        layer, or in full mode the reference model and the model (TRL's pairing, parameters in order)."""
        if not self.config.sync_ref_model:
            return None
        if isinstance(self.policy, OneLayerPolicy):
            reference, trained = self.policy.reference_layer, self.policy.target_layer
        else:
            reference, trained = self.policy.reference_model, self.model
        return list(zip(reference.parameters(), trained.parameters(), strict=True))

    def _layer(self) -> int | None:
        return self.policy.layer_index if self.run.mode == "single" else None

    def _metadata(self) -> dict[str, Any]:
        return {"base_model": self.base_model, "config": dataclasses.asdict(self.config),
                "run": dataclasses.asdict(self.run), "task": self.task.name}

    def _resume(self, path: Path) -> None:
        meta = checkpoint.read_meta(path)  # everything is checked before the model is touched
        if meta.get("mode") != self.run.mode or (self.run.mode == "single" and meta.get("layer") != self._layer()):
            raise ValueError(f"checkpoint {path} was written by a {meta.get('mode')} run of layer {meta.get('layer')}; "
                             "use another output_dir or the same mode and layer")
        check_resume(path, meta, {**self._metadata(), "mode": self.run.mode, "layer": self._layer()})
        checkpoint.load_layer(self.model, path)
        self.step, state = checkpoint.load_training_state(path, self.optimizer)
        torch.set_rng_state(state["torch_rng"])
        self.controls.resume(self.step * self.config.num_iterations, state.get("controls", {}))

    def _save(self) -> Path:
        if self._diverged:  # the last good checkpoint must stand
            raise DivergenceError(f"refusing to save step {self.step}: this run diverged")
        return checkpoint.save_checkpoint(
            self.output_dir, policy=self.policy, optimizer=self.optimizer, step=self.step, metadata=self._metadata(),
            trainer_state={"torch_rng": torch.get_rng_state(), "controls": self.controls.state_dict()},
            keep_last=self.run.save_total_limit,
        )

    def prompts_for_step(self, step: int) -> list[Example]:
        """The step's prompts: every prompt group of the step, or with data-parallel ranks this rank's share
        of them (a contiguous block: rank r samples groups r * n .. r * n + n - 1 of the step's N * n)."""
        groups = self.config.per_device_train_batch_size // self.config.num_generations
        examples = step_prompts(self.task, self.config.seed, step, groups)
        if self.world is None:
            return examples
        share = groups // self.world.size
        return examples[self.world.rank * share:(self.world.rank + 1) * share]

    def make_episodes(self, examples: list[Example]) -> tuple[RolloutBatch, Episodes]:
        """Environment tasks: G episodes per example, one batch row per step (see episodes.py)."""
        episodes = run_episodes(
            self.model, self.tokenizer, self.task, examples, self.config.num_generations,
            self.config.max_completion_length, temperature=self.config.temperature, top_p=self.config.top_p,
            device=self.device,
        )
        return episode_batch(self.tokenizer, episodes, self.config, self.device), episodes

    def make_rollouts(self, examples: list[Example]) -> tuple[RolloutBatch, list[str]]:
        """-> (batch, texts): completions of single-turn tasks, or for environment tasks one
        transcript per episode and a batch of one row per step."""
        if self.multi_turn:
            batch, episodes = self.make_episodes(examples)
            return batch, episodes.transcripts
        grouped = [e for e in examples for _ in range(self.config.num_generations)]
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, [e.prompt for e in grouped], self.device)
        sampling = dict(eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                        temperature=self.config.temperature, top_p=self.config.top_p,
                        group_size=self.config.num_generations)
        if self.world is None:
            completion_ids, completion_mask = sample_completions(
                self.model, prompt_ids, prompt_mask, self.config.max_completion_length, **sampling)
        else:  # keyed: this rank's groups are the step's groups first_group, first_group + 1, ...
            first_group = self.world.rank * len(examples)
            completion_ids, completion_mask = sample_keyed(
                self.model, prompt_ids, prompt_mask, self.config.max_completion_length,
                keys=DrawKeys((self.config.seed,), self.step, first_group=first_group), **sampling)
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        batch = scored_batch(self.config, self.task, texts, grouped, prompt_ids, prompt_mask, completion_ids,
                             completion_mask, self.device, world=self.world)
        return batch, texts

    def train_step(self) -> dict[str, float]:
        if self._diverged:
            raise DivergenceError("this run diverged; its weights are unusable (resume from the last checkpoint)")
        started = time.perf_counter()
        examples = self.prompts_for_step(self.step)
        if self.multi_turn:
            batch, episodes = self.make_episodes(examples)
            returns = episodes.returns  # rewards per episode, not per row
        else:
            batch, _ = self.make_rollouts(examples)
            returns = batch.rewards
        lengths = batch.completion_mask.sum(1).float()
        tokens = int(batch.attention_mask.sum())  # what was generated and run, masked for the loss or not
        truncated = None
        if self.config.mask_truncated_completions:
            batch, truncated = mask_truncated(batch, self.config.end_token_ids(self.tokenizer))
        generated = time.perf_counter()
        self._updating = True
        try:
            history = grpo_update(self.policy, self.optimizer, batch, self.update_config, self.controls, self.world)
        except DivergenceError as error:
            self._diverged = True
            raise DivergenceError(f"training diverged at step {self.step + 1}: {error}. Nothing was saved from it; "
                                  f"the last checkpoint in {self.output_dir}, if any, is the last good state") from error
        self.step += 1
        self._updating = False
        finished = time.perf_counter()
        record = {k: sum(h[k] for h in history) / len(history) for k in history[0]}
        if self.world is not None:  # the whole step's batch: every rank's rows
            returns, lengths, truncated = (None if x is None else self.world.all_gather_rows(x)
                                           for x in (returns, lengths, truncated))
            tokens = int(self.world.all_reduce_sum(torch.tensor([float(tokens)], dtype=torch.float64)))
            record["frac_reward_zero_std"] = float(group_advantages(returns.float(), self.config.num_generations,
                                                                    self.config.scale_rewards)[1].float().mean())
        grouped = returns.view(-1, self.config.num_generations)
        if self.multi_turn:
            constant = torch.isclose(grouped.std(dim=1), torch.zeros(()))  # groups with no episode-level signal
            record.update(frac_reward_zero_std=float(constant.float().mean()),
                          success_rate=sum(episodes.success) / len(episodes.success),
                          episode_length=float(episodes.lengths.float().mean()), rows=batch.rewards.shape[0])
        record.update(
            step=self.step, reward_mean=float(returns.mean()), reward_std=float(grouped.std(dim=1).mean()),
            completion_length=float(lengths.mean()),
            generate_time=generated - started, update_time=finished - generated, step_time=finished - started,
            tokens_per_second=tokens / (finished - started),
        )
        if truncated is not None:
            record["clipped_ratio"] = float(truncated.float().mean())  # TRL's completions/clipped_ratio
        return record

    @property
    def is_main(self) -> bool:
        """Whether this process writes the log and checkpoints (rank 0, or the only process)."""
        return self.world is None or self.world.is_main

    def train(self) -> list[dict[str, float]]:
        """Run until max_steps; a KeyboardInterrupt saves a checkpoint before it propagates, unless it lands
        inside an update (the weights may be a step ahead of the step count) or after a divergence.

        With data-parallel ranks every rank returns the same (global) records; rank 0 alone writes log.jsonl
        and the checkpoints, and the others wait for each checkpoint (a barrier), so that a rank that fails
        later finds it on disk."""
        log_path = self.output_dir / "log.jsonl"
        records = []
        bar = tqdm(total=self.config.max_steps, initial=self.step, desc=f"{self.config.algo} {self.run.mode}", unit="step",
                   disable=not (self.progress and self.is_main))
        try:
            while self.step < self.config.max_steps:
                record = self.train_step()
                records.append(record)
                if self.is_main:
                    with log_path.open("a") as log:
                        log.write(json.dumps(record) + "\n")
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward_mean']:.3f}", loss=f"{record['loss']:.4f}",
                                kl=f"{record.get('kl', 0.0):.4f}", clip=f"{record.get('clip_ratio/region_mean', 0.0):.3f}",
                                tok_s=f"{record['tokens_per_second']:.0f}")
                if self.step % self.run.save_steps == 0 or self.step == self.config.max_steps:
                    if self.is_main:
                        self._save()
                    if self.world is not None:
                        self.world.barrier()
        except KeyboardInterrupt:
            if not self.is_main:
                raise
            if self.step > 0 and not (self._updating or self._diverged):
                saved = self._save()
                print(f"\ninterrupted: saved step {self.step} to {saved}; run the same command to resume")
            elif self._updating:
                print("\ninterrupted inside an update: nothing saved, the last checkpoint stands; "
                      "run the same command to resume")
            raise
        finally:
            bar.close()
        return records
