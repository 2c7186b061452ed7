"""Peak memory of a block of code: the one meter of the layer sweep and of the benchmarks.

What it measures depends on the device:

- CUDA: the caching allocator's counters. `peak` is torch.cuda.max_memory_allocated over the block (the peak
  counter is reset on entry), `current()` is torch.cuda.memory_allocated. Live tensor bytes, exactly: blocks
  the allocator keeps cached but free are not counted, and nothing is sampled. The device is synchronized on
  entry and exit, so that kernels queued before or inside the block are accounted to the right side of it.
- CPU: the process's resident set size (RSS), which counts everything the process holds (tensors, allocator
  caches, libraries, Python objects). A background thread samples it every `interval` seconds, and once on entry
  and on exit; a spike shorter than the interval can be missed. RSS is read from /proc/self/statm (the same
  number as psutil's memory_info().rss), else from psutil where it is installed, else from ru_maxrss, which is
  the high-water mark of the whole process life rather than of the block.

Two readings of one block:

- `peak` (bytes) / `peak_mib`: the high-water mark during the block. The sweep reports it per run
  (`peak_memory_mib`, with `kind` naming the source).
- `growth_mib(baseline)`: that peak minus a `baseline` read earlier with `current()`. The benchmarks report it
  as working memory: what a step needs beyond the model, optimizer and inputs already built, which the plain
  peak would include.

    meter = PeakMemory("cpu", interval=0.005)
    baseline = meter.current()
    with meter:
        step()
    meter.peak_mib, meter.growth_mib(baseline)
"""
from __future__ import annotations

import os
import resource
import sys
import threading

import torch

__all__ = ["PeakMemory", "rss_bytes"]


def rss_bytes() -> int:
    """This process's resident set size in bytes (see the module docstring for the sources, in order)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return psutil.Process().memory_info().rss


class PeakMemory:
    """Context manager: the peak memory of the block it wraps on `device` (module docstring).

    `device`: a torch.device or a string ("cpu", "cuda", "cuda:1"). `interval`: seconds between RSS samples on the
    CPU (unused on CUDA). After the block: `peak` (bytes), `peak_mib`, `growth_mib(baseline)`; `samples` counts the
    RSS samples taken (0 on CUDA); `kind` is "cuda_max_allocated" or "rss_peak". A meter can wrap several blocks one
    after the other; each entry starts a new peak.
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.02):
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        self.kind = "cuda_max_allocated" if self.on_cuda else "rss_peak"
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def current(self) -> int:
        """Bytes in use now: torch.cuda.memory_allocated on CUDA, the RSS on the CPU."""
        return torch.cuda.memory_allocated(self.device) if self.on_cuda else rss_bytes()

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20

    def growth_mib(self, baseline: int) -> float:
        """MiB of the peak above `baseline` (bytes, from an earlier `current()`)."""
        return (self.peak - baseline) / 2**20

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self.samples = 0
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.peak = self.current()
        else:
            self.peak = rss_bytes()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, name="PeakMemory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.peak = max(self.peak, rss_bytes())
