"""The lm_head backward (`token_logprobs_triton_grads`): one logits tile per program, computed once.

Under the interpreter (one child process with TRITON_INTERPRET=1 from the start, as in
tests/test_token_logprobs_triton.py, which explains why) it checks, in float32 against float64 PyTorch:
grad_hidden and grad_W in both reduction modes (deterministic two-stage sums, also split into several
scratch-bounded launches, and fp32 atomics), either gradient alone, the autograd path of the custom op,
that the two modes agree, that the deterministic mode is bitwise repeatable, and that every logits tile is
recomputed exactly once: the child counts the interpreter's `tl.dot` calls by operand shape. Gradient
filtering (off by default) is checked against its error bound. A second child compiles every variant of
the kernel for an H100 (sm_90) with the ptxas in the triton wheel, without a GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

# Tokens 37 = 2 * 16 + 5, vocab 1013 = 15 * 64 + 53, hidden 48 = 32 + 16 (logits steps) = 3 * 16 (product
# chunks). The four block sizes differ, so a dot's operand shapes say which product it belongs to.
BLOCKS = dict(BLOCK_T=16, BLOCK_V=64, BLOCK_H=32, BLOCK_HO=16)
N, H, V, TAU = 37, 48, 1013, 0.7
# 32 KiB holds two (16 + 64) x 48 fp32 tiles: the deterministic path then needs many launches.
SMALL_SCRATCH_KIB = 32

_CHILD = r"""
import collections, json, os, sys
os.environ["TRITON_INTERPRET"] = "1"   # before the first triton import of this process
import torch
from triton.runtime import interpreter
from onelayer_fast.kernels import token_logprobs_triton as tt
assert tt.is_interpreted(), "kernels were not decorated in interpreter mode"
torch.set_num_threads(1)
blocks, n, h, v, tau, small_kib = json.loads(sys.argv[1])
bt, bv, bh, bho = blocks["BLOCK_T"], blocks["BLOCK_V"], blocks["BLOCK_H"], blocks["BLOCK_HO"]

def cdiv(a, b):
    return -(-a // b)

def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max()).item()

def reference(hidden, weight, ids, g):
    # float64 dL/dz = g * (onehot - softmax), then the two products; W and hidden gradients / tau.
    h64, w64 = hidden.double(), weight.double()
    grad_z = -torch.softmax(h64 @ w64.T / tau, dim=-1) * g.double()[:, None]
    grad_z[torch.arange(h64.shape[0]), ids.long()] += g.double()
    return grad_z @ w64 / tau, grad_z.T @ h64 / tau

dots = collections.Counter()
_create_dot = interpreter.interpreter_builder.create_dot
def counting_dot(a, b, d, *args):
    dots[(tuple(a.data.shape), tuple(b.data.shape))] += 1
    return _create_dot(a, b, d, *args)
interpreter.interpreter_builder.create_dot = counting_dot
LOGITS, GRAD_H, GRAD_W = ((bt, bh), (bh, bv)), ((bt, bv), (bv, bho)), ((bv, bt), (bt, bho))

def grads(*args, **settings):
    dots.clear()
    gh, gw = tt.token_logprobs_triton_grads(*args, **blocks, **settings)
    return gh, gw, {"logits": dots[LOGITS], "grad_hidden": dots[GRAD_H], "grad_weight": dots[GRAD_W],
                    "all": sum(dots.values())}

results = {"default_deterministic": tt.launch_config(torch.float32)["deterministic"]}
torch.manual_seed(0)
hidden = torch.randn(n, h)
weight = torch.randn(v, h) * 0.3
ids = torch.randint(0, v, (n,))
ids[0], ids[1] = v - 1, 0   # both vocab edges
g = torch.randn(n)
gh_ref, gw_ref = reference(hidden, weight, ids, g)
_, lse = tt.token_logprobs_triton_forward(hidden, weight, ids, tau, **blocks)
args = (g, hidden, weight, ids, lse, tau)

