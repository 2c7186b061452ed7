"""Data-parallel training (torch.distributed, gloo on CPU): N ranks x B/N rows give the same update as one process
with B rows through the same code path (keyed sampling, world size 1), for one run (GRPOTrainer) and for lanes
(LaneTrainer); a dead rank stops the group with a clear error and a rerun resumes; the group count must split
across ranks.

The ranks are real processes started here with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); this file is also their entry point (`python tests/test_distributed.py ...`). Each
process start costs seconds of imports on 2 CPU cores, so one pair of ranks trains every single-run equality case,
and one more pair every lane case.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # as a script (the ranks), the repository root is not on the path
    sys.path.insert(0, str(ROOT))

from onelayer_fast.distributed import World  # noqa: E402
from onelayer_fast.trainer import GRPOConfig, GRPOTrainer, RunSpec  # noqa: E402

BASE = dict(max_steps=3, per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
            learning_rate=1e-2, num_iterations=2, beta=0.04, sampler="keyed")
CASES = {
    "dapo-group": dict(loss_type="dapo", scale_rewards="group"),
    "dapo-batch": dict(loss_type="dapo", scale_rewards="batch"),
    "grpo-group": dict(loss_type="grpo", scale_rewards="group"),
    "grpo-batch": dict(loss_type="grpo", scale_rewards="batch"),
    # the entropy bonus normalizes by the whole batch's tokens while grpo averages over its rows
    "grpo-entropy": dict(loss_type="grpo", scale_rewards="group", entropy_coef=0.05),
}
LAYER = 1
RANKS = 2
TIMEOUT_S = 240


def train_layer(output_dir: Path, world: World | None, **overrides) -> tuple[dict[str, torch.Tensor], list[dict]]:
    from onelayer_fast.models import load_model
    from onelayer_fast.tasks.arithmetic import ArithmeticTask

    config = GRPOConfig(**{**BASE, **overrides})
    model, tokenizer = load_model("tiny", seed=config.seed, dtype=torch.float64)
    trainer = GRPOTrainer(model, tokenizer, ArithmeticTask(), config, RunSpec(str(output_dir), layer=LAYER, save_steps=100),
                          progress=False, world=world)
    records = trainer.train()
    return {k: v.detach().clone() for k, v in model.model.layers[LAYER].state_dict().items()}, records


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, port: int, size: int = RANKS) -> dict[str, str]:
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               ONELAYER_FAST_COLLECTIVE_TIMEOUT_S="60", PYTHONPATH=str(ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def launch_ok(args: list[str]) -> None:
    """`launch`, every rank exiting cleanly."""
    for rank, result in enumerate(launch(args)):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stdout}\n{result.stderr}"


def launch(args: list[str], size: int = RANKS) -> list[subprocess.CompletedProcess]:
    """Start `size` ranks of `python tests/test_distributed.py *args` and wait for all of them."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, *args], env=rank_env(rank, port, size), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(size)]
    done = []
    for rank, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-30)) for k in a)


# ------------------------------------------------------------------------------------ equality with one process
@pytest.fixture(scope="module")
def two_rank_layers(tmp_path_factory):
    """Every case trained by 2 ranks (gloo): {case: (rank 0's layer, rank 1's layer, rank 0's records)}."""
    out = tmp_path_factory.mktemp("ddp")
    launch_ok(["equality", str(out)])
    layers = {}
    for case in CASES:
        rank_layers = [torch.load(out / case / f"layer-rank{r}.pt") for r in range(RANKS)]
        records = json.loads((out / case / "records.json").read_text())
        layers[case] = (*rank_layers, records)
    return layers


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_train_as_one_process(tmp_path, two_rank_layers, case):
    rank0, rank1, records = two_rank_layers[case]
    reference, reference_records = train_layer(tmp_path, World(), **CASES[case])
    assert rel_diff(rank0, rank1) == 0.0  # identical gradients on every rank: identical weights
    assert rel_diff(rank0, reference) < 1e-9, case
    # the logged metrics are the whole batch's
    for mine, theirs in zip(records, reference_records):
        for key in ("loss", "kl", "reward_mean", "reward_std", "completion_length", "advantage_mean", "grad_norm",
                    "frac_reward_zero_std", "entropy"):
            if key in theirs:
                # advantages are float32 (as the loss takes them): their mean is 0 up to float32 rounding
                tolerance = 1e-6 if key == "advantage_mean" else 1e-12
                assert mine[key] == pytest.approx(theirs[key], rel=1e-9, abs=tolerance), (case, key)


