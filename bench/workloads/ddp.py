"""Workload `ddp`: data-parallel scaling on the CPU: the step time of one whole GRPO iteration (keyed sampling,
rewards on the arithmetic task, one update cycle) in 1 process vs 2 ranks (gloo) at the same total batch, both
through the same distributed code path (`--sampler keyed`: World of size 1 vs a gloo group of 2).

Design: the ranks are separate processes, so a contender's Runner (in the harness's worker subprocess) starts a
persistent group of rank processes (`python -m bench.ddp_rank ...`, with torchrun's environment: RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) that each build the model and a GRPOTrainer and then wait on
stdin for commands. The Runner's step() sends "step" to every rank and returns when every rank has answered:
the harness times one `GRPOTrainer.train_step()` of the whole group (the slowest rank), plus a pipe round trip
(well under a millisecond). `ranks1` runs the same way, one rank process with WORLD_SIZE=1, so both contenders pay
the same overheads. The harness's weight checks go through the ranks too: the Runner's trainable / frozen
"tensors" are each rank's float64 checksums of its trained layer / of the frozen weights, fetched outside the
timed region (and every rank's trained layer must have the same checksum: identical weights on every rank).

OMP threads: 2 ranks x (cores // 2) threads each, 1 process all the cores (`torch.set_num_threads` and
OMP_NUM_THREADS in each rank). The worker's own RSS (the table's work MiB) is the coordinating process only; each
rank's peak RSS is in the cross-check lines and the JSON (rank_peak_rss_mib).
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import statistics
import subprocess
import sys
from typing import Any

from bench.harness import REPO, Runner, Workload, checksum, scratch_dir
from bench.workloads.iteration import iteration_shapes, iteration_tokens
from bench.workloads.step import STEP_LR, build_model, loss_knobs

DDP_RANKS = {"ranks1": 1, "ranks2": 2}  # contender -> data-parallel ranks
COLLECTIVE_TIMEOUT_S = 300  # ONELAYER_FAST_COLLECTIVE_TIMEOUT_S of the ranks: a hung rank fails the run, not the CI
REPLY_PREFIX = "@ddp "  # the ranks' replies on stdout (anything else a library prints goes to stderr)
# Per-step metrics every rank logs for the whole batch (all-gathered / all-reduced), compared across contenders.
SAMPLED_KEYS = ("reward_mean", "reward_std", "completion_length")  # same keyed draws: must be equal exactly
UPDATE_KEYS = ("loss", "grad_norm", "kl")  # float32 sums in another order: equal to DDP_TOLERANCE
DDP_TOLERANCE = 1e-4  # relative to max(|value|, DDP_SCALE_FLOORS[key])
DDP_SCALE_FLOORS = {"loss": 1e-2, "grad_norm": 1e-2, "kl": 1e-6}  # (as the iteration / layout cross-checks)


def machine_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_rank(ranks: int) -> int:
    """OMP threads of each rank: the machine's cores split evenly over the ranks (at least 1)."""
    return max(1, machine_cores() // ranks)


def ddp_shapes(quick: bool) -> dict[str, Any]:
    """`iteration`'s shapes (the bench shape's model from step_shapes, 4 prompts x 4 generations, arithmetic),
    sampled with keyed draws; the total batch is the same for every contender (2 groups per rank with 2 ranks)."""
    return {**iteration_shapes(quick), "sampler": "keyed", "ranks": DDP_RANKS, "backend": "gloo",
            "threads_per_rank": "machine cores // ranks (1 rank: every core), as torch.set_num_threads and "
                                "OMP_NUM_THREADS"}


# --------------------------------------------------------------------------------------------------
# A rank: `python -m bench.ddp_rank SHAPES_JSON SEED THREADS` under torchrun's environment
# --------------------------------------------------------------------------------------------------


def build_trainer(shapes: dict[str, Any], seed: int, world):
    """The GRPOTrainer of one rank: `iteration`'s onelayer_fast trainer with keyed sampling in `world`."""
    import onelayer_fast as olf
    from bench.tokenizer import bench_tokenizer
    from onelayer_fast.tasks import get_task

    model = build_model(shapes, seed)  # seeded: the same weights on every rank
    tokenizer = bench_tokenizer(shapes["model"]["vocab_size"])
    rows = shapes["num_prompts"] * shapes["num_generations"]  # the whole step's batch; each rank samples its share
    config = olf.GRPOConfig(
        max_steps=10**9, per_device_train_batch_size=rows, num_generations=shapes["num_generations"],
        max_completion_length=shapes["completion_length"], **loss_knobs(shapes), temperature=shapes["temperature"],
        top_p=shapes["top_p"], learning_rate=STEP_LR, seed=seed, sampler=shapes["sampler"])
    run = olf.RunSpec(output_dir=str(scratch_dir("bench-ddp-")), layer=shapes["layer"], mode="single",
                      save_steps=10**9)
    trainer = olf.GRPOTrainer(model, tokenizer, get_task(shapes["task"]), config, run, resume=False, progress=False,
                              world=world)
    trainable = trainer.policy.trainable_parameters()
    ids = {id(p) for p in trainable}
    frozen = [p for p in model.parameters() if id(p) not in ids] + list(trainer.policy.reference_layer.parameters())
    return trainer, trainable, frozen


def step_record(record: dict[str, Any]) -> dict[str, float]:
    """What a rank reports of one train_step: the whole batch's metrics and this rank's own time split."""
    picked = {k: float(record[k]) for k in ("step", *SAMPLED_KEYS, *UPDATE_KEYS) if k in record}
    picked.update(generate_s=record["generate_time"], update_s=record["update_time"], rank_step_s=record["step_time"])
    return picked


def completion_fingerprints(batch) -> list[str]:
    """One short hash per row of the completion tokens sampled (mask applied): equal rows, equal completions."""
    import hashlib

    return [hashlib.sha1(repr(ids[mask.bool()].tolist()).encode()).hexdigest()[:12]
            for ids, mask in zip(batch.completion_ids, batch.completion_mask)]


def rank_main(argv: list[str]) -> int:
    shapes, seed, threads = json.loads(argv[0]), int(argv[1]), int(argv[2])
    reply = os.fdopen(os.dup(1), "w")  # the reply channel; fd 1 itself now goes to stderr (library prints)
    os.dup2(2, 1)
    import resource

    import torch

    from onelayer_fast.distributed import init_world

    torch.set_num_threads(threads)
    world = init_world(device="cpu")  # WORLD_SIZE 1: World of one process; 2: the gloo group

    def send(**fields) -> None:
        reply.write(REPLY_PREFIX + json.dumps(fields) + "\n")
        reply.flush()

    trainer, trainable, frozen = build_trainer(shapes, seed, world)
    sampled: dict[str, list[str]] = {}
    make_rollouts = trainer.make_rollouts

    def fingerprinted_rollouts(examples):  # this rank's completions, one fingerprint per row, for the cross-check
        batch, texts = make_rollouts(examples)
        sampled["rows"] = completion_fingerprints(batch)
        return batch, texts

    trainer.make_rollouts = fingerprinted_rollouts
    send(ready=True, rank=world.rank, size=world.size, threads=torch.get_num_threads(),
         trainable_params=sum(p.numel() for p in trainable), sampler=trainer.config.sampler)
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            record = step_record(trainer.train_step())
            send(record=record, rows=sampled.pop("rows"),
                 peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        elif command == "checksums":
            send(trainable=checksum(trainable), frozen=checksum(frozen))
        elif command == "quit":
            break
        else:
            raise SystemExit(f"rank {world.rank}: unknown command {command!r}")
    world.close()
    return 0


# --------------------------------------------------------------------------------------------------
# The worker's side: a persistent group of rank processes, and the Runner on it
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankGroup:
    """`size` rank processes of one data-parallel job, each answering one JSON line per command."""

    def __init__(self, size: int, shapes: dict[str, Any], seed: int, threads: int):
        port = free_port()
        logs = scratch_dir("bench-ddp-ranks-")
        self.stderr_paths = [logs / f"rank{r}.stderr" for r in range(size)]
        self.procs = []
        for rank in range(size):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       OMP_NUM_THREADS=str(threads), ONELAYER_FAST_COLLECTIVE_TIMEOUT_S=str(COLLECTIVE_TIMEOUT_S),
                       CUDA_VISIBLE_DEVICES="")
            with open(self.stderr_paths[rank], "w") as err:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "bench.ddp_rank", json.dumps(shapes), str(seed), str(threads)],
                    cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True))
        atexit.register(self.close)
        self.ready = self._replies()

    def _reply(self, rank: int) -> dict[str, Any]:
        proc = self.procs[rank]
        while True:
            line = proc.stdout.readline()
            if not line:
                proc.wait(timeout=30)
                tail = self.stderr_paths[rank].read_text()[-3000:]
                raise RuntimeError(f"ddp rank {rank} of {len(self.procs)} exited with code {proc.returncode}:\n{tail}")
            if line.startswith(REPLY_PREFIX):
                return json.loads(line[len(REPLY_PREFIX):])

    def _replies(self) -> list[dict[str, Any]]:
        return [self._reply(rank) for rank in range(len(self.procs))]

    def command(self, command: str) -> list[dict[str, Any]]:
        """Send `command` to every rank; every rank's reply, in rank order."""
        for proc in self.procs:
            proc.stdin.write(command + "\n")
            proc.stdin.flush()
        return self._replies()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.stdin.write("quit\n")
                    proc.stdin.close()
                except OSError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class RankChecksums:
    """The harness's `trainable` / `frozen` tensors for a job whose weights live in its ranks: iterating fetches
    every rank's float64 checksum of those weights (outside the timed region) and yields rank 0's as a tensor;
    ranks whose checksums differ (weights no longer identical on every rank) are recorded in `info`."""

    def __init__(self, group: RankGroup, key: str, info: dict[str, Any]):
        self.group, self.key, self.info = group, key, info

    def __iter__(self):
        import torch

        values = [reply[self.key] for reply in self.group.command("checksums")]
        if len(set(values)) != 1:
            self.info["ranks_differ"].append(f"{self.key} weight checksums {values} after step "
                                             f"{len(self.info['records'])}")
        return iter([torch.tensor([values[0]], dtype=torch.float64)])


