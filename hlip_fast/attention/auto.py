"""How ``backend="auto"`` ranks backends: from a table measured by ``bench/attention.py``.

The table (``auto_table.json`` beside this file, committed from a GPU run) lists, per device
type, dtype, head dim and segment length, the backends from fastest to slowest (forward +
backward). A call uses the entry nearest to it: same device type and dtype, nearest head dim,
then nearest segment length (on a log scale, using the level's longest segment). Without a table
or a matching entry, ``sdpa`` runs: it works everywhere and nothing measured says otherwise. A
compiled model asks for backends that keep one graph for every layout first (``FIXED_GRAPH_ORDER``).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .dispatch import AttentionCall

DEFAULT_ORDER: tuple[str, ...] = ("sdpa",)
FIXED_GRAPH_ORDER: tuple[str, ...] = ("triton", "flash", "torch_varlen", "xformers", "flex")
"""For a compiled model, where ``sdpa`` would trace a new graph per set of segment lengths: the
backends that trace to one graph, tried after the measured ranking's, hlip_fast's kernel first."""
TABLE_PATH = Path(__file__).with_name("auto_table.json")


@functools.cache
def load_table(path: Path = TABLE_PATH) -> tuple[dict, ...]:
    """The table's entries (empty when no table has been committed)."""
    if not path.is_file():
        return ()
    return tuple(json.loads(path.read_text())["entries"])


def ranked_backends(call: AttentionCall, table: tuple[dict, ...] | None = None) -> tuple[str, ...]:
    """Backends to try for ``call``, best first, ending with the default order."""
    entries = load_table() if table is None else table
    dtype = str(call.q.dtype).removeprefix("torch.")
    entries = [e for e in entries if e["device_type"] == call.q.device.type and e["dtype"] == dtype]
    if not entries:
        return DEFAULT_ORDER
    head_dim = min({e["head_dim"] for e in entries}, key=lambda d: abs(d - call.q.shape[-1]))
    entries = [e for e in entries if e["head_dim"] == head_dim]
    longest = call.layout.level(call.level).max_seqlen + call.prefix * int(call.class_tokens)
    best = min(entries, key=lambda e: abs(math.log(e["seqlen"]) - math.log(longest)))
    return tuple(best["ranking"]) + DEFAULT_ORDER
