"""The workload registry: name -> Workload, in the order `python -m bench --quick` runs them.

Adding a workload: a module here with a `Workload` (contenders, shapes, a `setup` returning a Runner, targets,
ratios, optionally a cross-check; bench/harness.py), registered below.
"""
from __future__ import annotations

from bench.harness import Workload
from bench.workloads.ddp import DDP
from bench.workloads.grpo_loss import GRPO_LOSS
from bench.workloads.iteration import ITERATION
from bench.workloads.step import STEP, STEP_VARLEN
from bench.workloads.step_real import STEP_REAL
from bench.workloads.sweep import SWEEP

WORKLOADS: dict[str, Workload] = {w.name: w for w in (STEP, STEP_VARLEN, STEP_REAL, GRPO_LOSS, ITERATION, SWEEP, DDP)}
