"""The README followed literally: every fenced ``python``, ``bash`` and ``yaml`` block runs as
written, in order, in one fresh working folder, and its result tables are the ones
``bench/readme.py`` writes from ``bench/results/``.

A block after ``<!-- snippet: file NAME -->`` is written to ``NAME``; one after
``<!-- snippet: skip (reason) -->`` is not run (only the test command itself). Stand-ins of the
same layout replace what a reader brings: ``models/BiomedBERT`` (a tiny BERT),
``hlip_chestct.pt`` (an original-layout HLIP checkpoint with random weights) and ``CT-RATE``
(a miniature release of both splits, as ``tests/test_ct_rate.py`` builds it). The training demo
runs at its smoke size (``HLIP_FAST_DEMO_SIZE=smoke``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(
    r"(?:<!-- snippet: (?P<directive>skip|file) (?P<argument>[^>]*?) -->\n)?"
    r"```(?P<lang>\w*)\n(?P<code>.*?)```",
    re.S,
)


@dataclass(frozen=True)
class Snippet:
    line: int
    lang: str
    code: str
    directive: str | None
    argument: str | None

    @property
    def name(self) -> str:
        return f"README.md:{self.line}:{self.lang}"


def snippets() -> list[Snippet]:
    text = (REPO / "README.md").read_text()
    found = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code"))
        found.append(Snippet(line, match["lang"], match["code"], match["directive"], match["argument"]))
    return found


SNIPPETS = snippets()


def test_every_block_is_runnable_or_says_why_not():
    for snippet in SNIPPETS:
        assert snippet.lang in ("python", "bash", "yaml"), f"{snippet.name}: no language to run it with"
        if snippet.lang == "yaml":
            assert snippet.directive == "file", (
                f"{snippet.name}: a yaml block needs <!-- snippet: file NAME -->"
            )
        if snippet.directive == "skip":
            assert snippet.argument.startswith("(") and len(snippet.argument) > 10, snippet.name
    assert sum(s.directive == "skip" for s in SNIPPETS) == 1  # only the test command itself


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A fresh folder with the repository's scripts and the stand-ins the snippets name."""
    import torch
    from test_ct_rate import ct_rate_release
    from transformers import BertModel

    from hlip_fast.data.synth import SIZES, make_study
    from hlip_fast.models.registry import get_config
    from hlip_fast.padded_hlip import OriginalHLIPClip
    from hlip_fast.text import build_tiny_text_model

    root = tmp_path_factory.mktemp("readme")
    (root / "scripts").symlink_to(REPO / "scripts")
    for split in ("train", "valid"):
        ct_rate_release(root / "CT-RATE", split)
    reports = [make_study(SIZES["tiny"], i)[0].report for i in range(20)] + ["No nodule. No effusion."]
    bert = build_tiny_text_model(root / "models" / "BiomedBERT", reports, mlm_steps=2)
    torch.manual_seed(0)
    original = OriginalHLIPClip(
        get_config("vit_base_singlescan_h2_token2744"), BertModel.from_pretrained(bert), 512
    )
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in original.state_dict().items()}}, root / "hlip_chestct.pt"
    )
    return root


def environment() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "HLIP_FAST_VENV": sys.prefix,  # scripts/demo.sh installs into the running environment
        "HLIP_FAST_DEMO_SIZE": "smoke",
        "PYTHONPATH": "",
    }


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.name for s in SNIPPETS])
def test_readme_snippet_runs_as_written(snippet: Snippet, workdir: Path):
    if snippet.directive == "skip":
        pytest.skip(f"{snippet.name}: {snippet.argument}")
    if "from monai" in snippet.code and not all(map(importlib.util.find_spec, ("monai", "einops"))):
        pytest.skip(f"{snippet.name}: needs the monai extra (pip install -e '.[monai]')")
    if snippet.directive == "file":
        (workdir / snippet.argument).write_text(snippet.code)
        return
    command = (
        [sys.executable, "-c", snippet.code]
        if snippet.lang == "python"
        else ["bash", "-euo", "pipefail", "-c", snippet.code]
    )
    result = subprocess.run(
        command, cwd=workdir, env=environment(), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, (
        f"{snippet.name} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )


def test_readme_tables_are_the_recorded_results():
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "readme.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
