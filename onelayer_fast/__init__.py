"""onelayer_fast: single-layer GRPO post-training of LLMs, fast.

Public API:
    RolloutBatch                                       (batch.py)
    PaddedLayout, PackedLayout, build_layout           (layout.py)
    OneLayerPolicy, FullModelPolicy, PrefixCache       (policy.py)
    grpo_loss, token_logprobs, LossConfig, LossResult  (loss.py)
    UpdateConfig, grpo_update, lanes_update,
    DivergenceError                                    (update.py)
    Lane, LanePolicy                                   (lanes.py)
    GRPOConfig, RunSpec, GRPOTrainer                   (trainer.py)
    LaneTrainer, LaneRun                               (lane_trainer.py)
    evaluate, EvalResult                               (evaluate.py)
    run_sweep, SweepConfig, parse_layers, contribution (sweep.py)
    load_layer, merge_checkpoint                       (checkpoint.py)
    load_model                                         (models/)
    get_task                                           (tasks/)
    run_python, SandboxResult                          (sandbox.py)
"""
from .checkpoint import load_layer, merge_checkpoint
from .evaluate import EvalResult, evaluate
from .batch import RolloutBatch
from .lane_trainer import LaneRun, LaneTrainer
from .lanes import Lane, LanePolicy
from .layout import PackedLayout, PaddedLayout, build_layout, position_ids_from_mask
from .loss import LossConfig, LossResult, grpo_loss, token_logprobs
from .policy import FullModelPolicy, OneLayerPolicy, PrefixCache
from .sandbox import SandboxResult, run_python
from .models import load_model
from .sweep import SweepConfig, contribution, parse_layers, run_sweep
from .tasks import get_task
from .trainer import GRPOConfig, GRPOTrainer, RunSpec
from .update import DivergenceError, UpdateConfig, grpo_update, lanes_update

__version__ = "0.1.0"

__all__ = [
    "DivergenceError",
    "EvalResult",
    "FullModelPolicy",
    "OneLayerPolicy",
    "PrefixCache",
    "GRPOConfig",
    "Lane",
    "LanePolicy",
    "LaneRun",
    "LaneTrainer",
    "LossConfig",
    "LossResult",
    "PackedLayout",
    "PaddedLayout",
    "RolloutBatch",
    "RunSpec",
    "SandboxResult",
    "UpdateConfig",
    "build_layout",
    "grpo_update",
    "lanes_update",
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
    "run_python",
    "run_sweep",
    "token_logprobs",
]
