"""Workload `sweep`: a whole layer sweep (Base, Full and one run per layer, each evaluated): onelayer_fast's
run_sweep with its single-layer runs as lanes (`onelayer_fast_lanes`, --lanes auto) and one at a time
(`onelayer_fast`, --lanes 1), against one independent naive TRL-style run per layer.

Each step also records `singles_seconds`: the single-layer part of the sweep (training + evaluation of every
layer's run), whose ratio between the two run_sweep contenders is what lanes change.
"""
from __future__ import annotations

from typing import Any

from bench.contenders.naive_trl import NaiveTRLStep
from bench.harness import Runner, Target, Workload, checksum, scratch_dir
from bench.workloads.iteration import iteration_prompts
from bench.workloads.step import STEP_LOSS, loss_knobs

def sweep_shapes(quick: bool) -> dict[str, Any]:
    # Quick: `tiny` (4 layers), one step per run, a smoke test. Full: the embedded base model `toy-arith` (8
    # layers, the README's main job, built once and cached), every layer, 10 steps per run: a model that earns
    # rewards, so every layer really trains. The `bench-cpu` shape does not fit: its random init almost never
    # samples a character, so every arithmetic reward, advantage and gradient is 0 and no layer changes.
    return {
        "quick": quick,
        "model": "tiny" if quick else "toy-arith",
        "layers": "all",
        "task": "arithmetic",
        "max_steps": 1 if quick else 10,  # training steps of every run (full and each layer)
        "num_prompts": 2 if quick else 8,
        "num_generations": 4 if quick else 8,
        "completion_length": 8 if quick else 6,
        **STEP_LOSS,
        "learning_rate": 3e-3 if quick else 1e-5,
        "eval_size": 8 if quick else 100,
        "seed": 0,
    }


# Every run checkpoints once, at its end: what a sweep needs to keep, without intermediate checkpoints.
SAVE_STEPS = 10**9


def sweep_grpo_config(shapes: dict[str, Any]):
    """The hyper-parameters of every run of the sweep (Full and each layer, both contenders)."""
    import onelayer_fast as olf

    return olf.GRPOConfig(
        max_steps=shapes["max_steps"], per_device_train_batch_size=shapes["num_prompts"] * shapes["num_generations"],
        num_generations=shapes["num_generations"], max_completion_length=shapes["completion_length"],
        **loss_knobs(shapes), learning_rate=shapes["learning_rate"], seed=shapes["seed"],
    )


def layer_checksums(model) -> list[float]:
    from onelayer_fast.policy import decoder_of

    return [checksum(list(layer.parameters())) for layer in decoder_of(model).layers]