def _equality_worker(out: Path) -> None:
    from onelayer_fast.distributed import init_world

    world = init_world(device="cpu")
    for case, overrides in CASES.items():
        layer, records = train_layer(out / case, world, **overrides)
        torch.save(layer, out / case / f"layer-rank{world.rank}.pt")
        if world.is_main:
            (out / case / "records.json").write_text(json.dumps(records))
    world.close()


# ----------------------------------------------------------------------------------- errors and a dead rank
def test_groups_must_split_across_ranks(tmp_path):
    from onelayer_fast.models import load_model
    from onelayer_fast.tasks.arithmetic import ArithmeticTask

    model, tokenizer = load_model("tiny")
    config = GRPOConfig(**{**BASE, "per_device_train_batch_size": 12})  # 3 groups of 4
    with pytest.raises(ValueError, match="3 prompt groups per step .* do not split evenly across 2 ranks"):
        GRPOTrainer(model, tokenizer, ArithmeticTask(), config, RunSpec(str(tmp_path)), world=World(rank=0, size=2))
    with pytest.raises(ValueError, match="--sampler generate with 2 data-parallel ranks"):
        GRPOTrainer(model, tokenizer, ArithmeticTask(), GRPOConfig(**{**BASE, "sampler": "generate"}),
                    RunSpec(str(tmp_path)), world=World(rank=0, size=2))


def test_auto_sampler_is_generate_in_one_process_and_recorded_resolved(tmp_path):
    from onelayer_fast.models import load_model
    from onelayer_fast.tasks.arithmetic import ArithmeticTask

    model, tokenizer = load_model("tiny")
    trainer = GRPOTrainer(model, tokenizer, ArithmeticTask(), GRPOConfig(**{**BASE, "sampler": "auto"}),
                          RunSpec(str(tmp_path)), progress=False)
    assert trainer.config.sampler == "generate" and trainer.world is None


def train_argv(output_dir: Path, steps: int = 3) -> list[str]:
    return ["train", "--model", "tiny", "--dtype", "float64", "--output-dir", str(output_dir), "--layer", str(LAYER),
            "--steps", str(steps), "--batch-size", "8", "--num-generations", "4", "--max-completion-length", "6",
            "--learning-rate", "1e-2", "--num-iterations", "2", "--beta", "0.04", "--save-steps", "1",
            "--sampler", "keyed"]


def saved_layer(output_dir: Path) -> dict[str, torch.Tensor]:
    from onelayer_fast import checkpoint

    path = checkpoint.latest_checkpoint(output_dir)
    return {k: v for k, v in checkpoint._read_tensors(path).items()}


