"""Liger-Kernel's LigerFusedLinearGRPOLoss as a contender of the GRPO loss (the `[compare]` extra): why it is skipped
where it does not import, and the loss built from the same inputs and loss knobs as onelayer_fast's grpo_loss.
Used by the `grpo_loss` workload and by bench/test_kernels_bench.py."""
from __future__ import annotations

import inspect
from typing import Callable


def liger_skip_reason(contender: str) -> str | None:
    if contender != "liger":
        return None
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        return ("liger_kernel is not installed (the [compare] extra: pip install -e '.[compare]'; "
                "this benchmark does not install it)")
    try:  # a real import: an installed but incompatible Liger must be skipped, not crash the run
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss  # noqa: F401
    except Exception as exc:
        return f"liger_kernel is installed but LigerFusedLinearGRPOLoss does not import ({type(exc).__name__}: {exc})"
    return None


# The LossConfig fields that Liger's loss takes, under the same names.
LIGER_KNOBS = ("beta", "epsilon_low", "epsilon_high", "loss_type", "importance_sampling_level")


def liger_grpo_loss(weight, ids, mask, rewards, old_logps, ref_logps, group_size: int, config,
                    compiled: bool = False) -> Callable:
    """hidden -> Liger's GRPO loss of `hidden` (rows, completion, hidden) under the frozen lm_head `weight`.

    Liger takes advantages, not rewards: they are normalized in groups of `group_size` by onelayer_fast's own
    group_advantages (TRL's normalization), once, here. `config`: onelayer_fast's LossConfig; only its LIGER_KNOBS
    reach Liger, so the comparison holds where the other knobs are at LossConfig's defaults, as in the bench.
    liger_kernel.chunked_loss is plain PyTorch, so with compiled=False it runs on the CPU too; `compiled=True` is
    Liger's own default (each chunk's forward + backward under torch.compile), the fair setting on a GPU."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    from onelayer_fast.kernels.grpo_loss import group_advantages

    advantages, _ = group_advantages(rewards, group_size)
    knobs = {k: getattr(config, k) for k in LIGER_KNOBS}
    if config.beta != 0 and config.use_bias_correction_kl:
        if "use_bias_correction_kl" not in inspect.signature(LigerFusedLinearGRPOLoss.__init__).parameters:
            raise ValueError("this liger_kernel's LigerFusedLinearGRPOLoss has no use_bias_correction_kl: compare "
                             "with use_bias_correction_kl=False (or beta=0)")
        knobs["use_bias_correction_kl"] = True
    module = LigerFusedLinearGRPOLoss(compiled=compiled, use_ref_model=True, **knobs)

    def loss_fn(hidden):
        out = module(hidden, weight, ids, mask, advantages, ref_per_token_logps=ref_logps, old_per_token_logps=old_logps)
        return out[0] if isinstance(out, tuple) else out

    return loss_fn
