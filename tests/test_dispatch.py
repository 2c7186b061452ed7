"""backend="auto" (`onelayer_fast/dispatch.py`): which path runs where, and the Triton self-check.

Interpreter runs happen in ONE child process started with TRITON_INTERPRET=1 (see the docstring of
tests/test_token_logprobs_triton.py for why): it wraps the two Triton entry points the public functions call
(`grpo_loss_triton`, `token_logprobs_triton`) with call counters, so "auto ran Triton" is proven by the
launches, not inferred from equal outputs. The plain-CPU rule (no interpreter: chunked, no Triton kernel
import) runs in a second, fresh child, because this pytest process may already have imported the kernels.
Checks that stop before any kernel (float64, explicit "triton" with an unsupported input) run in-process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import onelayer_fast as olf
from onelayer_fast import dispatch

_CHILD = r"""
import json, os, sys, warnings
os.environ["TRITON_INTERPRET"] = "1"   # before the first triton import of this process
import torch
import onelayer_fast as olf
from onelayer_fast import dispatch
from onelayer_fast.kernels import grpo_loss_triton as gt, token_logprobs_triton as tt
assert tt.is_interpreted(), "kernels were not decorated in interpreter mode"
torch.set_num_threads(1)
CPU = torch.device("cpu")

calls = {"grpo_loss": 0, "token_logprobs": 0}
real = {"grpo_loss": gt.grpo_loss_triton, "token_logprobs": tt.token_logprobs_triton}


def counted(name, transform=None):
    def entry(*args, **kwargs):
        calls[name] += 1
        out = real[name](*args, **kwargs)
        return out if transform is None else transform(out)
    return entry


def install(grpo=None, logprobs=None):
    gt.grpo_loss_triton = grpo or counted("grpo_loss")
    tt.token_logprobs_triton = logprobs or counted("token_logprobs")


def make_batch(dtype=torch.float32):
    gen = torch.Generator().manual_seed(5)
    B, T, H, V = 4, 5, 32, 300
    hidden = torch.randn(B, T, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) * 0.3).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    true = olf.token_logprobs(hidden.float(), weight.float(), ids, backend="chunked").detach()
    return dict(hidden=hidden, weight=weight, ids=ids, mask=mask, rewards=torch.tensor([0.0, 1.0, 0.5, 0.2]),
                old=true + 0.1 * torch.randn(B, T, generator=gen), ref=true + 0.1 * torch.randn(B, T, generator=gen))


def run_loss(backend, b, **knobs):
    x = b["hidden"].clone().requires_grad_()
    r = olf.grpo_loss(x, b["weight"], b["ids"], b["mask"], rewards=b["rewards"], group_size=2, old_logps=b["old"],
                      ref_logps=b["ref"], beta=0.04, backend=backend, **knobs)
    r.loss.backward()
    return [r.loss.detach(), r.token_logps, x.grad]


def run_logprobs(backend, b):
    x = b["hidden"].clone().requires_grad_()
    lp = olf.token_logprobs(x, b["weight"], b["ids"], 0.7, backend=backend)
    (lp * torch.arange(lp.numel(), dtype=lp.dtype).view(lp.shape)).sum().backward()
    return [lp.detach(), x.grad]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def errors(got, want):
    return [rel(g, w) for g, w in zip(got, want)]


def equal(got, want):
    return all(torch.equal(g, w) for g, w in zip(got, want))


def recorded(fn):
    # Every warning, however often: the test counts them.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


results = {}
b = make_batch()
install()

# ---- auto on CPU under the interpreter: the self-check passes, then auto launches the Triton kernels ----
verdict, warned = recorded(lambda: dispatch.triton_verified(CPU, torch.float32))
check_calls = dict(calls)
calls.update(grpo_loss=0, token_logprobs=0)
auto_token = run_loss("auto", b)
auto_seq = run_loss("auto", b, importance_sampling_level="sequence")
auto_lp = run_logprobs("auto", b)
auto_calls = dict(calls)
chunked = [run_loss("chunked", b), run_loss("chunked", b, importance_sampling_level="sequence"),
           run_logprobs("chunked", b)]
