"""Workload `grpo_loss`: forward + backward of the GRPO loss alone (lm_head + log-softmax + loss), the gradient
w.r.t. the hidden states (the lm_head is frozen).

Contenders: `onelayer_fast` (backend "auto"), its chunked and Triton paths named explicitly (`chunked`, `triton`),
the loss that materializes the logits (`materialized`, backend "reference"), Liger-Kernel's fused linear GRPO loss
(`liger`, the [compare] extra), and `matmul`: a plain matmul of the same tokens through the same lm_head, which
measures the device's matmul rate in the same run so that the loss contenders' FLOP rates can be given as a share
of it.

Devices: the CPU (fp32, grpo_loss_shapes; there `auto` is the chunked path, so `chunked` does not run a second
time, and `triton` and `matmul` are CUDA-only) and CUDA (grpo_loss_cuda_shape_sets: bf16, 16384 tokens x hidden
3584 x vocab 151936; `materialized` does not run there, see materialized_on_cuda). On the CPU every contender's
loss and gradient are cross-checked against materialized's; in bf16 each contender's error against a float64
oracle is bounded by PyTorch's own bf16 error on a slice of the batch (precision_check).

FLOP counts, N unmasked tokens, hidden H, vocab V, 2 FLOP per multiply-add, softmax and loss terms not counted:
  floor (grpo_loss_floor_flops): 4 N H V, the logits once forward and the hidden gradient once backward: the least
      matmul work a contender can do. The workload's count (the "TFLOP/s floor" column; gflop_per_s in the CSV).
  own (grpo_loss_kernel_flops): what the path that ran computes, read from its code (lm_head frozen / trained):
      triton     kernels/grpo_loss_triton.py TritonGRPOLoss on kernels/token_logprobs_triton.py (its docstring
                 gives the same count): forward 2NHV (logits tiles for logp and lse); backward 2NHV (each logits
                 tile recomputed) + 2NHV (grad_hidden) [+ 2NHV grad_W]: 6 NHV frozen, 8 trained.
      chunked    token-level IS: kernels/grpo_loss.py FusedTokenGRPOLoss forms the gradient inside the forward
                 from each chunk's softmax, still in memory (no recompute): 2NHV logits + 2NHV grad_hidden
                 [+ 2NHV grad_W]: 4 NHV frozen (the floor itself), 6 trained. Sequence-level IS runs
                 ChunkedTokenLogprobs instead (forward, then a backward that recomputes the logits): 6 / 8.
      reference  the materialized loss takes the logits of every position, masked ones included (B x T rows),
                 then autograd: 4 BTHV frozen, 6 trained.
      matmul     the probe: 2 NHV, one pass (the floor does not apply to it).
      liger      not counted: its work depends on the installed Liger version.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from bench.contenders.liger import liger_grpo_loss, liger_skip_reason
from bench.harness import CUDA_STATUS, Runner, Target, Workload, device_type
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
        # Liger's fused GRPO loss has no bias-corrected KL in every version: compare on the math all contenders have
        "use_bias_correction_kl": False,
        "importance_sampling_level": "token",
        "logp_noise": 0.1,  # old/ref log-probs = true log-probs + N(0, logp_noise^2), independently
        "hidden_requires_grad": True,
        "lm_head_requires_grad": False,
    }


# The CUDA shape set: 256 rows x 64 completion tokens = 16384 tokens through a hidden-3584 (Qwen2.5-7B's width),
# vocab-151936 (the Qwen2.5 tokenizer's) lm_head, bf16, lm_head frozen. Quick: 32 rows (2048 tokens), same head.
GRPO_LOSS_CUDA = {"rows": 256, "completion_length": 64, "hidden_size": 3584, "vocab_size": 151936,
                  "dtype": "bfloat16"}
GRPO_LOSS_CUDA_SET = "h3584-v151936"


def grpo_loss_cuda_shape_sets(quick: bool) -> dict[str, dict[str, Any]]:
    base = grpo_loss_shapes(quick)
    shapes = {**base, **GRPO_LOSS_CUDA, "shape_set": GRPO_LOSS_CUDA_SET}
    if quick:
        shapes["rows"] = 32
    full = shapes["completion_length"]
    shapes["completion_lengths"] = {"3": full - 5, "10": full - 2}  # the CPU pattern at this width
    return {GRPO_LOSS_CUDA_SET: shapes}


# --------------------------------------------------------------------------------------------------
# FLOP counts: one function each, used by the workers (Runner.info), the report and the JSON
# --------------------------------------------------------------------------------------------------


def grpo_loss_unmasked(shapes: dict[str, Any]) -> int:
    full = shapes["completion_length"]
    return shapes["rows"] * full - sum(full - n for n in shapes["completion_lengths"].values())


def grpo_loss_floor_flops(shapes: dict[str, Any]) -> float:
    """4 N H V: the logits once forward + the hidden gradient once backward, over the N unmasked tokens."""
    return 4.0 * grpo_loss_unmasked(shapes) * shapes["hidden_size"] * shapes["vocab_size"]


FLOOR_FLOPS_DEFINITION = ("4 x unmasked tokens x hidden x vocab FLOP (the logits once forward, the hidden gradient "
                          "once backward, 2 FLOP per multiply-add; softmax and loss not counted; the lm_head weight "
                          "gets no gradient): the floor, the least matmul work any contender does / median time")

# path -> (lm_head matmul passes over the tokens it runs with a frozen head, which tokens, why): the module docstring
KERNEL_PASSES = {
    "triton": (3, "unmasked", "forward logits; backward: logits recompute + grad_hidden"),
    "chunked": (2, "unmasked", "logits + grad_hidden, formed in the forward from each chunk's softmax: no recompute"),
    "chunked-sequence": (3, "unmasked", "forward logits; backward: logits recompute + grad_hidden"),
    "reference": (2, "all", "logits of every position, masked ones included, + grad_hidden by autograd"),
    "matmul": (1, "unmasked", "one matmul pass"),
}


def kernel_path(backend: str, shapes: dict[str, Any]) -> str:
    """The KERNEL_PASSES key of a backend at these shapes (the chunked path differs by importance-sampling level)."""
    if backend == "chunked" and shapes.get("importance_sampling_level", "token") == "sequence":
        return "chunked-sequence"
    return backend


def kernel_count(shapes: dict[str, Any], backend: str | None) -> tuple[int, int, str] | None:
    """(lm_head matmul passes, tokens each pass runs over, what the passes are) of `backend` ("triton", "chunked",
    "reference", "matmul") at `shapes`: KERNEL_PASSES, plus one pass (grad_W) when the lm_head trains (not for the
    matmul probe); None for a path without a count (liger, or an unrecognized `auto`)."""
    path = kernel_path(backend, shapes) if backend else None
    if path not in KERNEL_PASSES:
        return None
    passes, which, why = KERNEL_PASSES[path]
    if shapes.get("lm_head_requires_grad") and path != "matmul":
        passes, why = passes + 1, why + " + grad_W"
    tokens = grpo_loss_unmasked(shapes) if which == "unmasked" else shapes["rows"] * shapes["completion_length"]
    return passes, tokens, why


def grpo_loss_kernel_flops(shapes: dict[str, Any], backend: str | None) -> float | None:
    """The FLOP count of what `backend` computes for one forward + backward at `shapes`: 2 x tokens x H x V per
    lm_head pass (kernel_count); None where the path has no count."""
    count = kernel_count(shapes, backend)
    if count is None:
        return None
    passes, tokens, _ = count
    return 2.0 * passes * tokens * shapes["hidden_size"] * shapes["vocab_size"]


def kernel_flops_definition(shapes: dict[str, Any], backend: str | None) -> str:
    count = kernel_count(shapes, backend)
    if count is None:
        return f"no own count for {backend or 'an unrecognized path'}"
    passes, _, why = count
    which = KERNEL_PASSES[kernel_path(backend, shapes)][1]
    tokens = "unmasked tokens" if which == "unmasked" else "rows x completion positions"
    return f"{backend}: {2 * passes} x {tokens} x hidden x vocab ({why})"


def flops_info(shapes: dict[str, Any], backend: str | None) -> dict[str, Any]:
    """What a worker records (Runner.info) for the path it ran; aggregate turns it into kernel_tflop_per_s."""
    return {"backend": backend, "kernel_flops": grpo_loss_kernel_flops(shapes, backend),
            "kernel_flops_definition": kernel_flops_definition(shapes, backend)}


# The autograd node each onelayer_fast path leaves on the loss (the custom Functions of kernels/; the reference
# path is plain PyTorch ops and leaves none of these).
LOSS_NODES = {"TritonGRPOLossBackward": "triton", "FusedTokenGRPOLossBackward": "chunked",
              "ChunkedTokenLogprobsBackward": "chunked"}


def loss_backend(loss) -> str | None:
    """Which path computed `loss` (a GRPO loss of onelayer_fast), read off its autograd graph: "triton",
    "chunked", or None where neither path's node is in it. Lets the `auto` contender report what it ran."""
    seen, todo = set(), [loss.grad_fn]
    while todo and len(seen) < 10_000:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ in LOSS_NODES:
            return LOSS_NODES[type(node).__name__]
        todo.extend(fn for fn, _ in node.next_functions)
    return None


