"""TRL's own GRPOTrainer as a contender (`trl_frozen`: one layer trainable, `trl`: every parameter), and
onelayer_fast's TRL backend (`onelayer_fast_trl`: `onelayer_fast.trl.OneLayerGRPOTrainer`, one layer), with the
`[compare]` (or `[trl]`) extra: its settings, why it is skipped where it does not import, and the driver that runs it one update
cycle at a time. The `step` workload feeds it fixed rollouts through TRL's `rollout_func` hook; `iteration` lets it
generate.
"""
from __future__ import annotations

import os
import time
from functools import partial
from typing import Any, Callable

from bench.harness import scratch_dir

# How the TRL contenders are configured (step and iteration). TRL's GRPOConfig defaults are
# gradient_checkpointing=True and bf16=True: switched off so that every contender runs the same fp32 model
# without recomputation.
TRL_SETTINGS = {"gradient_checkpointing": False, "bf16": False, "use_cpu": True, "shuffle_dataset": False,
                "steps_per_generation": 1, "driven_by": "Trainer.training_step per optimizer step (see TRLDriver)"}


def trl_skip_reason(contender: str) -> str | None:
    if not contender.startswith("trl") and contender != "onelayer_fast_trl":
        return None
    try:  # a real import: an installed but incompatible TRL must be skipped, not crash the run
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401
    except Exception as exc:
        return (f"TRL's GRPOTrainer is not importable ({type(exc).__name__}: {exc}); "
                "install the [compare] extra: pip install -e '.[compare]'")
    return None


class TRLDriver:
    """TRL's GRPOTrainer on a given model, tokenizer, dataset and reward function, driven one optimizer step at
    a time the way Trainer.train's inner loop does: training_step (TRL's generation or `rollout_func`, rewards,
    old + reference log-probs, loss, backward), then grad clipping, an AdamW step and zero_grad. Driving it by
    hand (not trainer.train()) lets a worker time and check one update cycle at a time.

    `trl_frozen`: only layer `layer` requires grad before the trainer is built (how TRL users freeze layers);
    `trl`: every parameter trains; `onelayer_fast_trl`: OneLayerGRPOTrainer(layer=`layer`), TRL's loop with
    onelayer_fast's update (no reference model: a one-layer copy). TRL builds its reference model by reloading the policy from disk, so the
    random-init policy is saved first. TRL's defaults gradient_checkpointing=True and bf16=True are switched
    off (shapes["trl_settings"]) so that it runs the same fp32 model as every other contender.

    `loss`: the loss knobs by TRL's names (the workload's loss_knobs); `lr`: AdamW's learning rate. TRL's
    GRPOConfig takes both; the optimizer is then replaced by the same AdamW every contender uses."""

    def __init__(self, contender: str, model, tokenizer, shapes: dict[str, Any], seed: int, rows: list[dict[str, Any]],
                 reward_func: Callable[..., list[float]], rollout_func: Callable | None = None, *,
                 loss: dict[str, Any], lr: float):
        import torch
        from datasets import Dataset
        from trl import GRPOConfig as TRLConfig
        from trl import GRPOTrainer as TRLTrainer

        if rollout_func is not None:
            os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental
        self.shapes = shapes
        out = scratch_dir("bench-trl-")
        model.save_pretrained(out / "model")  # TRL reloads the reference model from config._name_or_path
        model.config._name_or_path = str(out / "model")
        if contender == "trl_frozen":
            model.requires_grad_(False)
            model.model.layers[shapes["layer"]].requires_grad_(True)
        t = shapes["trl_settings"]
        args = TRLConfig(
            output_dir=str(out / "trl"), per_device_train_batch_size=shapes["num_prompts"] * shapes["num_generations"],
            num_generations=shapes["num_generations"], max_completion_length=shapes["completion_length"],
            **loss, learning_rate=lr,
            temperature=shapes.get("temperature", 1.0), top_p=shapes.get("top_p", 1.0), top_k=shapes.get("top_k", 0),
            gradient_checkpointing=t["gradient_checkpointing"], bf16=t["bf16"], use_cpu=t["use_cpu"],
            shuffle_dataset=t["shuffle_dataset"], steps_per_generation=t["steps_per_generation"],
            report_to="none", save_strategy="no", logging_steps=10**9, disable_tqdm=True, seed=seed,
        )
        trainer_class = TRLTrainer
        if contender == "onelayer_fast_trl":
            from onelayer_fast.trl import OneLayerGRPOTrainer

            trainer_class = partial(OneLayerGRPOTrainer, layer=shapes["layer"])
        self.trainer = trainer_class(model=model, reward_funcs=[reward_func], args=args, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer, rollout_func=rollout_func)
        self.params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        self.trainer.optimizer = torch.optim.AdamW(self.params, lr=lr)  # the same optimizer as every contender
        self.trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train, which this loop replaces
        self.loader = self.trainer.get_train_dataloader()
        self.batches = iter(self.loader)
        ids = {id(p) for p in self.params}
        reference = (self.trainer.policy.reference_layer if contender == "onelayer_fast_trl"
                     else self.trainer.ref_model)
        self.frozen = [p for p in self.trainer.model.parameters() if id(p) not in ids] + list(reference.parameters())
        self.last_metrics: dict[str, list[float]] = {}
        # Seconds inside TRL's own sampling (`_generate`) during the last cycle: the rest of a cycle is the update
        # (scoring, old / reference log-probs, loss, backward, optimizer), what OneLayerGRPOTrainer changes.
        self.generate_s = 0.0
        generate = self.trainer._generate

        def timed_generate(*args, **kwargs):
            started = time.perf_counter()
            try:
                return generate(*args, **kwargs)
            finally:
                self.generate_s += time.perf_counter() - started

        self.trainer._generate = timed_generate

    def next_batch(self):
        try:
            return next(self.batches)
        except StopIteration:  # the dataset is cycled
            self.batches = iter(self.loader)
            return next(self.batches)

    def cycle(self) -> list[dict[str, float]]:
        """One update cycle: num_iterations optimizer steps; the first generates (or calls rollout_func), the next
        reuse TRL's buffer. Returns loss, grad norm and KL per optimizer step; TRL's other metrics in last_metrics."""
        import torch

        trainer = self.trainer
        history = []
        self.generate_s = 0.0
        for _ in range(self.shapes["num_iterations"]):
            loss = trainer.training_step(trainer.model, self.next_batch(), None)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.shapes["max_grad_norm"])
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer.state.global_step += 1
            history.append({"loss": float(loss), "grad_norm": float(grad_norm)})
        metrics = trainer._metrics["train"]
        for rec, kl in zip(history, metrics.get("kl", [])):  # TRL logs the KL once per training_step
            rec["kl"] = kl
        self.last_metrics = {k: list(v) for k, v in metrics.items()}
        metrics.clear()  # TRL's log would otherwise grow with every step
        return history

