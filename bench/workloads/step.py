"""Workloads `step` and `step-varlen`: one GRPO update cycle (num_iterations optimizer steps) on fixed rollouts.

Contenders: onelayer_fast in the padded, shared-prompt and packed update layouts (each layout cross-checked against
the padded one, with its token share vs the padded, unshared layout), full-parameter training with the same loss,
the naive TRL-style single layer, and TRL's GRPOTrainer with one layer trainable and with all (the [compare] extra).
`step` also has a CUDA path (Qwen2.5-0.5B and -1.5B shapes, bf16). `step-varlen` draws every row's completion
length uniformly from 16-64 tokens (EOS-terminated).

This module also spells, once, the loss and optimizer that every training workload uses (step, step-real, iteration,
sweep) and how the bench turns loss knobs into onelayer_fast's LossConfig (also for the grpo_loss workload, Liger and
the kernel micro-benchmarks): see STEP_LOSS and the functions after it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from bench.contenders.naive_trl import NaiveTRLStep
from bench.contenders.trl_driver import TRL_SETTINGS, TRLDriver, trl_skip_reason
from bench.harness import CUDA_STATUS, Runner, Target, Workload, device_type
from bench.tokenizer import bench_tokenizer

# --------------------------------------------------------------------------------------------------
# The loss and optimizer of every training workload: the one place that spells the loss knobs
# --------------------------------------------------------------------------------------------------

STEP_LR = 1e-5  # AdamW's learning rate, torch defaults otherwise, for every contender
# The loss knobs by TRL's names (GRPOConfig, ours and TRL's, takes them as they are) and the values of every
# training workload; each workload's shapes carry them, so that the JSON records what ran.
STEP_LOSS = {"num_iterations": 2, "beta": 0.04, "epsilon": 0.2, "max_grad_norm": 1.0, "loss_type": "dapo",
             "use_bias_correction_kl": True}  # TRL's default
STEP_LOSS_KEYS = tuple(STEP_LOSS)


def loss_knobs(shapes: dict[str, Any]) -> dict[str, Any]:
    """The loss knobs of `shapes`, as keyword arguments of onelayer_fast's and TRL's GRPOConfig."""
    return {k: shapes[k] for k in STEP_LOSS_KEYS}


def loss_config(shapes: dict[str, Any]):
    """onelayer_fast's LossConfig of `shapes`: one epsilon for both sides of the clip (TRL's `epsilon`), token-level
    importance sampling unless `shapes` names another level, LossConfig's defaults for every other knob."""
    from onelayer_fast.loss import LossConfig

    return LossConfig(beta=shapes["beta"], epsilon_low=shapes["epsilon"], epsilon_high=shapes["epsilon"],
                      loss_type=shapes["loss_type"],
                      importance_sampling_level=shapes.get("importance_sampling_level", "token"),
                      use_bias_correction_kl=shapes.get("use_bias_correction_kl", True))


def update_config(shapes: dict[str, Any], layout: str):
    """onelayer_fast's UpdateConfig for one update cycle of `shapes` in `layout`."""
    from onelayer_fast.update import UpdateConfig

    return UpdateConfig(loss=loss_config(shapes), num_iterations=shapes["num_iterations"],
                        max_grad_norm=shapes["max_grad_norm"], layout=layout)


# --------------------------------------------------------------------------------------------------
# Shapes, model and rollouts
# --------------------------------------------------------------------------------------------------


def step_shapes(quick: bool) -> dict[str, Any]:
    model = dict(num_hidden_layers=24, hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True)
    layer = 12
    if quick:
        model.update(num_hidden_layers=4, hidden_size=64, intermediate_size=256, vocab_size=2048)
        layer = 2
    return {
        "quick": quick,
        "model": {"arch": "qwen2", "dtype": "float32", "attn_implementation": "sdpa", **model},
        "layer": layer,
        "num_prompts": 4,
        "num_generations": 4,
        "prompt_length": 32,
        "completion_length": 64,
        # (row, real prompt tokens) and (row, real completion tokens): the rest is padding
        "prompt_left_pad": {"1": 5, "3": 11},  # prompt index -> pad tokens (all its rows)
        "completion_lengths": {"2": 40, "5": 17, "10": 63, "13": 1, "15": 52},  # row -> unmasked tokens
        **STEP_LOSS,
        "optimizer": f"AdamW(lr={STEP_LR}), torch defaults otherwise (also for the TRL contenders)",
        "trl_settings": TRL_SETTINGS,
    }