def sweep_setup(contender: str, shapes: dict[str, Any], seed: int) -> Runner:
    """One step = one whole sweep: Base (evaluation only), Full, and every layer, each from a fresh base model,
    evaluated greedily on the same held-out examples. Both contenders run Base and Full the same way (the
    onelayer_fast trainer in full mode, as the sweep does); only the per-layer runs differ:
    `onelayer_fast` calls onelayer_fast.sweep.run_sweep; `naive_per_layer` trains each layer independently the
    naive TRL way (NaiveTRLStep on rollouts from the same `generate`), as one would without a sweep engine.
    The weight checks of the other workloads do not apply (every run builds its own model): instead each step
    verifies that every trained layer differs from the base model and raises otherwise; `probe` counts them."""
    import torch

    import onelayer_fast as olf
    from onelayer_fast.evaluate import evaluate
    from onelayer_fast.policy import decoder_of
    from onelayer_fast.tasks import eval_examples, get_task

    base_model, _ = olf.load_model(shapes["model"], seed=shapes["seed"])
    base_sums = layer_checksums(base_model)
    num_layers = len(base_sums)
    probe = torch.zeros(1, dtype=torch.float64)  # += number of verified trained layers per step

    def verify(sums_by_layer: dict[int, float]) -> None:
        unchanged = [i for i, v in sums_by_layer.items() if v == base_sums[i]]
        if unchanged or len(sums_by_layer) != num_layers:
            raise RuntimeError(f"sweep {contender}: layers {unchanged} did not change "
                               f"({len(sums_by_layer)} of {num_layers} layers trained)")
        probe.add_(len(sums_by_layer))

    if contender in ("onelayer_fast", "onelayer_fast_lanes"):
        from onelayer_fast import checkpoint
        from onelayer_fast.sweep import SweepConfig, run_sweep

        lanes = "auto" if contender == "onelayer_fast_lanes" else 1

        def step() -> list[dict[str, float]]:
            out = scratch_dir("bench-sweep-")
            config = SweepConfig(model=shapes["model"], out=str(out), task=shapes["task"], layers=shapes["layers"],
                                 grpo=sweep_grpo_config(shapes), eval_size=shapes["eval_size"],
                                 save_steps=SAVE_STEPS, progress=False, lanes=lanes)
            result = run_sweep(config)
            sums = {}
            for single in result.singles:  # inside the timed step, as for naive_per_layer: a few ms per layer
                checkpoint.load_layer(base_model, checkpoint.latest_checkpoint(out / "runs" / single.name))
                sums[single.layer] = checksum(list(decoder_of(base_model).layers[single.layer].parameters()))
            verify(sums)
            return [{"full_accuracy": result.full.accuracy, "base_accuracy": result.base.accuracy,
                     "mean_single_accuracy": sum(r.accuracy for r in result.singles) / len(result.singles),
                     "singles_seconds": sum(r.train_seconds + r.eval_seconds for r in result.singles),
                     "full_seconds": result.full.train_seconds + result.full.eval_seconds}]

        return Runner(step, [probe], [], {"num_layers": num_layers})

    if contender == "naive_per_layer":
        from onelayer_fast.rollout import encode_prompts, sample_completions
        from onelayer_fast.batch import RolloutBatch
        from onelayer_fast.tasks.rewards import score

        task = get_task(shapes["task"])
        examples = eval_examples(task, shapes["eval_size"], seed=0)

        def evaluate_model(model, tokenizer) -> float:
            return evaluate(model, tokenizer, task, examples, max_new_tokens=shapes["completion_length"],
                            progress=False).accuracy

        def naive_layer_run(layer: int) -> tuple[float, float]:
            model, tokenizer = olf.load_model(shapes["model"], seed=shapes["seed"])
            naive = NaiveTRLStep(model, None, {**shapes, "layer": layer}, lr=shapes["learning_rate"])
            torch.manual_seed(shapes["seed"])
            for s in range(shapes["max_steps"]):
                batch_examples = iteration_prompts(task, shapes, shapes["seed"], s)
                grouped = [e for e in batch_examples for _ in range(shapes["num_generations"])]
                prompt_ids, prompt_mask = encode_prompts(tokenizer, [e.prompt for e in grouped], torch.device("cpu"))
                completion_ids, completion_mask = sample_completions(
                    model, prompt_ids, prompt_mask, shapes["completion_length"], eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
                rewards = torch.from_numpy(score(task, tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
                                                 grouped))
                naive.set_batch(RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, rewards,
                                             group_size=shapes["num_generations"]))
                naive.step()
            return evaluate_model(model, tokenizer), checksum(list(decoder_of(model).layers[layer].parameters()))

        def step() -> list[dict[str, float]]:
            model, tokenizer = olf.load_model(shapes["model"], seed=shapes["seed"])
            base_accuracy = evaluate_model(model, tokenizer)
            out = scratch_dir("bench-sweep-naive-")
            model, tokenizer = olf.load_model(shapes["model"], seed=shapes["seed"])
            olf.GRPOTrainer(model, tokenizer, task, sweep_grpo_config(shapes),
                            olf.RunSpec(output_dir=str(out), mode="full", save_steps=SAVE_STEPS), resume=False).train()
            full_accuracy = evaluate_model(model, tokenizer)
            accuracies, sums = [], {}
            for layer in range(num_layers):
                accuracy, sums[layer] = naive_layer_run(layer)
                accuracies.append(accuracy)
            verify(sums)
            return [{"full_accuracy": full_accuracy, "base_accuracy": base_accuracy,
                     "mean_single_accuracy": sum(accuracies) / len(accuracies)}]

        return Runner(step, [probe], [], {"num_layers": num_layers})
    raise ValueError(f"unknown contender {contender!r}")


def sweep_description(s: dict[str, Any]) -> str:
    return (f"a whole layer sweep: preset {s['model']!r}, layers {s['layers']}, Base eval + Full + one "
            f"run per layer, {s['max_steps']} GRPO steps each ({s['num_prompts']} prompts x {s['num_generations']} "
            f"generations, {s['completion_length']} new tokens, num_iterations={s['num_iterations']}), greedy "
            f"evaluation on {s['eval_size']} held-out {s['task']} examples after each run; onelayer_fast's run_sweep "
            f"also writes what a real sweep keeps (per-run checkpoints with fsync, results.csv/json, contribution.png), "
            f"the naive runs write nothing{' [quick shapes]' if s.get('quick') else ''}")


SWEEP = Workload(
    name="sweep",
    description=sweep_description,
    contenders=("onelayer_fast", "onelayer_fast_lanes", "naive_per_layer"),
    shapes=sweep_shapes,
    setup=sweep_setup,
    tokens_per_step=lambda s: 0,  # a sweep's token count depends on EOS; time per sweep is the measure
    tokens_definition="not defined for a sweep (tokens/s shows 0); compare the sweep times",
    targets=(Target("time naive_per_layer / onelayer_fast", "time", "naive_per_layer", "onelayer_fast", ">=", 1.5),
             Target("time onelayer_fast (lanes 1) / onelayer_fast_lanes", "time", "onelayer_fast", "onelayer_fast_lanes",
                    ">=", 3.0)),
    ratios=(("time", "naive_per_layer", "onelayer_fast"), ("time", "onelayer_fast", "onelayer_fast_lanes"),
            ("memory", "onelayer_fast", "naive_per_layer"), ("memory", "onelayer_fast_lanes", "onelayer_fast")),
    memory_definition="working_mib: peak RSS during the measured sweeps minus RSS after loading the base model; "
                      "sampled every 5 ms (no tensor_peak_mib: profiling one more whole sweep would cost a sweep)",
    profile_tensor_peak=False,
)
