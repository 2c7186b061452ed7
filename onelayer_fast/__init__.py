"""onelayer_fast: single-layer GRPO post-training of LLMs, fast.

Public API:
    OneLayerPolicy, FullModelPolicy, PrefixCache     (policy.py)
    grpo_loss, token_logprobs                          (loss.py)
    GRPOConfig, GRPOTrainer                            (trainer.py)
    evaluate, EvalResult                               (evaluate.py)
    run_sweep, SweepConfig, parse_layers, contribution (sweep.py)
    load_layer, merge_checkpoint                       (checkpoint.py)
    load_model                                         (presets.py)
    get_task                                           (tasks/)
"""
from .checkpoint import load_layer, merge_checkpoint
from .evaluate import EvalResult, evaluate
from .loss import grpo_loss, token_logprobs
from .policy import FullModelPolicy, OneLayerPolicy, PrefixCache, position_ids_from_mask
from .presets import load_model
from .sweep import SweepConfig, contribution, parse_layers, run_sweep
from .tasks import get_task
from .trainer import GRPOConfig, GRPOTrainer

__version__ = "0.1.0"

__all__ = [
    "EvalResult",
    "FullModelPolicy",
    "OneLayerPolicy",
    "PrefixCache",
    "GRPOConfig",
    "GRPOTrainer",
    "SweepConfig",
    "contribution",
    "evaluate",
    "get_task",
    "grpo_loss",
    "load_layer",
    "load_model",
    "merge_checkpoint",
    "parse_layers",
    "position_ids_from_mask",
    "run_sweep",
    "token_logprobs",
]
