"""Where a lanes step's time goes on this machine: FLOPs and matmul time of one toy-sweep training step as
8 lanes at once, beside the same 8 single-layer runs stepped one at a time (torch profiler counts).

    python -m bench.lanes_flops

Lanes do the same FLOPs as the runs alone; this prints both counts and the matmul seconds, which bound what
batching can gain where matmuls do not get faster per FLOP on bigger batches (CPU). Not a timed benchmark:
profiler timings carry its overhead; compare the two columns, not the absolute seconds.
"""
from __future__ import annotations

import tempfile

from torch.profiler import ProfilerActivity, profile

from bench.workloads.sweep import sweep_grpo_config, sweep_shapes

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def profiled_step(trainer, active: list[int]) -> tuple[float, float]:
    """(GFLOP, matmul seconds) of one train_step of the lanes `active`, after two warm-up steps."""
    for _ in range(2):
        trainer.train_step(active)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        trainer.train_step(active)
    events = prof.key_averages()
    return (sum(e.flops for e in events) / 1e9,
            sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / 1e6)


def main() -> None:
    import onelayer_fast as olf
    from onelayer_fast.tasks import get_task

    shapes = sweep_shapes(quick=False)
    task, config = get_task(shapes["task"]), sweep_grpo_config(shapes)

    def trainer(layers: list[int]):
        model, tokenizer = olf.load_model(shapes["model"], seed=shapes["seed"])
        out = tempfile.mkdtemp(prefix="lanes-flops-")
        runs = [olf.LaneRun(olf.Lane(j), f"{out}/layer-{j}") for j in layers]
        return olf.LaneTrainer(model, tokenizer, task, config, runs, save_steps=10**9, progress=False)

    layers = list(range(8))
    lanes_flops, lanes_mm = profiled_step(trainer(layers), list(range(len(layers))))
    alone = [profiled_step(trainer([j]), [0]) for j in layers]
    alone_flops, alone_mm = sum(f for f, _ in alone), sum(m for _, m in alone)
    print(f"one toy-sweep step (8 prompts x 8 completions per run), layers {layers}:")
    print(f"  8 lanes at once : {lanes_flops:8.2f} GFLOP, matmuls {lanes_mm:.3f} s")
    print(f"  8 runs alone    : {alone_flops:8.2f} GFLOP, matmuls {alone_mm:.3f} s")
    print(f"  FLOP ratio alone / lanes {alone_flops / lanes_flops:.3f}, matmul time ratio {alone_mm / lanes_mm:.2f}")


if __name__ == "__main__":
    main()
