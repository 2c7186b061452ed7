"""What a benchmark run reports: the table on stdout, and the results next to each other, same stem:
<workload>-<device>.json (the full record: machine, versions, git commit, shapes, every measurement), .csv (one
row per contender) and .png (a bar chart of every contender's ratios to onelayer_fast; needs the [plot] extra).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from bench.harness import REPO, Workload, device_type, tokens_definition

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
               "tokens_per_s", "gflop_per_s", "floor_tflop_per_s", "kernel_tflop_per_s", "working_mib",
               "working_mib_min", "working_mib_max", "tensor_peak_mib",
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
            "floor_tflop_per_s": c.get("floor_tflop_per_s"), "kernel_tflop_per_s": c.get("kernel_tflop_per_s"),
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
        print(f"TFLOP/s floor = the workload's FLOP count: {workload.flops_definition}")
        print(f"TFLOP/s own = {KERNEL_FLOPS_DEFINITION}")
    header = (f"{'contender':<20} {'median s':>9} {'min s':>8} {'max s':>8} {'IQR s':>15} {'tokens/s':>9} "
              + (f"{'TFLOP/s floor':>13} {'TFLOP/s own':>11} " if flops else "") +
              f"{'work MiB':>9} {'(range)':>15} {'tensor MiB':>10} {'n':>3} {'busy':>5} valid")
    print(header)
    print("-" * len(header))
    for name, c in per.items():
        iqr = f"{c['q25_s']:.3f}-{c['q75_s']:.3f}"
        wrange = f"{c['working_mib_min']:.0f}-{c['working_mib_max']:.0f}"
        n = sum(len(t) for t in c["raw_times_s"])
        tensor = f"{c['tensor_peak_mib']:.1f}" if c["tensor_peak_mib"] is not None else "-"
        gflops = f"{tflops(c.get('floor_tflop_per_s')):>13} {tflops(c.get('kernel_tflop_per_s')):>11} " if flops else ""
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
    if flops:
        print("own FLOP counts: " + "; ".join(f"{name}: {c['kernel_flops_definition'] or 'none'}"
                                                for name, c in per.items()))
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


KERNEL_FLOPS_DEFINITION = ("each contender's own FLOP count of one step (what its code computes, e.g. a logits "
                           "recompute in the backward; listed per contender under the table) / median time")


def tflops(value: float | None) -> str:
    """TFLOP/s for the table: 3 significant digits (a CPU gives ~0.01, a GPU hundreds); '-' where not counted."""
    return "-" if value is None else f"{value:.3g}"


MEMORY_DEFINITION_CUDA = ("working_mib: torch.cuda.max_memory_allocated during the measured steps (peak counter reset "
                          "before them) minus torch.cuda.memory_allocated after building model, reference, optimizer "
                          "and rollouts (before the warm-up step); live tensor bytes, allocator caching excluded. "
                          "cuda_peak_mib per run: that peak itself. No tensor_peak_mib on CUDA")



def build_record(args, workload: Workload, shapes: dict[str, Any], shape_set: str, device: str, plan: list[int],
                 repeats: int, runs: list[dict[str, Any]], skipped: dict[str, str], cross: list[str],
                 agg: dict[str, Any]) -> dict[str, Any]:
    """The JSON record of one shape set: the machine, versions, command, shapes, definitions, every measurement."""
    import torch
    import transformers

    return {
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
        "command": " ".join(["python -m bench"] + list(args.argv)),
        "shapes": shapes,
        "repeats": repeats,
        "rounds": plan,
        "seed": args.seed,
        "tokens_definition": tokens_definition(workload, shapes),
        **({"flops_definition": workload.flops_definition, "kernel_flops_definition": KERNEL_FLOPS_DEFINITION,
            "kernel_flops_definitions": {n: c["kernel_flops_definition"] for n, c in agg["contenders"].items()}}
           if workload.flops_per_step else {}),
        "memory_definition": MEMORY_DEFINITION_CUDA if device_type(shapes) == "cuda" else workload.memory_definition,
        "skipped": skipped,
        "crosscheck": cross,
        # contender -> packing.layout_stats of its update layout (step workloads): token share vs padded
        "layout_stats": {n: c["runs"][0]["layout_stats"] for n, c in agg["contenders"].items()
                         if c["runs"] and c["runs"][0].get("layout_stats")},
        **agg,
    }


def write_results(path: Path, record: dict[str, Any]) -> None:
    """`record` as <path> (JSON), and next to it, same stem, the .csv and .png (bench/results/step-cpu.{json,csv,png})."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    write_csv(path.with_suffix(".csv"), record)
    print(f"wrote {path.with_suffix('.csv')}")
    note = write_ratio_chart(path.with_suffix(".png"), record)
    print(note if note else f"wrote {path.with_suffix('.png')}")
