"""Building blocks of the hierarchical ViT: each module takes packed rows plus the layout."""

from .attention import HierarchicalAttention
from .block import HierarchicalBlock, SegmentDropPath
from .class_tokens import plan_switch, switch_level, switch_rows
from .patch_dropout import keep_patches
from .patch_embed import PatchEmbed3D
from .pos_embed import resample_3d, sincos_1d, sincos_3d
from .rope import RotaryTables, rope_chunk, token_positions

__all__ = [
    "HierarchicalAttention",
    "HierarchicalBlock",
    "PatchEmbed3D",
    "RotaryTables",
    "SegmentDropPath",
    "keep_patches",
    "plan_switch",
    "resample_3d",
    "rope_chunk",
    "sincos_1d",
    "sincos_3d",
    "switch_level",
    "switch_rows",
    "token_positions",
]