def step_tokens(shapes: dict[str, Any]) -> int:
    rows = shapes["num_prompts"] * shapes["num_generations"]
    return rows * (shapes["prompt_length"] + shapes["completion_length"])


def build_model(shapes: dict[str, Any], seed: int):
    """The random-init Qwen2 of `shapes`, in its dtype, on its device (CPU shapes: float32 on the CPU)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    spec = {k: v for k, v in shapes["model"].items() if k not in ("arch", "dtype", "attn_implementation")}
    config = Qwen2Config(**spec, max_position_embeddings=max(128, shapes["prompt_length"] + shapes["completion_length"]),
                         attn_implementation=shapes["model"]["attn_implementation"])
    torch.manual_seed(seed)  # seeds the CUDA generators too: every contender's worker builds the same weights
    # Parameters are created and initialized on the device itself: a 1.5B model initializes on a GPU in well
    # under a second, on the host it would take tens of seconds (and then a copy).
    with torch.device(shapes.get("device", "cpu")):
        model = Qwen2ForCausalLM(config)
    model = model.to(getattr(torch, shapes["model"]["dtype"])).eval()
    assert model.config._attn_implementation == "sdpa"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def make_rollouts(shapes: dict[str, Any], seed: int):
    """Fixed random rollouts, identical for every contender: grouped rows, left-padded prompts, masked tails."""
    import torch

    from onelayer_fast.batch import RolloutBatch

    g = torch.Generator().manual_seed(seed + 1)
    prompts, gens = shapes["num_prompts"], shapes["num_generations"]
    rows, plen, clen = prompts * gens, shapes["prompt_length"], shapes["completion_length"]
    vocab, pad = shapes["model"]["vocab_size"], 0
    prompt = torch.randint(1, vocab, (prompts, plen), generator=g)
    prompt_mask = torch.ones(prompts, plen, dtype=torch.long)
    for p, n in shapes["prompt_left_pad"].items():
        prompt[int(p), :n] = pad
        prompt_mask[int(p), :n] = 0
    prompt_ids = prompt.repeat_interleave(gens, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(gens, dim=0)
    eos = shapes.get("eos_token_id")  # step-varlen: the last real completion token is EOS (mask 1 up to it)
    low = 1 if eos is None else 2  # then ids drawn from [2, vocab): EOS appears only where placed
    completion_ids = torch.randint(low, vocab, (rows, clen), generator=g)
    completion_mask = torch.ones(rows, clen, dtype=torch.long)
    for r, n in shapes["completion_lengths"].items():
        completion_ids[int(r), n:] = pad
        completion_mask[int(r), n:] = 0
        if eos is not None:
            completion_ids[int(r), n - 1] = eos
    rewards = torch.rand(rows, generator=g)
    batch = RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, rewards, group_size=gens)
    return batch.to(shapes.get("device", "cpu"))  # drawn on the host: the same values on every device


# onelayer_fast contenders of `step` / `step-varlen` -> UpdateConfig.layout (onelayer_fast/layout.py)
STEP_LAYOUTS = {"onelayer_fast": "padded", "onelayer_fast_shared": "shared_prompt", "onelayer_fast_packed": "packed"}
LAYOUT_TOLERANCE = 1e-5  # warm-up loss / grad norm of a layout contender vs onelayer_fast (padded), relative
# ... to max(|value|, LAYOUT_SCALE_FLOOR): a GRPO loss is a mean of O(1) per-token terms (advantage x ratio) that
# can cancel to ~1e-3, where float32 rounding of the terms alone gives relative differences of ~1e-5.
LAYOUT_SCALE_FLOOR = 1e-2
# bf16 (the CUDA shape sets): its 8-bit mantissa rounds every state to ~4e-3 relative, and the layouts round in a
# different order; a wrong layout is off by O(1). Set from that rounding, with margin, not from a measured spread.
BF16_LAYOUT_TOLERANCE = 3e-2


def step_layout_stats(batch, layout: str) -> dict[str, Any]:
    """layout.layout_stats of `layout` on `batch`: tokens computed per layer vs the padded, unshared layout
    (token_share), attention scores computed (attention_share) and real query-key pairs (allowed_pair_share).
    For "padded" itself: the same keys, share 1.0, and real_tokens = unmasked prompt + completion tokens."""
    from onelayer_fast.layout import build_layout, layout_stats

    if layout != "padded":
        return {"layout": layout, **layout_stats(build_layout(batch, layout))}
    rows, width = batch.input_ids.shape
    return {"layout": layout, "padded_tokens": rows * width, "computed_tokens": rows * width,
            "real_tokens": int(batch.attention_mask.sum()), "token_share": 1.0, "attention_share": 1.0,
            "packed_rows": rows, "packed_row_length": width}


def step_setup(contender: str, shapes: dict[str, Any], seed: int) -> Runner:
    """`step` / `step-varlen`: the random-init model and random rollouts of `shapes` (on its device)."""
    return step_runner(contender, build_model(shapes, seed), make_rollouts(shapes, seed), shapes, seed)


def step_runner(contender: str, model, batch, shapes: dict[str, Any], seed: int,
                layouts: dict[str, str] = STEP_LAYOUTS) -> Runner:
    """One GRPO update cycle of `contender` on a fixed `batch` (a RolloutBatch on the model's device) from `model`:
    the part every step workload shares, whatever builds the model and the batch. `layouts`: the onelayer_fast
    contenders -> their update layout (layout.LAYOUTS; "auto" is resolved here, for the record)."""
    import torch

    import onelayer_fast as olf
    from onelayer_fast.layout import resolve_layout
    from onelayer_fast.update import grpo_update

    # layout pinned: `full` runs the padded layout (as training without this engine would), and each
    # onelayer_fast contender names its own layout (`layouts`) rather than what "auto" picks on this device.
    config = update_config(shapes, "padded")

    def pick(history: list[dict[str, float]]) -> list[dict[str, float]]:
        return [{k: rec[k] for k in ("loss", "grad_norm", "kl") if k in rec} for rec in history]

    if contender in layouts:  # onelayer_fast in the update layout layouts[contender]; else identical
        layout = layouts[contender]
        config = update_config(shapes, layout)
        policy = olf.OneLayerPolicy(model, layer=shapes["layer"])
        trainable = policy.trainable_parameters()
        optimizer = torch.optim.AdamW(trainable, lr=STEP_LR)
        ids = {id(p) for p in trainable}
        frozen = [p for p in model.parameters() if id(p) not in ids] + list(policy.reference_layer.parameters())
        runs = resolve_layout(layout, batch, model.config, policy.lm_head_weight.device)
        return Runner(lambda: pick(grpo_update(policy, optimizer, batch, config)), trainable, frozen,
                      {"trainable_params": sum(p.numel() for p in trainable), "layout": layout,
                       "layout_stats": step_layout_stats(batch, runs)})
    if contender == "full":
        policy = olf.FullModelPolicy(model)
        trainable = policy.trainable_parameters()
        optimizer = torch.optim.AdamW(trainable, lr=STEP_LR)
        frozen = list(policy.reference_model.parameters())
        return Runner(lambda: pick(grpo_update(policy, optimizer, batch, config)), trainable, frozen,
                      {"trainable_params": sum(p.numel() for p in trainable)})
    if contender == "naive_trl":
        naive = NaiveTRLStep(model, batch, shapes, lr=STEP_LR)
        ids = {id(p) for p in naive.params}
        frozen = [p for p in model.parameters() if id(p) not in ids] + list(naive.ref_model.parameters())
        return Runner(naive.step, naive.params, frozen, {"trainable_params": sum(p.numel() for p in naive.params)})
    if contender in ("trl", "trl_frozen"):
        return trl_step_runner(contender, model, batch, shapes, seed)
    raise ValueError(f"unknown contender {contender!r}")


def trl_step_runner(contender: str, model, batch, shapes: dict[str, Any], seed: int) -> Runner:
    """TRL's GRPOTrainer on the fixed rollouts: its `rollout_func` hook returns them instead of generating, and
    the reward function looks each completion's fixed reward up, so TRL runs exactly its update cycle (old and
    reference log-probs by full forwards, advantages, loss, backward) on the same batch as the other contenders."""
    rows = shapes["num_prompts"] * shapes["num_generations"]
    prompt_lists = [ids[m.bool()].tolist() for ids, m in zip(batch.prompt_ids, batch.prompt_mask)]
    completion_lists = [ids[m.bool()].tolist() for ids, m in zip(batch.completion_ids, batch.completion_mask)]
    reward_of = {tuple(c): float(r) for c, r in zip(completion_lists, batch.rewards)}
    assert len(reward_of) == rows, "fixed completions must be distinct to look their rewards up"

    def fixed_rollouts(prompts: list, trainer) -> dict[str, Any]:
        assert len(prompts) == rows, f"TRL asked for {len(prompts)} rollouts, the fixed batch has {rows}"
        return {"prompt_ids": prompt_lists, "completion_ids": completion_lists, "logprobs": None}

    def fixed_reward(prompts, completions, completion_ids, **_) -> list[float]:
        return [reward_of[tuple(ids)] for ids in completion_ids]

    tokenizer = bench_tokenizer(shapes["model"]["vocab_size"])  # TRL decodes the completions for its log
    dataset = [{"prompt": f"prompt {i}"} for _ in range(64) for i in range(shapes["num_prompts"])]
    driver = TRLDriver(contender, model, tokenizer, shapes, seed, dataset, fixed_reward, rollout_func=fixed_rollouts,
                       loss=loss_knobs(shapes), lr=STEP_LR)
    return Runner(driver.cycle, driver.params, driver.frozen, {"trainable_params": sum(p.numel() for p in driver.params)})


def step_crosscheck(agg: dict[str, Any], shapes: dict[str, Any] | None = None) -> list[str]:
    """onelayer_fast and naive_trl train the same layer with the same loss from the same weights: their
    warm-up metrics must agree (iteration 0 grad norm, iteration 1 loss and KL). The layout contenders
    (onelayer_fast_shared, onelayer_fast_packed) must match onelayer_fast's warm-up loss and grad norm to
    LAYOUT_TOLERANCE relative (to max(|value|, LAYOUT_SCALE_FLOOR); [MISMATCH] fails the run); their KL is
    shown only (~1e-7 after one step: a relative difference says nothing there). Then the layouts' token shares."""
    per = agg["contenders"]
    lines = layout_crosscheck(per, layout_tolerance(shapes))
    if "naive_trl" not in per:
        return lines
    b = per["naive_trl"]["runs"][0]["warmup_history"]
    # trl_frozen: TRL's own single-layer GRPO on the same rollouts (its rollout_func hook), reported, not asserted:
    # TRL's code is not ours to hold to a tolerance, but a large difference would mean the setups differ.
    for name in ("onelayer_fast", "trl_frozen"):
        if name not in per:
            continue
        a = per[name]["runs"][0]["warmup_history"]
        note = "" if name == "onelayer_fast" else " (informative)"
        lines.append(f"cross-check {name} vs naive_trl (warm-up step, same weights and rollouts){note}:")
        for it, (x, y) in enumerate(zip(a, b)):
            for k in ("loss", "grad_norm", "kl"):
                if k in x and k in y:
                    rel = abs(x[k] - y[k]) / max(abs(y[k]), 1e-12)
                    lines.append(f"  iter {it} {k:<9} {name} {x[k]: .6e}  naive_trl {y[k]: .6e}  rel diff {rel:.1e}")
    return lines


