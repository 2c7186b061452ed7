"""Triton lm_head log-probs (`kernels/token_logprobs_triton.py`) against the float64 reference.

CPU runs use the Triton interpreter. `triton.jit` decides at decoration time (import of the kernel
module) whether a kernel is interpreted, from TRITON_INTERPRET read through `triton.knobs`. Setting
the variable at the top of this module is not enough: pytest imports every test module before running
any, and another module (or onelayer_fast itself) may already have imported triton and the kernel
module. So the interpreter comparisons run in ONE child process (`python -c _CHILD`) whose environment
has TRITON_INTERPRET=1 from the start, and which sets it again before its first import and checks the
kernels really are interpreted. The child runs every case once (module-scoped fixture; one torch +
triton start-up) and prints the errors as JSON; the parametrized tests assert on them. That is
independent of test order, `-p xdist`, and of whatever this process has imported.

The GPU test runs in-process (compiled kernels) and is skipped without CUDA.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

# (name, tokens shape, hidden, vocab, temperature, launch overrides)
CASES = [
    ("t37_h48_v1013_tau1", [37], 48, 1013, 1.0, dict(BLOCK_T=16, BLOCK_V=64, BLOCK_H=16, BLOCK_HO=16)),
    ("t37_h48_v1013_tau0.7", [37], 48, 1013, 0.7, dict(BLOCK_T=16, BLOCK_V=64, BLOCK_H=16, BLOCK_HO=16)),
    ("t5_h16_v70_tau1", [5], 16, 70, 1.0, dict(BLOCK_T=16, BLOCK_V=32, BLOCK_H=16, BLOCK_HO=16)),
    ("t5_h16_v70_tau0.7", [5], 16, 70, 0.7, dict(BLOCK_T=16, BLOCK_V=32, BLOCK_H=16, BLOCK_HO=16)),
    # Blocks larger than every dimension (all edges masked), BLOCK_HO != BLOCK_H, 3-D input, int32 ids,
    # non-contiguous hidden, and the stride-0 upstream gradient of .sum().
    ("b2x3_h20_v50_bigblocks", [2, 3], 20, 50, 0.7, dict(BLOCK_T=16, BLOCK_V=64, BLOCK_H=32, BLOCK_HO=32)),
]

_CHILD = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"   # before the first triton import of this process
import torch
from onelayer_fast.kernels.token_logprobs import token_logprobs_ref
from onelayer_fast.kernels import token_logprobs_triton as tt
assert tt.is_interpreted(), "kernels were not decorated in interpreter mode"
torch.set_num_threads(1)

def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()

results = {}
for name, shape, h, v, tau, blocks in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    n = 1
    for s in shape:
        n *= s
    weight = torch.randn(v, h) * 0.3
    if name.startswith("b2x3"):
        hidden = torch.randn(*shape, 2 * h)[..., ::2]          # non-contiguous
        ids = torch.randint(0, v, shape, dtype=torch.int32)
        grad = torch.ones(shape, dtype=torch.float64)          # = .sum().backward(): stride-0 upstream grad
    else:
        hidden = torch.randn(*shape, h)
        ids = torch.randint(0, v, shape)
        grad = torch.randn(shape, dtype=torch.float64)
    # Targets at the first and last vocab entries exercise both vocab edges.
    ids.view(-1)[0] = v - 1
    if n > 1:
        ids.view(-1)[1] = 0

    h64 = hidden.double().requires_grad_()
    ref = token_logprobs_ref(h64, weight.double(), ids.long(), tau)
    ref.backward(grad)
    lse_ref = torch.logsumexp((h64.detach() @ weight.double().T) / tau, dim=-1)

    logp, lse = tt.token_logprobs_triton_forward(hidden, weight, ids, tau, **blocks)
    x = hidden.detach().clone().requires_grad_()
    out = tt.token_logprobs_triton(x, weight, ids, tau, **blocks)
    if name.startswith("b2x3"):
        out.sum().backward()
    else:
        out.backward(grad.float())
    results[name] = dict(
        logp=rel(logp, ref), lse=rel(lse, lse_ref), autograd_logp=rel(out, ref), grad=rel(x.grad, h64.grad),
        shapes=[list(logp.shape), list(lse.shape), list(x.grad.shape)], dtypes=[str(logp.dtype), str(x.grad.dtype)],
        expect_shapes=[list(shape), list(shape), list(shape) + [h]],
    )

# The public dispatch: olf.grpo_loss(backend="triton") against the materialized reference backend.
import onelayer_fast as olf
from onelayer_fast.kernels import grpo_loss_triton as gt
calls = {"n": 0}
_triton_entry = gt.grpo_loss_triton
def counting_entry(*args, **kwargs):   # proves the dispatch really reaches the fused Triton path
    calls["n"] += 1
    return _triton_entry(*args, **kwargs)
gt.grpo_loss_triton = counting_entry
torch.manual_seed(1)
B, T, H, V = 6, 7, 48, 1013
hidden = torch.randn(B, T, H)
weight = torch.randn(V, H) * 0.3
ids = torch.randint(0, V, (B, T))
mask = (torch.rand(B, T) > 0.25).float()
mask[1] = 0
rewards = torch.randn(B)
old = torch.randn(B, T) * 0.1 - 7
ref_lp = torch.randn(B, T) * 0.1 - 7
for level in ("token", "sequence"):
    out = {}
    for backend in ("triton", "reference"):
        x = hidden.clone().requires_grad_()
        result = olf.grpo_loss(x, weight, ids, mask, rewards=rewards, group_size=3, old_logps=old,
                               ref_logps=ref_lp, beta=0.04, temperature=0.7, loss_type="grpo",
                               importance_sampling_level=level, backend=backend)
        result.loss.backward()
        out[backend] = (result.loss, x.grad, result.token_logps)
    calls_made, calls["n"] = calls["n"], 0
    results["grpo_loss_dispatch_" + level] = dict(
        loss=rel(out["triton"][0], out["reference"][0]), grad=rel(out["triton"][1], out["reference"][1]),
        logps=rel(out["triton"][2], out["reference"][2]), triton_calls=calls_made,
    )
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(CASES)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreter child failed (rc={proc.returncode}):\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_interpreter_matches_float64_reference(interpreter_results, case):
    r = interpreter_results[case]
    assert r["shapes"] == r["expect_shapes"], r
    assert r["dtypes"] == ["torch.float32", "torch.float32"], r
    assert r["logp"] < 1e-5, r
    assert r["autograd_logp"] < 1e-5, r
    assert r["lse"] < 1e-5, r
    assert r["grad"] < 1e-4, r


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_loss_triton_backend_matches_reference(interpreter_results, level):
    r = interpreter_results["grpo_loss_dispatch_" + level]
    assert r["triton_calls"] == 1, r  # one call for the triton backend, none for the reference
    assert r["loss"] < 1e-5 and r["logps"] < 1e-5 and r["grad"] < 1e-4, r


# ---------------------------------------------------------------------------------------------
# In-process checks that launch no kernel (work whether or not this process interprets).
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hidden_shape, weight_shape, ids_shape, ids_dtype, match",
    [
        ((4, 16), (32, 8), (4,), torch.long, "hidden size"),
        ((4, 16), (32, 16), (5,), torch.long, "leading shape"),
        ((4, 16), (32, 16, 1), (4,), torch.long, "vocab, hidden"),
        ((4, 16), (32, 16), (4,), torch.float32, "int32 or int64"),
    ],
)
def test_shape_checks(hidden_shape, weight_shape, ids_shape, ids_dtype, match):
    from onelayer_fast.kernels.token_logprobs_triton import token_logprobs_triton_forward

    with pytest.raises((ValueError, TypeError), match=match):
        token_logprobs_triton_forward(
            torch.randn(hidden_shape), torch.randn(weight_shape), torch.zeros(ids_shape, dtype=ids_dtype)
        )


def test_temperature_must_be_positive():
    from onelayer_fast.kernels.token_logprobs_triton import token_logprobs_triton_forward

    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs_triton_forward(torch.randn(4, 16), torch.randn(32, 16), torch.zeros(4, dtype=torch.long), 0.0)


def test_launch_config_validation():
    from onelayer_fast.kernels.token_logprobs_triton import launch_config

    assert launch_config(torch.bfloat16, interpreted=False, BLOCK_V=256)["BLOCK_V"] == 256
    with pytest.raises(ValueError, match="power of two >= 16"):
        launch_config(torch.float32, interpreted=True, BLOCK_T=8)
    with pytest.raises(ValueError, match="power of two >= 16"):
        launch_config(torch.float32, interpreted=True, BLOCK_H=48)
    with pytest.raises(TypeError, match="unknown launch settings"):
        launch_config(torch.float32, interpreted=True, BLOCK_X=16)


def test_cpu_tensors_without_interpreter_raise():
    from onelayer_fast.kernels import token_logprobs_triton as tt

    if tt.is_interpreted():
        pytest.skip("this process runs Triton in interpreter mode")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tt.token_logprobs_triton_forward(torch.randn(4, 16), torch.randn(32, 16), torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# GPU: compiled kernels at a realistic shape (Qwen2.5-0.5B lm_head).
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_cuda_matches_float64_reference(dtype, temperature):
    from onelayer_fast.kernels.token_logprobs import token_logprobs_ref
    from onelayer_fast.kernels import token_logprobs_triton as tt

    if tt.is_interpreted():
        pytest.skip("TRITON_INTERPRET is set in this process")
    n, h, v = 1024, 896, 151936
    dev = "cuda"
    hidden = torch.randn(n, h, device=dev).to(dtype)
    weight = (torch.randn(v, h, device=dev) * 0.05).to(dtype)
    ids = torch.randint(0, v, (n,), device=dev)
    grad = torch.randn(n, device=dev)

    # Oracle: float64 from the same (already rounded) inputs.
    h64 = hidden.double().requires_grad_()
    ref = token_logprobs_ref(h64, weight.double(), ids, temperature)
    ref.backward(grad.double())
    lse_ref = torch.logsumexp((h64.detach() @ weight.double().T) / temperature, dim=-1)
    ref, grad_ref = ref.detach(), h64.grad
    del h64

    logp, lse = tt.token_logprobs_triton_forward(hidden, weight, ids, temperature)
    x = hidden.clone().requires_grad_()
    out = tt.token_logprobs_triton(x, weight, ids, temperature)
    out.backward(grad)
    torch.cuda.synchronize()

    def max_err(a, b):
        return (a.double() - b).abs().max().item()

    if dtype == torch.float32:
        scale = lambda t: t.abs().max().item()  # noqa: E731
        assert max_err(logp, ref) / scale(ref) < 1e-5
        assert max_err(out, ref) / scale(ref) < 1e-5
        assert max_err(lse, lse_ref) / scale(lse_ref) < 1e-5
        assert max_err(x.grad, grad_ref) / scale(grad_ref) < 1e-4
    else:
        # Bound: twice PyTorch's own bf16 error against the same float64 oracle, plus a small atol.
        xt = hidden.clone().requires_grad_()
        torch_logp = token_logprobs_ref(xt, weight, ids, temperature)
        torch_logp.backward(grad.to(torch_logp.dtype))
        torch_err = max_err(torch_logp, ref)
        torch_grad_err = max_err(xt.grad, grad_ref)
        assert max_err(logp, ref) <= 2 * torch_err + 1e-3, (max_err(logp, ref), torch_err)
        assert max_err(out, ref) <= 2 * torch_err + 1e-3, (max_err(out, ref), torch_err)
        assert max_err(lse, lse_ref) <= 2 * torch_err + 1e-3, (max_err(lse, lse_ref), torch_err)
        assert max_err(x.grad, grad_ref) <= 2 * torch_grad_err + 1e-4, (max_err(x.grad, grad_ref), torch_grad_err)
        assert x.grad.dtype == torch.bfloat16
