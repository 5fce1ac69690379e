"""Named encoder configs: HLIP's four published ones, tiny ones for tests, all also in timm."""

from __future__ import annotations

import dataclasses
import sys

from timm.models import register_model

from .encoder import HLIPVisionEncoder, VisionConfig

_BASE = dict(in_chans=1, embed_dim=768, depth=12, num_heads=12)
_TINY = dict(in_chans=1, embed_dim=48, num_heads=2, mlp_ratio=2.0)

_CONFIGS: dict[str, VisionConfig] = {
    # HLIP (arXiv 2505.21862) configs, under their original names.
    "vit_base_singlescan_h2_token2744": VisionConfig(
        img_size=(112, 336, 336),
        patch_size=(8, 24, 24),
        max_num_scans=1,
        levels=("slice", "slice", "study") * 4,
        **_BASE,
    ),
    "vit_base_multiscan_h2_token588": VisionConfig(
        img_size=(48, 224, 224),
        patch_size=(16, 16, 16),
        max_num_scans=40,
        levels=("scan", "scan", "study") * 4,
        **_BASE,
    ),
    "vit_base_multiscan_h2_token1176": VisionConfig(
        img_size=(48, 224, 224),
        patch_size=(8, 16, 16),
        max_num_scans=40,
        levels=("scan", "scan", "study") * 4,
        **_BASE,
    ),
    "vit_base_multiscan_h3_token1176": VisionConfig(
        img_size=(48, 224, 224),
        patch_size=(8, 16, 16),
        max_num_scans=40,
        levels=("slice", "scan", "study") * 4,
        **_BASE,
    ),
    # Tiny configs for tests and demos (same schedules, 3 blocks, width 48).
    "vit_tiny_singlescan_h2": VisionConfig(
        img_size=(16, 32, 32),
        patch_size=(4, 8, 8),
        max_num_scans=1,
        depth=3,
        levels=("slice", "slice", "study"),
        **_TINY,
    ),
    "vit_tiny_multiscan_h2": VisionConfig(
        img_size=(16, 32, 32),
        patch_size=(4, 8, 8),
        max_num_scans=8,
        depth=3,
        levels=("scan", "scan", "study"),
        **_TINY,
    ),
    "vit_tiny_multiscan_h3": VisionConfig(
        img_size=(16, 32, 32),
        patch_size=(4, 8, 8),
        max_num_scans=8,
        depth=3,
        levels=("slice", "scan", "study"),
        **_TINY,
    ),
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model` (and by ``timm.create_model``)."""
    return sorted(_CONFIGS)


def get_config(name: str, **overrides) -> VisionConfig:
    """The named config with ``overrides`` applied (any :class:`VisionConfig` field)."""
    if name not in _CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {list_models()}")
    fields = {f.name for f in dataclasses.fields(VisionConfig)}
    if unknown := sorted(set(overrides) - fields):
        raise ValueError(f"unknown VisionConfig fields {unknown}; known: {sorted(fields)}")
    return dataclasses.replace(_CONFIGS[name], **overrides)


def create_model(name: str, **overrides) -> HLIPVisionEncoder:
    """A freshly initialised encoder of the named config, e.g. ``create_model(
    "vit_base_multiscan_h2_token1176", drop_path_rate=0.2)``."""
    return HLIPVisionEncoder(get_config(name, **overrides))


def _timm_entrypoint(name: str):
    def entrypoint(pretrained: bool = False, **kwargs) -> HLIPVisionEncoder:
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        if pretrained:
            raise ValueError(f"{name}: hlip_fast fetches no weights; load a local checkpoint instead")
        return create_model(name, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"timm entry point for hlip_fast's ``{name}`` encoder."
    return entrypoint


for _name in _CONFIGS:
    # timm names models by function and lists them in the module's __all__, so define both.
    setattr(sys.modules[__name__], _name, register_model(_timm_entrypoint(_name)))