results["auto"] = dict(
    verdict=verdict, warnings=warned, check_calls=check_calls, auto_calls=auto_calls,
    chunked_calls={k: calls[k] - auto_calls[k] for k in calls},
    resolved=dispatch.auto_backend(b["hidden"], b["weight"], b["mask"]),
    loss_token=errors(auto_token, chunked[0]), loss_sequence=errors(auto_seq, chunked[1]),
    logprobs=errors(auto_lp, chunked[2]),
)

# ---- float64 stays on the reference path, interpreter or not ----
calls.update(grpo_loss=0, token_logprobs=0)
b64 = dict(b, hidden=b["hidden"].double(), weight=b["weight"].double())
results["float64"] = dict(
    resolved=dispatch.auto_backend(b64["hidden"], b64["weight"], b64["mask"]),
    loss_equal=equal(run_loss("auto", b64), run_loss("reference", b64)),
    logprobs_equal=equal(run_logprobs("auto", b64), run_logprobs("reference", b64)),
    calls=dict(calls),
)

# ---- an input the Triton loss does not cover (a fractional mask): auto -> chunked, explicit triton -> error ----
calls.update(grpo_loss=0, token_logprobs=0)
soft = dict(b, mask=b["mask"] * torch.tensor([1.0, 1.0, 0.5, 1.0, 1.0]))
fallback = equal(run_loss("auto", soft), run_loss("chunked", soft))
try:
    run_loss("triton", soft)
    explicit = None
except ValueError as error:
    explicit = str(error)
results["unsupported"] = dict(equal=fallback, calls=dict(calls), explicit_error=explicit)

# ---- bf16: the half-precision bound (err <= 2 x PyTorch's own + eps) admits the kernels ----
verdict, warned = recorded(lambda: dispatch.triton_verified(CPU, torch.bfloat16))
results["bf16"] = dict(verdict=verdict, warnings=warned)


def failing(grpo=None, logprobs=None):
    # Fresh verdicts, a broken entry point; several auto calls must warn once and equal the chunked path.
    dispatch.reset_self_checks()
    install(grpo, logprobs)
    calls.update(grpo_loss=0, token_logprobs=0)
    def calls_():
        return [run_loss("auto", b), run_logprobs("auto", b), run_loss("auto", b), run_logprobs("auto", b),
                run_loss("auto", b)]
    outs, warned = recorded(calls_)
    made = dict(calls)
    want_loss, want_lp = run_loss("chunked", b), run_logprobs("chunked", b)
    return dict(warnings=warned, calls=made, verdict=dispatch._verdicts.get(("cpu", None, torch.float32)),
                equal=all(equal(o, want_lp if len(o) == 2 else want_loss) for o in outs))


# A wrong loss (1% off): the self-check names the quantity and its error.
results["fail_mismatch"] = failing(grpo=counted("grpo_loss", lambda out: (out[0] * 1.01, out[1], out[2])))


def broken(*args, **kwargs):
    calls["token_logprobs"] += 1
    raise RuntimeError("injected kernel failure")


# An exception (as a compile error would be): the self-check names it.
results["fail_raise"] = failing(logprobs=broken)
print("RESULTS " + json.dumps(results))
"""

_PLAIN_CHILD = r"""
import json, os, sys, warnings
os.environ.pop("TRITON_INTERPRET", None)
import torch
import onelayer_fast as olf
from onelayer_fast import dispatch
torch.set_num_threads(1)

before = set(sys.modules)
gen = torch.Generator().manual_seed(0)
hidden, weight = torch.randn(4, 5, 16, generator=gen), torch.randn(50, 16, generator=gen)
ids, mask = torch.randint(0, 50, (4, 5), generator=gen), torch.ones(4, 5)
out = {}
for backend in ("auto", "chunked"):
    x = hidden.clone().requires_grad_()
    loss = olf.grpo_loss(x, weight, ids, mask, rewards=torch.tensor([0.0, 1.0, 0.3, 0.2]), group_size=2,
                         backend=backend).loss
    loss.backward()
    out[backend] = [loss.detach(), x.grad, olf.token_logprobs(hidden, weight, ids, backend=backend)]
results = dict(
    resolved=dispatch.auto_backend(hidden, weight, mask),
    equal=all(torch.equal(a, c) for a, c in zip(out["auto"], out["chunked"])),
    new_triton_modules=sorted(m for m in set(sys.modules) - before if "triton" in m),
    kernel_modules=sorted(m for m in sys.modules if m.startswith("onelayer_fast.kernels") and m.endswith("_triton")),
    verdicts=len(dispatch._verdicts),
)

