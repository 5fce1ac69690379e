"""A run's folder (``logs/NAME``) and its resume policy: locked against a second trainer, its
checkpoints, which one a resume continues from (verified, its settings compared with this
run's: each field's declared resume behaviour decides), and ``config.json`` with every resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hlip_fast.files import read_json, write_json
from hlip_fast.folder_lock import FolderLock

from . import distributed as D
from .checkpoints import Checkpoints
from .config import FIXED, RUN_ONLY, TrainConfig

log = logging.getLogger("hlip_fast.train")


def resume_changes(saved: dict, current: dict, override: list[str], source: Path) -> dict[str, tuple]:
    """The fields whose values differ from the checkpoint's config (``saved``) that a resume
    checks; refused unless ``override`` names them, and always for the fixed ones."""
    defaults = TrainConfig().to_dict()
    changes = {
        key: (saved.get(key, defaults[key]), value)
        for key, value in current.items()
        if key not in RUN_ONLY and saved.get(key, defaults[key]) != value
    }
    if fixed := {k: v for k, v in changes.items() if k in FIXED}:
        raise ValueError(
            f"{source} was trained with other model settings, which cannot change on resume: " + listed(fixed)
        )
    if refused := {k: v for k, v in changes.items() if k not in override}:
        names = " ".join(sorted(refused))
        raise ValueError(
            f"{source} was trained with other settings: {listed(refused)}. Drop those flags to resume "
            f"as it was, or add --resume-override {names} to apply the new values"
        )
    return changes


def listed(changes: dict[str, tuple]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(changes.items()))


class RunFolder:
    """``root`` locked by rank 0 (released by :meth:`close`), with its ``checkpoints`` (the
    newest ``keep`` of them)."""

    def __init__(self, root: Path, keep: int) -> None:
        self.root = root
        self.lock = D.on_main(FolderLock(root, "hlip-train").acquire)
        self.checkpoints = Checkpoints(root / "checkpoints", keep)

    def close(self) -> None:
        """Release the folder's lock."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def to_resume(self, resume: str, settings: dict, override: list[str]) -> tuple[Path, dict, dict] | None:
        """The verified checkpoint ``resume`` names (``latest``: the newest intact one), its state
        and the setting changes this run applies to it; ``None`` to start from scratch (a
        folder that already holds checkpoints is refused then)."""
        if not resume:
            if existing := self.checkpoints.latest():
                raise ValueError(
                    f"{self.root} already holds a run (newest checkpoint {existing.name}): continue "
                    "it with --resume latest, or give this run another --name"
                )
            return None
        if resume == "latest":
            found = self.checkpoints.load_latest_good()
            if found is None:
                log.info("no checkpoint in %s: starting from scratch", self.checkpoints.folder)
                return None
        else:
            found = (Path(resume), Checkpoints.load(resume))
        path, state = found
        return path, state, resume_changes(json.loads(state["config"]), settings, override, path)

    def write_config(self, settings: dict, name: str, resumed: tuple[Path, dict, dict] | None) -> None:
        """``config.json``: this run's settings, and each resume with the overrides it applied."""
        path = self.root / "config.json"
        history = read_json(path).get("resumed", []) if resumed and path.is_file() else []
        if resumed:
            checkpoint, state, overrides = resumed
            history.append(
                {
                    "step": state["step"],
                    "checkpoint": str(checkpoint),
                    "overrides": {k: list(v) for k, v in overrides.items()},
                }
            )
            if overrides:
                log.warning("resume overrides the checkpoint's settings: %s", listed(overrides))
        write_json(path, {**settings, "name": name, "resumed": history})
