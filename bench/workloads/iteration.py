"""Workload `iteration`: one whole GRPO iteration: sample rollouts with HF `generate`, score them on the arithmetic
task, then one update cycle. The same model and trained layer as `step`, so the update parts compare; contenders
onelayer_fast's trainer (single layer and full), the naive TRL-style single layer, and TRL's GRPOTrainer (the
[compare] extra).
"""
from __future__ import annotations

import statistics
import time
from typing import Any

from bench.contenders.naive_trl import NaiveTRLStep
from bench.contenders.trl_driver import TRL_SETTINGS, TRLDriver, trl_skip_reason
from bench.harness import Runner, Target, Workload, scratch_dir
from bench.tokenizer import bench_tokenizer
from bench.workloads.step import LAYOUT_SCALE_FLOOR, STEP_LOSS, STEP_LR, build_model, loss_knobs, step_shapes

ITERATION_DATASET_STEPS = 256  # prompts of this many iterations are laid out for TRL's dataloader (cycled after)


def iteration_shapes(quick: bool) -> dict[str, Any]:
    step = step_shapes(quick)  # the same model and trained layer as `step`, so the update parts compare
    return {
        "quick": quick,
        "model": step["model"],
        "layer": step["layer"],
        "task": "arithmetic",
        "tokenizer": "char-level HF tokenizer (the built-in char tokenizer's ids 0-97), extended to the model "
                     "vocabulary: ids past the 95 printable characters decode to them again, cyclically",
        "num_prompts": 4,
        "num_generations": 4,
        "prompt_length": 6,  # the longest arithmetic prompt ("99+99="); shorter ones are left-padded
        "completion_length": 16 if quick else 64,  # max_completion_length
        **STEP_LOSS,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "optimizer": f"AdamW(lr={STEP_LR}), torch defaults otherwise (also for the TRL contenders)",
        "trl_settings": TRL_SETTINGS,
    }


def iteration_tokens(shapes: dict[str, Any]) -> int:
    return shapes["num_prompts"] * shapes["num_generations"] * (shapes["prompt_length"] + shapes["completion_length"])


def iteration_prompts(task, shapes: dict[str, Any], seed: int, step: int) -> list:
    """The examples of iteration `step`: onelayer_fast's own draw for seed `seed` (trainer.step_prompts), so
    that every contender trains on the same prompts."""
    from onelayer_fast.trainer import step_prompts

    return step_prompts(task, seed, step, shapes["num_prompts"])


def iteration_record(history: list[dict[str, float]], rewards, completion_mask, generate_s: float,
                     update_s: float) -> dict[str, float]:
    """One record per iteration: the update metrics averaged over its inner iterations (as onelayer_fast's
    train_step logs them), plus the rollouts' reward / length and the generate / update time split."""
    record = {k: sum(h[k] for h in history) / len(history) for k in ("loss", "grad_norm", "kl") if k in history[0]}
    record.update(reward_mean=float(rewards.float().mean()),
                  completion_length=float(completion_mask.sum(1).float().mean()),
                  generate_s=generate_s, update_s=update_s)
    return record


