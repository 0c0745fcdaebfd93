"""One module per stage; the loop looks a stage up here by --stage. Adding a stage: one module, one line below.

The interface every stage offers the loop is documented in training/stages/base.py (Stage).
"""

from training.stages.base import Stage, StageEnv
from training.stages.dpo import DPOStage
from training.stages.pretrain import PretrainStage
from training.stages.rl import RLStage
from training.stages.rm import RMStage
from training.stages.sft import SFTStage

STAGES: dict[str, type[Stage]] = {
    "pretrain": PretrainStage,
    "sft": SFTStage,
    "dpo": DPOStage,
    "rm": RMStage,
    "rl": RLStage,
}

__all__ = ["STAGES", "Stage", "StageEnv"]
