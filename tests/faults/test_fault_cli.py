"""One error boundary per command-line tool: an expected failure is one message naming the file,
line or field, with exit status 2 (3: a run stopped; 1: an internal error); a traceback only
with --debug."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import pytest
from damage import copy_corpus, flip, truncate, without_rights

from hlip_fast import create_clip, save_pretrained
from hlip_fast.data.cli import prepare_main, synth_main
from hlip_fast.demo import main as demo_main
from hlip_fast.evaluation.cli import embed_main, eval_main
from hlip_fast.train import main as train_main
from hlip_fast.train.demo import main as train_demo_main


@pytest.fixture(scope="module")
def model_folder(tiny_text, tmp_path_factory) -> Path:
    model = create_clip("vit_tiny_multiscan_h2", tiny_text[0], embed_dim=16)
    return save_pretrained(model, tmp_path_factory.mktemp("model") / "final")


def run(main, argv: list[str], capsys) -> tuple[int, str]:
    status = main(argv)
    err = capsys.readouterr().err
    return status, err


def test_missing_inputs_are_one_line_per_tool(tmp_path, capsys, shards, model_folder):
    nowhere = tmp_path / "nowhere"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (prepare_main, [str(nowhere / "m.jsonl"), str(tmp_path / "o")], "m.jsonl: no such file or folder"),
        (synth_main, [str(a_file / "out"), "--quiet"], "a file stands where a folder was expected"),
        (eval_main, [str(nowhere), "--model", str(model_folder)], "nowhere does not exist"),
        (embed_main, [str(shards), "--model", str(nowhere)], "is not an hlip_fast checkpoint folder"),
        (
            train_main,
            ["--train-data", str(nowhere), "--recipe", "scratch-tiny"],
            "is not a prepared shard folder",
        ),
        (demo_main, ["--model", "vit_nope"], "unknown model 'vit_nope'"),
        (
            train_demo_main,
            ["--out", str(a_file / "demo"), "--quiet"],
            "a file stands where a folder was expected",
        ),
    ]
    for main, argv, fragment in cases:
        status, err = run(main, argv, capsys)
        assert status == 2 and fragment in err and "Traceback" not in err, (main.__name__, err)
        assert len(err.strip().splitlines()) == 1, err


def test_debug_shows_the_traceback_and_internal_errors_say_so(tmp_path, capsys, monkeypatch):
    status, err = run(prepare_main, [str(tmp_path / "m.jsonl"), str(tmp_path / "o"), "--debug"], capsys)
    assert status == 2 and "Traceback (most recent call last)" in err and "no such file or folder" in err

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(sys.modules["hlip_fast.data.prepare"], "prepare", broken)
    (tmp_path / "m.jsonl").write_text("")
    status, err = run(prepare_main, [str(tmp_path / "m.jsonl"), str(tmp_path / "o")], capsys)
    assert status == 1 and "internal error: ZeroDivisionError: a bug (rerun with --debug" in err
    assert "Traceback" not in err


def test_permission_denied_names_the_file(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"study_id": "a", "scans": ["x.nii"], "report": "r"}\n')
    manifest.chmod(0)
    with without_rights():
        status, err = run(prepare_main, [str(manifest), str(tmp_path / "o")], capsys)
    assert status == 2 and "permission denied" in err and str(tmp_path) in err


def test_damaged_model_files_are_named(model_folder, shards, tmp_path, capsys):
    folder = tmp_path / "final"
    folder.mkdir()
    for path in model_folder.rglob("*"):
        if path.is_file():
            (folder / path.relative_to(model_folder)).parent.mkdir(parents=True, exist_ok=True)
            (folder / path.relative_to(model_folder)).write_bytes(path.read_bytes())
    weights = folder / "model.safetensors"
    flip(weights, weights.stat().st_size // 2)
    status, err = run(eval_main, [str(shards), "--model", str(folder), "--quiet"], capsys)
    assert status == 2 and "model.safetensors: checksum mismatch" in err
    (folder / "checksums.json").unlink()  # a folder from before checksums: safetensors' own checks remain
    truncate(weights, 100)
    status, err = run(eval_main, [str(shards), "--model", str(folder), "--quiet"], capsys)
    assert status == 2 and "model.safetensors: not a readable safetensors file" in err
    for name, payload, fragment in [
        ("empty.pt", b"", "empty.pt: cannot read as a weights-only torch checkpoint"),
        ("cut.safetensors", weights.read_bytes(), "cut.safetensors: not a readable safetensors file"),
    ]:
        (tmp_path / name).write_bytes(payload)
        argv = [str(shards), "--hlip-checkpoint", str(tmp_path / name), "--vision", "vit_tiny_multiscan_h2"]
        status, err = run(eval_main, [*argv, "--text", str(tmp_path)], capsys)
        assert status == 2 and fragment in err, err


def test_prompt_template_errors_name_the_file(model_folder, shards, tmp_path, capsys):
    prompts = tmp_path / "p.yaml"
    prompts.write_text(
        'protocol: binary\ntemplates: ["{finding} is {}"]\nfindings:\n  mass: [no mass, mass]\n'
    )
    status, err = run(
        eval_main, [str(shards), "--model", str(model_folder), "--prompts", str(prompts)], capsys
    )
    assert status == 2 and "p.yaml: every template needs exactly one '{}'" in err and "{finding} is {}" in err
    prompts.write_text("protocol: binary\nfindings: {mass: [a, b]\n")
    status, err = run(
        eval_main, [str(shards), "--model", str(model_folder), "--prompts", str(prompts)], capsys
    )
    assert status == 2 and "p.yaml:3:1: invalid YAML" in err


def test_a_manifest_json_error_names_line_and_column(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps({"study_id": "a", "scans": ["x"], "report": "r"}) + '\n{"study_id": "b",, }\n'
    )
    status, err = run(prepare_main, [str(manifest), str(tmp_path / "o")], capsys)
    assert status == 2 and "m.jsonl:2:18: invalid JSON" in err


def test_eval_stops_at_a_damaged_study_or_skips_and_lists_it(model_folder, shards, tmp_path, capsys):
    data = copy_corpus(shards, tmp_path / "data")
    with tarfile.open(data / "shard-000002.tar") as tar:
        lz4 = next(m for m in tar.getmembers() if m.name.endswith(".lz4"))
    flip(data / "shard-000002.tar", lz4.offset_data + 5)
    argv = [str(data), "--model", str(model_folder), "--quiet", "--out", str(tmp_path / "eval")]
    status, err = run(eval_main, argv, capsys)
    assert status == 2 and "shard-000002.tar: study" in err and "checksum mismatch" in err
    status, err = run(eval_main, [*argv, "--on-error", "skip"], capsys)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert status == 0 and results["studies"] == 11 and len(results["skipped"]) == 1
    assert "shard-000002.tar" in results["skipped"][0]["reason"]