def iteration_setup(contender: str, shapes: dict[str, Any], seed: int) -> Runner:
    import torch

    import onelayer_fast as olf
    from onelayer_fast.tasks import get_task

    model = build_model(shapes, seed)
    tokenizer = bench_tokenizer(shapes["model"]["vocab_size"])
    task = get_task(shapes["task"])
    rows = shapes["num_prompts"] * shapes["num_generations"]
    layer = shapes["layer"]

    if contender in ("onelayer_fast", "full"):
        config = olf.GRPOConfig(
            max_steps=10**9, per_device_train_batch_size=rows, num_generations=shapes["num_generations"],
            max_completion_length=shapes["completion_length"], **loss_knobs(shapes),
            temperature=shapes["temperature"], top_p=shapes["top_p"], learning_rate=STEP_LR, seed=seed,
            # onelayer_fast runs the engine's default layout ("auto"); full-parameter training the padded one, as
            # in `step` (the same model and rollouts either way)
            layout="auto" if contender == "onelayer_fast" else "padded",
        )
        run = olf.RunSpec(output_dir=str(scratch_dir("bench-iteration-")), layer=layer,
                          mode="single" if contender == "onelayer_fast" else "full", save_steps=10**9)
        trainer = olf.GRPOTrainer(model, tokenizer, task, config, run, resume=False)
        policy = trainer.policy
        trainable = policy.trainable_parameters()
        if contender == "onelayer_fast":
            ids = {id(p) for p in trainable}
            frozen = [p for p in model.parameters() if id(p) not in ids] + list(policy.reference_layer.parameters())
        else:
            frozen = list(policy.reference_model.parameters())

        def step() -> list[dict[str, float]]:
            rec = trainer.train_step()  # prompts -> generate -> decode -> rewards -> grpo_update
            return [{"loss": rec["loss"], "grad_norm": rec["grad_norm"], "kl": rec.get("kl", 0.0),
                     "reward_mean": rec["reward_mean"], "completion_length": rec["completion_length"],
                     "generate_s": rec["generate_time"], "update_s": rec["update_time"]}]

        return Runner(step, trainable, frozen, {"trainable_params": sum(p.numel() for p in trainable)})

    if contender == "naive_trl":
        from onelayer_fast.rollout import encode_prompts, sample_completions
        from onelayer_fast.batch import RolloutBatch
        from onelayer_fast.tasks.rewards import score

        naive = NaiveTRLStep(model, None, shapes, lr=STEP_LR)
        ids = {id(p) for p in naive.params}
        frozen = [p for p in model.parameters() if id(p) not in ids] + list(naive.ref_model.parameters())
        torch.manual_seed(seed)  # as onelayer_fast's GRPOTrainer does: the first rollouts then match its own
        state = {"step": 0}

        def step() -> list[dict[str, float]]:
            started = time.perf_counter()
            examples = iteration_prompts(task, shapes, seed, state["step"])
            grouped = [e for e in examples for _ in range(shapes["num_generations"])]
            prompt_ids, prompt_mask = encode_prompts(tokenizer, [e.prompt for e in grouped], torch.device("cpu"))
            completion_ids, completion_mask = sample_completions(
                model, prompt_ids, prompt_mask, shapes["completion_length"], eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, temperature=shapes["temperature"], top_p=shapes["top_p"])
            rewards = torch.from_numpy(score(task, tokenizer.batch_decode(completion_ids, skip_special_tokens=True), grouped))
            batch = RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, rewards,
                                 group_size=shapes["num_generations"])
            generated = time.perf_counter()
            naive.set_batch(batch)
            history = naive.step()
            state["step"] += 1
            return [iteration_record(history, rewards, completion_mask, generated - started,
                                     time.perf_counter() - generated)]

        return Runner(step, naive.params, frozen, {"trainable_params": sum(p.numel() for p in naive.params)})

    if contender in ("trl", "trl_frozen", "onelayer_fast_trl"):
        return trl_iteration_runner(contender, model, tokenizer, task, shapes, seed)
    raise ValueError(f"unknown contender {contender!r}")


def trl_iteration_runner(contender: str, model, tokenizer, task, shapes: dict[str, Any], seed: int) -> Runner:
    """TRL on the arithmetic task: the same prompts (in order: shuffle_dataset=False), the same weighted rewards."""
    from onelayer_fast.tasks import Example

    examples = [e for s in range(ITERATION_DATASET_STEPS) for e in iteration_prompts(task, shapes, seed, s)]

    def arithmetic_reward(prompts, completions, answer, **_) -> list[float]:
        return [sum(w * f(c, Example(p, a)) for f, w in zip(task.reward_funcs, task.reward_weights))
                for p, c, a in zip(prompts, completions, answer)]

    driver = TRLDriver(contender, model, tokenizer, shapes, seed,
                       [{"prompt": e.prompt, "answer": e.answer} for e in examples], arithmetic_reward,
                       loss=loss_knobs(shapes), lr=STEP_LR)

    def step() -> list[dict[str, float]]:
        started = time.perf_counter()
        history = driver.cycle()
        total = time.perf_counter() - started
        m = driver.last_metrics
        record = {k: sum(h[k] for h in history) / len(history) for k in history[0]}
        record.update(reward_mean=m["reward"][-1] if m.get("reward") else float("nan"),
                      completion_length=m["completions/mean_length"][-1] if m.get("completions/mean_length")
                      else float("nan"))
        # TRL samples inside training_step: its `_generate` is timed, everything else counts as the update
        record.update(generate_s=driver.generate_s, update_s=total - driver.generate_s)
        return [record]

    return Runner(step, driver.params, driver.frozen, {"trainable_params": sum(p.numel() for p in driver.params)})


def iteration_skip_reason(contender: str) -> str | None:
    return trl_skip_reason(contender)


# Scales below which a relative difference is float rounding, not disagreement: the loss is a mean of O(1) terms
# that can cancel (as LAYOUT_SCALE_FLOOR), and the warm-up KL is ~1e-7 after one small step, where onelayer_fast's
# "auto" layout (shared prompt on CPU) and the padded naive path differ by a few 1e-10 from summation order alone.
ITERATION_SCALE_FLOORS = {"loss": LAYOUT_SCALE_FLOOR, "kl": 1e-6}


