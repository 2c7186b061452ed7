"""Where a sweep's jobs run: one after another in this process (LocalExecutor), or as tasks on a Ray cluster
(RayExecutor, the `[ray]` extra).

A Job is a name and a callable that takes no argument; it must be picklable (a module-level function or a
functools.partial of one) for Ray to ship it to a worker. An executor runs a list of jobs and hands each
job's return value to `on_done` on the driver as the job finishes: in list order for the local executor,
in order of completion for Ray. Jobs write their own files; an executor knows nothing about sweeps.

    with LocalExecutor() as executor:                  # or RayExecutor(address=..., num_gpus=1)
        executor.run([Job("a", f), Job("b", g)], on_done=lambda job, value: print(job.name, value))
"""
from __future__ import annotations

import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Protocol, Sequence, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

EXECUTORS = ("local", "ray")
RAY_INSTALL = "pip install 'onelayer_fast[ray]'"
# Test hook: the path of a JSON marker file {"job": NAME, "after": PATH}. The Ray worker running job NAME
# waits until PATH exists, claims the marker (renames it to MARKER.claimed, adding its pid and the time)
# and dies with os._exit, once.
CRASH_MARKER_ENV = "ONELAYER_FAST_TEST_CRASH_MARKER"
CONNECT_TIMEOUT_S = 5.0  # how long an explicit --ray-address may take to accept a TCP connection


class ExecutorError(ValueError):
    """The executor cannot start: Ray is not installed, or the cluster at the given address cannot be reached."""


@dataclass(frozen=True)
class Job(Generic[T]):
    """One unit of work: `run()` computes it (writing whatever files it writes) and returns its value."""

    name: str
    run: Callable[[], T]


class Executor(Protocol):
    """Runs jobs; a context manager (connect on enter, disconnect on exit)."""

    def describe(self) -> str: ...

    def run(self, jobs: Sequence[Job[T]], on_done: Callable[[Job[T], T], None]) -> None: ...

    def __enter__(self) -> "Executor": ...

    def __exit__(self, *exc_info: object) -> None: ...


class LocalExecutor:
    """The plain loop: every job in this process, in order. An exception in a job propagates at once."""

    def describe(self) -> str:
        return "local"

    def run(self, jobs: Sequence[Job[T]], on_done: Callable[[Job[T], T], None]) -> None:
        for job in jobs:
            on_done(job, job.run())

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


def import_ray():
    """The ray module, or ExecutorError naming the extra that installs it."""
    try:
        import ray
    except ImportError as error:
        raise ExecutorError(f"--executor ray needs Ray, which is not installed ({error}); install it with "
                            f"{RAY_INSTALL}") from None
    return ray


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ExecutorError when `address` (host:port, or ray://host:port) accepts no TCP connection within
    `timeout` seconds: ray.init would otherwise retry an unreachable cluster for minutes without a word.
    Other forms ("auto", "local") are left to ray.init."""
    text = address.strip()
    if text in ("auto", "local"):
        return
    parts = urlsplit(text if "://" in text else f"tcp://{text}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number
        host = port = None
    if not host or port is None:
        raise ExecutorError(f"--ray-address {address!r} is not host:port (e.g. 10.0.0.5:6379, or ray://10.0.0.5:10001)")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as error:
        raise ExecutorError(f"cannot reach the Ray cluster at --ray-address {address} ({error or 'timed out'}): "
                            "start it there with `ray start --head`, or check the address and port") from None


class RayExecutor:
    """Each job as one Ray task on an existing cluster (`address`) or on a local one started here (None).

    Every task asks Ray for `num_gpus` GPUs (Ray then sets the worker's CUDA_VISIBLE_DEVICES to them) and
    `num_cpus` CPUs (Ray sets OMP_NUM_THREADS to that), and is retried `max_retries` times when its worker
    dies (a crash, a kill, a lost node); an exception raised by the job itself is not retried, it cancels
    the jobs still running and is re-raised here as the job raised it. Workers run in the driver's working
    directory when they have it (relative paths mean the same there), and must be able to import
    onelayer_fast. When Ray is already initialized in this process, that connection is used and left open.
    """

    def __init__(self, address: str | None = None, num_gpus: float = 0.0, num_cpus: float = 1.0,
                 max_retries: int = 3):
        for name, value in (("num_gpus", num_gpus), ("num_cpus", num_cpus)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        self.ray = import_ray()  # fails here, before any work, when Ray is missing
        self.address, self.num_gpus, self.num_cpus, self.max_retries = address, num_gpus, num_cpus, max_retries
        self._started = False

    def describe(self) -> str:
        where = f"the Ray cluster at {self.address}" if self.address else "a local Ray cluster"
        return (f"ray: jobs on {where}, {self.num_gpus:g} GPU(s) and {self.num_cpus:g} CPU(s) each, "
                f"retried up to {self.max_retries} time(s) when a worker dies")

    def __enter__(self) -> "RayExecutor":
        if self.address:
            check_reachable(self.address)
        if not self.ray.is_initialized():
            try:
                self.ray.init(address=self.address or None)
            except (ConnectionError, TimeoutError) as error:
                where = f"join the Ray cluster at {self.address}" if self.address else "start a local Ray cluster"
                raise ExecutorError(f"could not {where}: {error}") from error
            self._started = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._started:
            self._started = False
            self.ray.shutdown()

    def run(self, jobs: Sequence[Job[T]], on_done: Callable[[Job[T], T], None]) -> None:
        ray = self.ray
        if not jobs:
            return
        task = ray.remote(num_gpus=self.num_gpus, num_cpus=self.num_cpus, max_retries=self.max_retries)(_run_job)
        cwd = os.getcwd()
        pending = {task.options(name=f"onelayer_fast: {job.name}").remote(job, cwd): job for job in jobs}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    job = pending.pop(ref)
                    on_done(job, _get(ray, ref, job))
        except BaseException:
            for ref in pending:  # a failed job, or Ctrl-C: stop the rest (their checkpoints stay for a rerun)
                ray.cancel(ref, force=True)
            raise


def _get(ray, ref, job: Job) -> Any:
    """The job's value; the job's own exception as it raised it (the remote traceback chained to it)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from error
        raise
    except ray.exceptions.RayError as error:  # the worker died more often than max_retries allows, ...
        raise RuntimeError(f"job {job.name!r} failed on Ray: {error}") from error


def _run_job(job: Job[T], cwd: str) -> T:
    """What a Ray worker runs: the job, in the driver's working directory when this machine has it."""
    if os.path.isdir(cwd):
        os.chdir(cwd)
    stop = threading.Event()
    _arm_test_crash(job.name, stop)
    try:
        return job.run()
    finally:
        stop.set()


def _arm_test_crash(name: str, stop: threading.Event) -> None:
    """The CRASH_MARKER_ENV test hook: a worker death in the middle of job `name`, once."""
    import json

    marker = os.environ.get(CRASH_MARKER_ENV)
    if not marker or not os.path.isfile(marker):
        return
    try:
        with open(marker, encoding="utf-8") as f:
            wanted = json.load(f)
    except (OSError, ValueError):
        return
    if wanted.get("job") != name:
        return

    def crash() -> None:
        while not stop.is_set():
            if os.path.exists(wanted.get("after") or "."):
                try:
                    os.rename(marker, marker + ".claimed")  # atomic: one worker claims it, once
                except OSError:
                    return
                with open(marker + ".claimed", "w", encoding="utf-8") as f:
                    json.dump({**wanted, "pid": os.getpid(), "time": time.time()}, f)
                os._exit(1)
            stop.wait(0.005)

    threading.Thread(target=crash, daemon=True).start()
