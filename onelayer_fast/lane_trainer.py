"""Training many single-layer runs at once: one LanePolicy, one rollout batch and one update per step.

Each lane is a run of its own as far as its files go: its output_dir holds log.jsonl and atomic
checkpoints exactly as GRPOTrainer writes them for a single-layer run (`onelayer-fast merge` and `eval`
read them), and it resumes from its own latest checkpoint. Lanes step in lockstep; lanes a kill left at
different steps (one checkpointed, another not yet) simply step apart until they meet again, which
changes nothing they compute: prompts come from (lane seed, step) and every sampled token from
(lane seed, step, group, row, position), never from a shared random stream.

Under torchrun (`world`: distributed.World) the lanes train data-parallel: every rank holds every lane's layer
and samples its share of every lane's prompt groups (rank r: groups r * n .. r * n + n - 1 of each lane's N * n,
a group never split; keyed draws make them what one process would sample); each lane's advantages come from its
rewards all-gathered from every rank, its loss is normalized over its whole batch (GlobalCounts per lane), every
lane's gradient is summed over the ranks (one flat all-reduce) before its own clipping, and its metrics are
reduced. Rank 0 alone writes the lanes' logs and checkpoints; every rank resumes from them (a shared output
directory). A World of one process runs the same code path: the reference that N ranks equal.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .advantages import apply_algorithm
from .batch import mask_truncated
from .distributed import World
from .episodes import is_environment_task
from .kernels.grpo_loss import GlobalCounts, check_counts_supported, group_advantages
from .lanes import Lane, LanePolicy
from .rollout import DrawKeys, encode_prompts, generate_lanes
from .tasks import Example, Task
from .trainer import GRPOConfig, check_groups_split, check_resume, scored_batch, step_prompts
from .update import DivergenceError, lanes_update


@dataclass(frozen=True)
class LaneRun:
    """One lane and where it writes."""

    lane: Lane
    output_dir: str


class LaneTrainer:
    """GRPO for several single-layer runs of one model at once.

    trainer = LaneTrainer(model, tokenizer, task, GRPOConfig(max_steps=20),
                          [LaneRun(Lane(3), "runs/l3"), LaneRun(Lane(5, learning_rate=3e-6), "runs/l5")])
    trainer.train()
    trainer.policy.lane_layers[k]   # lane k's trained layer (policy.lanes order; runs[trainer.policy.order[k]])

    world: this process's place among data-parallel ranks (distributed.init_world() under torchrun); None: one
    process, each lane's rows all here. per_device_train_batch_size is then each lane's step total over every
    rank, and its prompt groups must split evenly across the ranks.
    """

    def __init__(self, model, tokenizer, task: Task, config: GRPOConfig, runs: list[LaneRun], base_model: str = "",
                 save_steps: int = 50, save_total_limit: int = 2, progress: bool = True, world: World | None = None):
        config.validate()
        if is_environment_task(task):
            raise ValueError(f"lanes train single-turn tasks; {task.name!r} is an environment task "
                             "(train its layers one run at a time)")
        if save_steps < 1 or save_total_limit < 1:
            raise ValueError(f"save_steps and save_total_limit must be >= 1, got {save_steps} and {save_total_limit}")
        if len({str(Path(r.output_dir).resolve()) for r in runs}) != len(runs):
            raise ValueError("every lane needs its own output_dir")
        self.config = apply_algorithm(config)
        self.update_config = self.config.update_config()
        if world is not None:
            _check_data_parallel(self.config, world)
        self.world = world
        self.model, self.tokenizer, self.task, self.base_model = model, tokenizer, task, base_model
        self.save_steps, self.save_total_limit, self.progress = save_steps, save_total_limit, progress
        # sync_ref_model moves each lane's reference: then every lane needs its own copy of its original layer.
        self.policy = LanePolicy(model, [r.lane for r in runs], own_references=self.config.sync_ref_model)
        self.runs = [runs[k] for k in self.policy.order]  # policy.lanes order from here on
        self.optimizers = [
            torch.optim.AdamW(self.policy.trainable_parameters(k), lr=lane.learning_rate or self.config.learning_rate,
                              betas=(self.config.adam_beta1, self.config.adam_beta2), eps=self.config.adam_epsilon,
                              weight_decay=self.config.weight_decay)
            for k, lane in enumerate(self.policy.lanes)
        ]
        # Each lane's own schedule (over its own learning rate), entropy coefficient and reference sync.
        self.controls = [self.config.step_controls(optimizer, sync_pairs=self._reference_pairs(k))
                         for k, optimizer in enumerate(self.optimizers)]
        self.steps = [0] * self.policy.num_lanes
        self._saved = [0] * self.policy.num_lanes
        self._updating: list[int] = []  # lanes whose weights may be ahead of their step count right now
        self._diverged = False  # once set, the lanes' live weights are suspect: nothing may be saved from them
        for k, run in enumerate(self.runs):
            Path(run.output_dir).mkdir(parents=True, exist_ok=True)
            if (path := checkpoint.latest_checkpoint(run.output_dir)) is not None:
                self._resume(k, path)
        if world is not None:
            world.resume_hint = ("each lane's last checkpoint (written by rank 0 every save_steps steps) stands: rerun "
                                 "the same command to resume every rank from them")
            for k, run in enumerate(self.runs):
                world.same_on_every_rank(self.steps[k], f"the step {run.output_dir} resumed from")

    @property
    def device(self) -> torch.device:
        return self.policy.lm_head_weight.device

    @property
    def is_main(self) -> bool:
        """Whether this process writes the logs and checkpoints (rank 0, or the only process)."""
        return self.world is None or self.world.is_main

    def groups_here(self) -> int:
        """The prompt groups of each lane that this process samples in a step (its share under data parallelism)."""
        groups = self.config.per_device_train_batch_size // self.config.num_generations
        return groups if self.world is None else groups // self.world.size

    def _reference_pairs(self, k: int):
        if self.policy.reference_layers is None:
            return None
        return list(zip(self.policy.reference_layers[k].parameters(), self.policy.lane_layers[k].parameters(),
                        strict=True))

    def seed(self, k: int) -> int:
        lane = self.policy.lanes[k]
        return self.config.seed if lane.seed is None else lane.seed

    # -------------------------------------------------------------------------------- checkpoints
    def _metadata(self, k: int) -> dict[str, Any]:
        lane = self.policy.lanes[k]
        run = {"output_dir": self.runs[k].output_dir, "mode": "single", "layer": lane.layer,
               "lane": dataclasses.asdict(lane), "save_steps": self.save_steps, "save_total_limit": self.save_total_limit}
        return {"base_model": self.base_model, "config": dataclasses.asdict(self.config), "run": run,
                "task": self.task.name}

    def _resume(self, k: int, path: Path) -> None:
        layer = self.policy.lanes[k].layer
        # The lane's settings (its own learning rate and seed included) must be the checkpoint's.
        check_resume(path, checkpoint.read_meta(path), {**self._metadata(k), "mode": "single", "layer": layer})
        checkpoint.load_lane_layer(self.policy.lane_layers[k], path, layer)
        self.steps[k], state = checkpoint.load_training_state(path, self.optimizers[k])
        self.controls[k].resume(self.steps[k] * self.config.num_iterations, state.get("controls", {}))
        self._saved[k] = self.steps[k]

    def _save(self, k: int) -> Path:
        if self._diverged:  # every lane's last good checkpoint must stand
            raise DivergenceError(f"refusing to save {self.runs[k].output_dir}: this lane run diverged")
        lane = self.policy.lanes[k]
        view = SimpleNamespace(model=self.model, layer_index=lane.layer, target_layer=self.policy.lane_layers[k])
        path = checkpoint.save_checkpoint(
            self.runs[k].output_dir, policy=view, optimizer=self.optimizers[k], step=self.steps[k],
            metadata=self._metadata(k), trainer_state={"controls": self.controls[k].state_dict()},
            keep_last=self.save_total_limit,
        )
        self._saved[k] = self.steps[k]
        return path

    # ------------------------------------------------------------------------------------- a step
    def prompts_for_step(self, k: int, step: int) -> list[Example]:
        """Lane k's prompts of a step: every prompt group, or with data-parallel ranks this rank's share of them
        (a contiguous block, as GRPOTrainer.prompts_for_step)."""
        examples = step_prompts(self.task, self.seed(k), step,
                                self.config.per_device_train_batch_size // self.config.num_generations)
        if self.world is None:
            return examples
        share = self.groups_here()
        return examples[self.world.rank * share:(self.world.rank + 1) * share]

    def train_step(self, active: list[int]) -> list[dict[str, float]]:
        """One step of the lanes `active` (all at the same step); returns their log records.

        DivergenceError if any lane diverges: then every lane stops (the others may be half a step ahead) and
        nothing more is saved; each lane's last checkpoint stands, and a rerun resumes every lane from it.
        """
        if self._diverged:
            raise DivergenceError("these lanes diverged; their weights are unusable (resume from the last checkpoints)")
        config, group = self.config, self.config.num_generations
        step = self.steps[active[0]]
        policy = self.policy if len(active) == self.policy.num_lanes else self.policy.subset(active)
        started = time.perf_counter()
        examples = [e for k in active for e in self.prompts_for_step(k, step) for _ in range(group)]
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, [e.prompt for e in examples], self.device)
        first_group = 0 if self.world is None else self.world.rank * self.groups_here()
        completion_ids, completion_mask = generate_lanes(
            policy, prompt_ids, prompt_mask, config.max_completion_length, eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            keys=DrawKeys(tuple(self.seed(k) for k in active), step, first_group=first_group),
            temperature=config.temperature, top_p=config.top_p, group_size=group)
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        try:
            batch = scored_batch(config, self.task, texts, examples, prompt_ids, prompt_mask, completion_ids,
                                 completion_mask, self.device, lanes=len(active), world=self.world)
            rewards = batch.rewards
            truncated = None
            if config.mask_truncated_completions:
                batch, truncated = mask_truncated(batch, config.end_token_ids(self.tokenizer))
            generated = time.perf_counter()
            self._updating = list(active)
            histories = lanes_update(policy, [self.optimizers[k] for k in active], batch, self.update_config,
                                     [self.controls[k] for k in active], world=self.world)
        except DivergenceError as error:
            self._diverged = True
            diverged = tuple(active[i] for i in error.lanes)  # error.lanes index the active lanes
            runs = ", ".join(self.runs[k].output_dir for k in diverged)
            raise DivergenceError(f"training diverged at step {step + 1} ({runs}): {error}. Nothing was saved from "
                                  "it; every lane's last checkpoint, if any, is its last good state", diverged) from error
        finished = time.perf_counter()
        share = len(active)  # each lane's share of the step's wall time
        lengths = completion_mask.sum(1).float()
        # generated, masked for the loss or not: per lane (L, rows)
        tokens = (prompt_mask.sum(1) + completion_mask.sum(1)).double().view(share, -1).sum(1)
        per_row = torch.stack([rewards.double(), lengths.double()] + ([] if truncated is None else [truncated.double()]))
        per_row = per_row.view(per_row.shape[0], share, -1)  # (what, lane, this process's rows of the lane)
        if self.world is not None:  # each lane's whole batch: every rank's rows of it (rank order)
            per_row = self.world.all_gather_rows(per_row.permute(2, 0, 1).contiguous()).permute(1, 2, 0)
            tokens = self.world.all_reduce_sum(tokens)
        records = []
        for i, (k, history) in enumerate(zip(active, histories)):
            self.steps[k] += 1
            record = {name: sum(h[name] for h in history) / len(history) for name in history[0]}
            lane_rewards, lane_lengths = per_row[0, i], per_row[1, i]
            record.update(
                step=self.steps[k], reward_mean=float(lane_rewards.mean()),
                reward_std=float(lane_rewards.reshape(-1, group).std(dim=1).mean()),
                completion_length=float(lane_lengths.mean()),
                generate_time=(generated - started) / share, update_time=(finished - generated) / share,
                step_time=(finished - started) / share,
                tokens_per_second=int(tokens[i]) * share / (finished - started), lanes=len(active),
            )
            if self.world is not None:  # the loss took advantages (not rewards): the lane's whole batch's, here
                record["frac_reward_zero_std"] = float(group_advantages(lane_rewards.float(), group,
                                                                        config.scale_rewards)[1].float().mean())
            if truncated is not None:
                record["clipped_ratio"] = float(per_row[2, i].mean())  # TRL's completions/clipped_ratio
            records.append(record)
        self._updating = []
        return records

    # ------------------------------------------------------------------------------------- the loop
    def train(self) -> list[list[dict[str, float]]]:
        """Run every lane to max_steps; per lane (policy.lanes order) the records of the steps run now.

        A KeyboardInterrupt between steps saves every lane that moved since its last checkpoint; one that
        lands inside an update saves nothing for the lanes being updated (their weights may be half a
        step ahead of their step count), so their last checkpoint stands.
        """
        lanes = self.policy.num_lanes
        records: list[list[dict[str, float]]] = [[] for _ in range(lanes)]
        total = self.config.max_steps * lanes
        bar = tqdm(total=total, initial=sum(self.steps), desc=f"{self.config.algo} {lanes} lanes", unit="lane-step",
                   disable=not (self.progress and self.is_main))
        try:
            while pending := [k for k in range(lanes) if self.steps[k] < self.config.max_steps]:
                step = min(self.steps[k] for k in pending)
                active = [k for k in pending if self.steps[k] == step]
                step_records = self.train_step(active)
                saved = False
                for k, record in zip(active, step_records):
                    records[k].append(record)
                    if self.is_main:
                        with (Path(self.runs[k].output_dir) / "log.jsonl").open("a") as log:
                            log.write(json.dumps(record) + "\n")
                    if self.steps[k] % self.save_steps == 0 or self.steps[k] == self.config.max_steps:
                        saved = True
                        if self.is_main:
                            self._save(k)
                if saved and self.world is not None:  # the others wait for rank 0's checkpoints
                    self.world.barrier()
                bar.update(len(active))
                bar.set_postfix(reward=f"{sum(r['reward_mean'] for r in step_records) / len(step_records):.3f}")
        except KeyboardInterrupt:
            if not self.is_main:
                raise
            # Nothing from a diverged trainer (train() called again after the error): its weights are unusable.
            saved = [] if self._diverged else [k for k in range(lanes)
                                                 if k not in self._updating and self.steps[k] > self._saved[k]]
            for k in saved:
                self._save(k)
            print(f"\ninterrupted: saved {len(saved)} lane(s); run the same command to resume")
            raise
        finally:
            bar.close()
        return records


def _check_data_parallel(config: GRPOConfig, world: World) -> None:
    """ValueError for lanes that cannot train across `world`'s ranks: each lane's prompt groups must split evenly
    (a group never splits across ranks), and the loss must be computable over a batch split across ranks."""
    check_groups_split(config, world, lanes=True)
    check_counts_supported(config.loss_config(), GlobalCounts(tokens=0.0, rows=0))
