"""Checkpoints: hlip_fast's own format and the original HLIP (open_clip) layout.

Own format: a folder with ``model.safetensors`` (weights, read without unpickling),
``config.json`` (the :class:`~hlip_fast.clip.ClipConfig`), ``text/`` (tokenizer and text
encoder config, so the folder needs nothing else) and ``checksums.json`` (every other file's
checksum, verified on load). Original HLIP checkpoints are open_clip ``CustomTextCLIP`` state
dicts; ``.pt`` files are only ever read with ``weights_only=True``.

Upstream's quirks, and what they do to converted outputs: its final ``_slice2study`` call swaps
its scan and slice counts, which changes nothing (only their product is used); its DINO.txt head
keeps one ``(prefix, 2C)`` row per prefix token (hlip_fast returns ``(2C,)`` for a single prefix
token, the same numbers); its RoPE encoder averages the prefix tokens before the head (only its
one-prefix config exists, where that is the identity) and computes rotation angles in the
activations' dtype (see :mod:`hlip_fast.layers.rope`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_model

from .clip import ClipConfig, HLIPModel
from .data.config import HLIP_INPUT_MEAN, HLIP_INPUT_STD
from .errors import IntegrityError
from .files import read_json, write_json
from .integrity import check_finite, file_digest, verify_file
from .models import VisionConfig
from .models.registry import get_config
from .text import TextConfig

HLIP_HUB_MODELS: dict[str, str] = {
    "zch0414/hlip-2025_10_08": "ablate_seqposemb_vit_base_multiscan_h2_dinotxt1568",
    "zch0414/clip-vit_large-scan_study-dualdinotxt1568": "vit_large_scan_study_dualdinotxt1568",
    "zch0414/clip-vit_base-slice_scan_study-dualdinotxt1568": "vit_base_slice_scan_study_dualdinotxt1568",
}
"""Hugging Face repos of HLIP's released weights (the ``zch0414/hlip`` collection, as its README
names them in 2026-04) and the encoder each was trained as. hlip_fast downloads nothing: fetch a
repo (``huggingface-cli download REPO``), then ``load_hlip_checkpoint(its model.safetensors,
that name, a local copy of its text model)``. Its README writes the blog's model id both as
``hlip-2025_10_08`` and ``hlip-2025-10-08``; the collection lists the others."""

WEIGHTS, CONFIG, TEXT_DIR, CHECKSUMS = "model.safetensors", "config.json", "text", "checksums.json"
log = logging.getLogger(__name__)
FORMAT = "hlip_fast.clip/1"

# (original key pattern, hlip_fast name); None drops a key hlip_fast does not use.
_HLIP_RULES: list[tuple[re.Pattern, str | None]] = [
    (re.compile(p), r)
    for p, r in [
        (r"visual\.trunk\.(cls_token|reg_token|spatial_posemb|sequential_posemb)", r"visual.\1"),
        (r"visual\.trunk\.(patch_embed\.proj\.(?:weight|bias))", r"visual.\1"),
        (r"visual\.trunk\.(blocks\.\d+\..+)", r"visual.\1"),
        (r"visual\.trunk\.(norm\.(?:weight|bias))", r"visual.\1"),
        (r"visual\.head\.proj\.weight", "visual_proj.weight"),
        (r"text\.transformer\.(?:.+\.)?(?:position_ids|token_type_ids)", None),  # constant buffers
        (r"text\.transformer\.(.+)", r"text.transformer.\1"),
        (r"text\.proj\.weight", "text.proj.weight"),
        (r"(logit_scale|logit_bias)", r"\1"),
    ]
]
# The text encoder's own pooler is never used (pooling is CLS or mean over the last layer), so
# checkpoints with or without it both load.
_OPTIONAL = re.compile(r"text\.transformer\.pooler\..+")


def convert_hlip_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an original HLIP (open_clip ``CustomTextCLIP``) state dict onto hlip_fast's names.

    Accepts an optional ``module.`` prefix (DDP). Raises ``ValueError`` naming the keys that
    match no rule of the layout, so a checkpoint of another model is never half-loaded.
    """
    converted, unmatched = {}, []
    for key, value in state_dict.items():
        name = key.removeprefix("module.")
        for pattern, target in _HLIP_RULES:
            if pattern.fullmatch(name):
                if target is not None:
                    new = pattern.sub(target, name)
                    # open_clip's temperature and bias are scalars; hlip_fast's have shape (1,).
                    converted[new] = value.reshape(1) if new in ("logit_scale", "logit_bias") else value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise ValueError(
            f"not an HLIP (open_clip CustomTextCLIP) state dict: {len(unmatched)} keys match no rule, "
            f"e.g. {unmatched[:8]}"
        )
    if not any(k.startswith("visual.blocks.") for k in converted) or "visual_proj.weight" not in converted:
        raise ValueError(
            "not an HLIP state dict: no visual.trunk.blocks.* or visual.head.proj.weight keys "
            f"(got {list(state_dict)[:8]} ...)"
        )
    return converted


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{path}: not a readable safetensors file (truncated or damaged?): {error}"
            ) from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{path}: cannot read as a weights-only torch checkpoint ({error})") from error
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: holds no state dict of tensors (top-level keys: {list(loaded)[:8]})")
    return state


