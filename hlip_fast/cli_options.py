"""What every command-line tool spells the same way: the help layout (each flag with its default
and choices), ``--device``, ``--precision``, ``--quiet`` and ``--no-progress``. Light on
purpose: nothing here imports torch until a device is resolved, so ``--help`` answers at once."""

from __future__ import annotations

import argparse

from .boundary import add_debug_flag

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_HELP = "autocast dtype: auto (bf16 on a GPU, fp32 on the CPU), fp32, bf16 or fp16"
DEVICE_HELP = "auto (the GPU when there is one), cpu, cuda or cuda:N"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and ends every flag's help with its default (when it
    has one worth showing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = not isinstance(default, bool) and default not in (None, argparse.SUPPRESS, [], "")
        if shown and "%(default)" not in text and "default" not in text and action.option_strings:
            if isinstance(default, (list, tuple)):
                default = " ".join(map(str, default))
            text += f" (default: {default})"
        return text


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the shared help layout and ``--debug``."""
    parser = argparse.ArgumentParser(prog, description=description, formatter_class=HelpFormatter)
    add_debug_flag(parser)
    return parser


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """``--quiet`` and ``--no-progress``, the same in every tool."""
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="print only warnings, errors and the result (third-party bars and logs too)",
    )
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="plain lines instead of progress bars (for log files)",
    )


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--precision``, the same in every tool."""
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)


def add_preprocessing_flags(parser: argparse.ArgumentParser, applies_to: str) -> None:
    """``--grid`` and ``--modality``: how raw studies are preprocessed (``hlip-prepare``, and
    ``hlip-eval``/``hlip-embed`` on raw studies); ``applies_to`` names what they apply to."""
    parser.add_argument(
        "--grid",
        type=int,
        nargs=2,
        default=[224, 224],
        metavar=("H", "W"),
        help=f"in-plane size of every slice of {applies_to}",
    )
    parser.add_argument(
        "--modality",
        choices=["CT", "MR"],
        type=str.upper,
        default="CT",
        help=f"modality (intensity mapping) of {applies_to} when their manifest row names none",
    )


def resolve_device(name: str):
    """``torch.device`` for a ``--device`` value (``auto``: the GPU when there is one)."""
    import torch

    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r}: {DEVICE_HELP}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: no CUDA device is available here (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(
            f"--device {name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: {DEVICE_HELP}")
    return device


def autocast_dtype(precision: str, device_type: str):
    """The autocast dtype of a ``--precision`` value on a device type; ``None`` for fp32."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} not in {PRECISIONS}")
    if precision == "auto":
        precision = "bf16" if device_type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