# --------------------------------------------------------------------------------------------------
# Inputs, contenders
# --------------------------------------------------------------------------------------------------


def grpo_loss_inputs(shapes: dict[str, Any], seed: int) -> dict[str, Any]:
    """Random inputs, identical for every contender (same seed, same generator order), drawn on the shapes' device
    (the CPU shapes: the CPU, fp32) and cast to their dtype."""
    import torch

    import onelayer_fast as olf

    device, dtype = shapes.get("device", "cpu"), getattr(torch, shapes["dtype"])
    g = torch.Generator(device=device).manual_seed(seed)
    b, t, h, v = shapes["rows"], shapes["completion_length"], shapes["hidden_size"], shapes["vocab_size"]
    hidden = torch.randn(b, t, h, generator=g, device=device).to(dtype)
    weight = (torch.randn(v, h, generator=g, device=device) * (1.0 / h ** 0.5)).to(dtype)  # logits ~ N(0, 1)
    ids = torch.randint(0, v, (b, t), generator=g, device=device)
    mask = torch.ones(b, t, dtype=torch.long, device=device)
    for r, n in shapes["completion_lengths"].items():
        mask[int(r), n:] = 0
    rewards = torch.rand(b, generator=g, device=device)
    with torch.no_grad():  # chunked: never a (tokens, vocab) tensor in any contender's setup
        true = olf.token_logprobs(hidden, weight, ids, backend="chunked")
    noise = shapes["logp_noise"]
    old = (true + noise * torch.randn(b, t, generator=g, device=device)) * mask
    ref = (true + noise * torch.randn(b, t, generator=g, device=device)) * mask
    hidden.requires_grad_(True)
    hidden.grad = torch.zeros_like(hidden)  # one buffer, allocated before the baseline, zeroed before each step
    return {"hidden": hidden, "weight": weight, "ids": ids, "mask": mask, "rewards": rewards, "old": old, "ref": ref}


