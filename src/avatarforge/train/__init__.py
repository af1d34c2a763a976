"""The train step: DreamBooth + LoRA (UNet and text encoder) on the base that serves.

from avatarforge.train import TrainConfig, train
result = train(dataset_dir, out_dir, TrainConfig(steps=800))
result.adapter_dir  # load with avatarforge.adapter.load_adapter or pipe.load_lora_weights
"""

from .config import TrainConfig
from .errors import TrainingError, TrainingStopped
from .loop import StepInfo, TrainResult, train

__all__ = ["StepInfo", "TrainConfig", "TrainResult", "TrainingError", "TrainingStopped", "train"]
