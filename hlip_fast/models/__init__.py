"""The HLIP vision encoder and its named configurations."""

from .encoder import HLIPVisionEncoder, VisionConfig
from .registry import create_model, get_config, list_models

__all__ = ["HLIPVisionEncoder", "VisionConfig", "create_model", "get_config", "list_models"]
