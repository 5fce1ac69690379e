"""The training configuration: one typed dataclass whose fields declare their help, allowed
values, range and resume behaviour (open_clip's flag names where one exists). The value checks,
the resume sets and ``--help`` are derived from those declarations; the rules between fields are
listed in :meth:`TrainConfig.problems`. Reading files and flags is ``cli.py``'s job, looking at the
disk and the installed packages ``preflight.py``'s."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

from hlip_fast.cli_options import DEVICE_HELP, PRECISION_HELP, PRECISIONS
from hlip_fast.data.config import DEFAULT_MAX_TOKENS
from hlip_fast.data.shards import SHARD_SOURCES
from hlip_fast.errors import ON_ERROR

from .recipes import RECIPES

READERS = ("cpu", "nvcomp", "dali")
POOLING = ("token", "avg", "dinotxt")
TEXT_POOLING = ("cls", "mean")
FLOAT32_MAX = 3.4028234663852886e38
RESUME = {
    "checked": "a resume refuses a new value unless --resume-override names the field",
    "free": "a resume may change it freely: it does not change the weights the run trains",
    "fixed": "a resume can never change it: it shapes the model and its optimizer state",
}


@dataclass(frozen=True)
class Bounds:
    """The allowed range of a number: ``>= least``, ``> above``, ``< below`` (each optional)."""

    least: float | None = None
    above: float | None = None
    below: float | None = None

    def holds(self, value: float) -> bool:
        return (
            (self.least is None or value >= self.least)
            and (self.above is None or value > self.above)
            and (self.below is None or value < self.below)
        )

    def text(self) -> str:
        """``>= 0``, ``> 0``, ``in [0, 1)``, ``in (0, 1)``; empty when unbounded."""
        if self.least is not None:
            low, bracket = self.least, "["
        elif self.above is not None:
            low, bracket = self.above, "("
        else:
            return f"< {self.below:g}" if self.below is not None else ""
        if self.below is not None:
            return f"in {bracket}{low:g}, {self.below:g})"
        return f"{'>=' if bracket == '[' else '>'} {low:g}"


def knob(
    default,
    help: str,
    choices: tuple | None = None,
    *,
    least: float | None = None,
    above: float | None = None,
    below: float | None = None,
    resume: str = "checked",
):
    """A :class:`TrainConfig` field with its one-line help, allowed values or range, and what a
    resume may do with it (a key of :data:`RESUME`)."""
    if resume not in RESUME:
        raise ValueError(f"resume must be one of {list(RESUME)}, got {resume!r}")
    metadata = {"help": help, "choices": choices, "bounds": Bounds(least, above, below), "resume": resume}
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
    val_data: str = knob(
        "", f"held-out studies with labels, for zero-shot evaluation: {SHARD_SOURCES}", resume="free"
    )
    prompts: list[str] = knob(
        [], "prompt sets for zero-shot evaluation: YAML/JSON files or built-in names", resume="free"
    )
    max_tokens: int = knob(
        DEFAULT_MAX_TOKENS,
        "patch tokens per batch: whole ragged studies are packed up to this budget",
        above=0,
    )
    max_studies: int | None = knob(
        None, "at most this many studies per batch (none: only the token budget)", least=1
    )
    max_scans: int | None = knob(
        None, "at most this many scans per study (none: the model's position table)", least=1, resume="fixed"
    )
    jitter: float = knob(0.0, "random intensity scale 1 ± jitter per scan while training", least=0, below=1)
    workers: int = knob(
        2, "DataLoader worker processes per rank (0: read in the main process); DALI threads", least=0
    )
    reader: str = knob(
        "cpu",
        "cpu: decode in DataLoader workers; nvcomp: inflate on the GPU with nvCOMP; dali: DALI reads the "
        "shards and inflates on the GPU (on the host without CUDA)",
        READERS,
    )
    # model
    model: str = knob(
        "vit_base_multiscan_h2_token1176", "vision encoder config (hlip_fast.list_models())", resume="fixed"
    )
    text_model: str = knob(
        "",
        "local folder of a pretrained BERT-family model, or 'tiny' to build one from the training reports",
        resume="fixed",
    )
    text_mlm_steps: int = knob(
        0, "with text_model tiny: masked-language-model warm-up steps on the reports", least=0, resume="fixed"
    )
    embed_dim: int = knob(512, "width of the shared study/report embedding space", above=0, resume="fixed")
    pretrained: str = knob("", "hlip_fast model folder to start from (weights only)", resume="free")
    vision_pooling: str = knob(
        "token",
        "study embedding: the class token, the mean of the tokens, or DINO.txt (each prefix token beside "
        "the mean; with a register token the dual loss)",
        POOLING,
    )
    text_pooling: str = knob("cls", "report embedding: the CLS token, or the masked mean", TEXT_POOLING)
    siglip: bool = knob(False, "sigmoid loss (SigLIP) instead of the softmax CLIP loss", resume="fixed")
    lock_text: bool = knob(
        True, "freeze the text encoder except its LayerNorms (HLIP locks it)", resume="fixed"
    )
    lock_text_unlocked_layers: int = knob(
        0, "with lock_text: also train the last N text layers", resume="fixed"
    )
    force_patch_dropout: float = knob(
        0.0, "drop this share of each slice's patches while training", least=0, below=1
    )
    drop_path_rate: float = knob(0.0, "stochastic depth of the vision blocks", least=0, below=1)
    grad_checkpointing: bool = knob(False, "recompute the vision blocks in the backward pass (less memory)")
    torchcompile: bool = knob(False, "torch.compile the vision encoder's device work and the text tower")
    compile_backend: str = knob("inductor", "with torchcompile: its backend (aot_eager: no code generation)")
    attn_backend: str = knob("auto", "attention backend (hlip_fast.list_backends()), or auto")
    input_mean: float = knob(0.0, "input normalisation: (voxel - mean) / std on the stored [0, 1] range")
    input_std: float = knob(
        1.0, "input normalisation: (voxel - mean) / std on the stored [0, 1] range", above=0
    )
    # optimisation (HLIP's defaults: AdamW, lr 1e-5, wd 0.2, cosine with warm-up)
    lr: float = knob(1e-5, "peak learning rate (AdamW), reached after the warm-up", above=0)
    wd: float = knob(0.2, "AdamW weight decay (not on gains, biases, temperature)", least=0)
    beta1: float = knob(0.9, "AdamW beta1", above=0, below=1)
    beta2: float = knob(0.98, "AdamW beta2", above=0, below=1)
    eps: float = knob(1e-6, "AdamW epsilon", above=0)
    warmup: int = knob(377, "linear warm-up steps, then a cosine decay to the last step", least=0)
    epochs: int = knob(20, "passes over train_data (unless steps is set)", above=0)
    steps: int | None = knob(None, "run length in steps (none: epochs × the steps of an epoch)", above=0)
    accum_freq: int = knob(
        1, "batches per optimiser step (features cached, the loss sees every pair)", above=0
    )
    grad_clip_norm: float | None = knob(1.0, "clip the gradient norm to this (none: no clipping)", above=0)
    precision: str = knob("auto", PRECISION_HELP, PRECISIONS)
    local_loss: bool = knob(False, "each rank scores its own studies against all reports (open_clip)")
    gather_with_grad: bool = knob(False, "gather features across ranks with their gradients (open_clip)")
    fsdp: bool = knob(False, "shard the model with FSDP2 instead of DDP")
    meta_init: bool = knob(
        False,
        "with fsdp: only rank 0 builds the vision weights; the others shard empty ones, then receive",
        resume="free",
    )
    # run, checkpoints, logging
    logs: str = knob("logs", "folder of the run folders", resume="free")
    name: str = knob("", "run folder name under logs (default: hlip-DATE-TIME)", resume="free")
    seed: int = knob(0, "seed of weights, data order and augmentation")
    resume: str = knob("", "'latest' or a checkpoint path: continue that run exactly", resume="free")
    save_every: int = knob(500, "checkpoint every N steps (and at the end)", above=0, resume="free")
    keep: int = knob(3, "checkpoints kept", above=0, resume="free")
    log_every: int = knob(
        10,
        "metrics.jsonl row (and, with --no-progress, a line) every N steps; ranks also agree on stop "
        "signals, damaged studies and non-finite streaks there (the only host sync of ordinary steps)",
        above=0,
        resume="free",
    )
    zeroshot_every: int = knob(
        0, "zero-shot evaluation on val_data every N steps and at the end (0: never)", least=0, resume="free"
    )
    profile_steps: int = knob(
        0,
        "time N steps (from the second) by phase with torch.profiler: a metrics row, a line, a trace",
        least=0,
        resume="free",
    )
    report_to: str = knob("", "also log to TensorBoard", ("", "tensorboard"), resume="free")
    peak_tflops: float | None = knob(
        None, "the device's peak TFLOP/s for MFU (none: known GPUs only)", above=0, resume="free"
    )
    max_nonfinite: int = knob(
        10, "stop after this many non-finite steps in a row (seen at log steps)", least=0, resume="free"
    )
    on_error: str = knob(
        "raise", "a damaged training study: stop naming it, or skip and count it", ON_ERROR, resume="free"
    )
    max_skipped: float = knob(
        0.01,
        "stop past this many skipped studies: a fraction of train_data, or a count",
        least=0,
        resume="free",
    )
    resume_override: list[str] = knob(
        [], "with resume: fields whose new values replace the checkpoint's", resume="free"
    )
    progress: bool = knob(
        True, "a progress bar (--no-progress: a plain line every log_every steps)", resume="free"
    )
    quiet: bool = knob(
        False, "print only warnings, errors and the result (third-party output too)", resume="free"
    )
    device: str = knob("auto", DEVICE_HELP)

    @property
    def loss_kind(self) -> str:
        """``"siglip"``, ``"dual"`` (DINO.txt pooling of a model with a register token: HLIP's
        dual models) or ``"clip"``: the one place the loss is chosen (the model's temperature and
        bias and the loss module follow it)."""
        if self.siglip:
            return "siglip"
        if self.vision_pooling == "dinotxt":
            from hlip_fast.models.registry import get_config  # timm: only when a model is built

            if get_config(self.model).reg_tokens:
                return "dual"
        return "clip"

    def problems(self) -> list[str]:
        """Every problem of the values (empty when there is none): each field's declared choices
        and range, then the rules between fields (the machine is looked at by ``preflight``)."""
        return [*self._field_problems(), *self._rule_problems()]

    def _field_problems(self) -> list[str]:
        problems = []
        for f in dataclasses.fields(self):
            value, choices, bounds = getattr(self, f.name), f.metadata["choices"], f.metadata["bounds"]
            if choices and value not in choices:
                problems.append(f"{f.name} {value!r} not in {choices}")
            if value is None or isinstance(value, (bool, str, list)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{f.name} must be a finite number, got {value}")
            elif not bounds.holds(value):
                optional = " (or none)" if field_type(f)[1] else ""
                problems.append(f"{f.name} must be {bounds.text()}{optional}, got {value}")
        return problems

    def _rule_problems(self) -> list[str]:
        """The rules between fields, and the few that one range cannot state."""
        from hlip_fast.models import list_models

        problems = []
        if not self.train_data:
            problems.append("train_data is required (a folder written by hlip-prepare or hlip-synth)")
        if self.prompts and not self.val_data:
            problems.append("prompts need val_data (held-out studies with labels)")
        if self.model not in list_models():
            problems.append(f"unknown model {self.model!r}; available: {list_models()}")
        if not self.text_model:
            problems.append(
                "text_model is required: a local folder with a pretrained BERT-family model (as HLIP "
                "uses), or 'tiny' to build one from the training reports; or start from a recipe "
                f"(--recipe {' | '.join(RECIPES)})"
            )
        if self.recipe and self.recipe not in RECIPES:
            problems.append(f"unknown recipe {self.recipe!r}; available: {list(RECIPES)}")
        if self.zeroshot_every and not self.prompts:
            problems.append("zeroshot_every needs prompts")
        if self.meta_init and not self.fsdp:
            problems.append("meta_init shards the vision weights before they exist; it needs --fsdp")
        if self.zeroshot_every and self.fsdp:
            problems.append("zero-shot evaluation during training runs on rank 0 only; not with --fsdp")
        if math.isfinite(self.lr) and self.lr >= FLOAT32_MAX:
            problems.append(f"lr must be below {FLOAT32_MAX:.3g} (the largest float32), got {self.lr}")
        if math.isfinite(self.lr * self.wd) and self.lr * self.wd >= 1:
            problems.append(
                f"lr × wd must be < 1 (AdamW scales the weights by 1 - lr·wd every step), "
                f"got {self.lr} × {self.wd}"
            )
        if self.max_skipped >= 1 and self.max_skipped != int(self.max_skipped):
            problems.append(
                f"max_skipped must be a fraction in [0, 1) or a whole count >= 1, got {self.max_skipped}"
            )
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown := sorted(set(self.resume_override) - known):
            problems.append(f"resume_override names unknown field(s) {unknown}")
        if fixed := sorted(set(self.resume_override) & FIXED):
            problems.append(f"resume_override: {fixed} can never change on resume (they shape the model)")
        if self.resume_override and not self.resume:
            problems.append("resume_override needs resume (latest or a checkpoint path)")
        return problems

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


def field_type(f: dataclasses.Field) -> tuple[type, bool]:
    """The field's type (``X`` for ``X | None``) and whether ``None`` is allowed."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None)), True
    return hint, False


def resume_set(kind: str) -> frozenset[str]:
    """The fields declared with ``resume=kind``."""
    return frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["resume"] == kind)


RUN_ONLY = resume_set("free")
"""Fields a resumed run may change freely: they do not change the weights it trains."""
FIXED = resume_set("fixed")
"""Fields a resumed run can never change: they shape the model and its optimizer state."""
