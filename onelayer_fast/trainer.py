"""The training config (TRL GRPOConfig names) and the GRPO training loop; nothing model-specific."""
from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .advantages import ALGORITHMS, GIGPO_NORMS, apply_algorithm
from .episodes import Episodes, episode_batch, is_environment_task, run_episodes
from .policy import FullModelPolicy, OneLayerPolicy, decoder_of
from .rollout import encode_prompts, sample_completions
from .tasks import Example, Task
from .update import RolloutBatch, UpdateSettings, grpo_update

MODES = ("single", "full")


@dataclass
class GRPOConfig(UpdateSettings):
    """The loss knobs of UpdateSettings plus the run's; names and defaults follow TRL's GRPOConfig."""

    output_dir: str = "runs/grpo"
    layer: int | None = None  # None: the middle layer (len(layers) // 2)
    mode: str = "single"  # "single": one layer trains; "full": every parameter trains (the baseline)
    max_steps: int = 100
    per_device_train_batch_size: int = 8  # completions per step, a multiple of num_generations
    max_completion_length: int = 256
    top_p: float = 1.0
    learning_rate: float = 1e-6
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    seed: int = 42
    save_steps: int = 50
    save_total_limit: int = 2
    # Algorithm (advantages.py): "grpo" (TRL defaults), "dr_grpo" (sets scale_rewards "none", loss_type
    # "dr_grpo"), "gigpo" (episode + anchor-state step advantages; environment tasks only).
    algo: str = "grpo"
    gigpo_gamma: float = 0.95  # discount of the step returns that GiGPO compares within an anchor state
    gigpo_omega: float = 1.0  # weight of the step advantage: A = A_episode + omega * A_step
    gigpo_norm: str = "mean"  # "mean": subtract the group mean (the GiGPO paper's default); "std": also divide by std

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (GRPO compares completions in a group), got {self.num_generations}")
        if self.per_device_train_batch_size % self.num_generations != 0:
            raise ValueError(
                f"per_device_train_batch_size {self.per_device_train_batch_size} is not divisible by "
                f"num_generations {self.num_generations}"
            )
        for name in ("max_steps", "max_completion_length", "num_iterations", "save_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.algo not in ALGORITHMS:
            raise ValueError(f"algo must be one of {ALGORITHMS}, got {self.algo!r}")
        if self.gigpo_norm not in GIGPO_NORMS:
            raise ValueError(f"gigpo_norm must be one of {GIGPO_NORMS}, got {self.gigpo_norm!r}")
        if not 0.0 <= self.gigpo_gamma <= 1.0:
            raise ValueError(f"gigpo_gamma must be in [0, 1], got {self.gigpo_gamma}")
        if self.gigpo_omega < 0:
            raise ValueError(f"gigpo_omega must be >= 0, got {self.gigpo_omega}")


def score(task: Task, completions: list[str], examples: list[Example]) -> torch.Tensor:
    """Weighted sum of the task's reward functions, one value per completion; NaN/inf is an error."""
    rewards = torch.zeros(len(completions), dtype=torch.float32)
    for func, weight in zip(task.reward_funcs, task.reward_weights):
        values = torch.tensor([float(func(c, e)) for c, e in zip(completions, examples)], dtype=torch.float32)
        if not torch.isfinite(values).all():
            raise ValueError(f"reward function {getattr(func, '__name__', func)!r} returned NaN or inf")
        rewards += weight * values
    return rewards


class GRPOTrainer:
    """Single-layer (or full-parameter) GRPO on a task, with atomic checkpoints and resume.

    trainer = GRPOTrainer(model, tokenizer, task, GRPOConfig(layer=2, max_steps=20), base_model="tiny")
    trainer.train()
    """

    def __init__(self, model, tokenizer, task: Task, config: GRPOConfig, base_model: str = "", resume: bool = True,
                 progress: bool = True):
        config.validate()
        config = apply_algorithm(config)  # a copy: dr_grpo / gigpo fix some loss knobs
        self.multi_turn = is_environment_task(task)
        if config.algo == "gigpo" and not self.multi_turn:
            raise ValueError(f"algo 'gigpo' needs a multi-turn environment task (with make_env), "
                             f"and task {task.name!r} is single-turn; use grpo or dr_grpo")
        self.model, self.tokenizer, self.task, self.config = model, tokenizer, task, config
        self.base_model = base_model
        self.progress = progress  # the per-step bar; a sweep turns it off with its own
        num_layers = len(decoder_of(model).layers)
        if config.mode == "single":
            layer = num_layers // 2 if config.layer is None else config.layer
            self.policy = OneLayerPolicy(model, layer=layer)
        else:
            self.policy = FullModelPolicy(model, keep_reference=config.beta != 0.0)
        self.optimizer = torch.optim.AdamW(
            self.policy.trainable_parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon, weight_decay=config.weight_decay,
        )
        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.step = 0
        torch.manual_seed(config.seed)
        if resume and checkpoint.latest_checkpoint(self.output_dir) is not None:
            self._resume()

    @property
    def device(self) -> torch.device:
        return self.policy.lm_head_weight.device

    def _resume(self) -> None:
        path = checkpoint.latest_checkpoint(self.output_dir)
        meta = checkpoint.load_layer(self.model, path)
        if meta.get("mode") != self.config.mode or (self.config.mode == "single" and meta.get("layer") != self.policy.layer_index):
            raise ValueError(f"checkpoint {path} was written by a {meta.get('mode')} run of layer {meta.get('layer')}; "
                             "use another output_dir or the same mode and layer")
        self.step, state = checkpoint.load_training_state(path, self.optimizer)
        torch.set_rng_state(state["torch_rng"])

    def _save(self) -> Path:
        return checkpoint.save_checkpoint(
            self.output_dir, policy=self.policy, optimizer=self.optimizer, step=self.step,
            metadata={"base_model": self.base_model, "config": dataclasses.asdict(self.config), "task": self.task.name},
            trainer_state={"torch_rng": torch.get_rng_state()}, keep_last=self.config.save_total_limit,
        )

    def prompts_for_step(self, step: int) -> list[Example]:
        # Drawn from (seed, step) alone, so a resumed run sees exactly the prompts it would have seen.
        rng = random.Random(self.config.seed * 1_000_003 + step)
        return self.task.sample(rng, self.config.per_device_train_batch_size // self.config.num_generations)

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
        completion_ids, completion_mask = sample_completions(
            self.model, prompt_ids, prompt_mask, self.config.max_completion_length,
            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
            temperature=self.config.temperature, top_p=self.config.top_p, group_size=self.config.num_generations,
        )
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        rewards = score(self.task, texts, grouped).to(self.device)
        return RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, rewards), texts

    def train_step(self) -> dict[str, float]:
        started = time.perf_counter()
        examples = self.prompts_for_step(self.step)
        if self.multi_turn:
            batch, episodes = self.make_episodes(examples)
            returns = episodes.returns  # rewards per episode, not per row
        else:
            batch, _ = self.make_rollouts(examples)
            returns = batch.rewards
        generated = time.perf_counter()
        history = grpo_update(self.policy, self.optimizer, batch, self.config)
        finished = time.perf_counter()
        self.step += 1
        tokens = int(batch.attention_mask.sum())
        record = {k: sum(h[k] for h in history) / len(history) for k in history[0]}
        grouped = returns.view(-1, self.config.num_generations)
        if self.multi_turn:
            constant = torch.isclose(grouped.std(dim=1), torch.zeros(()))  # groups with no episode-level signal
            record.update(frac_reward_zero_std=float(constant.float().mean()),
                          success_rate=sum(episodes.success) / len(episodes.success),
                          episode_length=float(episodes.lengths.float().mean()), rows=batch.rewards.shape[0])
        record.update(
            step=self.step, reward_mean=float(returns.mean()), reward_std=float(grouped.std(dim=1).mean()),
            completion_length=float(batch.completion_mask.sum(1).float().mean()),
            generate_time=generated - started, update_time=finished - generated, step_time=finished - started,
            tokens_per_second=tokens / (finished - started),
        )
        return record

    def train(self) -> list[dict[str, float]]:
        """Run until max_steps; a KeyboardInterrupt saves a checkpoint before it propagates."""
        log_path = self.output_dir / "log.jsonl"
        records = []
        bar = tqdm(total=self.config.max_steps, initial=self.step, desc=f"{self.config.algo} {self.config.mode}", unit="step",
                   disable=not self.progress)
        try:
            while self.step < self.config.max_steps:
                record = self.train_step()
                records.append(record)
                with log_path.open("a") as log:
                    log.write(json.dumps(record) + "\n")
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward_mean']:.3f}", loss=f"{record['loss']:.4f}",
                                kl=f"{record.get('kl', 0.0):.4f}", clip=f"{record['clip_ratio/region_mean']:.3f}",
                                tok_s=f"{record['tokens_per_second']:.0f}")
                if self.step % self.config.save_steps == 0 or self.step == self.config.max_steps:
                    self._save()
        except KeyboardInterrupt:
            if self.step > 0:
                saved = self._save()
                print(f"\ninterrupted: saved step {self.step} to {saved}; run the same command to resume")
            raise
        finally:
            bar.close()
        return records
