"""``hlip-train``: parse and check the config (no torch needed for that, so ``--help`` answers at
once), then train and print where everything went."""

from __future__ import annotations

import json
import logging
from typing import NoReturn

from hlip_fast.boundary import command
from hlip_fast.console import Console

from .config import load_config

log = logging.getLogger("hlip_fast.train")


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
