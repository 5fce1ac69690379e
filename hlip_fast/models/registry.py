"""Named encoder configs: HLIP's published ones under their names (the four of the paper and the
later DINO.txt, dual, ViT-L and three-level ones), tiny ones for tests, all also in timm."""

from __future__ import annotations

import dataclasses
import sys

from timm.models import register_model

from .encoder import HLIPVisionEncoder, VisionConfig

_BASE = dict(in_chans=1, embed_dim=768, depth=12, num_heads=12)
_LARGE = dict(in_chans=1, embed_dim=1024, depth=24, num_heads=16)
_TINY = dict(in_chans=1, embed_dim=48, num_heads=2, mlp_ratio=2.0)


def schedule(
    depth: int, slice: tuple[int, ...] = (), scan: tuple[int, ...] = (), study: tuple[int, ...] = ()
):
    """The per-block levels from the block indexes of each level, as HLIP's configs give them."""
    levels = {**dict.fromkeys(slice, "slice"), **dict.fromkeys(scan, "scan"), **dict.fromkeys(study, "study")}
    if sorted(levels) != list(range(depth)) or len(slice) + len(scan) + len(study) != depth:
        raise ValueError(f"every block 0..{depth - 1} needs exactly one level: {slice=} {scan=} {study=}")
    return tuple(levels[i] for i in range(depth))


_EVERY_THIRD = dict(scan=(0, 1, 3, 4, 6, 7, 9, 10), study=(2, 5, 8, 11))
_H2 = schedule(12, **_EVERY_THIRD)
_H2_SLICE = schedule(12, slice=_EVERY_THIRD["scan"], scan=_EVERY_THIRD["study"])
_H3 = schedule(12, slice=(0, 3, 6, 9), scan=(1, 4, 7, 10), study=(2, 5, 8, 11))
_LARGE_STUDY = (5, 11, 17, 23)
_LARGE_H2 = schedule(24, scan=tuple(i for i in range(24) if i not in _LARGE_STUDY), study=_LARGE_STUDY)
_LARGE_H3 = schedule(
    24,
    slice=tuple(i for i in range(24) if i % 6 < 4),
    scan=tuple(i for i in range(24) if i % 6 == 4),
    study=_LARGE_STUDY,
)
_CT = dict(img_size=(112, 336, 336), patch_size=(8, 24, 24), max_num_scans=1)
_P1176 = dict(img_size=(48, 224, 224), patch_size=(8, 16, 16))
_P1568 = dict(img_size=(48, 224, 224), patch_size=(6, 16, 16))
_DINOTXT = dict(pooling="dinotxt")
_DUAL = dict(pooling="dinotxt", reg_tokens=1)
_NO_SEQ = dict(max_num_scans=0)  # no scan-sequence position embedding, any number of scans

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
    # HLIP's later configs (zch0414/hlip, 2025-2026; hlip-ablation branch): 6x16x16 patches,
    # DINO.txt pooling, a register token for the dual loss, ViT-L, three levels in one model.
    "vit_base_slice_scan_token2744": VisionConfig(**_CT, levels=_H2_SLICE, **_BASE),
    "vit_base_scan_study_token1176": VisionConfig(**_P1176, max_num_scans=40, levels=_H2, **_BASE),
    "vit_base_multiscan_h2_dinotxt1176": VisionConfig(
        **_P1176, max_num_scans=40, levels=_H2, **_DINOTXT, **_BASE
    ),
    "vit_base_multiscan_h2_token1568": VisionConfig(**_P1568, max_num_scans=40, levels=_H2, **_BASE),
    "vit_base_multiscan_h2_dinotxt1568": VisionConfig(
        **_P1568, max_num_scans=40, levels=_H2, **_DINOTXT, **_BASE
    ),
    "ablate_seqposemb_vit_base_multiscan_h2_dinotxt1568": VisionConfig(
        **_P1568, **_NO_SEQ, levels=_H2, **_DINOTXT, **_BASE
    ),
    "ablate_seqposemb_vit_base_multiscan_h2_dualdinotxt1568": VisionConfig(
        **_P1568, **_NO_SEQ, levels=_H2, **_DUAL, **_BASE
    ),
    "ablate_seqposemb_vit_base_multiscan_h3_dualdinotxt1568": VisionConfig(
        **_P1568, **_NO_SEQ, levels=_H3, **_DUAL, **_BASE
    ),
    "ablate_seqposemb_vit_large_multiscan_h2_dualdinotxt1568": VisionConfig(
        **_P1568, **_NO_SEQ, levels=_LARGE_H2, **_DUAL, **_LARGE
    ),
    "ablate_seqposemb_vit_large_multiscan_h3_dualdinotxt1568": VisionConfig(
        **_P1568, **_NO_SEQ, levels=_LARGE_H3, **_DUAL, **_LARGE
    ),
    "ablate_rope_vit_base_multiscan_h2_dinotxt1568": VisionConfig(
        **_P1568, **_NO_SEQ, levels=_H2, **_DINOTXT, rope=True, **_BASE
    ),
    "vit_base_slice_scan_dualdinotxt2744": VisionConfig(**_CT, levels=_H2_SLICE, **_DUAL, **_BASE),
    "vit_base_scan_study_dualdinotxt1568": VisionConfig(**_P1568, **_NO_SEQ, levels=_H2, **_DUAL, **_BASE),
    "vit_base_slice_scan_study_dualdinotxt1568": VisionConfig(
        **_P1568, **_NO_SEQ, levels=_H3, **_DUAL, **_BASE
    ),
    "vit_large_scan_study_dualdinotxt1568": VisionConfig(
        **_P1568, **_NO_SEQ, levels=_LARGE_H2, **_DUAL, **_LARGE
    ),
    "vit_large_slice_scan_study_dualdinotxt1568": VisionConfig(
        **_P1568, **_NO_SEQ, levels=_LARGE_H3, **_DUAL, **_LARGE
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
    "vit_tiny_multiscan_h3_dualdinotxt": VisionConfig(
        img_size=(16, 32, 32),
        patch_size=(4, 8, 8),
        depth=3,
        levels=("slice", "scan", "study"),
        **_NO_SEQ,
        **_DUAL,
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