def layout_tolerance(shapes: dict[str, Any] | None) -> float:
    """LAYOUT_TOLERANCE for float32 models; for bfloat16 ones (the CUDA shape sets) BF16_LAYOUT_TOLERANCE."""
    if shapes is not None and shapes["model"].get("dtype") == "bfloat16":
        return BF16_LAYOUT_TOLERANCE
    return LAYOUT_TOLERANCE


def layout_crosscheck(per: dict[str, Any], tolerance: float = LAYOUT_TOLERANCE) -> list[str]:
    lines = []
    if "onelayer_fast" in per:
        b = per["onelayer_fast"]["runs"][0]["warmup_history"]
        for name in STEP_LAYOUTS:
            if name == "onelayer_fast" or name not in per:
                continue
            a = per[name]["runs"][0]["warmup_history"]
            lines.append(f"cross-check {name} ({STEP_LAYOUTS[name]}) vs onelayer_fast (padded), warm-up step, same "
                         f"weights and rollouts; loss and grad norm must differ by < {tolerance:g} x "
                         f"max(|value|, {LAYOUT_SCALE_FLOOR:g}):")
            if len(a) != len(b):
                lines.append(f"  [MISMATCH] {len(a)} iterations vs {len(b)}")
            for it, (x, y) in enumerate(zip(a, b)):
                for k in ("loss", "grad_norm", "kl"):
                    if k in x and k in y:
                        diff = abs(x[k] - y[k])
                        rel = diff / max(abs(y[k]), 1e-12)
                        ok = diff < tolerance * max(abs(y[k]), LAYOUT_SCALE_FLOOR)
                        verdict = "(shown only)" if k == "kl" else "[MATCH]" if ok else "[MISMATCH]"
                        lines.append(f"  layout iter {it} {k:<9} {name} {x[k]: .8e}  onelayer_fast {y[k]: .8e}  "
                                     f"rel diff {rel:.1e} (abs {diff:.1e}) {verdict}")
    stats = {name: per[name]["runs"][0]["layout_stats"] for name in STEP_LAYOUTS
             if name in per and per[name]["runs"][0].get("layout_stats")}
    if stats:
        lines.append("layouts: tokens computed per layer vs the padded, unshared layout (token share); dense attention "
                     "scores computed (attention share); real query-key pairs (allowed pair share):")
        for name, st in stats.items():
            pairs = st.get("allowed_pair_share")
            lines.append(f"  {name:<21} {st['layout']:<13} tokens {st['computed_tokens']:>5}/{st['padded_tokens']:<5} "
                         f"token share {st['token_share']:.3f}  attention share {st['attention_share']:.3f}  "
                         f"allowed pairs {'-' if pairs is None else f'{pairs:.3f}'}  real tokens {st['real_tokens']}  "
                         f"({st['packed_rows']} rows x {st['packed_row_length']})")
    return lines


