"""OneLayerGRPOTrainer with several processes (accelerate's data parallel, gloo on CPU) against TRL's own
GRPOTrainer run the same way (the [trl] extra; skipped without it).

Two ranks are started here with the environment torchrun / `accelerate launch` set (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); this file is also their entry point (`python tests/test_trl_distributed.py OUT`). In
each rank the same tiny model, prompts, reward and seed train through TRL's GRPOTrainer (only layer LAYER
trainable, beta > 0, TRL's DDP-wrapped model and its full reference model) and through OneLayerGRPOTrainer; each
rank's data is its share of the global batch. Rank 0 saves both trained layers and the logged metrics; the
trained layers must agree to float32 rounding. One more run with the gradient averaging switched off must not:
the check that the comparison can see it. Each process start costs seconds of imports on 2 CPU cores, so one
pair of ranks trains every case.
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
for entry in (ROOT, ROOT / "tests"):  # as a script (the ranks), neither is on the path
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

trl = pytest.importorskip("trl", reason="the [trl] extra is not installed")
datasets = pytest.importorskip("datasets", reason="the [trl] extra is not installed")

from test_trl_backend import (LAYER, PROMPTS, VOCAB, digit_share, relative_difference, tiny_model,  # noqa: E402
                              train, trl_args)

RANKS = 2
TIMEOUT_S = 240
# Each case: 3 optimizer steps of 16 rows (2 ranks x 8: 4 prompts x 4 generations), TRL's then ours, per rank.
CASES = {
    "dapo-mu1": dict(num_iterations=1),
    "grpo-mu2": dict(num_iterations=2, loss_type="grpo"),
    "dapo-accum2": dict(num_iterations=1, per_device_train_batch_size=4, gradient_accumulation_steps=2),
    # normalized by the whole batch's tokens, as dapo; its own clip metric
    "cispo-mu2": dict(num_iterations=2, loss_type="cispo", epsilon_high=1.2),
    # sequence level: the clip metrics have one value per row (reduced weighted by rows, not tokens)
    "luspo-sequence": dict(num_iterations=2, loss_type="luspo", importance_sampling_level="sequence"),
    # one gamma weight per row, logged as a mean over every rank's rows
    "vespo-mu2": dict(num_iterations=2, loss_type="vespo"),
    # the entropy window is reduced over the ranks before the coefficient moves
    "adaptive-entropy-mu2": dict(num_iterations=2, use_adaptive_entropy=True, entropy_coef=0.05, entropy_target=10.0,
                                 entropy_coef_delta=0.02),
}
UNAVERAGED = "dapo-mu1"  # the case also run without the gradient averaging
LANES_AS = "dapo-mu1"  # the settings of the lanes run, whose first lane trains that case's layer
LANES = [LAYER, 2]
LOGGED = ("loss", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
          "cispo_clip_ratio", "vespo/phi_seq_mean", "entropy_coef")


def _layer(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.layers[LAYER].state_dict().items()}


def _train(trainer_class, out: Path, overrides: dict, **kwargs):
    from bench.tokenizer import bench_tokenizer

    model = tiny_model(out / "model")  # written by rank 0 alone (transformers' save_pretrained under torch.distributed)
    torch.distributed.barrier()  # TRL reloads its reference model from there
    if trainer_class is trl.GRPOTrainer:  # how a TRL user trains one layer
        model.requires_grad_(False)
        model.model.layers[LAYER].requires_grad_(True)
    data = datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS * 4])
    trainer = trainer_class(model=model, reward_funcs=[digit_share], args=trl_args(out / "run", **overrides),
                            train_dataset=data, processing_class=bench_tokenizer(VOCAB), **kwargs)
    trainer.train()
    return trainer, _layer(model)


def _logged(trainer) -> dict[str, dict[int, float]]:
    """{metric: {optimizer step: logged value}}."""
    return {name: {h["step"]: h[name] for h in trainer.state.log_history if name in h} for name in LOGGED}


def run_rank(out: Path) -> None:
    """One rank: every case through TRL and OneLayerGRPOTrainer (and the unaveraged run); the trained layers and
    logs go to out/CASE/ (rank 0; our layer from every rank)."""
    from accelerate import PartialState

    import onelayer_fast.trl_trainer as trl_trainer
    from onelayer_fast.trl import OneLayerGRPOTrainer

    PartialState(cpu=True)  # joins the process group (gloo) now: the model files are then written by rank 0 alone
    rank = int(os.environ["RANK"])
    scratch = out / "scratch"
    runs = [(case, overrides, True) for case, overrides in CASES.items()] + [("unaveraged", CASES[UNAVERAGED], False)]
    for case, overrides, averaged in runs:
        target = out / case
        target.mkdir(parents=True, exist_ok=True)
        record = {}
        if averaged:
            reference, trl_layer = _train(trl.GRPOTrainer, scratch / case / "trl", overrides)
            assert reference.accelerator.num_processes == RANKS
            assert isinstance(reference.model_wrapped, torch.nn.parallel.DistributedDataParallel)
            record["trl"] = _logged(reference)
            record["trl_last_world_entropy"] = reference._last_world_entropy
            if rank == 0:
                torch.save(trl_layer, target / "trl.pt")
        saved = trl_trainer.average_gradients
        if not averaged:  # what DDP's reducer alone would give: nothing (the loss never runs DDP's forward)
            trl_trainer.average_gradients = lambda parameters, world_size: None
        try:
            ours, our_layer = _train(OneLayerGRPOTrainer, scratch / case / "olf", overrides, layer=LAYER)
        finally:
            trl_trainer.average_gradients = saved
        assert isinstance(ours.model_wrapped, torch.nn.parallel.DistributedDataParallel)
        assert ours.prefix_passes == 0  # generation ran the unwrapped model, and its prefix states were kept
        record["ours"] = _logged(ours)
        record["ours_last_world_entropy"] = ours._last_world_entropy
        torch.save(our_layer, target / f"ours-rank{rank}.pt")
        if rank == 0:
            (target / "logs.json").write_text(json.dumps(record))
    # Lanes: the first (unseeded) lane samples as its single run does, so it trains the single run's layer
    lanes, _ = _train(OneLayerGRPOTrainer, scratch / "lanes", CASES[LANES_AS], layer=LANES)
    assert not isinstance(lanes.model_wrapped, torch.nn.parallel.DistributedDataParallel)  # it trains nothing
    target = out / "lanes"
    target.mkdir(parents=True, exist_ok=True)
    for k in range(len(LANES)):
        layer = {name: value.detach().clone() for name, value in lanes.lane_layer(k).state_dict().items()}
        torch.save(layer, target / f"lane{k}-rank{rank}.pt")
    if rank == 0:
        logged = {name: {h["step"]: h[name] for h in lanes.state.log_history if name in h}
                  for name in ("lane0/kl", "lane0/loss")}
        (target / "logs.json").write_text(json.dumps(logged))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, port: int) -> dict[str, str]:
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(RANKS), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(RANKS),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               TRL_EXPERIMENTAL_SILENCE="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Every case trained by 2 ranks (gloo); returns the directory of their results."""
    out = tmp_path_factory.mktemp("trl-ddp")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, str(out)], env=rank_env(rank, port), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(RANKS)]
    try:
        results = [proc.communicate(timeout=TIMEOUT_S) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, (stdout, stderr)) in enumerate(zip(procs, results)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_same_trained_layer_as_trl(two_ranks, tmp_path, case):
    directory = two_ranks / case
    trl_layer, ours = torch.load(directory / "trl.pt"), torch.load(directory / "ours-rank0.pt")
    initial = tiny_model(tmp_path / "init").model.layers[LAYER].state_dict()
    zeros = {k: torch.zeros_like(v) for k, v in initial.items()}
    assert relative_difference({k: trl_layer[k] - initial[k] for k in initial}, zeros) > 1e-3, "the layer barely moved"
    assert relative_difference(trl_layer, ours) < 1e-5
    assert relative_difference(ours, torch.load(directory / "ours-rank1.pt")) == 0.0  # one update on every rank
    # The logged loss metrics are every rank's (TRL reduces them across processes; so must we).
    logs = json.loads((directory / "logs.json").read_text())
    assert len(logs["trl"]["kl"]) == 3 and max(logs["trl"]["kl"].values()) > 0
    for name in LOGGED:
        trl_values, our_values = logs["trl"][name], logs["ours"][name]
        if name == "entropy":  # ours logs it only at the steps its loss takes the entropies (TRL's: always)
            trl_values = {step: trl_values[step] for step in our_values}
        assert our_values == pytest.approx(trl_values, rel=1e-4, abs=1e-7), name
    if CASES[case].get("use_adaptive_entropy"):  # the coefficient moved on every rank's window entropy
        assert len(logs["trl"]["entropy_coef"]) == 3 and logs["ours"]["entropy"]
        # the last window's entropy over both ranks' tokens (rank 0's own tokens give another)
        assert logs["ours_last_world_entropy"] == pytest.approx(logs["trl_last_world_entropy"], rel=1e-5)
    if case == "grpo-mu2":
        assert max(logs["trl"]["clip_ratio/region_mean"].values()) > 0


@pytest.mark.slow
def test_two_processes_with_lanes(two_ranks, tmp_path):
    """Lanes in two processes: every lane's gradient is averaged (the ranks keep one copy of each lane), the
    first lane trains what its single run trains, and its loss metrics are over both ranks' rows."""
    directory = two_ranks / "lanes"
    initial = tiny_model(tmp_path / "init").model.layers
    for k, layer in enumerate(LANES):
        rank0, rank1 = (torch.load(directory / f"lane{k}-rank{r}.pt") for r in range(RANKS))
        assert relative_difference(rank0, rank1) == 0.0, k
        start = initial[layer].state_dict()
        moved = {n: rank0[n] - start[n] for n in start}
        assert relative_difference(moved, {n: torch.zeros_like(v) for n, v in start.items()}) > 1e-3, k
    single = torch.load(two_ranks / LANES_AS / "ours-rank0.pt")
    assert relative_difference(single, torch.load(directory / "lane0-rank0.pt")) < 1e-5
    logs = json.loads((directory / "logs.json").read_text())
    single = json.loads((two_ranks / LANES_AS / "logs.json").read_text())["ours"]
    assert logs["lane0/kl"] == pytest.approx(single["kl"], rel=1e-4, abs=1e-7)
    assert logs["lane0/loss"] == pytest.approx(single["loss"], rel=1e-4, abs=1e-7)  # Trainer's: both ranks' mean


@pytest.mark.slow
def test_gradient_averaging_is_what_makes_them_agree(two_ranks, tmp_path):
    """Without the averaging each rank steps on its own rows' gradient: the ranks drift apart and neither equals
    TRL's; and one process over the same per-device batch trains another layer (each rank's rows differ)."""
    from onelayer_fast.trl import OneLayerGRPOTrainer

    trl_layer = torch.load(two_ranks / UNAVERAGED / "trl.pt")
    rank0, rank1 = (torch.load(two_ranks / "unaveraged" / f"ours-rank{r}.pt") for r in range(RANKS))
    assert relative_difference(trl_layer, rank0) > 1e-3
    assert relative_difference(rank0, rank1) > 1e-3
    _, one_process = train(OneLayerGRPOTrainer, tmp_path, layer_kwargs={"layer": LAYER}, **CASES[UNAVERAGED])
    assert relative_difference(trl_layer, one_process) > 1e-3


def test_sharded_and_model_parallel_setups_are_refused():
    """Only plain data parallel is supported: DeepSpeed, FSDP (from the GRPOConfig or an accelerate config),
    model-parallel accelerate setups and a cross-process entropy quantile are refused with a clear message."""
    from types import SimpleNamespace

    from onelayer_fast.trl_trainer import _unsupported, unsupported_parallelism

    def args(**changes):
        defaults = dict(deepspeed=None, fsdp=False, world_size=2, top_entropy_quantile=1.0)
        return SimpleNamespace(**{**defaults, **changes})

    assert _unsupported(args(), {}) is None  # several processes, plain data parallel
    assert "DeepSpeed" in _unsupported(args(deepspeed="ds.json"), {})
    assert "FSDP" in _unsupported(args(fsdp=True), {})
    assert "top_entropy_quantile" in _unsupported(args(top_entropy_quantile=0.5), {})
    assert _unsupported(args(world_size=1, top_entropy_quantile=0.5), {}) is None

    def trainer(kind="MULTI_GPU", deepspeed=False, fsdp=False, parallelism=None):
        accelerator = SimpleNamespace(distributed_type=kind, parallelism_config=parallelism)
        return SimpleNamespace(is_deepspeed_enabled=deepspeed, is_fsdp_enabled=fsdp, accelerator=accelerator)

    assert unsupported_parallelism(trainer()) is None and unsupported_parallelism(trainer("MULTI_CPU")) is None
    assert "DeepSpeed" in unsupported_parallelism(trainer("DEEPSPEED", deepspeed=True))
    assert "FSDP" in unsupported_parallelism(trainer("FSDP", fsdp=True))
    assert "XLA" in unsupported_parallelism(trainer("XLA"))
    assert "parallelism_config" in unsupported_parallelism(trainer(parallelism=SimpleNamespace(tp_enabled=True)))


if __name__ == "__main__":  # a rank
    run_rank(Path(sys.argv[1]))
