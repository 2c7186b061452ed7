"""onelayer_fast as TRL's GRPOTrainer backend (the `[trl]` extra): what a TRL user imports.

    from onelayer_fast.trl import OneLayerGRPOTrainer
    trainer = OneLayerGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=data,
                                  layer=12)        # or layer=[Lane(12), Lane(8, learning_rate=3e-6)]: lanes
    trainer.train()

One layer: `trl_trainer.py` (OneLayerGRPOTrainer); lanes: `trl_lanes.py` (LaneGRPOTrainer, which
OneLayerGRPOTrainer builds for a list of layers once this module has imported it).
"""
from __future__ import annotations

from .trl_lanes import LaneGRPOTrainer
from .trl_trainer import SUPPORTED_TRL_VERSIONS, OneLayerGRPOTrainer, check_trl_version, loss_config_from_trl

__all__ = ["LaneGRPOTrainer", "OneLayerGRPOTrainer", "SUPPORTED_TRL_VERSIONS", "check_trl_version",
           "loss_config_from_trl"]
