"""Swapping attention modules in place, all or nothing: the levels per block, and the swap."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn as nn

from ..layout import LEVELS

Levels = str | Sequence[str]
"""One level per block, one level for every block, or the name of an HLIP schedule
(a model of :func:`hlip_fast.list_models` of the same depth)."""


def resolve_levels(levels: Levels, blocks: Sequence[str]) -> tuple[str, ...]:
    """The level of each of ``blocks`` (their module names), or an error that names them."""
    depth = len(blocks)
    if isinstance(levels, str):
        if levels in LEVELS:
            return (levels,) * depth
        from ..models.registry import get_config, list_models

        if levels not in list_models():
            raise ValueError(
                f"levels {levels!r} is neither a level {LEVELS} nor an HLIP schedule {list_models()}"
            )
        schedule = get_config(levels).levels
        if len(schedule) != depth:
            raise ValueError(f"HLIP schedule {levels!r} has {len(schedule)} blocks; the model has {depth}")
        return tuple(schedule)
    levels = tuple(levels)
    if len(levels) != depth:
        raise ValueError(
            f"levels has {len(levels)} entries; the model has {depth} blocks ({blocks[0]} ... {blocks[-1]})"
        )
    for name, level in zip(blocks, levels):
        if level not in LEVELS:
            raise ValueError(f"{name}: unknown level {level!r}; expected one of {LEVELS}")
    return levels


def swap_all(model: nn.Module, replacements: dict[str, Callable[[], nn.Module]]) -> None:
    """Build every replacement first (a refusal raises before anything changed), then set them:
    ``replacements`` maps a module's dotted name to the function that builds its successor."""
    built = {name: make() for name, make in replacements.items()}
    for name, module in built.items():
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, module)