# onelayer_fast contenders -> the `backend` they call olf.grpo_loss with
CONTENDER_BACKENDS = {"onelayer_fast": "auto", "chunked": "chunked", "triton": "triton", "materialized": "reference"}


def contender_loss(contender: str, x: dict[str, Any], shapes: dict[str, Any]) -> Callable:
    """hidden -> the loss of `contender` on the inputs `x` (grpo_loss_inputs or a slice of them)."""
    import onelayer_fast as olf

    config = loss_config(shapes)
    if contender in CONTENDER_BACKENDS:
        backend = CONTENDER_BACKENDS[contender]

        def loss_fn(hidden):
            return olf.grpo_loss(hidden, x["weight"], x["ids"], x["mask"], rewards=x["rewards"],
                                 group_size=shapes["group_size"], old_logps=x["old"], ref_logps=x["ref"],
                                 config=config, backend=backend).loss

        return loss_fn
    if contender == "liger":
        return liger_grpo_loss(x["weight"], x["ids"], x["mask"], x["rewards"], x["old"], x["ref"],
                               shapes["group_size"], config, compiled=device_type(shapes) == "cuda")
    raise ValueError(f"unknown contender {contender!r}")


def grpo_loss_setup(contender: str, shapes: dict[str, Any], seed: int) -> Runner:
    x = grpo_loss_inputs(shapes, seed)
    if contender == "matmul":
        return matmul_probe(x, shapes)
    hidden, weight = x["hidden"], x["weight"]
    grad = hidden.grad
    loss_fn = contender_loss(contender, x, shapes)
    backend = CONTENDER_BACKENDS.get(contender)
    info: dict[str, Any] = {"unmasked_tokens": grpo_loss_unmasked(shapes)}
    if backend is None:  # liger
        info.update(backend=None, kernel_flops=None, kernel_flops_definition=LIGER_FLOPS_NOTE)
    elif backend != "auto":
        info.update(flops_info(shapes, backend))
    if shapes["dtype"] != "float32":  # the fp32 shapes are cross-checked against materialized instead
        info["precision"] = precision_check(contender, x, shapes)
    last: dict[str, Any] = {}

    def step() -> list[dict[str, float]]:
        loss = loss_fn(hidden)
        if backend == "auto" and "backend" not in info:  # what `auto` ran, once (the warm-up step)
            ran = loss_backend(loss)
            info.update(flops_info(shapes, ran), auto_resolved_to=ran or "unrecognized")
        loss.backward()  # accumulates into the zeroed buffer `grad`
        last["loss"] = loss.detach()
        return [{"loss": float(loss.detach()), "grad_norm": float(grad.norm())}]

    def before_step() -> None:
        assert hidden.grad is grad, "backward replaced the gradient buffer: the update check would be blind"
        grad.zero_()

    def artifacts() -> dict[str, Any]:
        return {"loss": last["loss"].double(), "grad": grad.detach().clone()}

    frozen = [weight, x["old"], x["ref"], hidden]
    # Artifacts feed the cross-check against materialized, which does not run on CUDA.
    return Runner(step, [grad], frozen, info, before_step=before_step,
                  artifacts=artifacts if device_type(shapes) == "cpu" else None)