runs = {}
for name, settings in {
    "deterministic": dict(deterministic=True),
    "deterministic_split": dict(deterministic=True, scratch_kib=small_kib),
    "atomic": dict(deterministic=False),
}.items():
    gh, gw, count = grads(*args, **settings)
    runs[name] = (gh, gw)
    results[name] = dict(grad_hidden=rel(gh, gh_ref), grad_weight=rel(gw, gw_ref), dots=count)
    gh_only, none_w, count_h = grads(*args, need_weight=False, **settings)
    none_h, gw_only, count_w = grads(*args, need_hidden=False, **settings)
    results[name + "_one_grad"] = dict(
        grad_hidden=rel(gh_only, gh_ref), grad_weight=rel(gw_only, gw_ref), nones=[none_w is None, none_h is None],
        dots_hidden_only=count_h, dots_weight_only=count_w,
    )
gh2, gw2, _ = grads(*args, deterministic=True)
results["repeat_bitwise"] = [torch.equal(gh2, runs["deterministic"][0]), torch.equal(gw2, runs["deterministic"][1])]
results["deterministic_vs_atomic"] = [rel(runs["atomic"][0], runs["deterministic"][0]),
                                      rel(runs["atomic"][1], runs["deterministic"][1])]
results["tiles"] = dict(token_blocks=cdiv(n, bt), vocab_blocks=cdiv(v, bv), logit_steps=cdiv(h, bh),
                        product_chunks=cdiv(h, bho))

# The custom op's autograd, both gradients, non-contiguous 3-D hidden, int32 ids, each reduction mode
# passed through the op's launch list.
torch.manual_seed(1)
base = torch.randn(3, 5, 2 * h)
w0 = torch.randn(v, h) * 0.3
ids3 = torch.randint(0, v, (3, 5), dtype=torch.int32)
up = torch.randn(3, 5)
gh_ref3, gw_ref3 = reference(base[..., ::2].reshape(-1, h), w0, ids3.reshape(-1), up.reshape(-1))
for deterministic in (True, False):
    leaf = base.clone().requires_grad_()
    x = leaf[..., ::2]   # a non-contiguous view
    w = w0.clone().requires_grad_()
    tt.token_logprobs_triton(x, w, ids3, tau, deterministic=deterministic, **blocks).backward(up)
    results[f"autograd_deterministic_{deterministic}"] = dict(
        grad_hidden=rel(leaf.grad[..., ::2].reshape(-1, h), gh_ref3), grad_weight=rel(w.grad, gw_ref3),
        contiguous_input=x.is_contiguous(), other_columns_zero=bool((leaf.grad[..., 1::2] == 0).all()),
    )

# Gradient filtering: a peaked softmax whose mode is the target for most rows (as for sampled tokens),
# so that some tiles fall below the threshold everywhere; random targets on a few rows keep others above it.
torch.manual_seed(2)
hidden_f = torch.randn(n, h) * 2
weight_f = torch.randn(v, h)
ids_f = (hidden_f @ weight_f.T).argmax(-1)
ids_f[:4] = torch.randint(0, v, (4,))
g_f = torch.randn(n)
gh_ref_f, gw_ref_f = reference(hidden_f, weight_f, ids_f, g_f)
_, lse_f = tt.token_logprobs_triton_forward(hidden_f, weight_f, ids_f, tau, **blocks)
k = 10
eps = 2.0 ** -k
# A skipped tile drops dz entries with |dz| < |g| * eps / tau, which bounds the error elementwise.
bound_h = (g_f.double().abs()[:, None] * eps / tau) * weight_f.double().abs().sum(0)[None, :]
bound_w = (eps / tau) * (g_f.double().abs()[:, None] * hidden_f.double().abs()).sum(0)[None, :].expand(v, h)
for deterministic in (True, False):
    gh, gw, count = grads(g_f, hidden_f, weight_f, ids_f, lse_f, tau, deterministic=deterministic,
                          grad_filter_log2=k, scratch_kib=small_kib)
    slack_h, slack_w = 1e-5 * gh_ref_f.abs().max(), 1e-5 * gw_ref_f.abs().max()
    results[f"filter_deterministic_{deterministic}"] = dict(
        within_bound=[bool(((gh.double() - gh_ref_f).abs() <= bound_h + slack_h).all()),
                      bool(((gw.double() - gw_ref_f).abs() <= bound_w + slack_w).all())],
        error=[rel(gh, gh_ref_f), rel(gw, gw_ref_f)], dots=count,
    )