def iteration_crosscheck(agg: dict[str, Any], shapes: dict[str, Any] | None = None) -> list[str]:
    """onelayer_fast and naive_trl start from the same weights, RNG state and prompts, so their warm-up
    iterations sample the same rollouts (same rewards) and must then agree on loss, grad norm and KL.
    Also: each contender's median split of an iteration into generation and update time, and the update-alone
    ratio of TRL with one layer trainable to OneLayerGRPOTrainer (the same TRL sampling in both)."""
    per = agg["contenders"]
    lines = []
    for name, c in per.items():
        hist = [r["last_history"][0] for r in c["runs"] if r.get("last_history")]
        if hist and "generate_s" in hist[0]:
            gen = statistics.median(h["generate_s"] for h in hist)
            upd = statistics.median(h["update_s"] for h in hist)
            sampled = "TRL's _generate" if name.startswith("trl") or name == "onelayer_fast_trl" else "generate + score"
            lines.append(f"{name}: last measured iteration split (median over runs): {sampled} {gen:.3f} s, "
                         f"update {upd:.3f} s")
    updates = {name: statistics.median(r["last_history"][0]["update_s"] for r in c["runs"] if r.get("last_history"))
               for name, c in per.items() if any(r.get("last_history") for r in c["runs"])}
    if "trl_frozen" in updates and "onelayer_fast_trl" in updates:
        lines.append(f"update alone (iteration minus TRL's sampling), trl_frozen / onelayer_fast_trl: "
                     f"{updates['trl_frozen'] / updates['onelayer_fast_trl']:.2f}x "
                     f"({updates['trl_frozen']:.3f} s / {updates['onelayer_fast_trl']:.3f} s)")
    if "onelayer_fast" in per and "naive_trl" in per:
        a = per["onelayer_fast"]["runs"][0]["warmup_history"][0]
        b = per["naive_trl"]["runs"][0]["warmup_history"][0]
        if a["reward_mean"] != b["reward_mean"] or a["completion_length"] != b["completion_length"]:
            lines.append(f"cross-check onelayer_fast vs naive_trl: the warm-up rollouts differ (reward mean "
                         f"{a['reward_mean']:.6f} vs {b['reward_mean']:.6f}) [MISMATCH]")
        else:
            lines.append("cross-check onelayer_fast vs naive_trl (warm-up iteration: same rollouts, reward mean "
                         f"{a['reward_mean']:.6f}; metrics averaged over the inner iterations; rel diff must be < 1e-3, "
                         f"relative to max(|value|, floor): floors {ITERATION_SCALE_FLOORS}):")
            for k in ("loss", "grad_norm", "kl"):
                rel = abs(a[k] - b[k]) / max(abs(b[k]), ITERATION_SCALE_FLOORS.get(k, 1e-12))
                lines.append(f"  {k:<9} onelayer_fast {a[k]: .6e}  naive_trl {b[k]: .6e}  rel diff {rel:.1e}  "
                             f"[{'MATCH' if rel < 1e-3 else 'MISMATCH'}]")
    return lines


def iteration_description(s: dict[str, Any]) -> str:
    m = s["model"]
    return (f"one full GRPO iteration on the {s['task']} task: {s['num_prompts']} prompts x {s['num_generations']} "
            f"generations sampled with HF generate (KV cache, temperature {s['temperature']}, up to "
            f"{s['completion_length']} new tokens; the same generate for every contender, except that the onelayer_fast "
            f"and full trainers prefill each group's prompt once and share its KV cache, which samples the same tokens), "
            f"decoded and rewarded, then one update cycle "
            f"(num_iterations={s['num_iterations']}, beta={s['beta']}, {s['loss_type']}); Qwen2-shaped random-init fp32 "
            f"model ({m['num_hidden_layers']} layers, hidden {m['hidden_size']}, vocab {m['vocab_size']}, tied, sdpa), "
            f"layer {s['layer']} trains{' [quick shapes]' if s.get('quick') else ''}")


ITERATION = Workload(
    name="iteration",
    description=iteration_description,
    contenders=("onelayer_fast", "full", "naive_trl", "trl_frozen", "trl", "onelayer_fast_trl"),
    shapes=iteration_shapes,
    setup=iteration_setup,
    tokens_per_step=iteration_tokens,
    tokens_definition="rows x (longest prompt + max completion) positions per iteration (16 x (6 + 64) = 1120; "
                      "the random-init model rarely samples EOS, so completions nearly always run to the limit: "
                      "see completion_length in the histories) / median iteration time",
    # TRL's loop either way (the same generation): the difference is the update
    targets=(Target("time trl_frozen / onelayer_fast_trl", "time", "trl_frozen", "onelayer_fast_trl", ">=", 1.5),
             Target("memory onelayer_fast_trl / trl_frozen", "memory", "onelayer_fast_trl", "trl_frozen", "<", 1.0)),
    ratios=(("time", "naive_trl", "onelayer_fast"), ("time", "full", "onelayer_fast"),
            ("time", "trl_frozen", "onelayer_fast"), ("time", "trl", "onelayer_fast"),
            ("time", "trl_frozen", "onelayer_fast_trl"), ("time", "trl", "onelayer_fast_trl"),
            ("memory", "onelayer_fast", "naive_trl"), ("memory", "onelayer_fast", "trl_frozen"),
            ("memory", "onelayer_fast_trl", "trl_frozen")),
    memory_definition="working_mib: peak RSS during the measured iterations minus RSS after building the model, "
                      "tokenizer, trainer (reference copy, optimizer) and, for TRL, its dataset; sampled every 5 ms. "
                      "tensor_peak_mib: peak live tensor bytes during one extra iteration under torch.profiler "
                      "(round 0 only), over its start",
    skip_reason=iteration_skip_reason,
    crosscheck=iteration_crosscheck,
)
