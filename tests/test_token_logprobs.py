"""Per-token log-probs through the lm_head: chunked path vs the materialized reference.

The expected values are computed here in float64 (materialized logits, log_softmax, gather) on
float64 copies of the inputs, so every float32 path, `token_logprobs_ref` included, is compared
against (nearly) exact numbers. (`token_logprobs_ref` itself always returns float32: it casts the
logits with `.float()`, so it cannot serve as the float64 oracle.)
"""
from __future__ import annotations

import pytest
import torch

import onelayer_fast as olf
from onelayer_fast.kernels.token_logprobs import (
    chunked_token_logprobs,
    rows_per_chunk,
    token_logprobs_ref,
)

# tiny tensors: one intra-op thread is faster and immune to a busy machine (see conftest)
pytestmark = pytest.mark.usefixtures("torch_single_thread")

N, H, V = 37, 48, 1013  # odd sizes on purpose: 37 rows in chunks of 5 leave a ragged last chunk of 2


def make_inputs(shape: tuple[int, ...], hidden_size: int = H, vocab: int = V, scale: float = 1.0):
    hidden = torch.randn(*shape, hidden_size) * scale
    weight = torch.randn(vocab, hidden_size) / hidden_size**0.5
    ids = torch.randint(0, vocab, shape)
    return hidden, weight, ids


def logprobs_fp64(hidden, weight, ids, temperature):
    logits = (hidden.double() @ weight.double().T) / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)


