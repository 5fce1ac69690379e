"""The exceptions that cross module boundaries, so that every command-line tool can turn them
into one clear message (see :mod:`hlip_fast.boundary`); the choices for damaged data; and how a
list of problems reads."""

from __future__ import annotations

ON_ERROR = ("raise", "skip")
"""What a long job does with a damaged stored study: stop naming it, or skip and count it."""


class IntegrityError(ValueError):
    """Stored bytes (an index, a side file, a checkpoint) do not match their checksum or size:
    the file is damaged or truncated. The message names the file."""


class DataError(ValueError):
    """A stored study that cannot be read: damaged bytes, a lost tar member, undecodable slices.

    The message names the shard and the study; ``shard``, ``key`` and ``study_id`` say the same
    for code. Picklable (DataLoader workers send it to the main process intact).
    """

    def __init__(self, message: str, *, shard: str = "", key: str | None = None, study_id: str | None = None):
        super().__init__(message)
        self.shard, self.key, self.study_id = str(shard), key, study_id

    def record(self) -> dict:
        """The JSON-able record of a skipped study (what ``skipped.jsonl`` and metrics hold)."""
        return {"shard": self.shard, "key": self.key, "study_id": self.study_id, "reason": str(self)}

    @classmethod
    def from_record(cls, record: dict) -> DataError:
        return cls(record["reason"], shard=record["shard"], key=record["key"], study_id=record["study_id"])


class RunStopped(RuntimeError):
    """A run stopped before its end for a reason the user must act on (divergence, too many
    damaged studies, non-finite weights); the message says what to do."""


def problem_list(summary: str, problems: list[str], limit: int = 20) -> str:
    """One line for one problem; a summary and an indented line per problem (the first ``limit``)
    for several."""
    if len(problems) == 1:
        return f"{summary}: {problems[0]}"
    shown = "".join(f"\n  - {p}" for p in problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{summary} ({len(problems)} problems):{shown}{more}"
