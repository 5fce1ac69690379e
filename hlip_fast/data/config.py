"""How raw volumes become stored scans: per-modality spacing, intensity mapping and grid."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .volumes import MAX_VOXELS, check_spacing

HLIP_CT_WINDOW = (-1150.0, 350.0)
"""HLIP's CT window in Hounsfield units, mapped to the full integer range."""
HLIP_INPUT_MEAN, HLIP_INPUT_STD = 0.449, 0.226
"""HLIP's input normalisation of the stored [0, 1] range: ImageNet's mean and std averaged over
the RGB channels."""
DEFAULT_MAX_TOKENS = 16384
"""Patch tokens per batch when nothing says otherwise: training, evaluation and the readers."""
MAX_GRID = 4096
"""Largest in-plane grid side ``prepare`` accepts (a typo guard: 22400 for 224)."""


@dataclass(frozen=True)
class ModalityConfig:
    """Preprocessing of one modality.

    ``spacing`` is the target voxel size ``(depth, height, width)`` in mm (``None`` keeps the
    scan's own); ``window`` clips and maps HU linearly (CT); ``percentiles`` maps the given
    lower/upper percentiles of the scan's non-zero voxels (MRI). Exactly one of the two is set.
    In-plane, every scan is resized (``fit="resize"``, only the depth is resampled to
    ``spacing``) or resampled to ``spacing`` and centre-cropped/padded (``fit="crop"``) to the
    shard's grid; each scan keeps its own depth, clamped to ``[min_depth, max_depth]`` slices by
    centre crop (too thin scans are rejected).
    """

    spacing: tuple[float, float, float] | None = None
    window: tuple[float, float] | None = None
    percentiles: tuple[float, float] | None = None
    fit: str = "resize"
    min_depth: int = 1
    max_depth: int = 512

    def __post_init__(self) -> None:
        if self.spacing is not None:
            check_spacing(self.spacing, "target spacing")
        if (self.window is None) == (self.percentiles is None):
            raise ValueError("a ModalityConfig needs exactly one of window (CT) or percentiles (MRI)")
        if self.fit not in ("resize", "crop"):
            raise ValueError(f"fit must be 'resize' or 'crop', got {self.fit!r}")
        if not 1 <= self.min_depth <= self.max_depth:
            raise ValueError(f"bad depth range [{self.min_depth}, {self.max_depth}]")


def default_modalities() -> dict[str, ModalityConfig]:
    """HLIP's choices: CT windowed to −1150..350 HU; MRI by 0.5/99.5 percentiles."""
    return {
        "CT": ModalityConfig(spacing=(3.0, 1.0, 1.0), window=HLIP_CT_WINDOW),
        "MR": ModalityConfig(spacing=(4.0, 1.0, 1.0), percentiles=(0.5, 99.5)),
    }


@dataclass(frozen=True)
class PrepareConfig:
    """Everything ``prepare`` needs besides the manifest; saved next to the shards.

    All scans share one in-plane ``grid`` so a study's slices decode as equal-shaped chunks
    (what DALI's and nvCOMP's batched LZ4 decoders want).
    """

    grid: tuple[int, int] = (224, 224)
    modalities: dict[str, ModalityConfig] = field(default_factory=default_modalities)
    default_modality: str = "CT"
    dtype: str = "uint8"
    studies_per_shard: int = 64
    patch_size: tuple[int, int, int] = (8, 16, 16)
    max_voxels: int = MAX_VOXELS

    def __post_init__(self) -> None:
        if self.dtype not in ("uint8", "uint16"):
            raise ValueError(f"dtype must be uint8 or uint16, got {self.dtype!r}")
        if self.default_modality not in self.modalities:
            raise ValueError(f"default_modality {self.default_modality!r} not in {sorted(self.modalities)}")
        if len(self.grid) != 2 or not all(
            isinstance(n, (int, np.integer)) and 1 <= n <= MAX_GRID for n in self.grid
        ):
            raise ValueError(f"grid must be two integers in 1..{MAX_GRID}, got {self.grid}")
        if self.studies_per_shard < 1:
            raise ValueError(f"studies_per_shard must be >= 1, got {self.studies_per_shard}")
        if self.max_voxels < 1:
            raise ValueError(f"max_voxels must be >= 1, got {self.max_voxels}")

    @property
    def max_value(self) -> int:
        return int(np.iinfo(self.dtype).max)

    def modality(self, name: str | None) -> tuple[str, ModalityConfig]:
        key = (name or self.default_modality).upper()
        key = {"MRI": "MR"}.get(key, key)
        if key not in self.modalities:
            raise ValueError(
                f"no preprocessing configured for modality {name!r} (have {sorted(self.modalities)})"
            )
        return key, self.modalities[key]

    def to_dict(self) -> dict:
        return asdict(self)