# TRITON_INTERPRET set after the kernels were decorated for a GPU: the self-check fails (the kernels refuse
# CPU tensors), warns once, and auto stays on the chunked path.
import onelayer_fast.kernels.grpo_loss_triton, onelayer_fast.kernels.token_logprobs_triton  # noqa: E401
os.environ["TRITON_INTERPRET"] = "1"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    late = [olf.token_logprobs(hidden, weight, ids, backend="auto") for _ in range(2)]
results["late_env"] = dict(
    warnings=[str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
    equal=all(torch.equal(t, out["chunked"][2]) for t in late),
)
print("RESULTS " + json.dumps(results))
"""


def _run_child(script: str, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"child failed (rc={proc.returncode}):\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.fixture(scope="module")
def interpreter_results():
    return _run_child(_CHILD, dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def plain_results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return _run_child(_PLAIN_CHILD, dict(env, OMP_NUM_THREADS="1"))


def test_auto_launches_triton_under_interpreter(interpreter_results):
    r = interpreter_results["auto"]
    assert r["verdict"] is True and r["warnings"] == [], r
    # The self-check ran both entry points once; then each auto call launched its Triton kernels once.
    assert r["check_calls"] == {"grpo_loss": 1, "token_logprobs": 1}, r
    assert r["auto_calls"] == {"grpo_loss": 2, "token_logprobs": 1}, r
    assert r["chunked_calls"] == {"grpo_loss": 0, "token_logprobs": 0}, r
    assert r["resolved"] == "triton"
    for key in ("loss_token", "loss_sequence"):  # loss, token_logps, grad_hidden
        loss, logps, grad = r[key]
        assert loss < 1e-5 and logps < 1e-5 and grad < 1e-4, (key, r[key])
    logps, grad = r["logprobs"]
    assert logps < 1e-5 and grad < 1e-4, r["logprobs"]


def test_auto_float64_is_reference(interpreter_results):
    r = interpreter_results["float64"]
    assert r["resolved"] == "reference"
    assert r["loss_equal"] and r["logprobs_equal"], r
    assert r["calls"] == {"grpo_loss": 0, "token_logprobs": 0}, r
    hidden = torch.randn(2, 3, 8, dtype=torch.float64)
    assert dispatch.auto_backend(hidden, torch.randn(11, 8, dtype=torch.float64)) == "reference"


def test_auto_unsupported_input_falls_back(interpreter_results):
    r = interpreter_results["unsupported"]
    assert r["equal"], r
    assert r["calls"]["grpo_loss"] == 0, r
    assert r["explicit_error"] is not None and "completion_mask" in r["explicit_error"], r


def test_bf16_self_check_passes_under_interpreter(interpreter_results):
    r = interpreter_results["bf16"]
    assert r["verdict"] is True and r["warnings"] == [], r


@pytest.mark.parametrize("case, names", [("fail_mismatch", ("loss", "relative error")),
                                         ("fail_raise", ("RuntimeError", "injected kernel failure"))])
def test_failed_self_check_warns_once_and_falls_back(interpreter_results, case, names):
    r = interpreter_results[case]
    assert len(r["warnings"]) == 1, r["warnings"]
    message = r["warnings"][0]
    assert all(name in message for name in names) and "chunked" in message, message
    assert r["verdict"] is False
    assert r["equal"], r  # every auto call gave the chunked path's numbers, bit for bit
    # Only the self-check reached the Triton entry points (once each); the five auto calls did not.
    assert r["calls"] == {"grpo_loss": 1, "token_logprobs": 1}, r


def test_plain_cpu_auto_is_chunked_without_triton_import(plain_results):
    r = plain_results
    assert r["resolved"] == "chunked" and r["equal"], r
    assert r["new_triton_modules"] == [] and r["kernel_modules"] == [], r
    assert r["verdicts"] == 0, r  # no self-check ran


def test_interpreter_env_set_too_late_falls_back_once(plain_results):
    r = plain_results["late_env"]
    assert len(r["warnings"]) == 1 and "needs CUDA tensors" in r["warnings"][0], r
    assert r["equal"], r


def _inputs(dtype=torch.float32, weight_dtype=None):
    hidden = torch.randn(2, 3, 8, dtype=dtype)
    weight = torch.randn(11, 8, dtype=weight_dtype or dtype)
    return hidden, weight, torch.randint(0, 11, (2, 3))


@pytest.mark.parametrize("case, match", [("soft_mask", "completion_mask with values other than 0 and 1"),
                                         ("weight_dtype", "lm_head_weight dtype torch.bfloat16"),
                                         ("float64", "hidden dtype torch.float64")])
def test_explicit_triton_rejects_unsupported_input(case, match):
    """Raised before any kernel module is imported, so this runs in-process on any machine."""
    hidden, weight, ids = _inputs(torch.float64 if case == "float64" else torch.float32,
                                  torch.bfloat16 if case == "weight_dtype" else None)
    mask = torch.ones(2, 3)
    if case == "soft_mask":
        mask[0, 1] = 0.5
    with pytest.raises(ValueError, match=match):
        olf.grpo_loss(hidden, weight, ids, mask, rewards=torch.tensor([0.0, 1.0]), group_size=2, backend="triton")
    if case != "soft_mask":
        with pytest.raises(ValueError, match=match):
            olf.token_logprobs(hidden, weight, ids, backend="triton")


def test_auto_plain_cpu_in_process(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight, _ = _inputs()
    assert dispatch.auto_backend(hidden, weight, torch.ones(2, 3)) == "chunked"
    assert dispatch.auto_backend(hidden.bfloat16(), weight.bfloat16()) == "chunked"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_self_check_passes(dtype):
    """On a GPU the compiled kernels pass the self-check and auto picks them."""
    from onelayer_fast.kernels import token_logprobs_triton as tt

    if tt.is_interpreted():
        pytest.skip("TRITON_INTERPRET is set in this process")
    device = torch.device("cuda", torch.cuda.current_device())
    assert dispatch.self_check(device, dtype) is None
    hidden, weight, _ = _inputs(dtype)
    assert dispatch.auto_backend(hidden.to(device), weight.to(device)) == "triton"


@pytest.mark.parametrize("knobs, names", [
    (dict(loss_type="vespo"), ("loss_type 'vespo'",)),
    (dict(loss_type="cispo"), ("loss_type 'cispo'",)),
    (dict(off_policy_mask_threshold=0.5), ("off_policy_mask_threshold=0.5",)),
    (dict(top_entropy_quantile=0.2), ("top_entropy_quantile=0.2",)),
    (dict(entropy_coef=0.01), ("entropy_coef=0.01",)),
    (dict(off_policy_mask_threshold=0.0, top_entropy_quantile=0.5, entropy_coef=0.1),
     ("off_policy_mask_threshold=0.0", "top_entropy_quantile=0.5", "entropy_coef=0.1")),
])
def test_triton_unsupported_names_the_loss_settings(knobs, names, monkeypatch):
    """The LossConfig settings the Triton loss does not cover are named; "auto" then runs them chunked, and on plain
    CPU (no TRITON_INTERPRET) chunked all the same, without a self-check."""
    from onelayer_fast.kernels.grpo_loss import LossConfig

    hidden, weight, _ = _inputs()
    config = LossConfig(**knobs)
    reason = dispatch.triton_unsupported(hidden, weight, torch.ones(2, 3), config)
    assert reason is not None and all(name in reason for name in names), reason
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    verdicts = dict(dispatch._verdicts)
    assert dispatch.auto_backend(hidden, weight, torch.ones(2, 3), config) == "chunked"
    assert dispatch._verdicts == verdicts  # no self-check ran for it
    assert dispatch.auto_backend(hidden.double(), weight.double(), None, config) == "reference"


def test_triton_unsupported_covers_the_default_and_triton_loss_settings():
    from onelayer_fast.kernels.grpo_loss import TRITON_LOSS_TYPES, LossConfig

    hidden, weight, _ = _inputs()
    assert dispatch.triton_unsupported(hidden, weight, torch.ones(2, 3)) is None
    for loss_type in TRITON_LOSS_TYPES:
        for level in ("token", "sequence"):
            config = LossConfig(loss_type=loss_type, importance_sampling_level=level, beta=0.04, delta=1.5,
                                top_entropy_quantile=1.0, entropy_coef=0.0, off_policy_mask_threshold=None)
            assert dispatch.triton_unsupported(hidden, weight, torch.ones(2, 3), config) is None, (loss_type, level)
