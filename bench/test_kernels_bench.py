"""Kernel micro-benchmarks for pytest-benchmark, at small CPU shapes (the whole file runs in well under a minute):

    pytest bench/ --benchmark-only                      # time them
    pytest bench/ --benchmark-only --benchmark-group-by=group --benchmark-columns=min,median,iqr,rounds
    OMP_NUM_THREADS=1 pytest bench/ --benchmark-only    # on a busy machine: a second OpenMP thread that has
                                                        # to wait for a core distorts every timing

Two groups, each the kernel against its plain-PyTorch reference (the same `_ref` the tests use):
    token_logprobs  chunked log-probs (kernels/token_logprobs.py), forward + backward w.r.t. hidden
    grpo_loss       the fused chunked GRPO loss (olf.grpo_loss, backend "auto" = chunked on CPU) against the
                    materialized loss (backend "reference"), and Liger-Kernel's LigerFusedLinearGRPOLoss when
                    installed (the `[compare]` extra), forward + backward w.r.t. hidden
Before timing, every benchmark checks its contender against the reference, so a fast wrong kernel fails here.

Not collected by the default `python -m pytest` (testpaths = ["tests"]). The full-size comparison with memory,
FLOP/s and ratios is `python -m bench grpo_loss`; the loss settings and the Liger contender are that workload's.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (the [test] extra)")

import onelayer_fast as olf  # noqa: E402
from bench.contenders.liger import liger_grpo_loss  # noqa: E402
from bench.workloads.step import STEP_LOSS, loss_config  # noqa: E402
from onelayer_fast.kernels.token_logprobs import chunked_token_logprobs, token_logprobs_ref  # noqa: E402

# Odd sizes on purpose (house style): partial chunks and tails are part of what is timed.
TOKENS, HIDDEN, VOCAB = 509, 64, 8191
ROWS, COMPLETION, GROUP = 16, 32, 8
LOSS = loss_config(STEP_LOSS)  # the bench's loss: beta 0.04, epsilon 0.2, dapo, token-level importance sampling


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def fwd_bwd(fn, hidden: torch.Tensor):
    """One forward + backward of `fn(hidden)` (summed to a scalar when it is not one) -> (output, hidden grad)."""
    hidden.grad = None
    out = fn(hidden)
    (out if out.dim() == 0 else out.sum()).backward()
    return out.detach(), hidden.grad


# --------------------------------------------------------------------------------------------------
# token_logprobs
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def logprob_inputs():
    hidden = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN) / HIDDEN ** 0.5
    ids = torch.randint(0, VOCAB, (TOKENS,))
    return hidden, weight, ids


TOKEN_LOGPROBS = {
    "chunked": lambda h, w, ids: chunked_token_logprobs(h, w, ids),
    "reference": lambda h, w, ids: token_logprobs_ref(h, w, ids),
}


@pytest.mark.benchmark(group="token_logprobs")
@pytest.mark.parametrize("impl", list(TOKEN_LOGPROBS))
def test_token_logprobs_fwd_bwd(benchmark, impl, logprob_inputs):
    hidden, weight, ids = logprob_inputs
    fn = lambda h: TOKEN_LOGPROBS[impl](h, weight, ids)  # noqa: E731
    out, grad = fwd_bwd(fn, hidden)
    ref_out, ref_grad = fwd_bwd(lambda h: token_logprobs_ref(h, weight, ids), hidden)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    benchmark(fwd_bwd, fn, hidden)


# --------------------------------------------------------------------------------------------------
# grpo_loss
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def loss_inputs():
    hidden = torch.randn(ROWS, COMPLETION, HIDDEN, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN) / HIDDEN ** 0.5
    ids = torch.randint(0, VOCAB, (ROWS, COMPLETION))
    mask = torch.ones(ROWS, COMPLETION, dtype=torch.long)
    mask[3, COMPLETION - 5:] = 0
    mask[10, COMPLETION - 2:] = 0
    rewards = torch.rand(ROWS)
    with torch.no_grad():
        true = olf.token_logprobs(hidden, weight, ids)
    old = (true + 0.1 * torch.randn(ROWS, COMPLETION)) * mask
    ref = (true + 0.1 * torch.randn(ROWS, COMPLETION)) * mask
    return dict(hidden=hidden, weight=weight, ids=ids, mask=mask, rewards=rewards, old=old, ref=ref)


def olf_loss(x: dict, backend: str):
    def fn(h):
        return olf.grpo_loss(h, x["weight"], x["ids"], x["mask"], rewards=x["rewards"], group_size=GROUP,
                             old_logps=x["old"], ref_logps=x["ref"], config=LOSS, backend=backend).loss
    return fn


def liger_loss(x: dict):
    return liger_grpo_loss(x["weight"], x["ids"], x["mask"], x["rewards"], x["old"], x["ref"], GROUP, LOSS)


GRPO_LOSS = {
    "fused_chunked": lambda x: olf_loss(x, "auto"),
    "materialized": lambda x: olf_loss(x, "reference"),
    "liger": liger_loss,
}


@pytest.mark.benchmark(group="grpo_loss")
@pytest.mark.parametrize("impl", list(GRPO_LOSS))
def test_grpo_loss_fwd_bwd(benchmark, impl, loss_inputs):
    if impl == "liger" and importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger_kernel is not installed (the [compare] extra)")
    hidden = loss_inputs["hidden"]
    fn = GRPO_LOSS[impl](loss_inputs)
    out, grad = fwd_bwd(fn, hidden)
    ref_out, ref_grad = fwd_bwd(olf_loss(loss_inputs, "reference"), hidden)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    benchmark(fwd_bwd, fn, hidden)
