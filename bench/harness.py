"""The benchmark harness: what a workload is, how one contender is measured in its own worker subprocess, how
the parent spawns the workers, orders them over rounds and aggregates their measurements.

A `Workload` names its contenders and shapes and builds a `Runner` per contender; `run_worker` measures one
Runner (setup, one warm-up step, timed steps, memory, weight checks) and returns one JSON-serializable dict;
`spawn_worker` runs it in a fresh `python -m bench _worker ...` subprocess; `aggregate` turns the workers' dicts
into medians, spreads, ratios and targets. The parent's loop is bench/cli.py (run_benchmark), the report and
result files bench/report.py, the registry of workloads bench/workloads/__init__.py.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
# Printed wherever a run or its help mentions the CUDA path (descriptions, --device), so that it is said the same way
# everywhere and removed in one place once a GPU run has calibrated it.
CUDA_STATUS = "the CUDA path has not been run on a GPU yet: written and plumbing-tested on a CPU-only machine"


# --------------------------------------------------------------------------------------------------
# What a workload is
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
    """`numerator / denominator` of `metric` ("time" = median step time, "memory" = working MiB, "flop_rate" =
    achieved FLOP/s, see `metric_value`), checked only on the device types in `devices`."""

    label: str
    metric: str
    numerator: str
    denominator: str
    op: str  # ">=", "<=", ">" or "<"
    threshold: float
    devices: tuple[str, ...] = ("cpu", "cuda")  # e.g. ("cuda",): a GPU target, not shown for CPU runs

    def check(self, ratio: float) -> bool:
        compare = {">=": ratio >= self.threshold, "<=": ratio <= self.threshold,
                   ">": ratio > self.threshold, "<": ratio < self.threshold}
        return compare[self.op]


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
    # (contender, device) -> why it does not run on that device (e.g. a CUDA-only kernel on the CPU), or None
    device_skip_reason: Callable[[str, str], str | None] | None = None
    # One extra profiled step (tensor_peak_mib) in round 0; off where a step is a whole sweep.
    profile_tensor_peak: bool = True
    devices: tuple[str, ...] = ("cpu",)  # device types it runs on (--device)
    # quick -> {shape set name: shapes} run on CUDA instead of the one `shapes(quick)` (see shape_sets)
    cuda_shape_sets: Callable[[bool], dict[str, dict[str, Any]]] | None = None
    cpu_only_contenders: tuple[str, ...] = ()  # skipped, with the reason printed, on any other device
    # (aggregate, shapes) -> report lines comparing the contenders' results; "[MISMATCH]" in a line fails the run
    crosscheck: Callable[[dict[str, Any], dict[str, Any] | None], list[str]] | None = None


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
        if reason is None and workload.device_skip_reason:
            reason = workload.device_skip_reason(name, device)
        if reason:
            reasons[name] = reason
    return reasons


# --------------------------------------------------------------------------------------------------
# Measurement inside a worker
# --------------------------------------------------------------------------------------------------


def device_barrier(device: str) -> Callable[[], None]:
    """What to call before reading the clock: CUDA kernels run asynchronously, so a step has only finished once
    torch.cuda.synchronize() returns; on the CPU an op has finished when it returns."""
    if device.split(":")[0] != "cuda":
        return lambda: None
    import torch

    return torch.cuda.synchronize


class CpuShare:
    """How busy the machine was with OTHER processes: (system busy CPU time - this process's and its children's
    CPU time) / (wall time x logical CPUs), since construction. 0 on a quiet machine; contention makes timings slow."""

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
        """This process's CPU time, with its children's: the exited ones (children_*) and the live ones (e.g.
        the rank processes of the `ddp` workload, which do its work)."""
        t = self._proc.cpu_times()
        own = t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)
        for child in self._proc.children(recursive=True):
            try:
                c = child.cpu_times()
            except self._psutil.Error:  # exited meanwhile
                continue
            own += c.user + c.system
        return own

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

    `shapes` (default: workload.shapes(quick), the CPU set) names the device. Working memory is the growth of
    onelayer_fast.memory.PeakMemory's peak over its reading before the warm-up step: the process RSS sampled every
    5 ms on the CPU; on CUDA torch.cuda.max_memory_allocated, every clock read follows a torch.cuda.synchronize(),
    and there is no profiled step (its memory events would mix host and device bytes)."""
    import torch

    from onelayer_fast.memory import PeakMemory

    shapes = workload.shapes(quick) if shapes is None else shapes
    on_cuda = device_type(shapes) == "cuda"
    barrier = device_barrier(device_type(shapes))
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    runner = workload.setup(contender, shapes, seed)
    barrier()
    setup_s = time.perf_counter() - t0
    gc.collect()
    host = PeakMemory("cpu", interval=0.005)  # the process RSS, read on every device
    meter = PeakMemory(shapes["device"]) if on_cuda else host  # what working memory is measured on
    rss_baseline = host.current()
    baseline = meter.current()

    prepare = runner.before_step or (lambda: None)
    prepare()
    barrier()
    t0 = time.perf_counter()
    warmup_history = runner.step()
    barrier()
    warmup_s = time.perf_counter() - t0
    after_warmup = host.current()
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
    if on_cuda:  # the process RSS above is host memory only; these are the device's
        cuda_memory = {"memory_source": "torch.cuda.max_memory_allocated", "cuda_baseline_mib": baseline / 2**20,
                       "cuda_after_warmup_mib": device_after_warmup / 2**20, "cuda_peak_mib": meter.peak_mib,
                       "gpu": torch.cuda.get_device_name()}
    return {
        "contender": contender,
        "steps": steps,
        "times_s": times,
        "setup_s": setup_s,
        "warmup_s": warmup_s,
        "rss_baseline_mib": rss_baseline / 2**20,
        "rss_after_warmup_mib": after_warmup / 2**20,
        "rss_peak_mib": None if on_cuda else host.peak_mib,  # not sampled on CUDA
        "working_mib": meter.growth_mib(baseline),
        "rss_samples": host.samples,
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


# --------------------------------------------------------------------------------------------------
# The parent: worker subprocesses interleaved over rounds, aggregation
# --------------------------------------------------------------------------------------------------


def spawn_worker(workload: str, contender: str, steps: int, quick: bool, seed: int, tensor_peak: bool,
                 device: str = "cpu", shape_set: str = "") -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench", "_worker", workload, contender,
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


def rate(flops: float | None, seconds: float, unit: float) -> float | None:
    """FLOP/s in `unit` (1e9: GFLOP/s, 1e12: TFLOP/s); None where no count is defined."""
    return flops / seconds / unit if flops else None


def metric_value(entry: dict[str, Any], metric: str) -> float | None:
    """One contender's value of a ratio or target metric: "time" its median step time, "memory" its working MiB,
    "flop_rate" its achieved FLOP/s by the workload's count where that applies to it (the floor of the workload's
    op), else by its own count (a probe that is not the op, e.g. a plain matmul)."""
    if metric == "time":
        return entry["median_s"]
    if metric == "memory":
        return entry["working_mib"]
    if metric == "flop_rate":
        return entry.get("floor_tflop_per_s") or entry.get("kernel_tflop_per_s")
    raise ValueError(f"unknown metric {metric!r}")


def aggregate(workload: Workload, shapes: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per contender: time statistics, tokens/s, FLOP/s, memory, validity; then the workload's ratios and targets.

    FLOP/s: `gflop_per_s` / `floor_tflop_per_s` by the workload's count (workload.flops_per_step; a worker whose
    Runner.info sets "floor_flops" overrides it for its contender, None: the count does not apply), and
    `kernel_tflop_per_s` by the contender's own count where its worker gives one (Runner.info "kernel_flops")."""
    tokens = workload.tokens_per_step(shapes)
    if tokens is None:  # counted by the workers on the batch they built (their cross-check compares the batches)
        tokens = next((r["tokens_per_step"] for r in runs if "tokens_per_step" in r), None)
    workload_flops = workload.flops_per_step(shapes) if workload.flops_per_step else None
    per: dict[str, Any] = {}
    for name in workload.contenders:
        mine = [r for r in runs if r["contender"] == name]
        if not mine:
            continue
        times = [t for r in mine for t in r["times_s"]]
        working = [r["working_mib"] for r in mine]
        median = statistics.median(times)
        floor_flops = mine[0]["floor_flops"] if "floor_flops" in mine[0] else workload_flops
        kernel_flops = mine[0].get("kernel_flops")
        per[name] = {
            "median_s": median,
            "min_s": min(times),
            "max_s": max(times),
            "q25_s": quantile(times, 0.25),
            "q75_s": quantile(times, 0.75),
            "tokens_per_s": mine[0].get("tokens_per_step", tokens) / median,
            "gflop_per_s": rate(floor_flops, median, 1e9),
            "floor_tflop_per_s": rate(floor_flops, median, 1e12),
            "kernel_flops_per_step": kernel_flops,
            "kernel_tflop_per_s": rate(kernel_flops, median, 1e12),
            "kernel_flops_definition": mine[0].get("kernel_flops_definition"),
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

    def ratio_of(metric: str, num: str, den: str) -> float | None:
        if num not in per or den not in per:
            return None
        a, b = metric_value(per[num], metric), metric_value(per[den], metric)
        return a / b if a is not None and b else None

    ratios = {}
    for metric, num, den in workload.ratios:
        ratio = ratio_of(metric, num, den)
        if ratio is not None:
            ratios[f"{metric}:{num}/{den}"] = ratio
            if metric == "time":  # the best step of each: the least contention-sensitive estimate
                ratios[f"time_min:{num}/{den}"] = per[num]["min_s"] / per[den]["min_s"]
            if metric == "memory" and per[num]["tensor_peak_mib"] and per[den]["tensor_peak_mib"]:
                ratios[f"tensor_peak:{num}/{den}"] = per[num]["tensor_peak_mib"] / per[den]["tensor_peak_mib"]
    targets = []
    for t in workload.targets:
        ratio = ratio_of(t.metric, t.numerator, t.denominator) if device_type(shapes) in t.devices else None
        if ratio is not None:
            targets.append({"label": t.label, "metric": t.metric, "ratio": ratio, "op": t.op,
                            "threshold": t.threshold, "pass": t.check(ratio)})
    return {"tokens_per_step": tokens, "contenders": per, "ratios": ratios, "targets": targets}


def crosscheck_failed(lines: list[str]) -> bool:
    """A cross-check hook marks a failed comparison with "[MISMATCH]"; the run then exits non-zero."""
    return any("[MISMATCH]" in line for line in lines)


def scratch_dir(prefix: str) -> Path:
    """A temporary directory removed when the worker exits (checkpoints / the model copy TRL reloads)."""
    import atexit
    import shutil

    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path
