"""hlip_fast: fast language-image pre-training on ragged 3D medical studies (after HLIP)."""

from .attention import hier_attention, list_backends
from .layers import HierarchicalAttention
from .layout import LEVELS, Layout
from .models import HLIPVisionEncoder, VisionConfig, create_model, list_models
from .packing import StudyBatch, pack_studies

__version__ = "0.1.0"

__all__ = [
    "LEVELS",
    "HLIPVisionEncoder",
    "HierarchicalAttention",
    "Layout",
    "StudyBatch",
    "VisionConfig",
    "create_model",
    "hier_attention",
    "list_backends",
    "list_models",
    "pack_studies",
]