LIGER_FLOPS_NOTE = "liger: no own count (its work depends on the installed Liger version)"
MATMUL_VOCAB_CHUNK = 16384  # lm_head rows per matmul: a reused (N, 16384) output, 512 MiB in bf16 at N = 16384


def matmul_probe(x: dict[str, Any], shapes: dict[str, Any]) -> Runner:
    """The `matmul` contender: (N unmasked tokens, H) @ (H, V) in the shapes' dtype, MATMUL_VOCAB_CHUNK vocab rows
    per torch.mm into reused output buffers: the rate of the matmul every loss contender is built on, on this
    device, in this run. Its own count is 2 N H V (flops_info "matmul"); the floor does not apply to it. On CUDA each
    step also records its time between CUDA events (`cuda_event_s`)."""
    import torch

    n, v = grpo_loss_unmasked(shapes), shapes["vocab_size"]
    rows = x["hidden"].detach().reshape(-1, shapes["hidden_size"])[:n]  # N rows: the FLOP count's N
    weight = x["weight"]
    chunk = min(MATMUL_VOCAB_CHUNK, v)
    out = torch.empty(n, chunk, dtype=rows.dtype, device=rows.device)
    tail = torch.empty(n, v % chunk, dtype=rows.dtype, device=rows.device)  # contiguous, unlike out[:, :v % chunk]
    on_cuda = rows.device.type == "cuda"

    def step() -> list[dict[str, float]]:
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        for v0 in range(0, v, chunk):
            part = weight[v0:v0 + chunk]
            torch.mm(rows, part.T, out=out if part.shape[0] == chunk else tail)
        if not on_cuda:
            return [{}]
        end.record()
        end.synchronize()
        return [{"cuda_event_s": start.elapsed_time(end) / 1e3}]

    def before_step() -> None:  # so that every step visibly writes its outputs (the harness's update check)
        out.zero_()
        tail.zero_()

    info = {"unmasked_tokens": n, "floor_flops": None, **flops_info(shapes, "matmul")}
    return Runner(step, [out, tail], [weight, x["hidden"]], info, before_step=before_step)


# --------------------------------------------------------------------------------------------------
# Accuracy: the cross-check against materialized (fp32) and the float64 slice check (bf16)
# --------------------------------------------------------------------------------------------------

GRPO_LOSS_TOLERANCE = 1e-4
PRECISION_TOKENS = 256  # tokens of the slice the float64 oracle runs on
PRECISION_ATOL = 1e-6  # added to the bound: where PyTorch's own error is ~0, the kernel's need not be exactly 0


