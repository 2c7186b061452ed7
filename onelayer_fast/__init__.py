"""onelayer_fast: single-layer GRPO post-training of LLMs, fast.

Public API:
    OneLayerPolicy, FullModelPolicy, PrefixCache   (policy.py)
    grpo_loss, token_logprobs                        (loss.py)
    GRPOConfig, GRPOTrainer                          (trainer.py)
    load_layer, merge_checkpoint                     (checkpoint.py)
    load_model                                       (presets.py)
"""
from .checkpoint import load_layer, merge_checkpoint
from .loss import grpo_loss, token_logprobs
from .policy import FullModelPolicy, OneLayerPolicy, PrefixCache, position_ids_from_mask
from .presets import load_model
from .trainer import GRPOConfig, GRPOTrainer

__version__ = "0.1.0"

__all__ = [
    "FullModelPolicy",
    "OneLayerPolicy",
    "PrefixCache",
    "GRPOConfig",
    "GRPOTrainer",
    "grpo_loss",
    "load_layer",
    "load_model",
    "merge_checkpoint",
    "position_ids_from_mask",
    "token_logprobs",
]
