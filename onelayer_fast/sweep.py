"""Layer sweeps: Base, Full and Single(i) runs with the same data, seeds and hyper-parameters, each
evaluated greedily, combined into the paper's per-layer contribution

    contribution(i) = (Single(i) - Base) / (Full - Base)        (undefined when Full == Base)

The protocol: every arm (Full and each layer) trains at every learning rate of the grid
(`learning_rates`; Full at `full_learning_rates` when given, since a whole model and one layer can want
rates an order of magnitude apart, more than one 3-point grid brackets) with `seeds` training seeds each
(grpo.seed, grpo.seed + 1, ...). Per arm, the rate
with the best validation score (mean over seeds; the smaller rate on ties) is selected; the arm's
reported score is that rate's test score, mean over seeds. Validation is scored only when there is a
rate to choose. 95% intervals come from a paired bootstrap over the test problems and the seeds
(stats.paired_bootstrap), contribution computed inside each resample.

Layout of a sweep directory DIR:
    sweep.json                 the settings; a rerun with different settings is refused
    .sweep.lock                flocked while a sweep runs here, holding its pid: a second sweep into DIR
                               fails at once; the kernel drops the lock when that process dies (even by kill -9)
    runs/<name>/               one GRPOTrainer output_dir per run (`full`, `layer-05`, `layer-05-lr3e-05-seed43`
                               when there are several rates / seeds): checkpoints, log.jsonl
    runs/<name>/result.json    the run's evaluated result (with every test and validation score), written
                               atomically when the run finishes
    results.csv, results.json  the table (one row per layer); results.json keeps every run
    contribution.png           contribution per layer with interval bars (needs matplotlib), and
    lr_heatmap.png             validation gain over (arm x learning rate), when the grid has several rates
    report.md                  settings, table and plain answers to the paper's questions

Lanes: the single-layer runs train as lanes of one LaneTrainer (lanes.py), as many at once as `lanes`
says (`auto`: as many as a memory budget allows, see plan_lanes), in waves; `lanes=1` runs them one after
another. Every lane writes the same files as a single run, and lanes compute what they would alone, so the
table does not depend on `lanes`. Base is evaluated as loaded; Full (every weight trains) is its own run.

Jobs and executors: the runs still to do become jobs, one per Base, per Full run (per rate and seed), per
lane wave (and per single-layer run of an environment task); each job loads a fresh model, trains, evaluates
and writes its runs' result.json itself. An executor (executors.py, `executor`) runs the list: `local` in this
process one after another, `ray` as Ray tasks (one GPU each on a CUDA device, retried when a worker dies, and
then resumed from the run's checkpoints as below), which need the sweep directory on storage every worker
sees at the same path. The driver alone holds the lock and writes sweep.json and the tables; the executor
changes no result, and is not a setting: a sweep resumes under either.

Resume: a rerun of the same sweep skips runs that have a result.json and lets the trainer resume a
half-finished run from its latest checkpoint, so a kill loses at most the steps since that checkpoint.
A directory holding only the leftovers of a kill during the very first settings write (a temp or a torn
sweep.json, the lock file) ran nothing yet and starts over.
"""
from __future__ import annotations

import copy
import fcntl
import csv
import dataclasses
import functools
import gc
import importlib.util
import io
import json
import math
import os
import random
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .episodes import is_environment_task
from .evaluate import EvalResult, evaluate, evaluate_lanes
from .executors import EXECUTORS, Executor, Job, LocalExecutor, RayExecutor
from .lane_trainer import LaneRun, LaneTrainer
from .lanes import Lane
from .layout import auto_layout
from . import report
from .memory import PeakMemory
from .models import load_model
from .models.presets import check_model_source
from .policy import decoder_of
from .rollout import encode_prompts
from .stats import BootstrapResult, contribution_components, paired_bootstrap, problems_needed
from .tasks import eval_examples, get_task, val_examples
from .trainer import GRPOConfig, GRPOTrainer, RunSpec, finite_positive, flag
from .update import DivergenceError

# 2: single-layer runs sample with keyed draws (sampling.py), as lanes. 3: learning-rate grid, seeds,
# validation split, per-problem scores and bootstrap intervals.
FORMAT_VERSION = 3
METRICS = ("accuracy", "mean_reward")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
SETTINGS_NAME = "sweep.json"
LOCK_NAME = ".sweep.lock"
RESULT_NAME = "result.json"
CSV_COLUMNS = (
    "layer", "base", "full", "single", "contribution",
    "single_seconds", "single_tokens", "single_peak_memory_mib",
    "full_seconds", "full_tokens", "full_peak_memory_mib",
    "base_reward", "full_reward", "single_reward",
    "selected_learning_rate", "n_seeds", "single_ci_low", "single_ci_high",
    "contribution_ci_low", "contribution_ci_high", "p_recovers_80",
)
RECOVER_THRESHOLD = 0.8  # the share of Full's gain that counts as recovering it (p_recovers_80)
BOOTSTRAP_RESAMPLES = 10_000
# The SweepConfig fields that choose where the jobs run (cli.py makes each a `sweep` flag)
EXECUTOR_FIELDS = ("executor", "ray_address", "ray_gpus_per_job", "ray_cpus_per_job", "ray_max_retries")


# -------------------------------------------------------------------------------------- small math

def contribution(single: float, base: float, full: float) -> float | None:
    """(single - base) / (full - base); None when full == base (no gain to share)."""
    gain = full - base
    if abs(gain) < 1e-12:
        return None
    return (single - base) / gain + 0.0  # + 0.0: no "-0.000" in tables when single == base and full < base


