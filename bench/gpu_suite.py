"""`python -m bench gpu-suite`: the project's GPU checks in one command, within a time budget.

On a machine with CUDA it runs, one after the other, each in its own subprocess with its own time limit:
    pytest-gpu   `pytest -m gpu tests`: the GPU-marked tests (compiled Triton kernels against float64 oracles)
    grpo_loss    `python -m bench grpo_loss --device cuda`: the loss benchmark on its CUDA shape set, with the matmul
                 probe and the float64 slice check (bench/workloads/grpo_loss.py)
    step         `python -m bench step --device cuda`: the update cycle at the Qwen2.5-0.5B and -1.5B shapes
    sweep        the lanes sweep: listed as skipped while the `sweep` workload has no CUDA path; it runs, in its
                 turn, once it has one
then writes <out-dir>/gpu-suite-<gpu>-<YYYY-MM-DD>.json (default out-dir bench/results; <gpu> as in the benchmark
files, e.g. h100-80gb-hbm3; the date in UTC): the GPU, date, commit, versions, budget, and per part its command,
time limit, seconds, exit code, outcome, the last lines of its output and the files it wrote, with each benchmark
file's medians, FLOP rates, targets and checks copied in (so the record stands after a later run overwrites those
files). Exit 0 only if every part that runs passes; a part that fails or runs out of time makes it 1. Without CUDA
it says so and exits 2 before anything else.

Budget: SUITE_BUDGET_S in all, under 8 minutes. Each part has a share (BENCHMARKS, PYTEST_BUDGET_S) and may also use
what the parts before it left unused, never so much that the parts after it lose their shares. A part that runs out
of time is stopped (its whole process group: the benchmark parents' worker subprocesses too) and counts as failed.
Repeats are chosen to fit the shares: one round per benchmark (rounds interleave contenders against drift of a
shared CPU, which a GPU run does not need); every worker starts a fresh process (import torch, init CUDA, build the
inputs) whose start costs more than its measured steps.
"""
from __future__ import annotations

import argparse
import collections
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bench import report
from bench.harness import REPO, RESULTS, shape_sets
from bench.workloads import WORKLOADS

SUITE_BUDGET_S = 470.0  # 7 min 50 s: under the 8 minutes a GPU check may take, with a margin for writing the record
PYTEST_BUDGET_S = 120.0
# (workload, share of the budget in s, repeats, repeats with --quick), run in this order after the tests.
BENCHMARKS = (
    ("grpo_loss", 150.0, 10, 3),  # 5 workers (liger where installed), each ~0.1-0.5 s per step: startup dominates
    ("step", 200.0, 2, 1),  # 2 shape sets x 5 contenders = 10 workers, each builds a 0.5B / 1.5B model on the GPU
    ("sweep", 0.0, 1, 1),  # no CUDA path yet: skipped; give it a share (from the others) when it gains one
)
assert PYTEST_BUDGET_S + sum(b[1] for b in BENCHMARKS) == SUITE_BUDGET_S


@dataclass(frozen=True)
class Part:
    name: str
    argv: tuple[str, ...]  # the command, run from the repository root
    budget_s: float  # its share of SUITE_BUDGET_S
    outputs: tuple[str, ...] = ()  # the files it writes
    skip: str | None = None  # why it does not run on this machine


def suite_stem(tag: str, day: str, quick: bool) -> str:
    return f"gpu-suite-{tag}-{day}" + ("-quick" if quick else "")


def suite_plan(tag: str, day: str, out_dir: Path, quick: bool = False) -> list[Part]:
    """The parts, in order: the GPU tests, then each benchmark of BENCHMARKS on CUDA (or its reason to skip)."""
    junit = out_dir / f"{suite_stem(tag, day, quick)}-pytest.xml"
    parts = [Part("pytest-gpu", (sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                                 f"--junitxml={junit}", "tests"), PYTEST_BUDGET_S, (str(junit),))]
    for name, share, repeats, quick_repeats in BENCHMARKS:
        workload = WORKLOADS[name]
        if "cuda" not in workload.devices:
            parts.append(Part(name, (), share, skip=f"the {name} workload has no CUDA path (it runs on "
                                                    f"{' / '.join(workload.devices)})"))
            continue
        base = out_dir / f"{name}-{tag}.json"  # each shape set's file: <name>-<tag>-<shape set>.json
        outputs = tuple(str(report.result_path(base, s)) for s in shape_sets(workload, quick, "cuda"))
        argv = (sys.executable, "-m", "bench", name, "--device", "cuda",
                "--repeats", str(quick_repeats if quick else repeats), "--rounds", "1", "--wait-idle", "0",
                "--out", str(base)) + (("--quick",) if quick else ())
        parts.append(Part(name, argv, share, outputs))
    return parts


# --------------------------------------------------------------------------------------------------
# Running one part
# --------------------------------------------------------------------------------------------------

PartRunner = Callable[[list[str], float], dict[str, Any]]  # (command, time limit in s) -> exit_code, timed_out, tail