def expected_fp64(hidden, weight, ids, temperature, upstream, weight_grad: bool):
    """float64 reference: (logps, grad hidden, grad weight or None) for the upstream gradient."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(weight_grad)
    out = logprobs_fp64(h, w, ids, temperature)
    assert out.dtype == torch.float64
    (out * upstream.double()).sum().backward()
    return out.detach(), h.grad, (w.grad if weight_grad else None)


def run_fp32(fn, hidden, weight, ids, upstream, weight_grad: bool):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(weight_grad)
    out = fn(h, w, ids)
    (out * upstream).sum().backward()
    return out.detach(), h.grad, w.grad


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["hidden_grad", "weight_grad"])
@pytest.mark.parametrize("chunk_rows", [1, 5, 36, 37, 64, None], ids=lambda c: f"chunk{c}")
def test_chunked_matches_reference(chunk_rows, weight_grad, temperature, assert_close, relative_error):
    hidden, weight, ids = make_inputs((N,))
    upstream = torch.randn(N)
    exp_out, exp_gh, exp_gw = expected_fp64(hidden, weight, ids, temperature, upstream, weight_grad)
    out, gh, gw = run_fp32(
        lambda h, w, t: chunked_token_logprobs(h, w, t, temperature, chunk_rows=chunk_rows),
        hidden, weight, ids, upstream, weight_grad,
    )
    assert out.dtype == torch.float32 and out.shape == (N,)
    assert_close(out, exp_out, rtol=1e-5, atol=1e-5, name="logps")
    assert relative_error(gh, exp_gh) < 1e-5, relative_error(gh, exp_gh)
    assert_close(gh, exp_gh, rtol=1e-4, atol=1e-6, name="grad hidden")
    if weight_grad:
        assert gw is not None and gw.shape == weight.shape and gw.dtype == weight.dtype
        assert relative_error(gw, exp_gw) < 1e-5, relative_error(gw, exp_gw)
        assert_close(gw, exp_gw, rtol=1e-4, atol=1e-6, name="grad weight")
    else:
        assert gw is None


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["hidden_grad", "weight_grad"])
def test_reference_kernel_matches_fp64(weight_grad, temperature, assert_close, relative_error):
    """`token_logprobs_ref` (the oracle of the other kernels) against the float64 formula, 2-D and 3-D."""
    for shape in [(N,), (3, 13)]:
        hidden, weight, ids = make_inputs(shape)
        upstream = torch.randn(shape)
        exp_out, exp_gh, exp_gw = expected_fp64(hidden, weight, ids, temperature, upstream, weight_grad)
        out, gh, gw = run_fp32(lambda h, w, t: token_logprobs_ref(h, w, t, temperature), hidden, weight, ids, upstream, weight_grad)
        assert out.shape == shape
        assert_close(out, exp_out, rtol=1e-5, atol=1e-5, name="logps")
        assert relative_error(gh, exp_gh) < 1e-5
        if weight_grad:
            assert relative_error(gw, exp_gw) < 1e-5


def test_chunked_chunks_are_independent(assert_close):
    """Every chunking of the same rows gives the same values (the ragged last chunk included)."""
    hidden, weight, ids = make_inputs((N,))
    full = chunked_token_logprobs(hidden, weight, ids, 0.7, chunk_rows=N)
    for chunk_rows in (1, 2, 5, 8, 36):
        assert_close(chunked_token_logprobs(hidden, weight, ids, 0.7, chunk_rows=chunk_rows), full,
                     rtol=1e-6, atol=1e-6, name=f"chunk_rows={chunk_rows}")


@pytest.mark.parametrize("backend", ["auto", "chunked", "reference"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["hidden_grad", "weight_grad"])
def test_public_token_logprobs_3d(backend, temperature, weight_grad, assert_close, relative_error):
    """(B, T, H) inputs: the public function flattens, computes, and restores the shape."""
    shape = (3, 13)
    hidden, weight, ids = make_inputs(shape)
    upstream = torch.randn(shape)
    exp_out, exp_gh, exp_gw = expected_fp64(hidden, weight, ids, temperature, upstream, weight_grad)
    out, gh, gw = run_fp32(
        lambda h, w, t: olf.token_logprobs(h, w, t, temperature=temperature, backend=backend),
        hidden, weight, ids, upstream, weight_grad,
    )
    assert out.shape == shape and out.dtype == torch.float32
    assert_close(out, exp_out, rtol=1e-5, atol=1e-5, name="logps")
    assert gh.shape == hidden.shape
    assert relative_error(gh, exp_gh) < 1e-5, relative_error(gh, exp_gh)
    if weight_grad:
        assert relative_error(gw, exp_gw) < 1e-5, relative_error(gw, exp_gw)
    else:
        assert gw is None


def test_public_token_logprobs_small_chunks_3d(monkeypatch, assert_close, relative_error):
    """The public 3-D path through several ragged chunks (chunk size forced down to 5 rows)."""
    import onelayer_fast.kernels.token_logprobs as tl

    monkeypatch.setattr(tl, "rows_per_chunk", lambda vocab_size, chunk_elements=5 * V: max(1, chunk_elements // vocab_size))
    calls = []
    original_forward = tl.chunked_token_logprobs_forward
    monkeypatch.setattr(tl, "chunked_token_logprobs_forward",
                        lambda *args: calls.append(args[-1]) or original_forward(*args))
    shape = (3, 13)  # 39 rows: 7 chunks of 5 and one of 4
    hidden, weight, ids = make_inputs(shape)
    upstream = torch.randn(shape)
    exp_out, exp_gh, exp_gw = expected_fp64(hidden, weight, ids, 0.7, upstream, True)
    out, gh, gw = run_fp32(lambda h, w, t: olf.token_logprobs(h, w, t, temperature=0.7), hidden, weight, ids, upstream, True)
    assert calls == [5]  # the public function really ran with 5-row chunks
    assert_close(out, exp_out, rtol=1e-5, atol=1e-5, name="logps")
    assert relative_error(gh, exp_gh) < 1e-5
    assert relative_error(gw, exp_gw) < 1e-5


def test_large_logits_are_stable(assert_close, relative_error):
    """Logits in the hundreds: the logsumexp must not overflow in float32."""
    hidden, weight, ids = make_inputs((N,), scale=60.0)
    upstream = torch.randn(N)
    exp_out, exp_gh, _ = expected_fp64(hidden, weight, ids, 0.7, upstream, False)
    assert exp_out.abs().max() > 50  # really large logits
    out, gh, _ = run_fp32(lambda h, w, t: chunked_token_logprobs(h, w, t, 0.7, chunk_rows=5), hidden, weight, ids, upstream, False)
    assert torch.isfinite(out).all() and torch.isfinite(gh).all()
    # float32 logits of magnitude ~300 carry ~3e-5 absolute rounding each: the softmax (and so the
    # gradient) cannot be better than ~1e-5 relative here, whatever the kernel does.
    assert_close(out, exp_out, rtol=1e-5, atol=1e-4, name="logps")
    assert relative_error(gh, exp_gh) < 1e-4


def test_logprobs_are_normalized():
    """exp(logp) summed over every possible target is 1 for each row."""
    hidden, weight, _ = make_inputs((4,), vocab=97)
    rows = hidden.repeat_interleave(97, dim=0)
    targets = torch.arange(97).repeat(4)
    logp = chunked_token_logprobs(rows, weight, targets, 0.7, chunk_rows=5).view(4, 97)
    torch.testing.assert_close(logp.double().exp().sum(-1), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-5)


def test_no_grad_inputs_forward_only():
    hidden, weight, ids = make_inputs((N,))
    out = chunked_token_logprobs(hidden, weight, ids, chunk_rows=5)
    assert not out.requires_grad
    with torch.no_grad():
        h = hidden.clone().requires_grad_(True)
        assert not chunked_token_logprobs(h, weight, ids, chunk_rows=5).requires_grad


def test_rows_per_chunk():
    assert rows_per_chunk(1013, chunk_elements=5 * 1013, min_rows=1) == 5
    assert rows_per_chunk(1013, chunk_elements=5 * 1013 + 1012, min_rows=1) == 5
    assert rows_per_chunk(10**6, chunk_elements=10, min_rows=0) == 1  # never zero rows
    # Large vocabularies: the row floor keeps the matmuls from getting thin.
    assert rows_per_chunk(151936) == 128 and rows_per_chunk(32000) == (1 << 22) // 32000


@pytest.mark.parametrize(
    "case, match",
    [
        ("id_too_large", "vocab"),
        ("id_negative", "vocab"),
        ("ids_shape", "token_ids shape"),
        ("hidden_size", "hidden size mismatch"),
        ("float_ids", "integer"),
        ("temperature", "temperature"),
        ("backend", "backend"),
        ("weight_1d", "lm_head_weight"),
    ],
)
def test_bad_inputs_raise(case, match):
    hidden, weight, ids = make_inputs((3, 13))
    kwargs = {}
    if case == "id_too_large":
        ids[1, 2] = V
    elif case == "id_negative":
        ids[0, 0] = -1
    elif case == "ids_shape":
        ids = ids[:, :-1]
    elif case == "hidden_size":
        weight = weight[:, :-1]
    elif case == "float_ids":
        ids = ids.float()
    elif case == "temperature":
        kwargs["temperature"] = 0.0
    elif case == "backend":
        kwargs["backend"] = "triton-please"
    elif case == "weight_1d":
        weight = weight[0]
    with pytest.raises(ValueError, match=match):
        olf.token_logprobs(hidden, weight, ids, **kwargs)
