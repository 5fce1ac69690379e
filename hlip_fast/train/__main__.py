"""``python -m hlip_fast.train`` = ``hlip-train``."""

from .cli import run

run()