gh, gw, count = grads(g_f, hidden_f, weight_f, ids_f, lse_f, tau)
results["filter_off"] = dict(error=[rel(gh, gh_ref_f), rel(gw, gw_ref_f)], dots=count)
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps([BLOCKS, N, H, V, TAU, SMALL_SCRATCH_KIB])],
        env=env, capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreter child failed (rc={proc.returncode}):\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return json.loads(lines[-1][len("RESULTS "):])


def _tile_dots(tiles: dict) -> tuple[int, int]:
    """(logits dots, dots of one gradient product) when every tile is computed once and none is filtered."""
    n_tiles = tiles["token_blocks"] * tiles["vocab_blocks"]
    return n_tiles * tiles["logit_steps"], n_tiles * tiles["product_chunks"]


def test_deterministic_is_the_interpreter_default(results):
    assert results["default_deterministic"] is True


@pytest.mark.parametrize("mode", ["deterministic", "deterministic_split", "atomic"])
def test_gradients_match_float64(results, mode):
    r, one = results[mode], results[mode + "_one_grad"]
    assert r["grad_hidden"] < 1e-5 and r["grad_weight"] < 1e-5, r
    assert one["grad_hidden"] < 1e-5 and one["grad_weight"] < 1e-5 and one["nones"] == [True, True], one


@pytest.mark.parametrize("mode", ["deterministic", "deterministic_split", "atomic"])
def test_each_logits_tile_is_computed_once(results, mode):
    logits, product = _tile_dots(results["tiles"])
    assert results[mode]["dots"] == dict(logits=logits, grad_hidden=product, grad_weight=product,
                                         all=logits + 2 * product)
    one = results[mode + "_one_grad"]
    assert one["dots_hidden_only"] == dict(logits=logits, grad_hidden=product, grad_weight=0, all=logits + product)
    assert one["dots_weight_only"] == dict(logits=logits, grad_hidden=0, grad_weight=product, all=logits + product)


def test_deterministic_and_atomic_agree(results):
    assert max(results["deterministic_vs_atomic"]) < 1e-6, results["deterministic_vs_atomic"]


def test_deterministic_repeats_bitwise(results):
    assert results["repeat_bitwise"] == [True, True]


@pytest.mark.parametrize("deterministic", [True, False])
def test_autograd_both_gradients(results, deterministic):
    r = results[f"autograd_deterministic_{deterministic}"]
    assert not r["contiguous_input"] and r["other_columns_zero"]
    assert r["grad_hidden"] < 1e-5 and r["grad_weight"] < 1e-5, r


@pytest.mark.parametrize("deterministic", [True, False])
def test_gradient_filter_stays_within_its_bound(results, deterministic):
    r = results[f"filter_deterministic_{deterministic}"]
    logits, product = _tile_dots(results["tiles"])
    assert r["within_bound"] == [True, True], r
    assert r["dots"]["logits"] == logits
    # The case is built so that the filter skips some tiles but not all.
    assert 0 < r["dots"]["grad_hidden"] == r["dots"]["grad_weight"] < product, r
    off = results["filter_off"]
    assert off["dots"]["grad_hidden"] == product and max(off["error"]) < 1e-5, off


# ---------------------------------------------------------------------------------------------
# In-process checks that launch no kernel.
# ---------------------------------------------------------------------------------------------


