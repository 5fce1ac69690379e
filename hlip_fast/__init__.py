"""hlip_fast: fast language-image pre-training on ragged 3D medical studies (after HLIP)."""

from .attention import hier_attention, list_backends
from .checkpoint import convert_hlip_state_dict, load_hlip_checkpoint, load_pretrained, save_pretrained
from .clip import ClipConfig, HLIPModel, create_clip
from .layers import HierarchicalAttention
from .layout import LEVELS, Layout
from .models import HLIPVisionEncoder, VisionConfig, create_model, list_models
from .packing import StudyBatch, pack_studies
from .text import TextConfig, TextTower

__version__ = "0.1.0"

__all__ = [
    "LEVELS",
    "ClipConfig",
    "HLIPModel",
    "HLIPVisionEncoder",
    "HierarchicalAttention",
    "Layout",
    "StudyBatch",
    "TextConfig",
    "TextTower",
    "VisionConfig",
    "convert_hlip_state_dict",
    "create_clip",
    "create_model",
    "hier_attention",
    "list_backends",
    "list_models",
    "load_hlip_checkpoint",
    "load_pretrained",
    "pack_studies",
    "save_pretrained",
]