def run_part(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run `argv` from the repository root, its output streamed through to ours (the last 40 lines kept), until it
    exits or `timeout` s have passed; then its process group is stopped (TERM, then KILL). TRITON_INTERPRET is
    removed from its environment: interpreted kernels would skip the GPU tests and time the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    tail: collections.deque[str] = collections.deque(maxlen=40)

    def pump() -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        code = proc.wait()
    reader.join(timeout=5)
    return {"exit_code": code, "timed_out": timed_out, "tail": list(tail)}


def output_summary(path: Path) -> dict[str, Any] | None:
    """What the suite record keeps of a file a part wrote: a benchmark JSON's per-contender medians, FLOP rates,
    memory and validity, its ratios, targets, checks and skips; a JUnit XML's test counts. None if absent."""
    if not path.exists():
        return None
    if path.suffix == ".xml":
        root = ET.parse(path).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        return {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    record = json.loads(path.read_text())
    keep = ("median_s", "floor_tflop_per_s", "kernel_tflop_per_s", "kernel_flops_definition", "working_mib", "valid")
    return {"description": record.get("description"),
            "contenders": {n: {k: c.get(k) for k in keep} for n, c in record.get("contenders", {}).items()},
            "ratios": record.get("ratios"), "targets": record.get("targets"), "crosscheck": record.get("crosscheck"),
            "skipped": record.get("skipped")}


# --------------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    intro, details = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(prog="python -m bench gpu-suite", description=intro, epilog=details,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=str(RESULTS), help="where the suite JSON and the benchmark files go "
                                                           "(default bench/results)")
    p.add_argument("--budget", type=float, default=SUITE_BUDGET_S,
                   help=f"seconds for the whole suite (default {SUITE_BUDGET_S:.0f}); the parts' shares scale to it")
    p.add_argument("--quick", action="store_true", help="benchmarks at their quick shapes, fewer repeats (a smoke "
                                                        "run); the record is named ...-quick.json")
    return p


def main(argv: list[str], runner: PartRunner = run_part, clock: Callable[[], float] = time.monotonic,
         today: str | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"python -m bench gpu-suite needs CUDA: torch {torch.__version__} sees no CUDA device here. Nothing "
              f"was run. Run it on a machine with a GPU.", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0)
    tag = report.gpu_tag(gpu)
    day = today or _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scale = args.budget / SUITE_BUDGET_S
    parts = [Part(p.name, p.argv, p.budget_s * scale, p.outputs, p.skip)
             for p in suite_plan(tag, day, out_dir, args.quick)]
    print(f"gpu-suite on {gpu}, {day}: budget {args.budget:.0f} s; parts "
          + ", ".join(f"{p.name} ({'skipped' if p.skip else f'{p.budget_s:.0f} s'})" for p in parts), flush=True)

    start = clock()
    deadline = start + args.budget
    results = []
    for i, part in enumerate(parts):
        entry: dict[str, Any] = {"name": part.name, "command": " ".join(part.argv), "budget_s": part.budget_s}
        if part.skip:
            print(f"\n== {part.name}: skipped: {part.skip}", flush=True)
            results.append({**entry, "outcome": "skipped", "reason": part.skip})
            continue
        later = sum(p.budget_s for p in parts[i + 1:] if not p.skip)  # kept for the parts after this one
        limit = deadline - clock() - later
        if limit <= 0:
            print(f"\n== {part.name}: not run: no time left in the budget", flush=True)
            results.append({**entry, "outcome": "not run: no time left", "limit_s": 0.0})
            continue
        print(f"\n== {part.name} (limit {limit:.0f} s): {entry['command']}", flush=True)
        t0 = clock()
        run = runner(list(part.argv), limit)
        seconds = clock() - t0
        code = run["exit_code"]
        outcome = "timed out" if run["timed_out"] else "passed" if code == 0 else f"failed (exit {code})"
        outputs = [{"path": path, "summary": output_summary(Path(path))} for path in part.outputs]
        print(f"== {part.name}: {outcome} in {seconds:.1f} s (limit {limit:.0f} s)", flush=True)
        results.append({**entry, "limit_s": limit, "seconds": seconds, "exit_code": code, "outcome": outcome,
                        "outputs": outputs, "output_tail": run.get("tail", [])})
    total = clock() - start
    passed = all(r["outcome"] in ("passed", "skipped") for r in results)

    print(f"\ngpu-suite on {gpu}: {'passed' if passed else 'FAILED'} in {total:.1f} s (budget {args.budget:.0f} s)")
    for r in results:
        took = f"{r['seconds']:7.1f} s" if "seconds" in r else " " * 9
        print(f"  {r['name']:<11} {took}  {r['outcome']}" + (f": {r['reason']}" if r.get("reason") else ""))
    path = out_dir / f"{suite_stem(tag, day, args.quick)}.json"
    record = {
        "suite": "gpu-suite", "gpu": gpu, "device_tag": tag, "date": day, "quick": args.quick,
        "command": " ".join(["python -m bench gpu-suite"] + list(argv)),
        **report.device_info("cuda"), "versions": report.package_versions(), "git": report.git_info(),
        "budget_s": args.budget, "total_s": total, "passed": passed, "parts": results,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0 if passed else 1