def ddp_setup(contender: str, shapes: dict[str, Any], seed: int) -> Runner:
    ranks = DDP_RANKS[contender]
    threads = threads_per_rank(ranks)
    group = RankGroup(ranks, shapes, seed, threads)
    info: dict[str, Any] = {
        "ranks": ranks, "threads_per_rank": threads, "machine_cores": machine_cores(),
        "rank_threads": [r["threads"] for r in group.ready], "trainable_params": group.ready[0]["trainable_params"],
        "sampler": group.ready[0]["sampler"],
        "records": [],  # rank 0's record of every step this worker ran (warm-up included), for the cross-check
        "rank_peak_rss_mib": [None] * ranks,
        "ranks_differ": [],  # where the ranks' logged metrics or weights were not identical (must stay empty)
    }

    def step() -> list[dict[str, float]]:
        replies = group.command("step")
        records = [r["record"] for r in replies]
        shared = ("step", *SAMPLED_KEYS, *UPDATE_KEYS)  # the whole batch's, on every rank
        for rank, rec in enumerate(records[1:], 1):
            differ = [k for k in shared if rec.get(k) != records[0].get(k)]
            if differ:
                info["ranks_differ"].append(f"step {records[0]['step']:.0f}: rank {rank} logged other {differ}")
        # the whole batch's completions: every rank's rows, in rank order (its groups' order in the step)
        info["records"].append({**records[0], "rows": [row for r in replies for row in r["rows"]]})
        info["rank_step_s"] = [r["rank_step_s"] for r in records]
        info["rank_peak_rss_mib"] = [r["peak_rss_mib"] for r in replies]
        return [records[0]]

    return Runner(step, RankChecksums(group, "trainable", info), RankChecksums(group, "frozen", info), info)


