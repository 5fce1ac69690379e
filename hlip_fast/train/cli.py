"""``hlip-train``: flags and config files into a checked :class:`TrainConfig` (no torch needed for
that, so ``--help`` answers at once), then train and print where everything went."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import typing
from pathlib import Path
from typing import NoReturn

from hlip_fast.boundary import command
from hlip_fast.cli_options import new_parser
from hlip_fast.console import Console
from hlip_fast.errors import problem_list
from hlip_fast.files import read_config_file

from .config import TrainConfig, field_type
from .preflight import environment_problems
from .recipes import RECIPES, describe_recipes

log = logging.getLogger("hlip_fast.train")
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _parse_optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    return parse


def _typed(name: str, value, where: str):
    """A config-file ``value`` checked against the field's type (YAML gives text for ``1e-3``
    without a dot, for example); a ``ValueError`` naming the file and field otherwise."""
    kind, optional = field_type(FIELDS[name])
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
    """The field's help, then its default, range and what a resume may do with it."""
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if field_type(f)[0] is bool:
        shown = "on" if default else "off"
    elif default is None:
        shown = "none"
    elif default in ("", []):
        shown = "unset"
    else:
        shown = " ".join(default) if isinstance(default, list) else str(default)
    notes = [f"default: {shown}", f.metadata["bounds"].text()]
    notes.append({"free": "free on resume", "fixed": "fixed on resume"}.get(f.metadata["resume"], ""))
    return f"{f.metadata['help']} ({'; '.join(n for n in notes if n)})"


def build_parser() -> argparse.ArgumentParser:
    """Flags generated from :class:`TrainConfig` (``--lr``, ``--grad-checkpointing`` /
    ``--no-grad-checkpointing``, ...), each with its help, default, range and choices, plus
    ``--config FILE`` and ``--debug``."""
    parser = new_parser(
        "hlip-train",
        "Contrastive pre-training of a hierarchical 3D CLIP (HLIP) on prepared shards.\n"
        "Settings: defaults <- --recipe <- --config FILE <- flags. On resume, a changed setting is "
        "refused unless --resume-override names it; 'free on resume' ones may change, 'fixed on "
        "resume' ones never. Recipes:\n" + describe_recipes(),
    )
    parser.add_argument(
        "--config", type=Path, help="YAML or JSON file of the fields below (snake_case); flags override it"
    )
    for f in FIELDS.values():
        flag = "--" + f.name.replace("_", "-")
        kind, choices = field_type(f)[0], f.metadata["choices"]
        common = {"default": None, "help": _flag_help(f)}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, nargs="*", **common)
        else:  # choices are shown here and checked by TrainConfig.problems, with every other problem
            choices = list(RECIPES) if f.name == "recipe" else choices
            metavar = "{" + ",".join(choices) + "}" if choices else None
            parser.add_argument(flag, type=_parse_optional(kind), metavar=metavar, **common)
    return parser


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults ← the recipe (``--recipe``, or ``recipe`` in the file) ← ``--config`` file ← flags;
    unknown file keys are an error, as is a field a recipe needs that nothing gives. The result is
    checked, values and this machine alike, before it is returned."""
    args = vars(build_parser().parse_args(argv))
    args.pop("debug")
    values: dict = {}
    if config_file := args.pop("config"):
        values = read_config_file(config_file) or {}
        if not isinstance(values, dict):
            raise ValueError(
                f"{config_file}: expected a mapping of TrainConfig fields, got {type(values).__name__}"
            )
        if unknown := sorted(set(values) - set(FIELDS)):
            raise ValueError(f"{config_file}: unknown keys {unknown}")
        values = {k: _typed(k, v, str(config_file)) for k, v in values.items()}
    values.update({k: v for k, v in args.items() if v is not None})
    recipe = RECIPES.get(values.get("recipe", ""))
    if recipe is not None:
        if missing := [f"{k} ({why})" for k, why in recipe.needs.items() if not values.get(k)]:
            raise ValueError(f"recipe {values['recipe']} needs: {'; '.join(missing)}")
        values = {**recipe.values, **values}
    config = TrainConfig(**values)
    if problems := config.problems() + environment_problems(config):
        raise ValueError(problem_list("invalid training config", problems))
    return config


@command("hlip-train")
def main(argv: list[str] | None = None) -> int:
    """``hlip-train [--recipe NAME] [--config FILE] [flags]``."""
    cfg = load_config(argv)
    logging.basicConfig(
        level=logging.WARNING if cfg.quiet else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    from . import distributed as D
    from .trainer import Trainer

    dist = D.setup(cfg.device)
    for warning in cfg.warnings() if dist.main else []:
        log.warning(warning)
    console = Console.for_tool("hlip-train", cfg, enabled=dist.main)
    try:
        with Trainer(cfg, dist, console) as trainer:
            result = trainer.fit()
    finally:
        D.teardown()
    if dist.main:
        kept = {k: v for k, v in result.items() if k in ("step", "stopped", "loss", "studies_per_s")}
        print(f"hlip-train: {json.dumps(kept)}; run folder {trainer.run_dir}")
    return 0


def run(argv: list[str] | None = None) -> NoReturn:
    """The ``hlip-train`` entry point: :func:`main`, then an exit that is safe for a rank of a
    multi-process run (:func:`~hlip_fast.train.distributed.exit_process`)."""
    status = main(argv)
    from .distributed import exit_process  # here: ``hlip-train --help`` must not import torch

    exit_process(status)
