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

from hlip_fast.cli_options import DEVICE_HELP, PRECISION_HELP, PRECISIONS, new_parser
from hlip_fast.data.config import DEFAULT_MAX_TOKENS
from hlip_fast.data.shards import SHARD_SOURCES, is_prepared, is_url_or_pattern
from hlip_fast.errors import ON_ERROR, problem_list
from hlip_fast.files import read_config_file

from .recipes import RECIPES, describe_recipes

READERS = ("cpu", "nvcomp", "dali")
POOLING = ("token", "avg")
TEXT_POOLING = ("cls", "mean")
FLOAT32_MAX = 3.4028234663852886e38
RUN_ONLY = frozenset(
    {
        "logs",
        "name",
        "resume",
        "resume_override",
        "progress",
        "quiet",
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
        "profile_steps",
        "meta_init",
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


def knob(default, help: str, choices: tuple | None = None):
    """A :class:`TrainConfig` field with its one-line help (and allowed values) for ``--help``."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every knob of a run; the resolved config is saved as ``config.json`` in the run folder.
    The defaults are HLIP's optimisation settings; ``recipe`` fills in a whole published setup."""

    recipe: str = knob("", "named settings to start from (explicit flags and --config override them)")
    # data
    train_data: str = knob("", f"shards to train on (hlip-prepare or hlip-synth output): {SHARD_SOURCES}")
    val_data: str = knob("", f"held-out studies with labels, for zero-shot evaluation: {SHARD_SOURCES}")
    prompts: list[str] = knob([], "prompt sets for zero-shot evaluation: YAML/JSON files or built-in names")
    max_tokens: int = knob(
        DEFAULT_MAX_TOKENS, "patch tokens per batch: whole ragged studies are packed up to this budget"
    )
    max_studies: int | None = knob(None, "at most this many studies per batch (none: only the token budget)")
    max_scans: int | None = knob(None, "at most this many scans per study (none: the model's position table)")
    jitter: float = knob(0.0, "random intensity scale 1 ± jitter per scan while training")
    workers: int = knob(2, "DataLoader worker processes per rank (0: read in the main process); DALI threads")
    reader: str = knob(
        "cpu",
        "cpu: decode in DataLoader workers; nvcomp: inflate on the GPU with nvCOMP; dali: DALI reads the "
        "shards and inflates on the GPU (on the host without CUDA)",
        READERS,
    )
    # model
    model: str = knob("vit_base_multiscan_h2_token1176", "vision encoder config (hlip_fast.list_models())")
    text_model: str = knob(
        "", "local folder of a pretrained BERT-family model, or 'tiny' to build one from the training reports"
    )
    text_mlm_steps: int = knob(0, "with text_model tiny: masked-language-model warm-up steps on the reports")
    embed_dim: int = knob(512, "width of the shared study/report embedding space")
    pretrained: str = knob("", "hlip_fast model folder to start from (weights only)")
    vision_pooling: str = knob(
        "token", "study embedding: the class token, or the mean of the tokens", POOLING
    )
    text_pooling: str = knob("cls", "report embedding: the CLS token, or the masked mean", TEXT_POOLING)
    siglip: bool = knob(False, "sigmoid loss (SigLIP) instead of the softmax CLIP loss")
    lock_text: bool = knob(True, "freeze the text encoder except its LayerNorms (HLIP locks it)")
    lock_text_unlocked_layers: int = knob(0, "with lock_text: also train the last N text layers")
    force_patch_dropout: float = knob(0.0, "drop this share of each slice's patches while training")
    drop_path_rate: float = knob(0.0, "stochastic depth of the vision blocks")
    grad_checkpointing: bool = knob(False, "recompute the vision blocks in the backward pass (less memory)")
    torchcompile: bool = knob(False, "torch.compile the vision encoder's device work and the text tower")
    compile_backend: str = knob("inductor", "with torchcompile: its backend (aot_eager: no code generation)")
    attn_backend: str = knob("auto", "attention backend (hlip_fast.list_backends()), or auto")
    input_mean: float = knob(0.0, "input normalisation: (voxel - mean) / std on the stored [0, 1] range")
    input_std: float = knob(1.0, "input normalisation: (voxel - mean) / std on the stored [0, 1] range")
    # optimisation (HLIP's defaults: AdamW, lr 1e-5, wd 0.2, cosine with warm-up)
    lr: float = knob(1e-5, "peak learning rate (AdamW), reached after the warm-up")
    wd: float = knob(0.2, "AdamW weight decay (not on gains, biases, temperature)")
    beta1: float = knob(0.9, "AdamW beta1")
    beta2: float = knob(0.98, "AdamW beta2")
    eps: float = knob(1e-6, "AdamW epsilon")
    warmup: int = knob(377, "linear warm-up steps, then a cosine decay to the last step")
    epochs: int = knob(20, "passes over train_data (unless steps is set)")
    steps: int | None = knob(None, "run length in steps (none: epochs × the steps of an epoch)")
    accum_freq: int = knob(1, "batches per optimiser step (features cached, the loss sees every pair)")
    grad_clip_norm: float | None = knob(1.0, "clip the gradient norm to this (none: no clipping)")
    precision: str = knob("auto", PRECISION_HELP, PRECISIONS)
    local_loss: bool = knob(False, "each rank scores its own studies against all reports (open_clip)")
    gather_with_grad: bool = knob(False, "gather features across ranks with their gradients (open_clip)")
    fsdp: bool = knob(False, "shard the model with FSDP2 instead of DDP")
    meta_init: bool = knob(
        False, "with fsdp: only rank 0 builds the vision weights; the others shard empty ones, then receive"
    )
    # run, checkpoints, logging
    logs: str = knob("logs", "folder of the run folders")
    name: str = knob("", "run folder name under logs (default: hlip-DATE-TIME)")
    seed: int = knob(0, "seed of weights, data order and augmentation")
    resume: str = knob("", "'latest' or a checkpoint path: continue that run exactly")
    save_every: int = knob(500, "checkpoint every N steps (and at the end)")
    keep: int = knob(3, "checkpoints kept")
    log_every: int = knob(
        10,
        "metrics.jsonl row (and, with --no-progress, a line) every N steps; ranks also agree on stop "
        "signals, damaged studies and non-finite streaks there (the only host sync of ordinary steps)",
    )
    zeroshot_every: int = knob(0, "zero-shot evaluation on val_data every N steps and at the end (0: never)")
    profile_steps: int = knob(
        0, "time N steps (from the second) by phase with torch.profiler: a metrics row, a line, a trace"
    )
    report_to: str = knob("", "also log to TensorBoard", ("", "tensorboard"))
    peak_tflops: float | None = knob(None, "the device's peak TFLOP/s for MFU (none: known GPUs only)")
    max_nonfinite: int = knob(10, "stop after this many non-finite steps in a row (seen at log steps)")
    on_error: str = knob("raise", "a damaged training study: stop naming it, or skip and count it", ON_ERROR)
    max_skipped: float = knob(
        0.01, "stop past this many skipped studies: a fraction of train_data, or a count"
    )
    resume_override: list[str] = knob([], "with resume: fields whose new values replace the checkpoint's")
    progress: bool = knob(True, "a progress bar (--no-progress: a plain line every log_every steps)")
    quiet: bool = knob(False, "print only warnings, errors and the result (third-party output too)")
    device: str = knob("auto", DEVICE_HELP)

    def check(self) -> None:
        """Raise ``ValueError`` listing every problem (paths, ranges, choices)."""
        from hlip_fast.evaluation import load_prompts
        from hlip_fast.models import list_models

        problems = []
        if not self.train_data:
            problems.append("train_data is required (a folder written by hlip-prepare or hlip-synth)")
        for key in ("train_data", "val_data"):
            path = getattr(self, key)
            if path and not (is_prepared(path) or is_url_or_pattern(path)):
                problems.append(
                    f"{key} {path!r} is not a prepared shard folder (no index.json), its index.json, a URL "
                    "or a brace pattern of shards"
                )
        if self.prompts and not self.val_data:
            problems.append("prompts need val_data (held-out studies with labels)")
        for prompt in self.prompts:
            try:
                load_prompts(prompt)
            except (OSError, ValueError) as error:
                problems.append(str(error))
        if self.model not in list_models():
            problems.append(f"unknown model {self.model!r}; available: {list_models()}")
        if not self.text_model:
            problems.append(
                "text_model is required: a local folder with a pretrained BERT-family model (as HLIP "
                "uses), or 'tiny' to build one from the training reports; or start from a recipe "
                f"(--recipe {' | '.join(RECIPES)})"
            )
        elif self.text_model != "tiny" and not Path(self.text_model).is_dir():
            problems.append(f"text_model {self.text_model!r}: not a local folder (or 'tiny' to build one)")
        elif self.lock_text and self.text_tower_from_scratch():
            problems.append(
                f"a locked text tower (lock_text) that starts from random weights ({self._text_origin()}) "
                "never learns: every report gets a near-identical embedding and the loss stays at "
                "ln(batch). Train it (--no-lock-text), warm it up (--text-mlm-steps N with text_model "
                "tiny), give a pretrained model (--text-model FOLDER), or use --recipe scratch-tiny"
            )
        if self.recipe and self.recipe not in RECIPES:
            problems.append(f"unknown recipe {self.recipe!r}; available: {list(RECIPES)}")
        if self.pretrained and not Path(self.pretrained).exists():
            problems.append(f"pretrained {self.pretrained!r} does not exist")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                problems.append(f"{f.name} {getattr(self, f.name)!r} not in {choices}")
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
            "profile_steps",
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
        if self.meta_init and not self.fsdp:
            problems.append("meta_init shards the vision weights before they exist; it needs --fsdp")
        if self.torchcompile:
            from torch._dynamo import list_backends

            if self.compile_backend not in list_backends(exclude_tags=()):
                problems.append(
                    f"compile_backend {self.compile_backend!r} is not a torch.compile backend; this torch "
                    f"has {', '.join(list_backends())} and debug ones such as aot_eager"
                )
        if self.zeroshot_every and self.fsdp:
            problems.append("zero-shot evaluation during training runs on rank 0 only; not with --fsdp")
        problems += self._number_problems()
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

    def text_tower_from_scratch(self) -> bool:
        """Whether the text encoder starts from random weights: ``tiny`` without a
        masked-language-model warm-up, or a folder with a config but no weights."""
        if self.text_model == "tiny":
            return self.text_mlm_steps == 0
        folder = Path(self.text_model)
        return not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin"))

    def _text_origin(self) -> str:
        if self.text_model == "tiny":
            return "text_model tiny with no --text-mlm-steps"
        return f"{self.text_model} holds no weights"

    def warnings(self) -> list[str]:
        """Settings that can train but are likely not what was meant; printed before a run."""
        found = []
        if self.vision_pooling == "token" and not self.pretrained and self.text_model == "tiny":
            found.append(
                "vision_pooling token from scratch with a text tower from scratch: the class token "
                "carries nothing at first and both towers start blind, so the loss can stay at "
                "ln(batch) for a long time; --vision-pooling avg learns from the first step"
            )
        return found

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


def _flag_help(f: dataclasses.Field) -> str:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    kind = _field_type(f)
    if kind is bool:
        shown = "on" if default else "off"
    elif default is None:
        shown = "none"
    elif default in ("", []):
        shown = "unset"
    else:
        shown = " ".join(default) if isinstance(default, list) else str(default)
    return f"{f.metadata['help']} (default: {shown})"


def build_parser() -> argparse.ArgumentParser:
    """Flags generated from :class:`TrainConfig` (``--lr``, ``--grad-checkpointing`` /
    ``--no-grad-checkpointing``, ...), each with its help, default and choices, plus
    ``--config FILE`` and ``--debug``."""
    parser = new_parser(
        "hlip-train",
        "Contrastive pre-training of a hierarchical 3D CLIP (HLIP) on prepared shards.\n"
        "Settings: defaults <- --recipe <- --config FILE <- flags. Recipes:\n" + describe_recipes(),
    )
    parser.add_argument(
        "--config", type=Path, help="YAML or JSON file of the fields below (snake_case); flags override it"
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind, choices = _field_type(f), f.metadata["choices"]
        common = {"default": None, "help": _flag_help(f)}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, nargs="*", **common)
        else:  # choices are shown here and checked by TrainConfig.check, with every other problem
            choices = list(RECIPES) if f.name == "recipe" else choices
            metavar = "{" + ",".join(choices) + "}" if choices else None
            parser.add_argument(flag, type=_parse_optional(kind), metavar=metavar, **common)
    return parser


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults ← the recipe (``--recipe``, or ``recipe`` in the file) ← ``--config`` file ← flags;
    unknown file keys are an error, as is a field a recipe needs that nothing gives."""
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
    recipe = RECIPES.get(values.get("recipe", ""))
    if recipe is not None:
        if missing := [f"{k} ({why})" for k, why in recipe.needs.items() if not values.get(k)]:
            raise ValueError(f"recipe {values['recipe']} needs: {'; '.join(missing)}")
        values = {**recipe.values, **values}
    config = TrainConfig(**values)
    config.check()
    return config