def precision_slice(x: dict[str, Any], shapes: dict[str, Any]) -> dict[str, Any]:
    """The first group's rows and their first PRECISION_TOKENS / group_size positions: a loss problem of its own
    (normalized over its own tokens), small enough for materialized float64 logits."""
    rows = shapes["group_size"]
    width = min(shapes["completion_length"], max(1, PRECISION_TOKENS // rows))
    part = {k: x[k][:rows, :width] for k in ("ids", "mask", "old", "ref")}
    return {**part, "hidden": x["hidden"].detach()[:rows, :width], "weight": x["weight"],
            "rewards": x["rewards"][:rows]}


def loss_and_grad(loss_fn: Callable, hidden) -> tuple[Any, Any]:
    leaf = hidden.detach().clone().requires_grad_(True)
    loss = loss_fn(leaf)
    loss.backward()
    return loss.detach(), leaf.grad


def precision_check(contender: str, x: dict[str, Any], shapes: dict[str, Any]) -> dict[str, Any]:
    """`contender`'s max abs error of the loss and of the hidden gradient on precision_slice, against a float64
    oracle (the materialized loss in float64 on the same, already rounded, inputs), next to PyTorch's own error in
    the shapes' dtype (the materialized loss in that dtype: bf16 matmuls, fp32 log-softmax). Within the bound when
    each error <= 2 x PyTorch's own + PRECISION_ATOL (the house rule for low-precision kernels)."""
    import torch

    part = precision_slice(x, shapes)
    wide = {**part, **{k: part[k].double() for k in ("hidden", "weight", "rewards", "old", "ref")}}
    loss64, grad64 = loss_and_grad(contender_loss("materialized", wide, shapes), wide["hidden"])
    torch_loss, torch_grad = loss_and_grad(contender_loss("materialized", part, shapes), part["hidden"])
    loss, grad = loss_and_grad(contender_loss(contender, part, shapes), part["hidden"])
    del wide

    def err(a, b) -> float:
        return float((a.double() - b).abs().max())

    out = {"rows": part["ids"].shape[0], "width": part["ids"].shape[1], "tokens": int(part["mask"].sum()),
           "dtype": shapes["dtype"], "atol": PRECISION_ATOL,
           "loss_err": err(loss, loss64), "grad_err": err(grad, grad64),
           "torch_loss_err": err(torch_loss, loss64), "torch_grad_err": err(torch_grad, grad64)}
    out["within_bound"] = all(out[f"{k}_err"] <= 2 * out[f"torch_{k}_err"] + PRECISION_ATOL for k in ("loss", "grad"))
    if torch.cuda.is_available() and device_type(shapes) == "cuda":
        torch.cuda.empty_cache()  # the float64 weight copy, before the memory baseline
    return out


def grpo_loss_crosscheck(agg: dict[str, Any], shapes: dict[str, Any] | None = None) -> list[str]:
    return materialized_crosscheck(agg) + precision_lines(agg)


def materialized_crosscheck(agg: dict[str, Any]) -> list[str]:
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
        if name in ("materialized", "matmul"):
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


def precision_lines(agg: dict[str, Any]) -> list[str]:
    """The precision_check of every contender that ran one; a onelayer_fast path outside the bound fails the run
    ([MISMATCH]), Liger's is shown only (not this project's code to hold to a bound)."""
    checked = {n: c["runs"][0]["precision"] for n, c in agg["contenders"].items() if c["runs"][0].get("precision")}
    if not checked:
        return []
    p = next(iter(checked.values()))
    lines = [f"{p['dtype']} error vs float64 on a slice (the first group: {p['rows']} rows x {p['width']} positions, "
             f"{p['tokens']} tokens; oracle: the materialized loss in float64 on the same rounded inputs); max abs "
             f"error of the loss and of grad_hidden, bound 2 x PyTorch's own {p['dtype']} error (the materialized "
             f"loss in {p['dtype']}) + {p['atol']:g}:"]
    for name, p in checked.items():
        ok = p["within_bound"]
        verdict = ("(informative: within the bound)" if ok else "(informative: outside the bound)") \
            if name not in CONTENDER_BACKENDS else "[MATCH]" if ok else "[MISMATCH]"
        lines.append(f"  {name:<14} loss err {p['loss_err']:.2e} (PyTorch {p['torch_loss_err']:.2e}), grad err "
                     f"{p['grad_err']:.2e} (PyTorch {p['torch_grad_err']:.2e})  {verdict}")
    return lines


# --------------------------------------------------------------------------------------------------
# Which contender runs where, the workload
# --------------------------------------------------------------------------------------------------


def materialized_on_cuda() -> str:
    s = grpo_loss_cuda_shape_sets(False)[GRPO_LOSS_CUDA_SET]
    positions, v = s["rows"] * s["completion_length"], s["vocab_size"]
    return (f"not run on CUDA: at {positions} positions x vocab {v} it would hold the logits, "
            f"{positions * v * 2 / 2**30:.1f} GiB in bf16 plus {positions * v * 4 / 2**30:.1f} GiB per fp32 copy "
            f"(log-softmax input, output and their gradients), in every step: the fused contenders exist not to; "
            f"the float64 slice check takes its place as the accuracy reference")


def grpo_loss_device_skip_reason(contender: str, device: str) -> str | None:
    on_cpu = device.split(":")[0] == "cpu"
    if on_cpu and contender == "triton":
        return "the Triton kernels run on CUDA (on the CPU only under TRITON_INTERPRET=1, far too slow to time)"
    if on_cpu and contender == "matmul":
        return "the matmul probe measures the GPU's matmul rate, which the CUDA targets are shares of: CUDA only"
    if on_cpu and contender == "chunked":
        return "on the CPU backend='auto' is the chunked path, which the onelayer_fast contender times"
    if not on_cpu and contender == "materialized":
        return materialized_on_cuda()
    return None


def grpo_loss_description(s: dict[str, Any]) -> str:
    tokens = s["rows"] * s["completion_length"]
    cuda = f" on {s['device']} [{CUDA_STATUS}]" if device_type(s) == "cuda" else ""
    return (f"GRPO loss forward + backward alone: {s['rows']} rows x {s['completion_length']} tokens = {tokens} tokens "
            f"({grpo_loss_unmasked(s)} unmasked), hidden {s['hidden_size']}, vocab {s['vocab_size']}, {s['dtype']}; "
            f"rewards in groups of {s['group_size']}, old/ref log-probs given, beta={s['beta']}, {s['loss_type']}, "
            f"{s['importance_sampling_level']}-level IS; grad w.r.t. hidden only (lm_head frozen)"
            f"{' [quick shapes]' if s.get('quick') else ''}{cuda}")


GRPO_LOSS_CONTENDERS = ("onelayer_fast", "chunked", "triton", "materialized", "liger", "matmul")

GRPO_LOSS = Workload(
    name="grpo_loss",
    description=grpo_loss_description,
    contenders=GRPO_LOSS_CONTENDERS,
    shapes=grpo_loss_shapes,
    setup=grpo_loss_setup,
    tokens_per_step=lambda s: s["rows"] * s["completion_length"],
    tokens_definition="rows x completion tokens per loss forward + backward (masked included) / median time",
    targets=(
        Target("memory onelayer_fast / materialized", "memory", "onelayer_fast", "materialized", "<=", 1 / 8),
        Target("time materialized / onelayer_fast", "time", "materialized", "onelayer_fast", ">=", 1.0),
        # the GPU issue's: fused forward + backward at >= 60% of the matmul rate, both counted as 4 N H V / time for
        # the loss and 2 N H V / time for the matmul, and >= 1.5x faster than Liger
        *(t for name in ("onelayer_fast", "triton") for t in (
            Target(f"{name} FLOP rate (4NHV) / matmul rate", "flop_rate", name, "matmul", ">=", 0.6, ("cuda",)),
            Target(f"time liger / {name}", "time", "liger", name, ">=", 1.5, ("cuda",)))),
    ),
    ratios=(("time", "materialized", "onelayer_fast"), ("memory", "onelayer_fast", "materialized"),
            ("time", "liger", "onelayer_fast"), ("memory", "onelayer_fast", "liger"),
            ("time", "chunked", "onelayer_fast"), ("time", "triton", "onelayer_fast"), ("time", "chunked", "triton"),
            ("time", "liger", "triton"), ("memory", "triton", "chunked"),
            *(("flop_rate", name, "matmul") for name in ("onelayer_fast", "chunked", "triton", "liger"))),
    flops_per_step=grpo_loss_floor_flops,
    flops_definition=FLOOR_FLOPS_DEFINITION,
    memory_definition="working_mib: peak RSS during the measured steps minus RSS after the inputs are built (hidden, "
                      "lm_head weight, ids, mask, rewards, old/ref log-probs, the zeroed hidden.grad buffer) and "
                      "before the warm-up step; sampled every 5 ms. tensor_peak_mib: peak live tensor bytes during "
                      "one extra step under torch.profiler (round 0 only), over the step's start",
    skip_reason=liger_skip_reason,
    device_skip_reason=grpo_loss_device_skip_reason,
    devices=("cpu", "cuda"),
    cuda_shape_sets=grpo_loss_cuda_shape_sets,
    crosscheck=grpo_loss_crosscheck,
)
