"""What a training config needs from this machine, looked at before any work starts: the shard
folders, the prompt files, the text model folder and its weights, the pretrained model, the
``torch.compile`` backend, the device, the attention backend and the launch. The values
themselves are checked by :meth:`TrainConfig.problems`."""

from __future__ import annotations

import os
from pathlib import Path

from hlip_fast.data.shards import is_prepared, is_url_or_pattern

from .config import TrainConfig


def environment_problems(cfg: TrainConfig) -> list[str]:
    """Why this machine cannot run ``cfg`` (empty when it can)."""
    from hlip_fast.evaluation import load_prompts

    problems = []
    for key in ("train_data", "val_data"):
        path = getattr(cfg, key)
        if path and not (is_prepared(path) or is_url_or_pattern(path)):
            problems.append(
                f"{key} {path!r} is not a prepared shard folder (no index.json), its index.json, a URL "
                "or a brace pattern of shards"
            )
    for prompt in cfg.prompts:
        try:
            load_prompts(prompt)
        except (OSError, ValueError) as error:
            problems.append(str(error))
    if cfg.text_model and cfg.text_model != "tiny" and not Path(cfg.text_model).is_dir():
        problems.append(f"text_model {cfg.text_model!r}: not a local folder (or 'tiny' to build one)")
    elif cfg.text_model and cfg.lock_text and text_tower_from_scratch(cfg):
        origin = (
            "text_model tiny with no --text-mlm-steps"
            if cfg.text_model == "tiny"
            else f"{cfg.text_model} holds no weights"
        )
        problems.append(
            f"a locked text tower (lock_text) that starts from random weights ({origin}) "
            "never learns: every report gets a near-identical embedding and the loss stays at "
            "ln(batch). Train it (--no-lock-text), warm it up (--text-mlm-steps N with text_model "
            "tiny), give a pretrained model (--text-model FOLDER), or use --recipe scratch-tiny"
        )
    problems += launch_problems(cfg)
    if cfg.pretrained and not Path(cfg.pretrained).exists():
        problems.append(f"pretrained {cfg.pretrained!r} does not exist")
    if cfg.torchcompile:
        from torch._dynamo import list_backends

        if cfg.compile_backend not in list_backends(exclude_tags=()):
            problems.append(
                f"compile_backend {cfg.compile_backend!r} is not a torch.compile backend; this torch "
                f"has {', '.join(list_backends())} and debug ones such as aot_eager"
            )
    return problems


def text_tower_from_scratch(cfg: TrainConfig) -> bool:
    """Whether the text encoder starts from random weights: ``tiny`` without a
    masked-language-model warm-up, or a folder with a config but no weights."""
    if cfg.text_model == "tiny":
        return cfg.text_mlm_steps == 0
    folder = Path(cfg.text_model)
    return not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin"))


def launch_problems(cfg: TrainConfig) -> list[str]:
    """What the launch cannot serve: a device that is not here, an attention backend that does
    not exist or cannot run on it, FSDP outside a torchrun launch."""
    from hlip_fast.attention.dispatch import backend_problem
    from hlip_fast.cli_options import resolve_device

    try:
        device = resolve_device(cfg.device)
    except ValueError as error:
        return [str(error)]
    problems = []
    if problem := backend_problem(cfg.attn_backend, device.type):
        problems.append(f"--attn-backend: {problem}")
    if cfg.fsdp and not all(os.environ.get(key) for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        problems.append(
            "--fsdp shards the model across the processes of a torchrun launch (RANK, WORLD_SIZE "
            "unset here): launch with torchrun --nproc-per-node N -m hlip_fast.train ..."
        )
    return problems
