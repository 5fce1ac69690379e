"""The training configuration: one typed dataclass, read from YAML/JSON and command-line flags
(open_clip's flag names where one exists), checked before any work starts."""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from hlip_fast.boundary import add_debug_flag
from hlip_fast.errors import ON_ERROR, problem_list
from hlip_fast.files import read_config_file

PRECISIONS = ("auto", "fp32", "amp_bf16", "amp")
READERS = ("cpu", "nvcomp")
FLOAT32_MAX = 3.4028234663852886e38
RUN_ONLY = frozenset(
    {
        "logs",
        "name",
        "resume",
        "resume_override",
        "progress",
        "log_every",
        "save_every",
        "keep",
        "report_to",
        "zeroshot_every",
        "prompts",
        "val_data",
        "peak_tflops",
        "max_nonfinite",
        "on_error",
        "max_skipped",
        "pretrained",
    }
)
"""Fields a resumed run may change freely: they do not change the weights it trains."""
FIXED = frozenset(
    {
        "model",
        "embed_dim",
        "text_model",
        "text_mlm_steps",
        "siglip",
        "lock_text",
        "lock_text_unlocked_layers",
        "max_scans",
    }
)
"""Fields a resumed run can never change: they shape the model and its optimizer state."""


@dataclass
class TrainConfig:
    """Every knob of a run; the resolved config is saved as ``config.json`` in the run folder."""

    # data
    train_data: str = ""
    val_data: str = ""
    prompts: list[str] = field(default_factory=list)
    max_tokens: int = 16384
    max_studies: int | None = None
    max_scans: int | None = None
    jitter: float = 0.0
    workers: int = 2
    reader: str = "cpu"
    # model
    model: str = "vit_base_multiscan_h2_token1176"
    text_model: str = "tiny"
    text_mlm_steps: int = 0
    embed_dim: int = 512
    pretrained: str = ""
    vision_pooling: str = "token"
    text_pooling: str = "cls"
    siglip: bool = False
    lock_text: bool = True
    lock_text_unlocked_layers: int = 0
    force_patch_dropout: float = 0.0
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    torchcompile: bool = False
    attn_backend: str = "auto"
    input_mean: float = 0.0
    input_std: float = 1.0
    # optimisation (HLIP's defaults: AdamW, lr 1e-5, wd 0.2, cosine with warm-up)
    lr: float = 1e-5
    wd: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup: int = 377
    epochs: int = 20
    steps: int | None = None
    accum_freq: int = 1
    grad_clip_norm: float | None = 1.0
    precision: str = "auto"
    local_loss: bool = False
    gather_with_grad: bool = False
    fsdp: bool = False
    # run, checkpoints, logging
    logs: str = "logs"
    name: str = ""
    seed: int = 0
    resume: str = ""
    save_every: int = 500
    keep: int = 3
    log_every: int = 10
    zeroshot_every: int = 0
    report_to: str = ""
    peak_tflops: float | None = None
    max_nonfinite: int = 10
    on_error: str = "raise"
    max_skipped: float = 0.01
    resume_override: list[str] = field(default_factory=list)
    progress: bool = True
    device: str = ""

    def check(self) -> None:
        """Raise ``ValueError`` listing every problem (paths, ranges, choices)."""
        from hlip_fast.evaluation import load_prompts
        from hlip_fast.models import list_models

        problems = []
        if not self.train_data:
            problems.append("train_data is required (a folder written by hlip-prepare or hlip-synth)")
        for key in ("train_data", "val_data"):
            path = getattr(self, key)
            if path and not (Path(path) / "index.json").is_file():
                problems.append(f"{key} {path!r} is not a prepared shard folder (no index.json)")
        if self.prompts and not self.val_data:
            problems.append("prompts need val_data (held-out studies with labels)")
        for prompt in self.prompts:
            try:
                load_prompts(prompt)
            except (OSError, ValueError) as error:
                problems.append(str(error))
        if self.model not in list_models():
            problems.append(f"unknown model {self.model!r}; available: {list_models()}")
        if self.text_model != "tiny" and not Path(self.text_model).is_dir():
            problems.append(f"text_model {self.text_model!r}: not a local folder (or 'tiny' to build one)")
        if self.pretrained and not Path(self.pretrained).exists():
            problems.append(f"pretrained {self.pretrained!r} does not exist")
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} not in {PRECISIONS}")
        if self.vision_pooling not in ("token", "avg") or self.text_pooling not in ("cls", "mean"):
            problems.append("vision_pooling must be token or avg, text_pooling cls or mean")
        if self.reader not in READERS:
            problems.append(f"reader {self.reader!r} not in {READERS}")
        if self.report_to not in ("", "tensorboard"):
            problems.append(f"report_to {self.report_to!r}: '' or 'tensorboard'")
        positive = (
            "max_tokens",
            "embed_dim",
            "lr",
            "accum_freq",
            "save_every",
            "keep",
            "log_every",
            "epochs",
        )
        problems += [f"{k} must be > 0, got {getattr(self, k)}" for k in positive if getattr(self, k) <= 0]
        non_negative = (
            "wd",
            "warmup",
            "workers",
            "zeroshot_every",
            "max_nonfinite",
            "jitter",
            "text_mlm_steps",
        )
        problems += [
            f"{k} must be >= 0, got {getattr(self, k)}" for k in non_negative if getattr(self, k) < 0
        ]
        if self.steps is not None and self.steps <= 0:
            problems.append(f"steps must be > 0, got {self.steps}")
        if not 0 <= self.force_patch_dropout < 1 or not 0 <= self.drop_path_rate < 1:
            problems.append("force_patch_dropout and drop_path_rate must be in [0, 1)")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            problems.append(f"beta1, beta2 must be in (0, 1), got {self.beta1}, {self.beta2}")
        if self.zeroshot_every and not self.prompts:
            problems.append("zeroshot_every needs prompts")
        if self.zeroshot_every and self.fsdp:
            problems.append("zero-shot evaluation during training runs on rank 0 only; not with --fsdp")
        problems += self._number_problems()
        if self.on_error not in ON_ERROR:
            problems.append(f"on_error {self.on_error!r} not in {ON_ERROR}")
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown := sorted(set(self.resume_override) - known):
            problems.append(f"resume_override names unknown field(s) {unknown}")
        if fixed := sorted(set(self.resume_override) & FIXED):
            problems.append(f"resume_override: {fixed} can never change on resume (they shape the model)")
        if self.resume_override and not self.resume:
            problems.append("resume_override needs resume (latest or a checkpoint path)")
        if problems:
            raise ValueError(problem_list("invalid training config", problems))

    def _number_problems(self) -> list[str]:
        """Finiteness and the ranges the generic checks above do not cover."""
        problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{f.name} must be a finite number, got {value}")
        if problems:
            return problems
        if self.lr >= FLOAT32_MAX:
            problems.append(f"lr must be below {FLOAT32_MAX:.3g} (the largest float32), got {self.lr}")
        if self.lr * self.wd >= 1:
            problems.append(
                f"lr × wd must be < 1 (AdamW scales the weights by 1 - lr·wd every step), "
                f"got {self.lr} × {self.wd}"
            )
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            problems.append(
                f"grad_clip_norm must be > 0 (or none to turn clipping off), got {self.grad_clip_norm}"
            )
        if self.eps <= 0 or self.input_std <= 0:
            problems.append(f"eps and input_std must be > 0, got {self.eps}, {self.input_std}")
        if self.jitter >= 1:
            problems.append(f"jitter must be in [0, 1) (intensity scale 1 ± jitter), got {self.jitter}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            problems.append(f"peak_tflops must be > 0, got {self.peak_tflops}")
        for key in ("max_studies", "max_scans"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                problems.append(f"{key} must be >= 1 (or none), got {getattr(self, key)}")
        if self.max_skipped < 0 or (self.max_skipped >= 1 and self.max_skipped != int(self.max_skipped)):
            problems.append(
                f"max_skipped must be a fraction in [0, 1) or a whole count >= 1, got {self.max_skipped}"
            )
        return problems

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_type(f: dataclasses.Field):
    """The field's type, ``X`` for ``X | None``."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _parse_optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    return parse


def _typed(name: str, value, where: str):
    """A config-file ``value`` checked against the field's type (YAML gives text for ``1e-3``
    without a dot, for example); a ``ValueError`` naming the file and field otherwise."""
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    kind, hint = _field_type(f), typing.get_type_hints(TrainConfig)[name]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    if value is None and optional:
        return None
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (str, bool) and isinstance(value, kind):
        return value
    if typing.get_origin(kind) is list:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(v, str) for v in items):
            return items
    wanted = {float: "a number", int: "a whole number", str: "text", bool: "true or false"}.get(
        kind, "a list of text"
    )
    raise ValueError(f"{where}: {name} must be {wanted}{' or null' if optional else ''}, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    """Flags generated from :class:`TrainConfig` (``--lr``, ``--grad-checkpointing`` /
    ``--no-grad-checkpointing``, ...), plus ``--config FILE`` and ``--debug``."""
    parser = argparse.ArgumentParser(
        "hlip-train", description="Contrastive pre-training of a hierarchical 3D CLIP (HLIP)."
    )
    parser.add_argument(
        "--config", type=Path, help="YAML or JSON file of TrainConfig fields; flags override it"
    )
    add_debug_flag(parser)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, nargs="*", default=None)
        else:
            parser.add_argument(flag, type=_parse_optional(kind), default=None)
    return parser


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults ← ``--config`` file ← flags; unknown file keys are an error."""
    args = vars(build_parser().parse_args(argv))
    args.pop("debug")
    values: dict = {}
    if config_file := args.pop("config"):
        values = read_config_file(config_file) or {}
        if not isinstance(values, dict):
            raise ValueError(
                f"{config_file}: expected a mapping of TrainConfig fields, got {type(values).__name__}"
            )
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown := sorted(set(values) - known):
            raise ValueError(f"{config_file}: unknown keys {unknown}")
        values = {k: _typed(k, v, str(config_file)) for k, v in values.items()}
    values.update({k: v for k, v in args.items() if v is not None})
    config = TrainConfig(**values)
    config.check()
    return config
