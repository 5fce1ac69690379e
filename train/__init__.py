"""The lean distributed trainer, installed as ``hlip_fast.train`` (console script ``hlip-train``)."""

from .config import TrainConfig, load_config
from .trainer import Trainer, TrainingStopped, main

__all__ = ["TrainConfig", "Trainer", "TrainingStopped", "load_config", "main"]
