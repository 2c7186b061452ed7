"""Data-parallel training with torch.distributed: which process this is, and the few collectives training needs.

`init_world()` reads the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and
joins the process group: `gloo` on CPU, `nccl` on CUDA (each rank on cuda:LOCAL_RANK). Without that environment,
or with WORLD_SIZE 1, it returns a World of one process whose collectives return their input: the same code path
as N ranks, with no process group (what the one-process reference of the equality tests runs).

Every collective goes through `World._collective`, which turns a failure (a peer rank died, or did not answer
within the collective timeout) into a PeerRankError that says so and how to resume: rank 0 writes a checkpoint
every --save-steps steps into the shared output directory, and rerunning the same command resumes every rank
from it.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch
from torch import Tensor

# How long a collective waits for the slowest rank before the group gives up. Ranks meet at least once per
# optimizer step and once per checkpoint (rank 0 writes it while the others wait), so this must exceed the
# largest difference in time between ranks within one step, not a whole run. A dead peer is usually reported
# at once (its connections close); the timeout is what catches a peer that hangs.
DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "ONELAYER_FAST_COLLECTIVE_TIMEOUT_S"

T = TypeVar("T")


class PeerRankError(RuntimeError):
    """A collective failed: another rank of the group died (or hung past the collective timeout)."""


@dataclass
class World:
    """This process's place among the data-parallel ranks; a World() is one process, where every collective
    returns its input unchanged.

    device: where this rank computes (cuda:LOCAL_RANK under torchrun with CUDA), None: wherever the model is.
    resume_hint: what the error of a failed collective tells the user to do (the trainer sets it).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    backend: str | None = None  # None: no process group (one process)
    resume_hint: str = "rerun the same command to resume from the last checkpoint"
    _group_alive: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes logs and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # ------------------------------------------------------------------------------------------ collectives
    def _collective(self, what: str, run: Callable[[], T]) -> T:
        try:
            return run()
        except (RuntimeError, ConnectionError, TimeoutError) as error:
            raise PeerRankError(
                f"rank {self.rank} of {self.size}: the {what} across ranks failed ({_first_line(error)}); a peer rank "
                f"probably died or hung (collective timeout {collective_timeout():.0f} s, {TIMEOUT_ENV}). Every rank "
                f"stops; {self.resume_hint}") from error

    def _to_collective_device(self, tensor: Tensor) -> Tensor:
        if self.backend == "nccl":
            return tensor.to(self.device)
        return tensor.cpu() if tensor.device.type != "cpu" else tensor

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """The elementwise sum of `tensor` over every rank (a new tensor, on tensor's device)."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        buffer = self._to_collective_device(tensor.detach().clone())
        self._collective("sum", lambda: dist.all_reduce(buffer, op=dist.ReduceOp.SUM))
        return buffer.to(tensor.device)

    def all_gather_rows(self, tensor: Tensor) -> Tensor:
        """Every rank's `tensor` (the same shape on each), concatenated along dim 0 in rank order."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        local = self._to_collective_device(tensor.detach().contiguous())
        parts = [torch.empty_like(local) for _ in range(self.size)]
        self._collective("gather", lambda: dist.all_gather(parts, local))
        return torch.cat(parts).to(tensor.device)

    def all_reduce_gradients(self, params: list[Tensor], average: bool = False) -> None:
        """Sum (average: mean, as DDP's reducer: divided by the ranks, then summed) each parameter's .grad over
        the ranks, in place; a parameter without one counts as zeros, so every rank runs the same collectives.

        Explicit, not DistributedDataParallel: the trained tensors are one layer's handful (a few lanes'), so
        flat all-reduces after backward cost no more than DDP's buckets, and the loss's forward does not go
        through one wrapped module (prefix cache, then suffix from the trained layer, then the chunked lm_head
        loss), which is what DDP hooks into. Called after backward and before clipping, so that clipping and the
        optimizer step see the same gradient on every rank. Flat buffers of at most GRADIENT_BUCKET_ELEMENTS:
        never a second copy of many large layers at once.
        """
        if not self.distributed:
            return
        for grads in _gradient_buckets(params):
            flat = torch.cat([g.reshape(-1) for g in grads])
            if average:
                flat.div_(self.size)
            total = self.all_reduce_sum(flat)
            offset = 0
            for g in grads:
                g.copy_(total[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def barrier(self) -> None:
        if not self.distributed:
            return
        import torch.distributed as dist

        self._collective("barrier", lambda: dist.barrier())

    def same_on_every_rank(self, value: int, what: str) -> None:
        """ValueError unless every rank holds the same integer `value` (e.g. the step each resumed from)."""
        if not self.distributed:
            return
        pair = torch.tensor([value, -value], dtype=torch.float64)
        import torch.distributed as dist

        buffer = self._to_collective_device(pair)
        self._collective("check", lambda: dist.all_reduce(buffer, op=dist.ReduceOp.MAX))
        high, low = float(buffer[0]), -float(buffer[1])
        if high != low:
            raise ValueError(f"the ranks disagree on {what} ({low:g} .. {high:g}); every rank must see the same "
                             "output directory (a shared file system)")

    def close(self) -> None:
        """Leave the process group (no-op for one process)."""
        if self._group_alive:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._group_alive = False


# Gradients are all-reduced in flat buffers of at most this many elements (DDP's default bucket is 25 MiB).
GRADIENT_BUCKET_ELEMENTS = 1 << 23


def _gradient_buckets(params: list[Tensor]) -> list[list[Tensor]]:
    """The parameters' gradients (zeros where a parameter has none yet), grouped in order into runs of one
    device and dtype and at most GRADIENT_BUCKET_ELEMENTS elements (a larger gradient gets a bucket alone)."""
    buckets: list[list[Tensor]] = []
    size, key = 0, None
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grad = p.grad
        if not buckets or (grad.device, grad.dtype) != key or size + grad.numel() > GRADIENT_BUCKET_ELEMENTS:
            buckets.append([])
            size, key = 0, (grad.device, grad.dtype)
        buckets[-1].append(grad)
        size += grad.numel()
    return buckets


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def collective_timeout() -> float:
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0 seconds, got {text!r}")
    return value


def launched_by_torchrun() -> bool:
    """Whether this process has torchrun's (or an equivalent launcher's) environment."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise ValueError(f"{name} is not set: launch with torchrun (or set RANK, WORLD_SIZE, LOCAL_RANK, "
                             "MASTER_ADDR and MASTER_PORT)")
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None


def init_world(device: str | None = None) -> World:
    """The World of this process, from torchrun's environment; World() without it.

    device: "cpu" or "cuda" to force one; None: CUDA when available. With WORLD_SIZE > 1 the process group
    is joined (gloo on CPU, nccl on CUDA) with the collective timeout of `collective_timeout()`.
    """
    if not launched_by_torchrun():
        return World()
    rank, size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK", rank)
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"RANK {rank} and WORLD_SIZE {size} do not describe a process group")
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices: start at "
                             "most one rank per GPU (--nproc-per-node)")
        where = torch.device("cuda", local_rank)
        torch.cuda.set_device(where)
    else:
        where = torch.device("cpu")
    if size == 1:
        return World(rank=0, size=1, local_rank=local_rank, device=where)
    import torch.distributed as dist

    backend = "nccl" if where.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=collective_timeout())
    try:
        dist.init_process_group(backend=backend, rank=rank, world_size=size, timeout=timeout,
                                **({"device_id": where} if backend == "nccl" else {}))
    except (RuntimeError, ConnectionError, TimeoutError) as error:
        raise PeerRankError(f"rank {rank} of {size}: could not join the process group ({_first_line(error)}); check "
                            "that every rank was started with the same MASTER_ADDR / MASTER_PORT") from error
    return World(rank=rank, size=size, local_rank=local_rank, device=where, backend=backend, _group_alive=True)