def step_description(s: dict[str, Any]) -> str:
    m = s["model"]
    return (f"one GRPO update cycle (num_iterations={s['num_iterations']}, beta={s['beta']}, {s['loss_type']}) on fixed "
            f"rollouts: {s['num_prompts']} prompts x {s['num_generations']} generations, {s['prompt_length']} prompt + "
            f"{s['completion_length']} completion tokens{step_lengths_note(s)}; Qwen2-shaped random-init "
            f"{DTYPE_NAMES[m['dtype']]} model ({m['num_hidden_layers']} layers, "
            f"hidden {m['hidden_size']}, {m['num_attention_heads']}/{m['num_key_value_heads']} heads, intermediate "
            f"{m['intermediate_size']}, vocab {m['vocab_size']}, tied, sdpa), layer {s['layer']} trains"
            f"{' [quick shapes]' if s.get('quick') else ''}{cuda_note(s)}")


DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16"}


def cuda_note(s: dict[str, Any]) -> str:
    return f" on {s['device']} [{CUDA_STATUS}]" if device_type(s) == "cuda" else ""


def step_tokens_definition(s: dict[str, Any]) -> str:
    rows, width = s["num_prompts"] * s["num_generations"], s["prompt_length"] + s["completion_length"]
    return (f"rows x (prompt + completion) positions per update cycle ({rows} x {width} = {rows * width}, padding "
            f"included, whatever the layout; one cycle = num_iterations = {s['num_iterations']} optimizer steps) / "
            f"median cycle time")


