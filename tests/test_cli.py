"""Every command-line tool: help that teaches (each flag's help, default and choices), answered
without importing torch, and one spelling of the options they share."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from hlip_fast.cli_options import PRECISIONS

# (console command, module, parser factory, main)
TOOLS = [
    ("hlip-prepare", "hlip_fast.data.cli", "prepare_parser", "prepare_main"),
    ("hlip-synth", "hlip_fast.data.cli", "synth_parser", "synth_main"),
    ("hlip-eval", "hlip_fast.evaluation.cli", "eval_parser", "eval_main"),
    ("hlip-embed", "hlip_fast.evaluation.cli", "embed_parser", "embed_main"),
    ("hlip-train", "hlip_fast.train.cli", "build_parser", None),
    ("python -m hlip_fast.demo", "hlip_fast.demo", "parser", "main"),
    ("python -m hlip_fast.train.demo", "hlip_fast.train.demo", "parser", "main"),
]


def parser_of(module: str, factory: str) -> argparse.ArgumentParser:
    return getattr(__import__(module, fromlist=[factory]), factory)()


def test_help_answers_without_importing_torch():
    # The installed console scripts and `python -m` entries, all in one fresh interpreter: none of
    # them may import torch (seconds, before a word of help) to print its help.
    code = "\n".join(
        [
            "import contextlib, io, runpy, sys",
            "from importlib.metadata import entry_points",
            "entries = entry_points(group='console_scripts')",
            "scripts = {e.name: e for e in entries if e.name.startswith('hlip-')}",
            "for name, entry in sorted(scripts.items()):",
            "    out = io.StringIO()",
            "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):",
            "        entry.load()(['--help'])",
            "    assert out.getvalue().startswith('usage: ' + name), (name, out.getvalue()[:200])",
            "for module in ('hlip_fast.demo', 'hlip_fast.train.demo', 'hlip_fast.train'):",
            "    out = io.StringIO()",
            "    sys.argv = [module, '--help']",
            "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):",
            "        runpy.run_module(module, run_name='__main__')",
            "    assert out.getvalue().startswith('usage: '), (module, out.getvalue()[:200])",
            "print(sorted(scripts), 'torch' in sys.modules)",
        ]
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "['hlip-embed',",
        "'hlip-eval',",
        "'hlip-prepare',",
        "'hlip-synth',",
        "'hlip-train']",
        "False",
    ]


@pytest.mark.parametrize("tool", TOOLS, ids=[t[0] for t in TOOLS])
def test_every_flag_has_help_with_its_default_and_choices(tool):
    name, module, factory, _ = tool
    parser = parser_of(module, factory)
    assert parser.prog == name
    formatter = parser.formatter_class(prog=name)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.option_strings or action.dest}: no help"
        text = formatter._expand_help(action) if action.help else ""
        has_default = action.default not in (None, False, True, [], "", argparse.SUPPRESS)
        if action.option_strings and has_default:
            assert "default" in text, f"{name} {action.option_strings}: default not shown in {text!r}"
        if action.choices:
            assert "{" in formatter._format_action_invocation(action) or "{" in str(action.metavar)


def test_train_flags_are_generated_from_the_config_with_help_default_and_choices():
    from hlip_fast.train import TrainConfig
    from hlip_fast.train.cli import build_parser

    parser = build_parser()
    flags = {a.dest: a for a in parser._actions}
    for field in dataclasses.fields(TrainConfig):
        action = flags[field.name]
        assert action.help.endswith(")") and "(default: " in action.help, field.name
        if field.metadata["choices"]:
            assert action.metavar == "{" + ",".join(field.metadata["choices"]) + "}", field.name
    help_text = parser.format_help()
    for recipe in ("hlip-ct-rate", "hlip-brain-mri", "scratch-tiny"):
        assert f"  {recipe}: " in help_text


def test_train_ranges_and_resume_behaviour_are_declared_once_and_enforced():
    """Each field's declared range refuses a value just outside it, naming the field, and
    ``--help`` states the range and what a resume may do with the field."""
    from hlip_fast.train import TrainConfig
    from hlip_fast.train.cli import build_parser
    from hlip_fast.train.config import FIXED, RUN_ONLY, field_type

    base = TrainConfig(train_data="shards", text_model="tiny", model="vit_tiny_multiscan_h2")
    assert base.problems() == []
    bounded = [f for f in dataclasses.fields(TrainConfig) if f.metadata["bounds"].text()]
    assert len(bounded) >= 25
    for field in bounded:
        bounds, kind = field.metadata["bounds"], field_type(field)[0]
        outside = bounds.least - 1 if bounds.least is not None else bounds.above
        for value in [outside] + ([bounds.below] if bounds.below is not None else []):
            problems = dataclasses.replace(base, **{field.name: kind(value)}).problems()
            assert [p for p in problems if p.startswith(f"{field.name} must be ")], (
                field.name,
                value,
                problems,
            )
    helps = {a.dest: a.help for a in build_parser()._actions}
    assert "; > 0" in helps["lr"] and "; in [0, 1)" in helps["jitter"]
    assert all("; fixed on resume)" in helps[name] for name in FIXED)
    assert all("; free on resume)" in helps[name] for name in RUN_ONLY)
    assert "on resume" not in helps["lr"]  # checked: refused unless --resume-override names it


def test_shared_options_have_one_spelling():
    for name, module, factory, _ in TOOLS:
        parser = parser_of(module, factory)
        flags = {flag: action for action in parser._actions for flag in action.option_strings}
        if "--precision" in flags:
            action = flags["--precision"]
            assert tuple(action.choices or action.metavar.strip("{}").split(",")) == PRECISIONS, name
        if "--device" in flags:
            assert flags["--device"].default in ("auto", None), name
        if name != "python -m hlip_fast.demo":  # the attention demo prints a table and nothing else
            assert {"--quiet", "--no-progress", "--debug"} <= set(flags), name


def test_refused_spellings_are_named():
    from hlip_fast.cli_options import autocast_dtype

    with pytest.raises(ValueError, match=r"precision 'amp_bf16' not in \('auto', 'fp32', 'bf16', 'fp16'\)"):
        autocast_dtype("amp_bf16", "cpu")