def middle_layers(num_layers: int) -> list[int]:
    """The middle third of the stack: drop floor(n / 3) layers from each end, i.e. range(n // 3, n - n // 3).

    28 layers (Qwen2.5-1.5B) -> 9..18, 36 (Qwen2.5-3B / Qwen3-4B) -> 12..23, 4 -> 1..2, 1 or 2 -> all.
    """
    return list(range(num_layers // 3, num_layers - num_layers // 3))


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """A layer spec -> sorted distinct layer indices in [0, num_layers).

    `all`; `middle` (see middle_layers); or a comma list of indices and inclusive ranges, e.g.
    `0,5,10-14`. Negative indices count from the end (`-1` is the last layer, `-3--1` the last three).
    Raises ValueError for empty items, malformed items, out-of-range indices and descending ranges.
    """
    if num_layers < 1:
        raise ValueError(f"the model has no decoder layers (num_layers={num_layers})")
    text = spec.strip().lower()
    if text == "all":
        return list(range(num_layers))
    if text == "middle":
        return middle_layers(num_layers)
    valid = f"valid: 0..{num_layers - 1}, or -{num_layers}..-1 from the end"

    def index(token: str) -> int:
        value = int(token)
        resolved = value + num_layers if value < 0 else value
        if not 0 <= resolved < num_layers:
            raise ValueError(f"layer {value} in {spec!r} is out of range for a model with {num_layers} layers ({valid})")
        return resolved

    chosen: set[int] = set()
    for item in text.split(","):
        item = item.strip()
        if single := re.fullmatch(r"-?\d+", item):
            chosen.add(index(single.group(0)))
        elif span := re.fullmatch(r"(-?\d+)\s*-\s*(-?\d+)", item):
            start, stop = index(span.group(1)), index(span.group(2))
            if start > stop:
                raise ValueError(f"range {item!r} in {spec!r} is descending (layers {start} > {stop})")
            chosen.update(range(start, stop + 1))
        else:
            raise ValueError(f"bad layer spec {spec!r}: item {item!r} is not an index or a range a-b; "
                             "use all, middle, or e.g. 0,5,10-14 (negative indices count from the end)")
    return sorted(chosen)


# ----------------------------------------------------------------------------------------- device

def resolve_device(name: str | None, what: str = "device") -> torch.device:
    """`name` as a device that exists on this machine (None: cuda when available, else cpu).

    Raises ValueError (naming `what`, e.g. the CLI flag) for a malformed name or a device that is not
    here, so that a typo fails before a model is loaded rather than at its first `.to(device)`.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{what} {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {name!r}: CUDA is not available on this machine; use cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{what} {name!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
        return device
    if device.type == "mps" and torch.backends.mps.is_available():
        return device
    raise ValueError(f"{what} {name!r} is not available here; use cpu, cuda or cuda:N")


# ----------------------------------------------------------------------------------------- config

@dataclass
class SweepConfig:
    """What to sweep. `grpo` holds every training knob (max_steps, learning_rate, seed, ...), the same for
    every run; each run's RunSpec (output directory, mode, layer) comes from the sweep."""

    model: str  # a preset name or a local HF model directory
    out: str  # the sweep directory
    task: str = "arithmetic"
    task_path: str | None = None
    layers: str = "middle"  # see parse_layers
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval_size: int = 200  # test examples (the reported scores), the same for every run
    val_size: int = 100  # validation examples, for choosing each arm's learning rate (scored only then)
    eval_seed: int = 0  # which test and validation examples
    learning_rates: tuple[float, ...] | None = None  # the grid every arm trains at; None: (grpo.learning_rate,)
    full_learning_rates: tuple[float, ...] | None = None  # Full's own grid; None: learning_rates
    seeds: int = 1  # training seeds per (arm, learning rate): grpo.seed, grpo.seed + 1, ...
    eval_batch_size: int = 64
    eval_max_new_tokens: int | None = None  # None: grpo.max_completion_length
    metric: str = "accuracy"  # what Base / Full / Single and the contribution are measured in
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str = "float32"
    progress: bool = True
    save_steps: int = 50  # checkpoint cadence of every run (does not change what a run computes)
    save_total_limit: int = 2
    lanes: int | str = "auto"  # single-layer runs trained at once: a number, or "auto" (plan_lanes)
    memory_budget_mib: float | None = None  # what "auto" lanes may use; None: a share of the free memory
    # Where the jobs (Base, each Full run, each lane wave) run; not a setting of the results (not in sweep.json):
    # a sweep started with one executor resumes with the other. cli.py makes these fields its flags.
    executor: str = field(default="local", metadata={
        "choices": EXECUTORS, "help": "where the sweep's jobs run: local (this process, one after another) or ray"})
    ray_address: str | None = field(default=None, metadata={
        "help": "with --executor ray: the cluster to join, host:port (none: start a local Ray cluster)"})
    ray_gpus_per_job: float | None = field(default=None, metadata={
        "help": "with --executor ray: GPUs each job asks Ray for (none: 1 on a CUDA --device, else 0)"})
    ray_cpus_per_job: float = field(default=1.0, metadata={
        "help": "with --executor ray: CPUs each job asks Ray for (Ray sets the job's OMP_NUM_THREADS to it)"})
    ray_max_retries: int = field(default=3, metadata={
        "help": "with --executor ray: reruns of a job whose worker dies; each resumes from its checkpoints"})

    def validate(self) -> None:
        """Every check that needs no model: a bad setting fails before anything loads or is written."""
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"sweep directory {self.out} exists and is not a directory")
        self.grpo.validate()
        # The checkpoint cadence every run gets, checked as its RunSpec will be, but before Base is evaluated.
        RunSpec(output_dir=str(Path(self.out) / "runs" / "full"), mode="full", save_steps=self.save_steps,
                save_total_limit=self.save_total_limit).validate()
        check_model_source(self.model)
        resolve_device(self.device)
        if self.lanes != "auto" and (not isinstance(self.lanes, int) or isinstance(self.lanes, bool) or self.lanes < 1):
            raise ValueError(f"lanes must be an integer >= 1 or 'auto', got {self.lanes!r}")
        if self.memory_budget_mib is not None and not finite_positive(self.memory_budget_mib):
            raise ValueError(f"memory_budget_mib must be a finite number > 0, got {self.memory_budget_mib}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.eval_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"eval_size and eval_batch_size must be >= 1, got {self.eval_size} and {self.eval_batch_size}")
        if self.eval_max_new_tokens is not None and self.eval_max_new_tokens < 1:
            raise ValueError(f"eval_max_new_tokens must be >= 1, got {self.eval_max_new_tokens}")
        if isinstance(self.val_size, bool) or not isinstance(self.val_size, int) or self.val_size < 1:
            raise ValueError(f"val_size must be an integer >= 1, got {self.val_size!r}")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds must be an integer >= 1, got {self.seeds!r}")
        for name in ("learning_rates", "full_learning_rates"):
            if getattr(self, name) is not None:
                _check_rates(name, tuple(getattr(self, name)))
        self._validate_executor()

    def _validate_executor(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {self.executor!r}")
        if self.executor != "ray":
            given = [name for name in ("ray_address", "ray_gpus_per_job") if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{', '.join(flag(name) for name in given)} is for --executor ray (executor is "
                                 f"{self.executor!r})")
        for name in ("ray_gpus_per_job", "ray_cpus_per_job"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        retries = self.ray_max_retries
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"ray_max_retries must be an integer >= 0, got {self.ray_max_retries!r}")
        if self.ray_address is not None and not self.ray_address.strip():
            raise ValueError("ray_address is empty: give host:port, or leave it out to start a local Ray cluster")

    def executor_for(self, device: torch.device) -> Executor:
        """The executor these settings name, for a sweep on `device` (not yet entered: nothing is started).
        Raises ExecutorError when --executor ray is asked for without Ray installed."""
        if self.executor == "local":
            return LocalExecutor()
        gpus = self.ray_gpus_per_job
        if gpus is None:
            gpus = 1.0 if device.type == "cuda" else 0.0
        elif gpus > 0 and device.type != "cuda":
            raise ValueError(f"ray_gpus_per_job is {gpus:g} but the sweep's device is {device}: its jobs would hold "
                             "GPUs they do not use; give --device cuda, or leave --ray-gpus-per-job out")
        return RayExecutor(address=self.ray_address, num_gpus=gpus, num_cpus=self.ray_cpus_per_job,
                           max_retries=self.ray_max_retries)

    @property
    def rates(self) -> tuple[float, ...]:
        """The learning-rate grid of the single-layer arms, ascending."""
        return tuple(sorted(float(r) for r in self.learning_rates)) if self.learning_rates else (self.grpo.learning_rate,)

    @property
    def full_rates(self) -> tuple[float, ...]:
        """Full's learning-rate grid, ascending: full_learning_rates, else the layers' grid."""
        return tuple(sorted(float(r) for r in self.full_learning_rates)) if self.full_learning_rates else self.rates

    @property
    def seed_values(self) -> tuple[int, ...]:
        return tuple(self.grpo.seed + k for k in range(self.seeds))

    @property
    def selects(self) -> bool:
        """Whether some arm has a learning rate to choose (and so a validation split to score)."""
        return len(self.rates) > 1 or len(self.full_rates) > 1


def _check_rates(name: str, rates: tuple) -> None:
    if not rates:
        raise ValueError(f"{name} is empty: give at least one rate, e.g. 5e-6,3e-5,2e-4")
    for rate in rates:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not finite_positive(rate):
            raise ValueError(f"every learning rate must be a finite number > 0, got {rate!r} in {name}")
    if len(set(rates)) != len(rates):
        raise ValueError(f"{name} has a rate twice: {', '.join(f'{r:g}' for r in rates)}")


# ------------------------------------------------------------------------------------------ results

@dataclass
class RunResult:
    """One trained (or, for Base, untrained) model, scored on the test split (and validation, when the
    sweep selects a learning rate)."""

    name: str  # "base", "full", "layer-05", "layer-05-lr3e-05-seed43"
    mode: str  # "base" (no training) | "full" | "single"
    layer: int | None
    accuracy: float  # test
    mean_reward: float  # test
    n: int  # test examples
    eval_seconds: float
    train_seconds: float  # sum of logged per-step wall times (rollout + update); counts each step once across resumes
    steps: int
    tokens: int  # prompt + completion tokens of every training rollout, summed over steps
    peak_memory_mib: float
    memory_kind: str  # "cuda_max_allocated" (torch.cuda.max_memory_allocated) or "rss_peak" (sampled RSS)
    learning_rate: float | None = None  # None for Base
    seed: int | None = None  # the training seed; None for Base
    correct: list[int] = field(default_factory=list)  # per test example, 1 where task.correct
    rewards: list[float] = field(default_factory=list)  # per test example
    val: dict[str, Any] | None = None  # the validation EvalResult as a dict; None when nothing was selected
    diverged: str | None = None  # why training diverged; such a run has no scores (0, empty) and is never selected

    def metric(self, name: str) -> float:
        return float(getattr(self, name))

    def scores(self, metric: str) -> list[float]:
        """Per-test-example values of `metric`, in the order of the test examples."""
        return [float(c) for c in self.correct] if metric == "accuracy" else list(self.rewards)

    def val_metric(self, metric: str) -> float:
        if self.val is None:
            raise ValueError(f"run {self.name} has no validation scores")
        return float(self.val[metric])


@dataclass
class ArmResult:
    """An arm (Base, Full or one layer) at its selected learning rate: its runs there, one per seed.
    Scores are means over those runs; costs are per run (mean), peak memory the highest."""

    name: str  # "base", "full", "layer-05"
    mode: str
    layer: int | None
    learning_rate: float | None  # the selected rate; None for Base
    runs: list[RunResult]  # ascending seed

    def _mean(self, key: str) -> float:
        return sum(float(getattr(r, key)) for r in self.runs) / len(self.runs)

    @property
    def accuracy(self) -> float:
        return self._mean("accuracy")

    @property
    def mean_reward(self) -> float:
        return self._mean("mean_reward")

    @property
    def n(self) -> int:
        return self.runs[0].n

    @property
    def seeds(self) -> int:
        return len(self.runs)

    @property
    def eval_seconds(self) -> float:
        return self._mean("eval_seconds")

    @property
    def train_seconds(self) -> float:
        return self._mean("train_seconds")

    @property
    def steps(self) -> int:
        return min(r.steps for r in self.runs)

    @property
    def tokens(self) -> int:
        return round(self._mean("tokens"))

    @property
    def peak_memory_mib(self) -> float:
        return max(r.peak_memory_mib for r in self.runs)

    @property
    def memory_kind(self) -> str:
        return self.runs[0].memory_kind

    def metric(self, name: str) -> float:
        return float(getattr(self, name))

    def scores(self, metric: str) -> list[list[float]]:
        """(seeds, test examples): what the bootstrap resamples."""
        return [r.scores(metric) for r in self.runs]


def _arm_key(run: RunResult) -> report.Arm:
    return report.FULL if run.mode == "full" else run.layer


def select_learning_rates(runs: list[RunResult], metric: str, base_val: float | None) -> tuple[dict, dict]:
    """Per arm (report.FULL or a layer), the learning rate with the best validation score (mean over
    seeds; the smaller rate on ties), and the validation gains {(arm, rate): mean - base_val} it chose
    from. Test scores are never read. A rate at which any of the arm's seeds diverged is not a candidate.
    Without validation (base_val None) every arm must have exactly one candidate rate, and takes it.
    Raises ValueError when an arm diverged at every rate (there is nothing to report for it)."""
    cells: dict[tuple[report.Arm, float], list[RunResult]] = {}
    for r in runs:
        if r.mode != "base":
            cells.setdefault((_arm_key(r), r.learning_rate), []).append(r)
    usable = {cell: rs for cell, rs in cells.items() if not any(r.diverged for r in rs)}
    for arm in dict.fromkeys(arm for arm, _ in cells):
        rates = sorted(rate for a, rate in cells if a == arm)
        candidates = [rate for a, rate in usable if a == arm]
        if not candidates:
            raise ValueError(f"{'Full' if arm == report.FULL else f'layer {arm}'} diverged at every learning rate "
                             f"({', '.join(f'{rate:g}' for rate in rates)}): nothing to report for it; "
                             "sweep smaller rates")
        if base_val is None and len(candidates) > 1:
            raise ValueError("selecting a learning rate needs Base's validation score")
    if base_val is None:
        return {arm: rate for arm, rate in usable}, {}
    gains = {cell: sum(r.val_metric(metric) for r in rs) / len(rs) - base_val for cell, rs in usable.items()}
    return report.best_learning_rates(gains), gains


@dataclass
class SweepResult:
    settings: dict[str, Any]
    metric: str
    base: ArmResult
    full: ArmResult
    singles: list[ArmResult]  # ascending layer, each at its selected learning rate
    out: Path
    stats: BootstrapResult  # intervals of the arms above (test scores at the selected rates)
    runs: list[RunResult] = field(default_factory=list)  # every run of the grid, Base first
    validation_gains: dict[tuple[report.Arm, float], float] = field(default_factory=dict)  # {} without a choice
    plot: Path | None = None  # contribution.png
    plots: list[Path] = field(default_factory=list)  # every plot written
    report_path: Path | None = None

    @property
    def contributions(self) -> dict[int, float | None]:
        base, full = self.base.metric(self.metric), self.full.metric(self.metric)
        return {r.layer: contribution(r.metric(self.metric), base, full) for r in self.singles}

    @property
    def full_equals_base(self) -> bool:
        return contribution(0.0, self.base.metric(self.metric), self.full.metric(self.metric)) is None

    @property
    def best_layer(self) -> int | None:
        """The layer with the highest Single(i) score (lowest index on ties); None without layers."""
        if not self.singles:
            return None
        return max(self.singles, key=lambda r: (r.metric(self.metric), -r.layer)).layer

    @property
    def diverged(self) -> list[RunResult]:
        return [r for r in self.runs if r.diverged]

    @property
    def selected_learning_rates(self) -> dict[report.Arm, float]:
        return {report.FULL: self.full.learning_rate, **{r.layer: r.learning_rate for r in self.singles}}

    def rows(self) -> list[dict[str, Any]]:
        contributions = self.contributions
        rows = []
        for r in self.singles:
            layer_stats = self.stats.layers[r.layer]
            rows.append({
                "layer": r.layer, "base": self.base.metric(self.metric), "full": self.full.metric(self.metric),
                "single": r.metric(self.metric), "contribution": contributions[r.layer],
                "single_seconds": r.train_seconds, "single_tokens": r.tokens, "single_peak_memory_mib": r.peak_memory_mib,
                "full_seconds": self.full.train_seconds, "full_tokens": self.full.tokens,
                "full_peak_memory_mib": self.full.peak_memory_mib,
                "base_reward": self.base.mean_reward, "full_reward": self.full.mean_reward, "single_reward": r.mean_reward,
                "selected_learning_rate": r.learning_rate, "n_seeds": r.seeds,
                "single_ci_low": layer_stats.score.low, "single_ci_high": layer_stats.score.high,
                "contribution_ci_low": layer_stats.contribution.low,
                "contribution_ci_high": layer_stats.contribution.high, "p_recovers_80": layer_stats.p_recovers,
            })
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION, "metric": self.metric, "settings": self.settings,
            "full_equals_base": self.full_equals_base,
            "note": ("contribution = (single - base) / (full - base); null when full == base. Each arm at its "
                     "selected learning rate (best validation mean over seeds), scored on the test split"),
            "best_layer": self.best_layer, "rows": self.rows(),
            "selected_learning_rates": [{"arm": arm, "learning_rate": lr}
                                        for arm, lr in self.selected_learning_rates.items()],
            "validation_gains": [{"arm": arm, "learning_rate": lr, "gain": gain}
                                 for (arm, lr), gain in self.validation_gains.items()],
            "bootstrap": self.stats.to_dict(),
            "diverged_runs": [r.name for r in self.diverged],
            "runs": [dataclasses.asdict(r) for r in self.runs],
        }


def assemble(settings: dict[str, Any], metric: str, runs: list[RunResult], out: Path,
             resamples: int = BOOTSTRAP_RESAMPLES) -> SweepResult:
    """The sweep's answer from its finished runs: per arm the validation-selected learning rate, the
    arm's scores over seeds there, and paired-bootstrap intervals on the test scores."""
    base_runs = [r for r in runs if r.mode == "base"]
    if len(base_runs) != 1:
        raise ValueError(f"a sweep has exactly one Base run, got {len(base_runs)}")
    base_run = base_runs[0]
    base_val = base_run.val_metric(metric) if base_run.val is not None else None
    selected, gains = select_learning_rates(runs, metric, base_val)

    def arm(key: report.Arm) -> ArmResult:
        chosen = sorted((r for r in runs if r.mode != "base" and _arm_key(r) == key
                         and r.learning_rate == selected[key]), key=lambda r: r.seed)
        return ArmResult(name=_arm_name(chosen[0].mode, chosen[0].layer, settings.get("num_layers", 1)), mode=chosen[0].mode, layer=chosen[0].layer, learning_rate=selected[key],
                         runs=chosen)

    if report.FULL not in selected:
        raise ValueError("a sweep needs Full's runs")
    base = ArmResult(name="base", mode="base", layer=None, learning_rate=None, runs=[base_run])
    full = arm(report.FULL)
    singles = [arm(layer) for layer in sorted(k for k in selected if k != report.FULL)]
    stats = paired_bootstrap(base.scores(metric), full.scores(metric),
                             {s.layer: s.scores(metric) for s in singles}, resamples=resamples,
                             recover_threshold=RECOVER_THRESHOLD)
    return SweepResult(settings=settings, metric=metric, base=base, full=full, singles=singles, out=out,
                       stats=stats, runs=runs, validation_gains=gains)


PLAN_HALF_WIDTH = 0.25  # the contribution interval a sweep should aim for: +-0.25, wide enough to tell 0.5 from 1


def planning_note(result: SweepResult, half_width: float = PLAN_HALF_WIDTH) -> str | None:
    """How big a rerun must be for every contribution interval to reach +-half_width: for the layer with the
    widest interval, the test problems needed with this sweep's seeds and 2, 4 and 8 times as many, at this
    sweep's variance (stats.contribution_components). None with one seed (no seed variance to plan with) or
    without a gain."""
    k = len(result.full.runs)
    widths = {layer: s.contribution.width for layer, s in result.stats.layers.items() if s.contribution.width is not None}
    if k < 2 or not widths or not (result.stats.gain.estimate or 0.0):
        return None
    layer = max(widths, key=widths.get)
    single = next(s for s in result.singles if s.layer == layer)
    if len(single.runs) != k:
        return None
    base = result.base.scores(result.metric)[0]
    parts, gain = contribution_components(base, result.full.scores(result.metric), single.scores(result.metric))
    n = result.stats.num_problems
    options = []
    for seeds in (k, 2 * k, 4 * k, 8 * k):
        needed = problems_needed(parts, gain, seeds, half_width)
        options.append(f"{seeds} seeds: {'no number of problems' if needed is None else f'{needed} test problems'}")
    return (f"Planning: layer {layer} has the widest contribution interval (width {widths[layer]:.2f}, {k} seeds x "
            f"{n} test problems). At this sweep's variance (Full's gain {gain:.3f}), +-{half_width:g} for it needs "
            + "; ".join(options) + ". A larger Full gain narrows every interval in proportion.")


# -------------------------------------------------------------------------------------- file helpers

def _write_atomic(path: Path, text: str) -> None:
    """Temp file in the same directory, fsync, os.replace: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (a power cut could otherwise undo it); best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, value: Any) -> None:
    _write_atomic(path, json.dumps(value, indent=2) + "\n")


def _diff(stored: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(stored) | set(current)):
            name = f"{prefix}{key}"
            if key not in stored or key not in current:
                out.append(f"{name}: {stored.get(key, '<absent>')!r} -> {current.get(key, '<absent>')!r}")
            else:
                out.extend(_diff(stored[key], current[key], f"{name}."))
        return out
    return [] if stored == current else [f"{prefix[:-1]}: {stored!r} -> {current!r}"]


class SweepBusyError(RuntimeError):
    """Another live process is running a sweep in the same directory."""


class SweepLock:
    """An exclusive, non-blocking flock on DIR/.sweep.lock, held while a sweep runs in DIR.

    An flock belongs to the open file, so the kernel releases it when its process dies, even by SIGKILL:
    a lock file left behind by a killed sweep is free and simply taken over; no pid liveness guesses.
    The holder writes its pid into the file, for the message the next one gets. The file is never
    deleted: unlinking a locked file lets two later processes lock two different inodes at once.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "SweepLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise SweepBusyError(f"{self.directory} is in use by another sweep (pid {holder}); wait for it to "
                                 "finish, or use another --out") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor of the open file drops its flock

    def __enter__(self) -> "SweepLock":
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _is_settings_scratch(name: str) -> bool:
    """The lock file and the temp files of a settings write: what a kill before any run can leave."""
    return name == LOCK_NAME or name.startswith(f".{SETTINGS_NAME}.tmp-")


def _read_settings(path: Path) -> dict[str, Any] | None:
    """The stored settings; None when the file is torn (not one JSON object)."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return stored if isinstance(stored, dict) else None


def _sweep_entries(out: Path) -> list[str]:
    """What `out` holds besides the scratch files of a settings write."""
    return sorted(p.name for p in out.iterdir() if not _is_settings_scratch(p.name)) if out.is_dir() else []


def _not_a_sweep(out: Path) -> ValueError:
    return ValueError(f"{out} is not empty and has no {SETTINGS_NAME}: not a sweep directory; use another --out")


def _check_not_foreign(out: Path) -> None:
    """Before the lock file is created in `out`: refuse a directory that is not (yet) a sweep's."""
    if not (out / SETTINGS_NAME).is_file() and _sweep_entries(out):
        raise _not_a_sweep(out)


def _check_or_write_settings(out: Path, settings: dict[str, Any]) -> None:
    """Resume only what these settings made; start fresh in an empty directory, or in one that holds only
    what a kill during the first settings write leaves (nothing has run yet, so nothing is lost)."""
    path = out / SETTINGS_NAME
    settings = json.loads(json.dumps(settings))  # the form it takes on disk (tuples -> lists)
    others = _sweep_entries(out)
    if path.is_file():
        stored = _read_settings(path)
        if stored is not None:
            if differences := _diff(stored, settings):
                raise ValueError(f"{out} holds a sweep made with different settings ({'; '.join(differences)}); "
                                 "rerun with the same settings to resume it, or use another --out")
            return
        if others != [SETTINGS_NAME]:  # runs were made under settings nobody can read back now
            raise ValueError(f"{path} is damaged (not a JSON object), and {out} holds runs it describes; "
                             "use another --out, or remove the directory to start over")
    elif others:
        raise _not_a_sweep(out)
    for stale in out.glob(f".{SETTINGS_NAME}.tmp-*"):  # a killed writer's; the lock says none is writing now
        stale.unlink(missing_ok=True)
    _write_json(path, settings)


# -------------------------------------------------------------------------------------- measuring

def _training_cost(run_dir: Path, max_steps: int) -> tuple[float, int, int]:
    """(seconds, tokens, steps) from log.jsonl; a step logged twice (killed before its checkpoint, then
    redone after resume) counts once, with its last record."""
    log = run_dir / "log.jsonl"
    records: dict[int, dict] = {}
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                if record.get("step", 0) <= max_steps:
                    records[record["step"]] = record
    seconds = sum(r["step_time"] for r in records.values())
    tokens = sum(round(r["tokens_per_second"] * r["step_time"]) for r in records.values())
    return seconds, tokens, len(records)


# ------------------------------------------------------------------------------------------- lanes

@dataclass(frozen=True)
class LanePlan:
    """How the single-layer runs of a sweep train: `lanes` at once, in `waves` waves."""

    lanes: int
    waves: int
    per_lane_mib: float  # estimate of what one lane adds (lane_memory_mib)
    budget_mib: float | None  # what "auto" planned against; None when the number of lanes was given

    def describe(self, runs: int) -> str:
        text = (f"lanes: {runs} single-layer run(s) as {self.waves} wave(s) of up to {self.lanes} lane(s) at once, "
                f"about {self.per_lane_mib:.0f} MiB per lane")
        return text + (f" of a {self.budget_mib:.0f} MiB budget" if self.budget_mib is not None else "")


def lane_memory_mib(model, grpo: GRPOConfig, prompt_tokens: int, shared_prompt: bool = False) -> float:
    """An upper estimate of what one more lane costs: its layer copy with gradient and two AdamW moments;
    over its tokens (per_device_train_batch_size rows of prompt + max_completion_length, each prompt once
    per group when `shared_prompt`) the activations a backward through every layer keeps (the
    deepest-reaching lane, layer 0); the generation KV cache of every row; the float64 sampling buffers of
    its rows over the vocabulary. No reference copy: a lane's reference is the shared original layer."""
    config = model.config
    decoder = decoder_of(model)
    size = next(model.parameters()).element_size()
    layer_params = sum(p.numel() for p in decoder.layers[0].parameters())
    layers, hidden = len(decoder.layers), config.hidden_size
    rows = grpo.per_device_train_batch_size
    # The shared-prompt layout runs each prompt once per group of num_generations rows.
    prompt_rows = rows // grpo.num_generations if shared_prompt else rows
    tokens = prompt_rows * prompt_tokens + rows * grpo.max_completion_length
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    activations = tokens * layers * (8 * hidden + 4 * config.intermediate_size) * size
    kv_cache = rows * (prompt_tokens + grpo.max_completion_length) * layers * 2 * heads * head_dim * size
    sampling = grpo.per_device_train_batch_size * config.vocab_size * 8 * 3
    return (4 * layer_params * size + activations + kv_cache + sampling) / 2**20


def _free_memory_mib(device: torch.device) -> float:
    """Memory a sweep may plan lanes into: 80 % of the free CUDA memory, or half of the host's available."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.8 * free / 2**20
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = dict(line.split(":", 1) for line in f)
        return 0.5 * int(info["MemAvailable"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return 4096.0


def plan_lanes(lanes: int | str, runs: int, per_lane_mib: float, budget_mib: float | None) -> LanePlan:
    """`lanes` runs at once ("auto": as many as fit `budget_mib`, at least 1), in ceil(runs / lanes) waves."""
    if runs == 0:
        return LanePlan(lanes=0, waves=0, per_lane_mib=per_lane_mib, budget_mib=None)
    if lanes == "auto":
        at_once = max(1, min(runs, int(budget_mib // per_lane_mib)))
    else:
        at_once, budget_mib = min(runs, lanes), None
    return LanePlan(lanes=at_once, waves=-(-runs // at_once), per_lane_mib=per_lane_mib, budget_mib=budget_mib)


# ------------------------------------------------------------------------------------------- runs

@dataclass(frozen=True)
class _Run:
    name: str
    mode: str
    layer: int | None
    learning_rate: float | None = None
    seed: int | None = None


def _arm_name(mode: str, layer: int | None, num_layers: int) -> str:
    return mode if layer is None else f"layer-{layer:0{len(str(num_layers - 1))}d}"


def _runs(layers: list[int], num_layers: int, rates: tuple[float, ...], seeds: tuple[int, ...],
          full_rates: tuple[float, ...] | None = None) -> list[_Run]:
    """Base, then Full at every (rate of full_rates [default: rates], seed) and every layer at every (rate,
    seed). A run's name carries the rate and the seed only where its arm's grid has several: a one-rate,
    one-seed sweep keeps the plain names (full, layer-05)."""
    def suffix(grid: tuple[float, ...], rate: float, seed: int) -> str:
        return (f"-lr{rate:g}" if len(grid) > 1 else "") + (f"-seed{seed}" if len(seeds) > 1 else "")

    runs = [_Run("base", "base", None)]
    for mode, layer in [("full", None), *[("single", i) for i in layers]]:
        grid = full_rates or rates if mode == "full" else rates
        runs += [_Run(_arm_name(mode, layer, num_layers) + suffix(grid, rate, seed), mode, layer, rate, seed)
                 for rate in grid for seed in seeds]
    return runs


class _Sweep:
    def __init__(self, config: SweepConfig):
        config.validate()
        self.config = config
        self.grpo = config.grpo
        self.out = Path(config.out)
        self.device = resolve_device(config.device)
        self._task = get_task(config.task, config.task_path)
        self.max_new_tokens = config.eval_max_new_tokens or self.grpo.max_completion_length
        self._pristine = None  # (model on CPU, tokenizer): see fresh_model

    @property
    def task(self):
        if self._task is None:  # in a worker (see __setstate__), read in its working directory on first use
            self._task = get_task(self.config.task, self.config.task_path)
        return self._task

    def __getstate__(self) -> dict[str, Any]:
        """What a job sends to a Ray worker: the settings, without the model and the task (the worker loads
        its own on first use; a task may hold what does not pickle, such as a sandbox)."""
        return {**self.__dict__, "_pristine": None, "_task": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """In the worker's process: the same kind of device, the one the worker was given (Ray points
        CUDA_VISIBLE_DEVICES at the GPU it granted, so cuda:N on the driver is `cuda` there), and no inner
        progress bars (the driver's bar over jobs is the progress; many workers' bars would interleave)."""
        self.__dict__.update(state)
        if self.device.type == "cuda":
            self.device = torch.device("cuda")
        self.config = dataclasses.replace(self.config, progress=False)

    def fresh_model(self):
        """A new copy of the base model (never an edited one): the same seed as `onelayer-fast train` uses.

        Loaded from disk once; every later run gets a deep copy of that pristine model, kept in host memory
        (one extra CPU copy of the weights): a copy costs far less than loading and converting it again.
        """
        if self._pristine is None:
            model, tokenizer = load_model(self.config.model, seed=self.grpo.seed, dtype=DTYPES[self.config.dtype])
            self._pristine = (model.to("cpu"), tokenizer)
        model, tokenizer = self._pristine
        return copy.deepcopy(model).to(self.device), tokenizer

    def settings(self, layers: list[int], num_layers: int, test_n: int, val_n: int | None) -> dict[str, Any]:
        grpo = dataclasses.asdict(self.grpo)
        del grpo["learning_rate"]  # the grid's, in "learning_rates" (grpo.seed stays: the model's init seed, seeds[0])
        c = self.config
        # Full's own grid is written only where it differs, so the settings of a one-grid sweep stay as they were.
        full_grid = {"full_learning_rates": list(c.full_rates)} if c.full_rates != c.rates else {}
        return {"format_version": FORMAT_VERSION, "model": c.model, "task": c.task, "task_path": c.task_path,
                "algo": self.grpo.algo, "layer_spec": c.layers, "layers": layers, "num_layers": num_layers,
                "learning_rates": list(c.rates), **full_grid, "seeds": list(c.seed_values),
                "eval_size": c.eval_size, "eval_seed": c.eval_seed, "eval_examples": test_n,
                "val_size": c.val_size if c.selects else None, "val_examples": val_n,
                "eval_max_new_tokens": self.max_new_tokens, "dtype": c.dtype, "grpo": grpo}

    def run_config(self, run: _Run) -> GRPOConfig:
        """The shared training knobs with this run's learning rate and seed."""
        return dataclasses.replace(self.grpo, learning_rate=run.learning_rate, seed=run.seed)

    def execute(self, run: _Run, splits: dict[str, list], model=None, tokenizer=None) -> RunResult:
        run_dir = self.out / "runs" / run.name
        run_dir.mkdir(parents=True, exist_ok=True)
        if model is None:
            model, tokenizer = self.fresh_model()
        with PeakMemory(self.device) as memory:  # peak RSS (sampled every 20 ms) or CUDA max allocated
            if run.mode != "base":
                spec = RunSpec(output_dir=str(run_dir), mode=run.mode, layer=run.layer,
                               save_steps=self.config.save_steps, save_total_limit=self.config.save_total_limit)
                trainer = GRPOTrainer(model, tokenizer, self.task, self.run_config(run), spec,
                                      base_model=self.config.model, resume=True, progress=self.config.progress)
                try:
                    trainer.train()
                except DivergenceError as error:
                    return self.diverged_result(run, error)
                del trainer  # the trainer holds the policy (and in full mode a reference copy)
            scores = {name: evaluate(model, tokenizer, self.task, examples, batch_size=self.config.eval_batch_size,
                                     max_new_tokens=self.max_new_tokens, progress=self.config.progress)
                      for name, examples in splits.items()}
        return self.run_result(run, scores, memory)

    def run_result(self, run: _Run, scores: dict[str, EvalResult], memory: PeakMemory) -> RunResult:
        """A finished run's result: its scores, its training cost from its log, the memory it ran in."""
        seconds, tokens, steps = _training_cost(self.out / "runs" / run.name, self.grpo.max_steps)
        test, val = scores["test"], scores.get("val")
        return RunResult(name=run.name, mode=run.mode, layer=run.layer, accuracy=test.accuracy,
                         mean_reward=test.mean_reward, n=test.n, eval_seconds=test.seconds,
                         train_seconds=seconds, steps=steps, tokens=tokens, peak_memory_mib=memory.peak_mib,
                         memory_kind=memory.kind, learning_rate=run.learning_rate, seed=run.seed,
                         correct=list(test.correct), rewards=list(test.rewards),
                         val=None if val is None else val.to_dict())

    def diverged_result(self, run: _Run, error: DivergenceError) -> RunResult:
        """A run whose training diverged: no scores (it is never selected), the reason kept."""
        print(f"note: run {run.name} diverged; it is recorded as such and never selected ({error})")
        seconds, tokens, steps = _training_cost(self.out / "runs" / run.name, self.grpo.max_steps)
        return RunResult(name=run.name, mode=run.mode, layer=run.layer, accuracy=0.0, mean_reward=0.0, n=0,
                         eval_seconds=0.0, train_seconds=seconds, steps=steps, tokens=tokens, peak_memory_mib=0.0,
                         memory_kind="", learning_rate=run.learning_rate, seed=run.seed, diverged=str(error))

    def execute_wave(self, runs: list[_Run], splits: dict[str, list]) -> list[RunResult]:
        """Train single-layer runs as lanes of one LaneTrainer on a fresh model, evaluate them all at once.
        Their peak memory is the wave's; train and eval seconds are each lane's share.

        When lanes diverge, those runs are recorded as diverged and the others go on as a new wave, each
        resumed from its last checkpoint (a lane computes what it would alone, so nothing changes for them)."""
        model, tokenizer = self.fresh_model()
        lanes = [Lane(run.layer, learning_rate=run.learning_rate, seed=run.seed) for run in runs]
        with PeakMemory(self.device) as memory:
            trainer = LaneTrainer(model, tokenizer, self.task, self.grpo,
                                  [LaneRun(lane, str(self.out / "runs" / run.name)) for lane, run in zip(lanes, runs)],
                                  base_model=self.config.model, save_steps=self.config.save_steps,
                                  save_total_limit=self.config.save_total_limit, progress=self.config.progress)
            try:
                trainer.train()
            except DivergenceError as error:
                if not error.lanes:  # not one lane's doing (e.g. the rewards): the whole wave is stuck
                    raise
                names = {Path(trainer.runs[k].output_dir).name for k in error.lanes}
                trainer = model = None
                _release(self.device)
                diverged = [self.diverged_result(run, error) for run in runs if run.name in names]
                rest = [run for run in runs if run.name not in names]
                return diverged + (self.execute_wave(rest, splits) if rest else [])
            per_split = {}
            for name, examples in splits.items():
                per_split[name] = evaluate_lanes(trainer.policy, tokenizer, self.task, examples,
                                                 batch_size=self.config.eval_batch_size,
                                                 max_new_tokens=self.max_new_tokens, progress=self.config.progress)
        trained = list(trainer.policy.lanes)  # the policy's lane order (execution order, deepest first)
        del trainer, model
        by_lane = [{name: results[trained.index(lane)] for name, results in per_split.items()} for lane in lanes]
        return [self.run_result(run, scores, memory) for run, scores in zip(runs, by_lane)]


def _load_result(path: Path, run: _Run) -> RunResult:
    data = json.loads(path.read_text(encoding="utf-8"))
    result = RunResult(**data)
    found = (result.name, result.mode, result.layer, result.learning_rate, result.seed)
    if found != (run.name, run.mode, run.layer, run.learning_rate, run.seed):
        raise ValueError(f"{path} holds run {result.name!r} ({result.mode}, layer {result.layer}, lr "
                         f"{result.learning_rate}, seed {result.seed}), expected {run.name!r} ({run.mode}, layer "
                         f"{run.layer}, lr {run.learning_rate}, seed {run.seed})")
    return result


def _release(device: torch.device) -> None:
    """Free the previous run's model before the next one loads (a full collection catches reference cycles)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_sweep(config: SweepConfig) -> SweepResult:
    """Run (or resume) the sweep in config.out; write results.csv, results.json and contribution.png.

    Holds the directory's SweepLock throughout: a second sweep into the same directory raises
    SweepBusyError at once instead of racing this one over the same runs and tables."""
    sweep = _Sweep(config)  # validates the settings and reads the task first: a bad one fails before any work
    executor = config.executor_for(sweep.device)  # Ray missing: fails here, before any work
    _check_not_foreign(sweep.out)  # checked again under the lock; this spares a foreign directory the lock file
    # The driver (this process) holds the lock for the whole sweep; jobs, wherever they run, never take it.
    with executor, SweepLock(sweep.out):
        return _run_locked(sweep, config, executor)


def _execute_job(sweep: _Sweep, runs: list[_Run], splits: dict[str, list], wave: bool) -> list[RunResult]:
    """One job of a sweep, wherever it runs: a lane wave (`wave`) or one run, trained and evaluated on a
    fresh model; each result is written to its run's result.json here, so what finished survives the driver."""
    results = sweep.execute_wave(runs, splits) if wave else [sweep.execute(runs[0], splits)]
    for result in results:
        _write_json(sweep.out / "runs" / result.name / RESULT_NAME, dataclasses.asdict(result))
    _release(sweep.device)
    return results


def _jobs(sweep: _Sweep, pending: list[_Run], waves: list[list[_Run]], splits: dict[str, list]) -> list[Job]:
    """Every run that is not a lane wave's as a job of its own (Base, each Full run), then each wave."""
    jobs = [Job(run.name, functools.partial(_execute_job, sweep, [run], splits, False)) for run in pending]
    for k, wave in enumerate(waves, 1):
        name = f"wave {k}/{len(waves)}: " + ", ".join(run.name for run in wave)
        jobs.append(Job(name, functools.partial(_execute_job, sweep, wave, splits, True)))
    return jobs


def _run_locked(sweep: _Sweep, config: SweepConfig, executor: Executor) -> SweepResult:
    model, tokenizer = sweep.fresh_model()
    num_layers = len(decoder_of(model).layers)
    layers = parse_layers(config.layers, num_layers)
    splits = {"test": eval_examples(sweep.task, config.eval_size, seed=config.eval_seed)}
    if not splits["test"]:
        raise ValueError(f"task {sweep.task.name!r} has no test examples")
    if config.selects:
        splits["val"] = val_examples(sweep.task, config.val_size, seed=config.eval_seed)
        if not splits["val"]:
            raise ValueError(f"task {sweep.task.name!r} has no validation examples to select a learning rate on")
    _check_or_write_settings(sweep.out, sweep.settings(layers, num_layers, len(splits["test"]),
                                                       len(splits["val"]) if config.selects else None))

    runs = _runs(layers, num_layers, config.rates, config.seed_values, config.full_rates)
    results: dict[str, RunResult] = {}
    pending = []
    for run in runs:
        path = sweep.out / "runs" / run.name / RESULT_NAME
        if path.is_file():
            results[run.name] = _load_result(path, run)
        else:
            pending.append(run)
    singles = [run for run in pending if run.mode == "single"]
    waves: list[list[_Run]] = []
    if singles and is_environment_task(sweep.task):  # they stay in `pending`, run one by one
        print(f"lanes: {sweep.task.name!r} is an environment task; its single-layer runs train one at a time")
    elif singles:
        sample = sweep.task.sample(random.Random(config.grpo.seed), 16)
        prompt_tokens = encode_prompts(tokenizer, [e.prompt for e in sample], torch.device("cpu"))[0].shape[1]
        budget = config.memory_budget_mib or _free_memory_mib(sweep.device)
        layout = config.grpo.layout
        if layout == "auto":  # lane batches always come in prompt groups
            layout = auto_layout(model.config, sweep.device, grouped=True)
        per_lane = lane_memory_mib(model, config.grpo, prompt_tokens, shared_prompt=layout == "shared_prompt")
        plan = plan_lanes(config.lanes, len(singles), per_lane, budget)
        print(plan.describe(len(singles)))
        waves = [singles[i:i + plan.lanes] for i in range(0, len(singles), plan.lanes)]
        pending = [run for run in pending if run.mode != "single"]
    # Every job loads its own fresh model (Base's included): the copy loaded above is not needed any more.
    del model, tokenizer
    _release(sweep.device)
    jobs = _jobs(sweep, pending, waves, splits)
    if jobs and config.executor != "local":
        print(f"{executor.describe()}; {len(jobs)} job(s)")
    bar = tqdm(total=len(jobs), desc="sweep", unit="job", disable=not config.progress)
    bar.set_postfix_str(f"{len(results)}/{len(runs)} runs done")
    # Everything alive now (imported modules, the base model) outlives the sweep; freezing it keeps the
    # full collections between runs from rescanning those hundreds of thousands of objects each time.
    gc.freeze()

    def done(job: Job, finished: list[RunResult]) -> None:  # the job wrote their result.json files
        results.update((result.name, result) for result in finished)
        bar.update(1)
        bar.set_postfix_str(f"{len(results)}/{len(runs)} runs done")
        if config.progress:
            bar.write(f"sweep: finished {job.name}")

    try:
        executor.run(jobs, done)
    finally:
        bar.close()
        gc.unfreeze()

    settings = json.loads((sweep.out / SETTINGS_NAME).read_text(encoding="utf-8"))
    result = assemble(settings, config.metric, [results[r.name] for r in runs], sweep.out)
    write_results(result)
    write_plots_and_report(result)
    return result


# --------------------------------------------------------------------------------------- reporting

def _csv_value(value: Any) -> Any:
    if value is None:
        return ""  # undefined contribution (full == base)
    return f"{value:.6g}" if isinstance(value, float) else value


def write_results(result: SweepResult) -> tuple[Path, Path]:
    """DIR/results.csv (contribution empty when full == base) and DIR/results.json (null), atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in result.rows():
        writer.writerow({k: _csv_value(row[k]) for k in CSV_COLUMNS})
    csv_path, json_path = result.out / "results.csv", result.out / "results.json"
    _write_atomic(csv_path, buffer.getvalue())
    _write_json(json_path, result.to_json())
    return csv_path, json_path


def _title(result: SweepResult) -> str:
    s = result.settings
    return f"{s['task']} / {s['algo']} / {Path(s['model']).name or s['model']}"


def format_table(result: SweepResult) -> str:
    m = result.metric
    base, full = result.base, result.full
    s = result.settings
    grid = ""
    if max(len(s.get("learning_rates", [])), len(s.get("full_learning_rates") or [])) > 1 or len(s.get("seeds", [])) > 1:
        full_grid = s.get("full_learning_rates")
        grid = (f", {len(s['learning_rates'])} learning rate(s)"
                + (f" ({len(full_grid)} for Full)" if full_grid else "")
                + f" x {len(s['seeds'])} seed(s) per arm, rate selected on {s.get('val_examples') or 0} validation examples")
    stats = result.stats
    lines = [f"sweep {_title(result)}: {m} on {base.n} test examples, {s['grpo']['max_steps']} steps per run{grid}",
             f"  Base      {base.metric(m):8.4f}   reward {base.mean_reward:.4f}" + _ci(stats.base),
             f"  Full      {full.metric(m):8.4f}   reward {full.mean_reward:.4f}   lr {full.learning_rate:g}   "
             f"{full.train_seconds:8.1f} s  {full.tokens:10d} tok  {full.peak_memory_mib:8.0f} MiB"
             + _ci(stats.full)]
    if result.full_equals_base:
        lines.append(f"  Full == Base ({full.metric(m):.4f}): contribution is undefined "
                     "(n/a here, empty in results.csv, null in results.json)")
    if result.diverged:
        lines.append(f"  diverged (never selected): {', '.join(r.name for r in result.diverged)}")
    lines.append(f"  {'layer':>5}  {'Single(i)':>9}  {'contrib':>8}  {'95% interval':>17}  {'P(>=0.8)':>8}  "
                 f"{'lr':>8}  {'reward':>7}  {'seconds':>8}  {'tokens':>10}  {'peak MiB':>8}")
    best = result.best_layer
    contributions = result.contributions
    for r in result.singles:
        c = contributions[r.layer]
        layer_stats = stats.layers[r.layer]
        interval = "" if layer_stats.contribution.low is None else \
            f"[{layer_stats.contribution.low:6.2f}, {layer_stats.contribution.high:6.2f}]"
        recovers = "" if layer_stats.p_recovers is None else f"{layer_stats.p_recovers:.2f}"
        mark = "  <- best" if r.layer == best else ""
        lines.append(f"  {r.layer:>5}  {r.metric(m):9.4f}  {'n/a' if c is None else f'{c:8.3f}':>8}  {interval:>17}  "
                     f"{recovers:>8}  {r.learning_rate:8.2g}  {r.mean_reward:7.4f}  {r.train_seconds:8.1f}  "
                     f"{r.tokens:10d}  {r.peak_memory_mib:8.0f}{mark}")
    return "\n".join(lines)


def _ci(interval) -> str:
    return "" if interval.low is None else f"   95% [{interval.low:.4f}, {interval.high:.4f}]"


def print_table(result: SweepResult, file=None) -> None:
    """Base, Full, and per layer Single(i) with its contribution, interval and cost."""
    print(format_table(result), file=file or sys.stdout)


def write_plots_and_report(result: SweepResult) -> None:
    """contribution.png (intervals), lr_heatmap.png (when a rate was selected) and report.md in result.out.
    Without matplotlib the plots are skipped with a note; report.md is written either way."""
    if importlib.util.find_spec("matplotlib") is None:
        print("note: matplotlib is not installed (pip install 'onelayer_fast[plot]'): plots skipped")
    else:
        if result.stats.layers:
            result.plot = report.plot_contribution_intervals(result.stats, result.out / "contribution.png",
                                                             title=_title(result))
            result.plots.append(result.plot)
        if result.validation_gains:
            result.plots.append(report.plot_lr_heatmap(
                result.validation_gains, result.out / "lr_heatmap.png", selected=result.selected_learning_rates,
                title=f"{_title(result)}\nvalidation gain over Base (boxed: selected)"))
    rows = report.table_rows(result.stats, result.selected_learning_rates)
    for row, arm in zip(rows, [result.base, result.full, *result.singles]):
        row["train seconds per run"] = arm.train_seconds if arm.mode != "base" else None
    result.report_path = result.out / "report.md"
    notes = [f"Run {r.name} diverged and was never selected: {r.diverged}" for r in result.diverged]
    plan = planning_note(result)
    if plan:
        notes.append(plan)
    report.write_report(result.report_path, result.settings, result.stats, rows=rows,
                        selected_lr=result.selected_learning_rates, plots=result.plots,
                        title=f"Layer sweep: {_title(result)}", notes=notes)
