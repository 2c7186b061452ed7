"""onelayer_fast: single-layer GRPO post-training of LLMs, fast.

Public API:
    OneLayerPolicy, FullModelPolicy, PrefixCache   (policy.py)
    grpo_loss, token_logprobs                        (loss.py)
"""
from .loss import grpo_loss, token_logprobs
from .policy import FullModelPolicy, OneLayerPolicy, PrefixCache, position_ids_from_mask

__version__ = "0.1.0"

__all__ = [
    "FullModelPolicy",
    "OneLayerPolicy",
    "PrefixCache",
    "grpo_loss",
    "position_ids_from_mask",
    "token_logprobs",
]