def test_launch_list_round_trips_bool_settings():
    from onelayer_fast.kernels.token_logprobs_triton import _launch_dict, _launch_list

    for overrides in ({}, {"deterministic": False}, {"deterministic": True, "BLOCK_HO": 32, "scratch_kib": 64}):
        assert _launch_dict(_launch_list(overrides)) == overrides


def test_launch_config_backward_settings():
    from onelayer_fast.kernels.token_logprobs_triton import launch_config

    assert launch_config(torch.float32, interpreted=True)["deterministic"] is True
    assert launch_config(torch.float32, interpreted=True, deterministic=False)["deterministic"] is False
    assert launch_config(torch.bfloat16, interpreted=False)["grad_filter_log2"] == 0
    with pytest.raises(TypeError, match="deterministic"):
        launch_config(torch.float32, interpreted=True, deterministic=1)
    with pytest.raises(ValueError, match="scratch_kib"):
        launch_config(torch.float32, interpreted=True, scratch_kib=-1)
    with pytest.raises(ValueError, match="grad_filter_log2"):
        launch_config(torch.float32, interpreted=True, grad_filter_log2=200)


@pytest.mark.parametrize("need_hidden, need_weight", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("max_tiles", [1, 7, 64, 10**6])
def test_tile_groups_fit_the_budget(need_hidden, need_weight, max_tiles):
    from onelayer_fast.kernels.token_logprobs_triton import _tile_groups

    token_blocks, vocab_blocks = 13, 40
    gt, gv = _tile_groups(token_blocks, vocab_blocks, 16, 64, need_hidden, need_weight, max_tiles)
    assert 1 <= gt <= token_blocks and 1 <= gv <= vocab_blocks
    assert gt * gv <= max_tiles
    if max_tiles >= token_blocks * vocab_blocks:
        assert (gt, gv) == (token_blocks, vocab_blocks)


# ---------------------------------------------------------------------------------------------
# Every variant of the backward kernel compiles for an H100 (sm_90) without a GPU: the interpreter accepts
# code that the compiler rejects. Nothing is launched.
# ---------------------------------------------------------------------------------------------

_AOT_CHILD = r"""
import itertools, json, os
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from onelayer_fast.kernels import token_logprobs_triton as tt
assert not tt.is_interpreted()
fn = tt._token_logprobs_bwd_kernel
done = []
for data, dtype in (("*bf16", torch.bfloat16), ("*fp32", torch.float32)):
    cfg = tt.launch_config(dtype, interpreted=False)
    for hidden_grad, weight_grad, atomic, filt in itertools.product([True, False], repeat=4):
        if not (hidden_grad or weight_grad):
            continue
        constexprs = dict(BLOCK_T=cfg["BLOCK_T"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"],
                          BLOCK_HO=cfg["BLOCK_HO"], DOT_FP32=dtype == torch.float32, HIDDEN_GRAD=hidden_grad,
                          WEIGHT_GRAD=weight_grad, ATOMIC=atomic, FILTER=filt)
        if not atomic:
            # A later deterministic group can start at block 1, and an int argument equal to 1 arrives as a
            # constexpr (Triton specializes it): the kernel must accept that too.
            constexprs.update(t_block0=1, v_block0=1)
        sig = {}
        for name in fn.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name in ("hidden_ptr", "weight_ptr"):
                sig[name] = data
            elif name == "token_ids_ptr":
                sig[name] = "*i64"
            elif name.endswith("_ptr"):
                sig[name] = "*fp32"
            else:
                sig[name] = "fp32" if name in ("temperature", "filter_eps") else "i32"
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
        done.append([data, hidden_grad, weight_grad, atomic, filt])
print("COMPILED " + json.dumps(done))
"""


def test_backward_kernel_compiles_for_h100_without_gpu(compile_for_h100):
    assert len(compile_for_h100(_AOT_CHILD)) == 2 * 3 * 4  # dtypes x gradient sets x (atomic, filter)
