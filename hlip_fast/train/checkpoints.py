"""Training checkpoint files: written atomically (temporary file, fsync, rename) with a checksum
file beside each, the last K kept, verified and read back with ``weights_only=True``; a damaged
or truncated latest checkpoint gives way to the newest intact one. What goes into one is
:class:`~hlip_fast.train.training_state.TrainingState`'s business."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from hlip_fast.errors import IntegrityError
from hlip_fast.files import os_error_at, read_json, write_json
from hlip_fast.integrity import ALGORITHM, check_finite, file_digest, verify_file

PATTERN = re.compile(r"step_(\d+)\.pt")
log = logging.getLogger("hlip_fast.train")


class Checkpoints:
    """``folder/step_00000100.pt`` files, each with ``step_00000100.pt.sum`` (size and
    checksum, written before the checkpoint appears); at most ``keep`` of them after each save."""

    def __init__(self, folder: str | os.PathLike, keep: int):
        self.folder, self.keep = Path(folder), keep

    def all(self) -> list[Path]:
        found = [
            (int(m.group(1)), p) for p in self.folder.glob("step_*.pt") if (m := PATTERN.fullmatch(p.name))
        ]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    @staticmethod
    def _sum_path(path: Path) -> Path:
        return path.with_name(path.name + ".sum")

    def save(self, state: dict, step: int) -> Path:
        """Write ``state`` as the checkpoint of ``step``; on failure (a full disk) nothing is
        left behind but the earlier checkpoints, and the ``OSError`` names the file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step_{step:08d}.pt"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as handle:
                torch.save(state, handle)
                handle.flush()
                os.fsync(handle.fileno())
            record = {
                "algorithm": ALGORITHM,
                "digest": file_digest(tmp),
                "size": tmp.stat().st_size,
                "step": step,
            }
            write_json(self._sum_path(path), record)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as error:
            tmp.unlink(missing_ok=True)
            # torch.save reports a full disk as a RuntimeError raised while handling the OSError
            cause = error if isinstance(error, OSError) else error.__context__
            if not isinstance(cause, OSError):
                raise
            raise os_error_at(cause, path) from error
        for old in self.all()[: -self.keep]:
            old.unlink(missing_ok=True)
            self._sum_path(old).unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> dict:
        """The verified checkpoint at ``path``; :class:`IntegrityError` naming it when damaged or
        when it holds non-finite values."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        sums = cls._sum_path(path)
        if not sums.is_file():
            raise IntegrityError(f"{path}: no checksum file {sums.name}; it cannot be verified")
        record = read_json(sums)
        if not isinstance(record, dict) or not {"digest", "size"} <= set(record):
            raise IntegrityError(f"{sums}: not a checksum record; the checkpoint cannot be verified")
        verify_file(path, record["digest"], record["size"])
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - re-raised naming the file
            raise IntegrityError(f"{path}: unreadable checkpoint: {type(error).__name__}: {error}") from None
        check_finite(state, str(path))  # intact bytes of a diverged run: passed over like damage
        return state

    def load_latest_good(self) -> tuple[Path, dict] | None:
        """The newest checkpoint that verifies, with its state (``None``: there is none at all);
        each damaged one passed over is logged. All damaged: an error listing them."""
        damaged = []
        for path in reversed(self.all()):
            try:
                state = self.load(path)
            except (IntegrityError, ValueError) as error:
                log.warning("%s; falling back to the previous checkpoint", error)
                damaged.append(str(error))
                continue
            if damaged:
                log.warning("resuming from %s, the newest intact checkpoint", path)
            return path, state
        if damaged:
            raise IntegrityError("every checkpoint is damaged:\n  " + "\n  ".join(damaged))
        return None