# The CUDA shape sets of `step` (config.json of Qwen/Qwen2.5-0.5B and -1.5B; random init here, no weights).
QWEN25_MODELS = {
    "qwen2.5-0.5b": dict(num_hidden_layers=24, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(num_hidden_layers=28, hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}
# The rollout batch of the CUDA sets: GRPO's usual 8 generations per prompt, 4 prompts, 128 + 256 tokens. Sized so
# that `full` fits in an 80 GB H100 at the 1.5B shape without gradient checkpointing, by estimate (bf16
# weights + grads + AdamW states + reference ~15 GB, saved activations of 28 layers ~35-45 GB at ~100-130 KB
# per token and layer); 8 x 8 would double the activations. Padding: the CPU pattern scaled 4x, plus three rows
# past the 16th.
CUDA_STEP_BATCH = {
    "num_prompts": 4,
    "num_generations": 8,
    "prompt_length": 128,
    "completion_length": 256,
    "prompt_left_pad": {"1": 20, "3": 44},
    "completion_lengths": {"2": 160, "5": 68, "10": 252, "13": 4, "15": 208, "18": 96, "23": 33, "29": 240},
}


def step_cuda_shape_sets(quick: bool) -> dict[str, dict[str, Any]]:
    """`step` on CUDA: Qwen2.5-0.5B and -1.5B shapes, random init, bf16, middle layer, CUDA_STEP_BATCH; the loss
    and optimizer settings of the CPU shapes. Quick: the same widths and vocabulary, 4 layers, the CPU batch."""
    base = step_shapes(quick)
    sets = {}
    for name, spec in QWEN25_MODELS.items():
        layers = 4 if quick else spec["num_hidden_layers"]
        shapes = {**base, "model": {**base["model"], **spec, "num_hidden_layers": layers, "dtype": "bfloat16"},
                  "layer": layers // 2, "shape_set": name}
        sets[name] = shapes if quick else {**shapes, **CUDA_STEP_BATCH}
    return sets


def step_varlen_shapes(quick: bool) -> dict[str, Any]:
    """`step` with every row's completion length drawn uniformly from 16-64 tokens (seeded, the same for every
    contender and run): each row's last real completion token is EOS, the mask is 1 up to it, padding after."""
    import random

    shapes = step_shapes(quick)
    rng = random.Random(VARLEN_SEED)
    rows = shapes["num_prompts"] * shapes["num_generations"]
    low, high = VARLEN_RANGE
    return {**shapes, "completion_lengths": {str(r): rng.randint(low, high) for r in range(rows)},
            "completion_length_distribution": f"uniform {low}-{high} (random.Random({VARLEN_SEED}).randint)",
            "eos_token_id": 1}


VARLEN_RANGE = (16, 64)
VARLEN_SEED = 1234


def step_lengths_note(s: dict[str, Any]) -> str:
    if "completion_length_distribution" not in s:
        return ""
    n = sum(s["completion_lengths"].values())
    return f" ({s['completion_length_distribution']}, EOS-terminated: {n} real completion tokens in all)"


STEP_CONTENDERS = ("onelayer_fast", "onelayer_fast_shared", "onelayer_fast_packed", "full", "naive_trl",
                   "trl_frozen", "trl")
STEP_TARGETS = (
    Target("time naive_trl / onelayer_fast", "time", "naive_trl", "onelayer_fast", ">=", 1.3),
    Target("time full / onelayer_fast", "time", "full", "onelayer_fast", ">=", 2.1),
    Target("memory onelayer_fast / naive_trl", "memory", "onelayer_fast", "naive_trl", "<=", 0.60),
    # the shared-prompt and packed layouts compute fewer tokens than the padded one: stricter targets
    *(t for name in ("onelayer_fast_shared", "onelayer_fast_packed") for t in (
        Target(f"time naive_trl / {name}", "time", "naive_trl", name, ">=", 1.7),
        Target(f"time full / {name}", "time", "full", name, ">=", 2.8),
        Target(f"memory {name} / naive_trl", "memory", name, "naive_trl", "<=", 0.45))),
)
STEP_RATIOS = (("time", "naive_trl", "onelayer_fast"), ("time", "full", "onelayer_fast"),
               ("time", "trl_frozen", "onelayer_fast"), ("time", "trl", "onelayer_fast"),
               ("time", "onelayer_fast", "onelayer_fast_shared"), ("time", "onelayer_fast", "onelayer_fast_packed"),
               ("time", "naive_trl", "onelayer_fast_shared"), ("time", "naive_trl", "onelayer_fast_packed"),
               ("memory", "onelayer_fast", "naive_trl"), ("memory", "full", "onelayer_fast"),
               ("memory", "onelayer_fast", "trl_frozen"),
               ("memory", "onelayer_fast_shared", "naive_trl"), ("memory", "onelayer_fast_packed", "naive_trl"))

STEP = Workload(
    name="step",
    description=step_description,
    contenders=STEP_CONTENDERS,
    shapes=step_shapes,
    setup=step_setup,
    tokens_per_step=step_tokens,
    tokens_definition=step_tokens_definition,
    targets=STEP_TARGETS,
    ratios=STEP_RATIOS,
    skip_reason=trl_skip_reason,
    devices=("cpu", "cuda"),
    cuda_shape_sets=step_cuda_shape_sets,
    cpu_only_contenders=("trl_frozen", "trl"),  # TRL_SETTINGS: use_cpu=True, fp32
    crosscheck=step_crosscheck,
)

STEP_VARLEN = dataclasses.replace(
    STEP, name="step-varlen", shapes=step_varlen_shapes, devices=("cpu",), cuda_shape_sets=None,
    tokens_definition="rows x (prompt + completion) positions per update cycle (16 x 96 = 1536, padding "
                      "included, whatever the layout; the real completion tokens are in the description) / median "
                      "cycle time")
