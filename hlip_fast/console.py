"""What a tool prints while it works: one line per phase, a bar with a total for long work, or
with ``--no-progress`` a plain line every so often; with ``--quiet`` nothing but warnings,
errors and the result. Third-party progress bars (transformers, the Hugging Face hub) never
print through it."""

from __future__ import annotations

import os
import sys
import time


def silence_third_party(quiet: bool) -> None:
    """No transformers/hub progress bars; with ``quiet`` their info logs and warnings go too."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub is imported
    if quiet:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"  # read when transformers is imported
    if "transformers" in sys.modules:  # already imported: tell it directly
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if quiet:
            hf_logging.set_verbosity_error()


class Progress:
    """A bar (tqdm) or plain lines: ``update(n, **shown)``, ``close()``; a context manager."""

    def __init__(
        self, console: Console, total: int | None, desc: str, unit: str, every: int | None, initial: int
    ):
        self.console, self.total, self.desc, self.unit = console, total, desc, unit
        self.done, self.shown, self.started = initial, {}, time.perf_counter()
        self.bar = None
        if console.bars:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
        self.every = every or max(1, (total or 10) // 10)

    def update(self, n: int = 1, **shown: object) -> None:
        self.done += n
        self.shown = shown
        if self.bar is not None:
            self.bar.update(n)
            if shown:
                self.bar.set_postfix(shown, refresh=False)
        elif self.console.lines and self.done % self.every < n:
            self._line()

    def _line(self) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        extra = "".join(f" {k} {v}" for k, v in self.shown.items())
        seconds = time.perf_counter() - self.started
        rate = self.done / seconds if seconds > 0 else 0.0
        timing = f"{seconds:.0f} s, {rate:.3g} {self.unit}/s"
        if self.total is not None and rate > 0 and self.done < self.total:
            timing += f", ETA {(self.total - self.done) / rate:.0f} s"
        self.console.say(f"{self.desc}: {self.done}{of} {self.unit}{extra} ({timing})")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.console.lines and self.done % self.every:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Console:
    """``progress``: bars (else plain lines); ``quiet``: neither, and no phase lines; ``enabled``
    False prints nothing (ranks other than the main one)."""

    def __init__(self, name: str, *, progress: bool = True, quiet: bool = False, enabled: bool = True):
        self.name = name
        self.lines = enabled and not quiet
        self.bars = self.lines and progress

    @classmethod
    def for_tool(cls, name: str, args: object, enabled: bool = True) -> Console:
        """The console of a tool from its settings (``args.quiet``, ``args.progress``: the
        output flags, or a config with those fields); third-party output is silenced from here on."""
        silence_third_party(args.quiet)
        return cls(name, progress=args.progress, quiet=args.quiet, enabled=enabled)

    @classmethod
    def silent(cls) -> Console:
        """Prints nothing: the default of library functions."""
        return cls("", enabled=False)

    def say(self, message: str) -> None:
        """One line about what is happening (not with ``quiet``)."""
        if self.lines:
            print(f"[{self.name}] {message}", flush=True)

    def progress(
        self, total: int | None, desc: str, unit: str = "it", *, every: int | None = None, initial: int = 0
    ) -> Progress:
        """A bar with a total, or (``--no-progress``) a line every ``every`` units (a tenth of
        the total by default)."""
        return Progress(self, total, desc, unit, every, initial)