@pytest.mark.slow
def test_dead_rank_stops_the_group_and_a_rerun_resumes(tmp_path):
    from onelayer_fast.cli import main

    reference_dir = tmp_path / "reference"
    assert main(train_argv(reference_dir)) == 0  # one process, keyed: the uninterrupted run

    run_dir = tmp_path / "run"
    killed = launch(["cli", "--die-rank", "1", "--die-step", "2", "--", *train_argv(run_dir)])
    assert killed[1].returncode == 17  # the rank that died
    assert killed[0].returncode == 1, killed[0].stderr
    assert "a peer rank probably died" in killed[0].stderr
    assert "rerun the same command to resume" in killed[0].stderr
    assert [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()] == [1, 2]

    # the same command, now under torchrun itself: every rank resumes from step 2's checkpoint
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              "-m", "onelayer_fast", *train_argv(run_dir)],
                             env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)), cwd=ROOT,
                             capture_output=True, text=True, timeout=TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr
    assert "done: 3 steps" in resumed.stdout and "on 2 ranks" in resumed.stdout
    assert [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert rel_diff(saved_layer(run_dir), saved_layer(reference_dir)) < 1e-9


def _cli_worker(args: list[str]) -> int:
    """`cli --die-rank R --die-step S -- <onelayer-fast args>`: the CLI, with rank R exiting at once (os._exit,
    as a killed process would) when it is about to train step S + 1."""
    from onelayer_fast.cli import main

    assert args[1] == "--die-rank" and args[3] == "--die-step" and args[5] == "--", args
    die_rank, die_step = int(args[2]), int(args[4])
    if int(os.environ["RANK"]) == die_rank:
        original = GRPOTrainer.train_step

        def train_step(self):
            if self.step == die_step:
                os._exit(17)
            return original(self)

        GRPOTrainer.train_step = train_step
    return main(args[6:])


# ------------------------------------------------------------------------------- lanes (LaneTrainer) across ranks
# Two lanes of different layers, one at its own learning rate; a constant schedule, so that a run stopped after 2
# steps and resumed to 3 computes what an uninterrupted one does.
LANE_BASE = dict(BASE, lr_scheduler_type="constant")
LANE_CASES = {
    "lanes-dapo": dict(loss_type="dapo", scale_rewards="group"),
    "lanes-grpo": dict(loss_type="grpo", scale_rewards="batch"),
}
RESUMED_CASE = "lanes-grpo"  # the ranks train it 2 steps, then a new trainer (a fresh model) resumes it to 3


def lane_runs(output_dir: Path):
    from onelayer_fast.lane_trainer import LaneRun
    from onelayer_fast.lanes import Lane

    return [LaneRun(Lane(LAYER), str(output_dir / "lane-a")),
            LaneRun(Lane(LAYER + 1, learning_rate=3e-2), str(output_dir / "lane-b"))]


def train_lanes(output_dir: Path, world: World | None, max_steps: int = 3, **overrides) -> dict[str, dict]:
    """{lane directory name: its trained layer} after training the two lanes of `lane_runs` to max_steps."""
    from onelayer_fast.lane_trainer import LaneTrainer
    from onelayer_fast.models import load_model
    from onelayer_fast.tasks.arithmetic import ArithmeticTask

    config = GRPOConfig(**{**LANE_BASE, **overrides, "max_steps": max_steps})
    model, tokenizer = load_model("tiny", seed=config.seed, dtype=torch.float64)
    trainer = LaneTrainer(model, tokenizer, ArithmeticTask(), config, lane_runs(output_dir), save_steps=1,
                          progress=False, world=world)
    trainer.train()
    return {Path(run.output_dir).name: {k: v.detach().clone() for k, v in layer.state_dict().items()}
            for run, layer in zip(trainer.runs, trainer.policy.lane_layers)}


def lane_log(lane_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (lane_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_rank_lanes(tmp_path_factory):
    """Every lane case trained by 2 ranks (gloo): {case: (its output dir, rank 0's lanes, rank 1's lanes)}."""
    out = tmp_path_factory.mktemp("ddp-lanes")
    launch_ok(["lanes", str(out)])
    return {case: (out / case, *(torch.load(out / case / f"lanes-rank{r}.pt") for r in range(RANKS)))
            for case in LANE_CASES}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LANE_CASES))
def test_two_ranks_train_lanes_as_one_process(tmp_path, two_rank_lanes, case):
    out, rank0, rank1 = two_rank_lanes[case]
    reference = train_lanes(tmp_path, World(), **LANE_CASES[case])  # one process, the same (data-parallel) path
    assert rank0.keys() == reference.keys() == {"lane-a", "lane-b"}
    for lane in reference:
        assert rel_diff(rank0[lane], rank1[lane]) == 0.0, (case, lane)  # every rank steps each lane alike
        assert rel_diff(rank0[lane], reference[lane]) < 1e-9, (case, lane)
        # rank 0 alone wrote each lane's log (a resumed run appends to it), with the lane's whole-batch metrics
        mine, theirs = lane_log(out / lane), lane_log(tmp_path / lane)
        assert [r["step"] for r in mine] == [r["step"] for r in theirs] == [1, 2, 3]
        for a, b in zip(mine, theirs):
            for key in ("loss", "kl", "reward_mean", "reward_std", "completion_length", "advantage_mean", "grad_norm",
                        "clip_ratio/region_mean", "learning_rate", "frac_reward_zero_std"):
                assert key in b, key
                tolerance = 1e-6 if key == "advantage_mean" else 1e-12  # advantages are float32 (see above)
                assert a[key] == pytest.approx(b[key], rel=1e-9, abs=tolerance), (case, lane, key)
    # the lanes really differ (layer and learning rate), and the second lane ran at its own rate
    assert rel_diff(reference["lane-a"], reference["lane-b"]) > 0
    assert lane_log(out / "lane-b")[0]["learning_rate"] == pytest.approx(3e-2)
    assert lane_log(out / "lane-a")[0]["learning_rate"] == pytest.approx(LANE_BASE["learning_rate"])


def _lanes_worker(out: Path) -> None:
    from onelayer_fast.distributed import init_world

    world = init_world(device="cpu")
    for case, overrides in LANE_CASES.items():
        if case == RESUMED_CASE:  # stopped after step 2 (checkpointed), then every rank resumes it to step 3
            train_lanes(out / case, world, max_steps=2, **overrides)
        layers = train_lanes(out / case, world, **overrides)
        torch.save(layers, out / case / f"lanes-rank{world.rank}.pt")
    world.close()


def test_lane_groups_must_split_across_ranks(tmp_path):
    from onelayer_fast.lane_trainer import LaneTrainer
    from onelayer_fast.models import load_model
    from onelayer_fast.tasks.arithmetic import ArithmeticTask

    model, tokenizer = load_model("tiny")
    config = GRPOConfig(**{**LANE_BASE, "per_device_train_batch_size": 12})  # 3 groups of 4 per lane
    with pytest.raises(ValueError, match="each lane's 3 prompt groups per step .* do not split evenly across 2 ranks"):
        LaneTrainer(model, tokenizer, ArithmeticTask(), config, lane_runs(tmp_path), world=World(rank=0, size=2))
    assert not (tmp_path / "lane-a").exists()  # refused before anything was written


def test_rewards_too_large_on_another_rank_raise_on_every_rank():
    """A rank whose own rewards are fine raises too when another rank's are too large to train on (the check is
    made on the gathered batch), so no rank is left waiting in a collective."""
    from onelayer_fast.tasks.arithmetic import ArithmeticTask
    from onelayer_fast.trainer import _data_parallel_advantages
    from onelayer_fast.update import DivergenceError

    class RankZeroOfTwo:  # the other rank's rows are huge
        rank, size = 0, 2

        def all_gather_rows(self, local: torch.Tensor) -> torch.Tensor:
            return torch.cat([local, torch.full_like(local, 1e20)])

    rewards = torch.rand(4, dtype=torch.float64)
    with pytest.raises(DivergenceError, match="too large to train on"):
        _data_parallel_advantages(GRPOConfig(**BASE), ArithmeticTask(), None, rewards, RankZeroOfTwo())
    fine = _data_parallel_advantages(GRPOConfig(**BASE), ArithmeticTask(), None, rewards, World())
    assert fine.shape == (4,) and torch.isfinite(fine).all()


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "equality":
        _equality_worker(Path(sys.argv[2]))
    elif sys.argv[1] == "lanes":
        _lanes_worker(Path(sys.argv[2]))
    elif sys.argv[1] == "cli":
        sys.exit(_cli_worker(sys.argv[1:]))
    else:
        raise SystemExit(f"unknown worker {sys.argv[1]!r}")
