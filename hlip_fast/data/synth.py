"""``synthesize``: a seeded corpus of phantom studies with findings, reports and labels.

Brain MRI studies (T1, T2, FLAIR, T1C of one head) or chest CT studies (soft-tissue and lung
reconstructions of one chest), 1..N scans each, varying depth, spacing, contrast and noise.
Findings of several classes sit at a random side and height, differ in size, and show only in
the sequences where they would; the report describes present findings and negates some absent
ones, with varied wording and sentence order. Labels equal the findings, which are drawn
independently of everything else, so a model that ignores the image scores at chance.

Volumes are made in physical units (HU, MR signal) and stored through the same preprocessing
as ``prepare``, or written raw as NIfTI files plus a manifest for ``prepare`` to read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..console import Console
from ..files import write_json
from ..integrity import canonical, digest
from .config import PrepareConfig
from .encoding import StudyResult, encode_study
from .manifest import ScanEntry, StudyEntry, write_manifest
from .preprocess import preprocess_volume
from .shard_set import build_shards
from .volumes import Volume

# Signal of each tissue per MR sequence (arbitrary units) and HU per CT tissue.
MR_TISSUE = {
    "T1": {"scalp": 0.85, "brain": 0.55, "csf": 0.12},
    "T2": {"scalp": 0.55, "brain": 0.45, "csf": 0.95},
    "FLAIR": {"scalp": 0.6, "brain": 0.5, "csf": 0.08},
    "T1C": {"scalp": 0.85, "brain": 0.55, "csf": 0.12},
}
CT_TISSUE = {"air": -1000.0, "body": 40.0, "lung": -850.0, "heart": 45.0, "bone": 700.0}

# Finding -> (signal per sequence, or HU for CT; None where it does not show), radius range.
MR_FINDINGS = {
    "mass": ({"T1": 0.3, "T2": 0.85, "FLAIR": 0.9, "T1C": 1.0}, (0.16, 0.24)),
    "hemorrhage": ({"T1": 1.0, "T2": 0.15, "FLAIR": 0.9, "T1C": 1.0}, (0.12, 0.2)),
    "infarct": ({"T1": None, "T2": 0.9, "FLAIR": 1.0, "T1C": None}, (0.14, 0.22)),
}
CT_FINDINGS = {
    "nodule": ({"CT": 250.0}, (0.1, 0.16)),  # dense (calcified): distinct from consolidation
    "consolidation": ({"CT": -50.0}, (0.2, 0.28)),
    "effusion": ({"CT": 15.0}, (0.22, 0.3)),
}

NAMES = {
    "mass": ["mass", "space-occupying lesion", "tumour"],
    "hemorrhage": ["haemorrhage", "hemorrhage", "intraparenchymal bleed"],
    "infarct": ["infarct", "ischaemic lesion", "area of infarction"],
    "nodule": ["nodule", "pulmonary nodule", "nodular opacity"],
    "consolidation": ["consolidation", "airspace consolidation", "area of consolidation"],
    "effusion": ["pleural effusion", "effusion", "pleural fluid collection"],
}
SIZE_WORDS = ["small", "moderate", "large"]
PRESENT = [
    "There is a {size} {name} in the {place}.",
    "A {size} {name} is seen in the {place}.",
    "{Size} {name} in the {place}.",
    "Findings are consistent with a {size} {name} in the {place}.",
]
ABSENT = ["No {name}.", "No evidence of {name}.", "There is no {name}.", "{Name} is not seen."]
NORMAL = {
    "MR": [
        "The ventricles are normal in size.",
        "No midline shift.",
        "Grey-white differentiation is preserved.",
    ],
    "CT": ["The heart is normal in size.", "The airways are patent.", "No lymphadenopathy."],
}


@dataclass(frozen=True)
class SynthConfig:
    """Corpus size and variation. ``grid`` must match the prepare config's grid;
    ``finding_scale`` multiplies every finding's radius (larger findings are easier to see)."""

    num_studies: int = 16
    modality: str = "MR"
    min_scans: int = 1
    max_scans: int = 4
    depth_range: tuple[int, int] = (8, 24)
    grid: tuple[int, int] = (32, 32)
    finding_probability: float = 0.4
    finding_scale: float = 1.0
    noise: float = 0.03
    seed: int = 0
    prefix: str = "synth"

    def __post_init__(self) -> None:
        if self.modality not in ("MR", "CT"):
            raise ValueError(f"modality must be 'MR' or 'CT', got {self.modality!r}")
        if not 1 <= self.min_scans <= self.max_scans or not 1 <= self.depth_range[0] <= self.depth_range[1]:
            raise ValueError(
                f"bad scan count [{self.min_scans}, {self.max_scans}] or depth range {self.depth_range}"
            )
        problems = []
        if self.num_studies < 1:
            problems.append(f"num_studies must be >= 1, got {self.num_studies}")
        if min(self.grid) < 1:
            problems.append(f"grid sizes must be >= 1, got {tuple(self.grid)}")
        if not self.finding_scale > 0:
            problems.append(f"finding_scale must be > 0, got {self.finding_scale}")
        if not 0 <= self.finding_probability <= 1:
            problems.append(f"finding_probability must be in [0, 1], got {self.finding_probability}")
        if not self.noise >= 0:
            problems.append(f"noise must be >= 0, got {self.noise}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def finding_names(self) -> list[str]:
        return list(MR_FINDINGS if self.modality == "MR" else CT_FINDINGS)


SIZES = {
    "tiny": SynthConfig(num_studies=12, max_scans=3, depth_range=(8, 16), grid=(32, 32)),
    "small": SynthConfig(num_studies=96, max_scans=4, depth_range=(8, 24), grid=(32, 32)),
    "medium": SynthConfig(num_studies=512, max_scans=6, depth_range=(16, 48), grid=(96, 96)),
    "large": SynthConfig(num_studies=2048, max_scans=12, depth_range=(24, 64), grid=(224, 224)),
}


def _grid(depth: int, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised coordinates in [-1, 1]: z inferior→superior, y anterior→posterior, x right→left."""
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in (depth, *grid)]
    return np.meshgrid(*axes, indexing="ij")


def _ellipsoid(z, y, x, centre, radii) -> np.ndarray:
    return ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + (
        (x - centre[2]) / radii[2]
    ) ** 2 <= 1


def _anatomy(modality: str, z, y, x, sequence: str, ventricle_scale: float) -> np.ndarray:
    if modality == "MR":
        tissue = MR_TISSUE[sequence]
        out = np.zeros_like(z)
        out[_ellipsoid(z, y, x, (0, 0, 0), (1.1, 0.92, 0.78))] = tissue["scalp"]
        out[_ellipsoid(z, y, x, (0, 0, 0), (1.0, 0.82, 0.68))] = tissue["brain"]
        for side in (-0.12, 0.12):
            out[_ellipsoid(z, y, x, (0.1, -0.05, side), (0.3 * ventricle_scale, 0.3, 0.08))] = tissue["csf"]
        return out
    out = np.full_like(z, CT_TISSUE["air"])
    out[_ellipsoid(z, y, x, (0, 0, 0), (4.0, 0.7, 0.92))] = CT_TISSUE["body"]
    for side in (-0.45, 0.45):
        out[_ellipsoid(z, y, x, (0, -0.05, side), (1.2, 0.5, 0.33))] = CT_TISSUE["lung"]
    out[_ellipsoid(z, y, x, (-0.3, -0.25, -0.1), (0.5, 0.28, 0.3))] = CT_TISSUE["heart"]
    out[_ellipsoid(z, y, x, (0, 0.55, 0), (4.0, 0.1, 0.1))] = CT_TISSUE["bone"]
    return out


def _draw_findings(rng: np.random.Generator, config: SynthConfig) -> list[dict]:
    table = MR_FINDINGS if config.modality == "MR" else CT_FINDINGS
    findings = []
    for name, (_, (low, high)) in table.items():
        if rng.random() >= config.finding_probability:
            continue
        radius = float(rng.uniform(low, high))
        size = SIZE_WORDS[min(2, int(3 * (radius - low) / (high - low + 1e-9)))]
        radius *= config.finding_scale
        side = "right" if rng.random() < 0.5 else "left"
        level = "upper" if rng.random() < 0.5 else "lower"
        x = (-1 if side == "right" else 1) * (0.45 if config.modality == "CT" else rng.uniform(0.2, 0.35))
        zc = (0.35 if level == "upper" else -0.35) + rng.uniform(-0.1, 0.1)
        yc = rng.uniform(-0.2, 0.2) if name != "effusion" else 0.3
        findings.append(
            {
                "name": name,
                "centre": (zc, yc, x),
                "radius": radius,
                "side": side,
                "level": level,
                "size": size,
            }
        )
    return findings


def _render(
    config: SynthConfig, rng: np.random.Generator, sequence: str, findings: list[dict], ventricle_scale: float
) -> Volume:
    depth = int(rng.integers(config.depth_range[0], config.depth_range[1] + 1))
    z, y, x = _grid(depth, config.grid)
    volume = _anatomy(config.modality, z, y, x, sequence, ventricle_scale)
    table = MR_FINDINGS if config.modality == "MR" else CT_FINDINGS
    key = sequence if config.modality == "MR" else "CT"
    # Largest first, so that a smaller finding inside a larger one stays visible.
    for finding in sorted(findings, key=lambda f: -f["radius"]):
        signal = table[finding["name"]][0][key]
        if signal is not None:
            r = finding["radius"]
            volume[_ellipsoid(z, y, x, finding["centre"], (r * 1.3, r, r))] = signal
    if config.modality == "MR":
        gain, offset = rng.uniform(0.8, 1.25), rng.uniform(-0.05, 0.05)
        volume = (volume * gain + offset + rng.normal(0, config.noise, volume.shape)) * 1000.0
    else:
        volume = volume + rng.normal(
            0, config.noise * 1000.0 if sequence == "lung" else config.noise * 300.0, volume.shape
        )
    extent = rng.uniform(150.0, 200.0) if config.modality == "MR" else rng.uniform(300.0, 380.0)
    spacing = (
        extent / depth * (1.3 if config.modality == "CT" else 1.0),
        200.0 / config.grid[0],
        200.0 / config.grid[1],
    )
    return Volume(volume.astype(np.float32), spacing, description=sequence)


def _report(rng: np.random.Generator, config: SynthConfig, findings: list[dict]) -> str:
    region = "hemisphere" if config.modality == "MR" else "lung"
    sentences = []
    for finding in findings:
        template = PRESENT[rng.integers(len(PRESENT))]
        name = NAMES[finding["name"]][rng.integers(3)]
        place = (
            f"{finding['level']} {finding['side']} {region}"
            if config.modality == "CT"
            else f"{finding['side']} {region}"
        )
        sentences.append(
            template.format(size=finding["size"], Size=finding["size"].capitalize(), name=name, place=place)
        )
    present = {f["name"] for f in findings}
    for name in config.finding_names:
        if name not in present and rng.random() < 0.7:
            word = NAMES[name][rng.integers(3)]
            sentences.append(ABSENT[rng.integers(len(ABSENT))].format(name=word, Name=word.capitalize()))
    sentences += list(rng.choice(NORMAL[config.modality], size=int(rng.integers(0, 3)), replace=False))
    if not sentences:  # a report is never empty: hlip-prepare would skip the study
        sentences.append(str(rng.choice(NORMAL[config.modality])))
    rng.shuffle(sentences)
    return " ".join(sentences)


def make_study(config: SynthConfig, index: int) -> tuple[StudyEntry, list[Volume]]:
    """Study ``index`` of the corpus (independent of every other study): entry and volumes."""
    rng = np.random.default_rng([config.seed, index])
    findings = _draw_findings(rng, config)
    sequences = list(MR_TISSUE) if config.modality == "MR" else ["soft", "lung"]
    num_scans = int(rng.integers(config.min_scans, config.max_scans + 1))
    chosen = [
        sequences[i % len(sequences)] for i in rng.permutation(max(num_scans, len(sequences)))[:num_scans]
    ]
    ventricle_scale = float(rng.uniform(0.8, 1.2))
    volumes = [_render(config, rng, sequence, findings, ventricle_scale) for sequence in chosen]
    labels = {name: int(any(f["name"] == name for f in findings)) for name in config.finding_names}
    study_id = f"{config.prefix}-{config.seed}-{index:06d}"
    scans = [
        ScanEntry(path="", modality=config.modality, spacing=v.spacing, description=v.description)
        for v in volumes
    ]
    entry = StudyEntry(study_id, scans, _report(rng, config, findings), labels, config.modality)
    return entry, volumes


class _SynthStudy:
    """Picklable ``index -> StudyResult`` that renders and preprocesses one study."""

    def __init__(self, config: SynthConfig, prepare_config: PrepareConfig):
        self.config, self.prepare_config = config, prepare_config

    def __call__(self, index: int) -> StudyResult:
        entry, volumes = make_study(self.config, index)
        _, modality_config = self.prepare_config.modality(entry.modality)
        scans, records = [], []
        for scan, volume in zip(entry.scans, volumes):
            stored, record = preprocess_volume(
                volume,
                modality_config,
                self.prepare_config.grid,
                self.prepare_config.max_value,
                self.prepare_config.dtype,
            )
            record.update(modality=entry.modality, description=scan.description, source="synthetic")
            scans.append(stored)
            records.append(record)
        encoded = encode_study(
            entry.study_id, scans, records, entry.report, entry.labels, self.prepare_config
        )
        return StudyResult(entry.study_id, encoded, [])


def synth_prepare_config(config: SynthConfig, prepare_config: PrepareConfig | None = None) -> PrepareConfig:
    """The prepare settings for a synthetic corpus: the given ones on the corpus's grid, with
    no resampling (scans keep the depth they were generated with)."""
    base = prepare_config or PrepareConfig(studies_per_shard=32)
    modalities = {name: replace(m, spacing=None) for name, m in base.modalities.items()}
    return replace(base, grid=tuple(config.grid), default_modality=config.modality, modalities=modalities)


def synthesize(
    out_dir: str | Path,
    config: SynthConfig,
    prepare_config: PrepareConfig | None = None,
    *,
    workers: int = 1,
    console: Console | None = None,
    rebuild: bool = False,
) -> dict:
    """Write the corpus as shards (index, skip report) under ``out_dir``; returns the index.
    Resumable like ``prepare`` (a folder holding another corpus is refused unless ``rebuild``)."""
    prepare_config = synth_prepare_config(config, prepare_config)
    recipe = asdict(config)
    index = build_shards(
        out_dir,
        prepare_config,
        list(range(config.num_studies)),
        [digest(canonical([recipe, i])) for i in range(config.num_studies)],
        _SynthStudy(config, prepare_config),
        workers=workers,
        console=console,
        rebuild=rebuild,
        desc="hlip-synth",
    )
    write_json(Path(out_dir) / "synth_config.json", recipe)
    return index


def write_raw(out_dir: str | Path, config: SynthConfig, *, console: Console | None = None) -> Path:
    """Write the corpus as NIfTI files (RAS affine with the scan's spacing) plus ``manifest.jsonl``."""
    import nibabel as nib

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    bar = (console or Console.silent()).progress(config.num_studies, "writing NIfTI", "studies")
    for index in range(config.num_studies):
        entry, volumes = make_study(config, index)
        for number, (scan, volume) in enumerate(zip(entry.scans, volumes)):
            name = f"{entry.study_id}/scan{number:02d}_{scan.description}.nii.gz"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            xyz = np.ascontiguousarray(volume.array[:, ::-1, ::-1].transpose(2, 1, 0))
            affine = np.diag([volume.spacing[2], volume.spacing[1], volume.spacing[0], 1.0])
            nib.save(nib.Nifti1Image(xyz, affine), root / name)
            scan.path, scan.spacing = name, None
        entries.append(entry)
        bar.update()
    bar.close()
    manifest = root / "manifest.jsonl"
    write_manifest(manifest, entries)
    return manifest