# --------------------------------------------------------------------------------------------------
# Report: scaling and the equality of the two contenders' runs
# --------------------------------------------------------------------------------------------------


def compare_records(a: list[dict[str, Any]], b: list[dict[str, Any]], ranks: int = 2) -> tuple[int, list[str], str | None]:
    """-> (steps compared, lines of every disagreement, where the runs parted or None).

    Steps whose completions are identical (every row's fingerprint) must log the same sampled metrics exactly and
    the same update metrics to DDP_TOLERANCE. In float32 the two runs may part: a 2-group batch on 1 thread and a
    4-group batch on 2 threads give logits that differ in the last bits, and a keyed draw that falls within that
    difference of a token boundary picks another token (in float64 they never part over tests/test_distributed.py's
    steps, nor over 6 steps of the quick shapes here). The sampler orders tokens by probability (for top_p), and
    a random-init model's near-uniform distribution over a 32000-token vocabulary has many near-ties that rounding
    reorders, so at the full shape several rows of the first step part (3 of 16 measured); from there on the runs
    train on different batches and are not compared. A key that depended on the rank would change every row of
    a rank: a whole rank's share of the rows (rows / `ranks`) differing at once is a disagreement."""
    bad, parted, steps = [], None, 0
    for x, y in zip(a, b):
        if x["step"] != y["step"]:
            bad.append(f"step {x['step']:.0f} vs {y['step']:.0f}: not the same step")
            break
        differ = sum(p != q for p, q in zip(x["rows"], y["rows"])) + abs(len(x["rows"]) - len(y["rows"]))
        if differ:
            what = f"step {x['step']:.0f}: {differ} of {len(y['rows'])} completions differ"
            if differ >= max(1, len(y["rows"]) // ranks):
                bad.append(f"{what}: a whole rank's share or more, not float32 rounding flips of keyed draws "
                           f"(fewer than {max(1, len(y['rows']) // ranks)} rows)")
            else:
                parted = (f"{what} (float32 rounding flips of keyed draws), so the runs train on different batches "
                          f"from there: steps {x['step']:.0f}+ not compared")
            break
        steps += 1
        for k in SAMPLED_KEYS:
            if x.get(k) != y.get(k):
                bad.append(f"step {x['step']:.0f} {k}: {x.get(k)!r} vs {y.get(k)!r} (same completions: must be equal)")
        for k in UPDATE_KEYS:
            if k in x and k in y:
                diff = abs(x[k] - y[k])
                if not diff <= DDP_TOLERANCE * max(abs(y[k]), DDP_SCALE_FLOORS[k]):
                    bad.append(f"step {x['step']:.0f} {k}: {x[k]:.8e} vs {y[k]:.8e} (abs diff {diff:.1e})")
    if len(a) != len(b):
        bad.append(f"{len(a)} steps vs {len(b)}")
    return steps, bad, parted


def max_rel_diff(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str, steps: int) -> float:
    return max((abs(x[key] - y[key]) / max(abs(y[key]), DDP_SCALE_FLOORS[key]) for x, y in zip(a[:steps], b[:steps])
                if key in x and key in y), default=0.0)


def ddp_crosscheck(agg: dict[str, Any], shapes: dict[str, Any] | None = None) -> list[str]:
    """Speed-up and scaling efficiency of ranks2 over ranks1 (report only: no target); every rank of a job logged
    the same metrics and held the same weights; ranks1 and ranks2 logged the same rewards (exactly) and losses
    (to DDP_TOLERANCE) for the same steps, round by round ("[MISMATCH]" fails the run)."""
    per = agg["contenders"]
    lines = []
    for name, c in per.items():
        runs = c["runs"]
        recs = [rec for r in runs for rec in r["records"][1:]]  # the measured steps (not the warm-up)
        if recs:
            rss = [max(m for m in r["rank_peak_rss_mib"] if m is not None) for r in runs if r["rank_peak_rss_mib"]]
            lines.append(f"{name}: {runs[0]['ranks']} rank(s) x {runs[0]['threads_per_rank']} threads "
                         f"({runs[0]['machine_cores']} cores); measured steps, medians: generate + rewards "
                         f"{statistics.median(x['generate_s'] for x in recs):.3f} s, update "
                         f"{statistics.median(x['update_s'] for x in recs):.3f} s, rank 0's own step time "
                         f"{statistics.median(x['rank_step_s'] for x in recs):.3f} s (harness: {c['median_s']:.3f} s); "
                         f"largest rank peak RSS {max(rss):.0f} MiB per rank")
        for r in runs:
            for note in r.get("ranks_differ", []):
                lines.append(f"  [MISMATCH] {name} round {r.get('round', 0)}: the ranks differ: {note}")
    if "ranks1" in per and "ranks2" in per:
        one, two = per["ranks1"], per["ranks2"]
        speedup = one["median_s"] / two["median_s"]
        best = one["min_s"] / two["min_s"]
        lines.append(f"scaling: time ranks1 / ranks2 = {one['median_s']:.3f} s / {two['median_s']:.3f} s = "
                     f"{speedup:.2f}x speed-up (best steps {best:.2f}x); scaling efficiency (speed-up / 2) "
                     f"{speedup / 2:.0%} (best steps {best / 2:.0%}). Report only, no target: both ranks run on this "
                     f"one machine and split its {one['runs'][0]['machine_cores']} cores, memory bandwidth and caches "
                     f"(and any other process's load), each holding a full model copy; on separate machines the "
                     f"compute would not be shared")
        for r1 in one["runs"]:
            for r2 in (r for r in two["runs"] if r.get("round", 0) == r1.get("round", 0)):
                steps, bad, parted = compare_records(r1["records"], r2["records"])
                head = f"cross-check ranks1 vs ranks2, round {r1.get('round', 0)}"
                if bad:
                    lines += [f"  [MISMATCH] {head}: {line}" for line in bad]
                    continue
                rel = ", ".join(f"{k} {max_rel_diff(r1['records'], r2['records'], k, steps):.1e}" for k in UPDATE_KEYS)
                lines.append(f"{head}: steps 1-{steps} (warm-up included) sampled the same completions, logged the "
                             f"same {', '.join(SAMPLED_KEYS)} exactly and the same {', '.join(UPDATE_KEYS)} to < "
                             f"{DDP_TOLERANCE:g} x max(|value|, floor {DDP_SCALE_FLOORS}) [MATCH] (largest rel diffs: "
                             f"{rel})" if steps else f"{head}: no step compared")
                if parted:
                    lines.append(f"  then {parted}")
    return lines


def ddp_description(s: dict[str, Any]) -> str:
    m = s["model"]
    cores = machine_cores()
    return (f"data-parallel scaling on the CPU: one whole GRPO iteration ({s['num_prompts']} prompts x "
            f"{s['num_generations']} generations, the same total batch for both contenders, sampled with keyed draws "
            f"(--sampler keyed) up to {s['completion_length']} new tokens, rewarded on the {s['task']} task, then one "
            f"update cycle: num_iterations={s['num_iterations']}, beta={s['beta']}, {s['loss_type']}) in 1 process "
            f"(ranks1, {threads_per_rank(1)} threads) vs 2 gloo ranks x {threads_per_rank(2)} threads (ranks2), on "
            f"{cores} cores, both through the same distributed code path (World of 1 vs a process group of 2); "
            f"Qwen2-shaped random-init fp32 model ({m['num_hidden_layers']} layers, hidden {m['hidden_size']}, vocab "
            f"{m['vocab_size']}, tied, sdpa: the bench shape of `step`), layer {s['layer']} trains; step time = "
            f"the slowest rank's train_step, sent to persistent rank processes over pipes; work MiB = the "
            f"coordinating worker only (rank RSS in the cross-check)"
            f"{' [quick shapes]' if s.get('quick') else ''}")


DDP = Workload(
    name="ddp",
    description=ddp_description,
    contenders=tuple(DDP_RANKS),
    shapes=ddp_shapes,
    setup=ddp_setup,
    tokens_per_step=iteration_tokens,
    tokens_definition="rows x (longest prompt + max completion) positions per iteration, the whole batch over "
                      "every rank (16 x (6 + 64) = 1120 at the full shapes) / median iteration time",
    targets=(),  # report only: two ranks on one machine share its cores
    ratios=(("time", "ranks1", "ranks2"),),
    memory_definition="working_mib: peak RSS growth of the coordinating worker process during the measured steps "
                      "(not the ranks': each rank's peak RSS, ru_maxrss, is in rank_peak_rss_mib and the "
                      "cross-check lines)",
    profile_tensor_peak=False,  # the tensors live in the rank processes
    crosscheck=ddp_crosscheck,
)
