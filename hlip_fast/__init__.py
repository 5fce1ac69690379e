"""hlip_fast: fast language-image pre-training on ragged 3D medical studies (after HLIP).

Names load on first use (torch with them), so the command-line tools answer ``--help`` at once.
"""

from ._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "hier_attention": ".attention",
    "list_backends": ".attention",
    "convert_hlip_state_dict": ".pretrained",
    "load_hlip_checkpoint": ".pretrained",
    "load_pretrained": ".pretrained",
    "save_pretrained": ".pretrained",
    "ClipConfig": ".clip",
    "HLIPModel": ".clip",
    "create_clip": ".clip",
    "HierarchicalAttention": ".layers",
    "LEVELS": ".layout",
    "Layout": ".layout",
    "HLIPVisionEncoder": ".models",
    "VisionConfig": ".models",
    "create_model": ".models",
    "list_models": ".models",
    "StudyBatch": ".packing",
    "pack_studies": ".packing",
    "TextConfig": ".text",
    "TextTower": ".text",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
