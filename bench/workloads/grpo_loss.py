"""Workload `grpo_loss`: forward + backward of the GRPO loss alone (lm_head + log-softmax + loss), onelayer_fast's
fused chunked loss against the loss that materializes the logits (backend "reference") and, with the [compare]
extra, Liger-Kernel's fused linear GRPO loss; every contender's loss and gradient are cross-checked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.contenders.liger import liger_grpo_loss, liger_skip_reason
from bench.harness import Runner, Target, Workload
from bench.workloads.step import STEP_LOSS, loss_config

def grpo_loss_shapes(quick: bool) -> dict[str, Any]:
    shapes = {"rows": 64, "completion_length": 64, "hidden_size": 896, "vocab_size": 151936}  # Qwen2.5-0.5B head
    if quick:
        shapes.update(rows=16, completion_length=16, hidden_size=64, vocab_size=4096)
    return {
        "quick": quick,
        **shapes,
        "dtype": "float32",
        "group_size": 8,
        # row -> unmasked tokens: "all tokens unmasked except a few"
        "completion_lengths": {"3": shapes["completion_length"] - 5, "10": shapes["completion_length"] - 2},
        **{k: STEP_LOSS[k] for k in ("beta", "epsilon", "loss_type")},  # the loss of the training workloads
        "importance_sampling_level": "token",
        "logp_noise": 0.1,  # old/ref log-probs = true log-probs + N(0, logp_noise^2), independently
        "hidden_requires_grad": True,
        "lm_head_requires_grad": False,
    }


def grpo_loss_unmasked(shapes: dict[str, Any]) -> int:
    full = shapes["completion_length"]
    return shapes["rows"] * full - sum(full - n for n in shapes["completion_lengths"].values())


def grpo_loss_flops(shapes: dict[str, Any]) -> float:
    return 4.0 * grpo_loss_unmasked(shapes) * shapes["hidden_size"] * shapes["vocab_size"]


def grpo_loss_inputs(shapes: dict[str, Any], seed: int) -> dict[str, Any]:
    """Random inputs, identical for every contender (same seed, same generator order)."""
    import torch

    import onelayer_fast as olf

    g = torch.Generator().manual_seed(seed)
    b, t, h, v = shapes["rows"], shapes["completion_length"], shapes["hidden_size"], shapes["vocab_size"]
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (1.0 / h ** 0.5)  # logits ~ N(0, 1)
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    for r, n in shapes["completion_lengths"].items():
        mask[int(r), n:] = 0
    rewards = torch.rand(b, generator=g)
    with torch.no_grad():  # chunked: never a (tokens, vocab) tensor in any contender's setup
        true = olf.token_logprobs(hidden, weight, ids, backend="auto")
    noise = shapes["logp_noise"]
    old = (true + noise * torch.randn(b, t, generator=g)) * mask
    ref = (true + noise * torch.randn(b, t, generator=g)) * mask
    hidden.requires_grad_(True)
    hidden.grad = torch.zeros_like(hidden)  # one buffer, allocated before the baseline, zeroed before each step
    return {"hidden": hidden, "weight": weight, "ids": ids, "mask": mask, "rewards": rewards, "old": old, "ref": ref}


def grpo_loss_setup(contender: str, shapes: dict[str, Any], seed: int) -> Runner:
    import torch

    import onelayer_fast as olf

    x = grpo_loss_inputs(shapes, seed)
    hidden, weight = x["hidden"], x["weight"]
    grad = hidden.grad
    config = loss_config(shapes)
    if contender in ("onelayer_fast", "materialized"):
        backend = "auto" if contender == "onelayer_fast" else "reference"

        def loss_fn() -> "torch.Tensor":
            return olf.grpo_loss(hidden, weight, x["ids"], x["mask"], rewards=x["rewards"], group_size=shapes["group_size"],
                                 old_logps=x["old"], ref_logps=x["ref"], config=config, backend=backend).loss
    elif contender == "liger":
        liger = liger_grpo_loss(weight, x["ids"], x["mask"], x["rewards"], x["old"], x["ref"], shapes["group_size"],
                                config)

        def loss_fn() -> "torch.Tensor":
            return liger(hidden)
    else:
        raise ValueError(f"unknown contender {contender!r}")

    last: dict[str, Any] = {}

    def step() -> list[dict[str, float]]:
        loss = loss_fn()
        loss.backward()  # accumulates into the zeroed buffer `grad`
        last["loss"] = loss.detach()
        return [{"loss": float(loss.detach()), "grad_norm": float(grad.norm())}]

    def before_step() -> None:
        assert hidden.grad is grad, "backward replaced the gradient buffer: the update check would be blind"
        grad.zero_()

    def artifacts() -> dict[str, Any]:
        return {"loss": last["loss"].double(), "grad": grad.detach().clone()}

    frozen = [weight, x["old"], x["ref"], hidden]
    return Runner(step, [grad], frozen, {"unmasked_tokens": grpo_loss_unmasked(shapes)},
                  before_step=before_step, artifacts=artifacts)


GRPO_LOSS_TOLERANCE = 1e-4


def grpo_loss_crosscheck(agg: dict[str, Any], shapes: dict[str, Any] | None = None) -> list[str]:
    """Every contender's loss and gradient (last measured step; identical inputs) against materialized's."""
    import torch

    per = agg["contenders"]
    if "materialized" not in per:
        return []

    def load(name: str) -> dict[str, Any] | None:
        path = per[name]["runs"][0].get("artifact")
        return torch.load(path) if path and Path(path).exists() else None

    base = load("materialized")
    if base is None:
        return ["cross-check unavailable: materialized saved no loss/gradient"]
    lines = [f"cross-check vs materialized (same inputs; rel diff must be < {GRPO_LOSS_TOLERANCE:g}):"]
    for name in per:
        if name == "materialized":
            continue
        other = load(name)
        if other is None:
            lines.append(f"  {name}: [MISMATCH] no loss/gradient saved")
            continue
        loss_rel = float((other["loss"] - base["loss"]).abs() / base["loss"].abs().clamp(min=1e-30))
        g, gb = other["grad"].double(), base["grad"].double()
        grad_rel = float((g - gb).norm() / gb.norm().clamp(min=1e-30))
        grad_max = float((g - gb).abs().max() / gb.abs().max().clamp(min=1e-30))
        ok = loss_rel < GRPO_LOSS_TOLERANCE and grad_rel < GRPO_LOSS_TOLERANCE
        lines.append(f"  {name}: loss {float(other['loss']):.8e} vs {float(base['loss']):.8e} rel diff {loss_rel:.1e}; "
                     f"grad rel diff (norm) {grad_rel:.1e}, (max abs / max abs) {grad_max:.1e}  "
                     f"[{'MATCH' if ok else 'MISMATCH'}]")
    return lines


def grpo_loss_description(s: dict[str, Any]) -> str:
    tokens = s["rows"] * s["completion_length"]
    return (f"GRPO loss forward + backward alone: {s['rows']} rows x {s['completion_length']} tokens = {tokens} tokens "
            f"({grpo_loss_unmasked(s)} unmasked), hidden {s['hidden_size']}, vocab {s['vocab_size']}, {s['dtype']}; "
            f"rewards in groups of {s['group_size']}, old/ref log-probs given, beta={s['beta']}, {s['loss_type']}, "
            f"{s['importance_sampling_level']}-level IS; grad w.r.t. hidden only (lm_head frozen)"
            f"{' [quick shapes]' if s.get('quick') else ''}")


GRPO_LOSS = Workload(
    name="grpo_loss",
    description=grpo_loss_description,
    contenders=("onelayer_fast", "materialized", "liger"),
    shapes=grpo_loss_shapes,
    setup=grpo_loss_setup,
    tokens_per_step=lambda s: s["rows"] * s["completion_length"],
    tokens_definition="rows x completion tokens per loss forward + backward (masked included) / median time",
    targets=(
        Target("memory onelayer_fast / materialized", "memory", "onelayer_fast", "materialized", "<=", 1 / 8),
        Target("time materialized / onelayer_fast", "time", "materialized", "onelayer_fast", ">=", 1.0),
    ),
    ratios=(("time", "materialized", "onelayer_fast"), ("memory", "onelayer_fast", "materialized"),
            ("time", "liger", "onelayer_fast"), ("memory", "onelayer_fast", "liger")),
    flops_per_step=grpo_loss_flops,
    flops_definition="4 x unmasked tokens x hidden x vocab FLOP (forward logits matmul + backward input-gradient "
                     "matmul, 2 FLOP per multiply-add; softmax and loss not counted; the lm_head weight gets no "
                     "gradient) / median time",
    memory_definition="working_mib: peak RSS during the measured steps minus RSS after the inputs are built (hidden, "
                      "lm_head weight, ids, mask, rewards, old/ref log-probs, the zeroed hidden.grad buffer) and "
                      "before the warm-up step; sampled every 5 ms. tensor_peak_mib: peak live tensor bytes during "
                      "one extra step under torch.profiler (round 0 only), over the step's start",
    skip_reason=liger_skip_reason,
    crosscheck=grpo_loss_crosscheck,
)
