"""Shared test helpers: per-test seeding, a verbose `assert_close`, tiny random-init HF models.

Helpers are exposed as fixtures (`assert_close`, `tiny_model`) so that test modules need no import of
this file (which would break if `tests/` ever became a package).
"""
from __future__ import annotations

import random

import pytest
import torch

ARCHS = ("qwen2", "qwen3", "llama")

# Small enough that a forward + backward takes milliseconds on 2 CPU cores, large enough to exercise
# grouped-query attention (num_key_value_heads < num_attention_heads) and several layers.
_ARCH_DEFAULTS = {
    # qwen2: tied embeddings (lm_head.weight is embed_tokens.weight)
    "qwen2": dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True),
    # qwen3: untied, q/k norms, explicit head_dim
    "qwen3": dict(vocab_size=131, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False),
    # llama: untied
    "llama": dict(vocab_size=113, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False),
}


def build_tiny_model(arch: str, **overrides) -> torch.nn.Module:
    """A random-init float32 causal LM of `arch` in eval mode, sdpa attention."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    classes = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
    }
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}, expected one of {ARCHS}")
    config_cls, model_cls = classes[arch]
    kwargs = dict(_ARCH_DEFAULTS[arch])
    # A larger init than HF's 0.02 so the next-token distributions are far from uniform and the
    # gradients are not vanishingly small.
    kwargs.update(max_position_embeddings=128, initializer_range=0.1, attn_implementation="sdpa")
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    model = model_cls(config).to(torch.float32).eval()
    assert config.num_key_value_heads < config.num_attention_heads
    assert model.config._attn_implementation == "sdpa"
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == bool(config.tie_word_embeddings), (arch, tied)
    return model


def _mismatch_report(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, name: str) -> str | None:
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        return f"{name}: shape mismatch, actual {tuple(a.shape)} vs expected {tuple(e.shape)}"
    if a.numel() == 0:
        return None
    # Identical non-finite values (inf == inf, nan vs nan) count as equal; anything else non-finite is a mismatch.
    same_nonfinite = ~torch.isfinite(e) & ((a == e) | (a.isnan() & e.isnan()))
    diff = (a - e).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    diff = torch.where(same_nonfinite, torch.zeros_like(diff), diff)
    bad = ~(diff <= atol + rtol * e.abs().nan_to_num(posinf=0.0)) & ~same_nonfinite
    n_bad = int(bad.sum())
    if n_bad == 0:
        return None
    flat = int(torch.argmax(torch.where(bad, diff, torch.zeros_like(diff)).reshape(-1)))
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
    return (
        f"{name}: {n_bad}/{a.numel()} elements mismatch (rtol={rtol:g}, atol={atol:g}); "
        f"worst at index {index}: actual {a.reshape(-1)[flat].item()!r} vs expected {e.reshape(-1)[flat].item()!r} "
        f"(abs diff {diff.reshape(-1)[flat].item():.3e}); max abs expected {e.abs().max().item():.3e}"
    )


def assert_close_fn(actual, expected, rtol: float = 1e-5, atol: float = 1e-8, name: str = "tensor") -> None:
    """Elementwise |actual - expected| <= atol + rtol * |expected|, with a diagnostic on failure."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    report = _mismatch_report(actual, expected, rtol, atol, name)
    if report is not None:
        print(report)
        raise AssertionError(report)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are zero)."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    scale = e.abs().max().item()
    diff = (a - e).abs().max().item()
    if scale == 0.0:
        return diff
    return diff / scale


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same RNG state, independent of test order."""
    torch.manual_seed(0)
    random.seed(0)
    yield


@pytest.fixture
def torch_single_thread():
    """Run a test with one intra-op thread, then restore the previous setting.

    The models and tensors here are tiny: a second OpenMP thread buys nothing and, on a busy 2-core
    machine, its spin-waiting makes every op several times slower. Opt in per module with
    `pytestmark = pytest.mark.usefixtures("torch_single_thread")`.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def assert_close():
    return assert_close_fn


@pytest.fixture
def relative_error():
    return rel_err


@pytest.fixture
def tiny_model():
    """Factory: tiny_model(arch, **config_overrides) -> fresh random-init float32 eval model."""
    return build_tiny_model


def compiled_for_h100(child_script: str) -> list:
    """Run `child_script` in a fresh interpreter without TRITON_INTERPRET (so its kernels compile for a real
    GPU target) and return the JSON list on its last `COMPILED ` line. Skips when this triton install has
    no ptxas; fails with the child's output otherwise."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, set to silence its warning
    proc = subprocess.run([sys.executable, "-c", child_script], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("COMPILED ")]
    if proc.returncode != 0 or not lines:
        if "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
            pytest.skip("no ptxas in this triton install")
        pytest.fail(f"compile child failed (rc={proc.returncode}):\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return json.loads(lines[-1][len("COMPILED "):])


@pytest.fixture
def compile_for_h100():
    """compile_for_h100(child_script) -> the child's COMPILED list (see compiled_for_h100)."""
    return compiled_for_h100