def _load_weights(model: HLIPModel, state: Mapping[str, torch.Tensor], source: str) -> None:
    """A strict load except for the unused text pooler, with mismatches named in the error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not _OPTIONAL.fullmatch(k)]
    unexpected = [k for k in state if k not in own and not _OPTIONAL.fullmatch(k)]
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        first = (
            shapes
            or [f"{k}: in the model, not the checkpoint" for k in missing]
            or [f"{k}: unexpected" for k in unexpected]
        )[0]
        raise ValueError(
            f"{source} does not fit the model (is the vision config or text model right?): first "
            f"mismatch {first}; missing {missing[:8]}, unexpected {unexpected[:8]}, "
            f"shape (checkpoint vs model) {shapes[:8]}"
        )
    check_finite(state, source)
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def load_hlip_checkpoint(
    path: str | os.PathLike,
    vision: str | VisionConfig,
    text: str,
    *,
    input_mean: float = HLIP_INPUT_MEAN,
    input_std: float = HLIP_INPUT_STD,
) -> HLIPModel:
    """An :class:`HLIPModel` holding an original HLIP checkpoint's weights.

    ``vision``: the encoder the checkpoint was trained as (one of HLIP's names in
    ``list_models()``, or a ``VisionConfig``); ``text``: a local model folder with the text
    encoder's config and tokenizer (its weights come from the checkpoint). The projection
    width and the loss (``logit_bias`` present: SigLIP) are read from the checkpoint.
    """
    path = Path(path)
    state = convert_hlip_state_dict(_read_state_dict(path))
    vision_config = get_config(vision) if isinstance(vision, str) else vision
    config = ClipConfig(
        vision=vision_config,
        text=TextConfig(text, pretrained=False),
        embed_dim=state["visual_proj.weight"].shape[0],
        loss="siglip" if "logit_bias" in state else "dual" if vision_config.num_embeddings == 2 else "clip",
        input_mean=input_mean,
        input_std=input_std,
    )
    model = HLIPModel(config)
    _load_weights(model, state, str(path))
    return model.eval()


def save_pretrained(model: HLIPModel, out_dir: str | os.PathLike) -> Path:
    """Write ``model`` in hlip_fast's format; the folder appears complete or not at all."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}"  # umask permissions
    staging.mkdir()
    try:
        model.text.save_architecture(staging / TEXT_DIR)
        text = dataclasses.replace(model.config.text, model=TEXT_DIR, pretrained=False)
        config = {"format": FORMAT, **dataclasses.replace(model.config, text=text).to_dict()}
        (staging / CONFIG).write_text(json.dumps(config, indent=2))
        save_model(model, str(staging / WEIGHTS), metadata={"format": FORMAT})
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        write_json(staging / CHECKSUMS, {str(p.relative_to(staging)): file_digest(p) for p in files})
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def verify_folder(root: Path) -> None:
    """Check every file ``checksums.json`` lists (a folder written before checksums: a warning)."""
    if not (root / CHECKSUMS).is_file():
        log.warning("%s has no %s: its files cannot be verified", root, CHECKSUMS)
        return
    for name, expected in read_json(root / CHECKSUMS).items():
        if not (root / name).is_file():
            raise IntegrityError(f"{root / name}: missing from the checkpoint folder")
        verify_file(root / name, expected)


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu") -> HLIPModel:
    """A model saved by :func:`save_pretrained` (no unpickling, checksums verified), in eval
    mode on ``device``."""
    root = Path(path)
    if not (root / CONFIG).is_file() or not (root / WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{root} is not an hlip_fast checkpoint folder (needs {CONFIG} and {WEIGHTS})"
        )
    verify_folder(root)
    data = read_json(root / CONFIG)
    if data.pop("format", None) != FORMAT:
        raise ValueError(f"{root / CONFIG}: not written by hlip_fast (expected format {FORMAT})")
    text_dir = Path(data["text"]["model"])
    data["text"]["model"] = str(text_dir if text_dir.is_absolute() else root / text_dir)
    model = HLIPModel(ClipConfig.from_dict(data))
    try:
        missing, unexpected = load_model(model, str(root / WEIGHTS), strict=False)
    except SafetensorError as error:
        raise ValueError(f"{root / WEIGHTS}: not a readable safetensors file: {error}") from None
    missing = [k for k in missing if not _OPTIONAL.fullmatch(k)]
    if missing or unexpected:
        raise ValueError(f"{root / WEIGHTS}: missing {missing[:8]}, unexpected {unexpected[:8]}")
    check_finite(model.state_dict(), str(root / WEIGHTS))
    return model.to(device).eval()
