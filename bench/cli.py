"""`python -m bench`: the command line, which workloads a run covers, and the parent's loop over shape sets.

`python -m bench WORKLOAD [flags]` runs one workload; `python -m bench --quick [flags]` runs every registered
workload at its CI size, one after the other (each as `python -m bench WORKLOAD --quick` would), and exits non-zero
if any of them failed. `python -m bench gpu-suite` runs the GPU tests and benchmarks (bench/gpu_suite.py).
`python -m bench _worker ...` is the worker subprocess the parent spawns per contender.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench
from bench import report
from bench.harness import (CUDA_STATUS, RESULTS, Workload, aggregate, crosscheck_failed, device_type, resolve_device,
                           round_order, run_profile, run_worker, shape_sets, skip_reasons, spawn_worker, split_steps,
                           wait_until_idle)
from bench.workloads import WORKLOADS


def build_parser() -> argparse.ArgumentParser:
    intro, details = bench.__doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(prog="python -m bench", description=intro,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=details)
    p.add_argument("workload", nargs="?", choices=sorted(WORKLOADS),
                   help="the workload to run; omitted with --quick: every workload, one after the other")
    p.add_argument("--quick", action="store_true", help="small model, 2 steps: a smoke run in under a minute")
    p.add_argument("--repeats", type=int, default=None, help="measured steps per contender (default 5; quick 2)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds the repeats are spread over (default 2; quick 1)")
    p.add_argument("--out", default=None, help="JSON result path (default bench/results/<workload>-<device>.json, "
                                               "<device> = cpu or the GPU's name; a named shape set (CUDA) appends "
                                               "-<shape set>; --quick writes nothing unless --out is given). "
                                               "Without a workload: a directory, each workload's files in it")
    p.add_argument("--device", default=None,
                   help="cpu or cuda[:N] (default: cuda where torch sees a GPU and the workload has a CUDA path, "
                        f"else cpu; `step` and `grpo_loss` have one: {CUDA_STATUS}). Without a workload, the "
                        "workloads that do not run on the device are skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-idle", type=float, default=120.0, metavar="SECONDS",
                   help="before each subprocess wait (at most this long) until other processes use < 15%% "
                        "of the CPUs (default 120; 0 = never wait)")
    p.add_argument("--only", nargs="+", metavar="CONTENDER", help="run only these contenders (needs a workload)")
    p.add_argument("--profile", metavar="CONTENDER",
                   help="profile one warm step of CONTENDER instead of benchmarking (needs a workload)")
    p.add_argument("--sort", default="self_cpu_time_total", help="profiler table sort key")
    p.add_argument("--rows", type=int, default=25, help="profiler table rows")
    return p


def selected_workloads(args: argparse.Namespace) -> list[str]:
    """The workloads one command runs: the one named, or with --quick and no name every registered workload."""
    if args.workload is not None:
        return [args.workload]
    if not args.quick:
        raise SystemExit("name a workload (one of " + ", ".join(WORKLOADS) + "), or give --quick to run every "
                         "workload at its CI size")
    if args.only or args.profile:
        raise SystemExit("--only and --profile need a workload: contenders differ between workloads")
    return list(WORKLOADS)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        return worker_main(argv[1:])
    if argv and argv[0] == "gpu-suite":
        from bench import gpu_suite

        return gpu_suite.main(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in the JSON (main() may be called with arguments other than sys.argv)
    names = selected_workloads(args)
    if args.profile:
        workload = WORKLOADS[args.workload]
        run_profile(workload, args.profile, args.quick, args.seed, args.sort, args.rows,
                    device=resolve_device(args.device, workload))
        return 0
    if args.workload is not None:
        return run_benchmark(args, WORKLOADS[args.workload])
    return run_every_workload(args, names)


def run_every_workload(args: argparse.Namespace, names: list[str]) -> int:
    """`--quick` without a workload: each of `names` in turn, its files (with --out) in the directory --out; a summary
    line per workload at the end. A workload that does not run on the requested --device is skipped, not failed."""
    codes: dict[str, int | str] = {}
    for name in names:
        workload = WORKLOADS[name]
        if args.device is not None and args.device.split(":")[0] not in workload.devices:
            codes[name] = f"skipped: runs on {' / '.join(workload.devices)}, not on {args.device}"
            print(f"\n== {name}: {codes[name]}", flush=True)
            continue
        print(f"\n== {name}", flush=True)
        one = argparse.Namespace(**{**vars(args), "workload": name, "out": None, "out_dir": args.out})
        codes[name] = run_benchmark(one, workload)
    print("\nevery workload (--quick):")
    for name, code in codes.items():
        print(f"  {name:<12} {code if isinstance(code, str) else 'ok' if code == 0 else f'FAILED (exit {code})'}")
    return max((c for c in codes.values() if isinstance(c, int)), default=0)


def worker_main(argv: list[str]) -> int:
    """`python -m bench _worker WORKLOAD CONTENDER ...`: measure one contender, print one JSON line."""
    p = argparse.ArgumentParser(prog="python -m bench _worker")
    p.add_argument("workload", choices=sorted(WORKLOADS))
    p.add_argument("contender")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tensor-peak", action="store_true", help="after the measured steps, one profiled step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape-set", default="", help="which of the device's shape sets (shape_sets); '' on the CPU")
    a = p.parse_args(argv)
    workload = WORKLOADS[a.workload]
    shapes = shape_sets(workload, a.quick, a.device)[a.shape_set]
    result = run_worker(workload, a.contender, a.steps, a.quick, a.seed, a.tensor_peak, shapes=shapes)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def run_benchmark(args: argparse.Namespace, workload: Workload) -> int:
    """Every shape set of the workload on the chosen device, one after the other; exit 0 only if all are valid."""
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


def output_path(args: argparse.Namespace, workload: Workload, device: str) -> Path | None:
    """Where one run's JSON goes (CSV and PNG beside it): --out; else <workload>-<device>.json in the directory of a
    run of every workload (its --out), or for a full run in bench/results/; a quick run without --out: nowhere."""
    if args.out:
        return Path(args.out)
    out_dir = getattr(args, "out_dir", None)
    if out_dir or not args.quick:
        return Path(out_dir or RESULTS) / f"{workload.name}-{report.device_tag(device)}.json"
    return None


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
    report.print_report(wl, shapes, agg)
    cross = workload.crosscheck(agg, shapes) if workload.crosscheck else []
    for line in cross:
        print(f"  {line}")
    artifacts_dir.cleanup()
    for c in agg["contenders"].values():
        for r in c["runs"]:
            r.pop("artifact", None)  # temporary paths, gone now
    print(f"\ntotal wall time {time.perf_counter() - started:.1f} s")

    out = output_path(args, workload, device)
    if out:
        record = report.build_record(args, workload, shapes, shape_set, device, plan, repeats, runs, skipped, cross, agg)
        report.write_results(report.result_path(out, shape_set), record)
    valid = all(c["valid"] for c in agg["contenders"].values())
    return 0 if valid and not crosscheck_failed(cross) else 1
