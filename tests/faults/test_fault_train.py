"""hlip-train under bad flags and files, changed settings on resume, damaged checkpoints and
studies, weights that blow up, stop signals inside an accumulated step, a second trainer and a
full disk: a clear message and the right exit status, and never wrong weights with exit 0."""

from __future__ import annotations

import json
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from damage import copy_corpus, flip, truncate
from safetensors.torch import load_file

from hlip_fast.data import synthesize
from hlip_fast.data.synth import SIZES
from hlip_fast.errors import IntegrityError
from hlip_fast.folder_lock import FolderLock
from hlip_fast.train import main as train_main
from hlip_fast.train.checkpoints import Checkpoints
from hlip_fast.train.trainer import Trainer

TINY = ["--model", "vit_tiny_multiscan_h2", "--embed-dim", "32", "--max-tokens", "1024", "--workers", "0"]
# a text tower that can learn (tiny, trained) and a warm-up that fits the short runs here
TINY += ["--text-model", "tiny", "--no-lock-text", "--warmup", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_faults") / "train"
    config = replace(
        SIZES["tiny"], num_studies=16, modality="CT", min_scans=2, max_scans=2, depth_range=(8, 12)
    )
    synthesize(root, config)
    return root


def args(corpus: Path, logs: Path, *extra: str) -> list[str]:
    return ["--train-data", str(corpus), "--logs", str(logs), "--no-progress", "--lr", "1e-3", *TINY, *extra]


def final(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--lr", "inf"], "lr must be a finite number, got inf"),
        (["--lr", "nan"], "lr must be a finite number, got nan"),
        (["--grad-clip-norm", "-1"], "grad_clip_norm must be > 0 (or none)"),
        (["--lr", "10"], "lr × wd must be < 1"),
        (["--lr", "1e39", "--wd", "0"], "lr must be below 3.4e+38"),
        (["--eps", "0"], "eps must be > 0"),
        (["--input-std", "0"], "input_std must be > 0"),
        (["--max-skipped", "1.5"], "max_skipped must be a fraction in [0, 1) or a whole count"),
        (["--on-error", "ignore"], "on_error 'ignore' not in ('raise', 'skip')"),
        (["--resume-override", "model"], "['model'] can never change on resume"),
        (["--max-tokens", "8"], "max_tokens 8 is smaller than every study"),
        (["--accum-freq", "50"], "accum_freq 50 needs that many batches per step on each rank"),
        (["--max-studies", "1"], "a step would hold about 1.0 studies"),
    ],
)
def test_bad_flags_are_refused_before_any_work(corpus, tmp_path, capsys, flags, fragment):
    logs = tmp_path / "logs"
    assert train_main(args(corpus, logs, *flags)) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not logs.exists()


def test_config_file_errors_name_the_file_line_and_field(corpus, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    for text, fragment in [
        ("lr: 1e-3\nwd: [0.1\n", "run.yaml:3:1: invalid YAML"),
        ("lr: fast\n", "run.yaml: lr must be a number, got 'fast'"),
        ("steps: 2.5\n", "run.yaml: steps must be a whole number or null, got 2.5"),
        ("- lr\n", "run.yaml: expected a mapping of TrainConfig fields, got list"),
    ]:
        config.write_text(text)
        assert train_main(["--config", str(config), "--train-data", str(corpus)]) == 2
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err, err
    config.write_bytes(b"name: r\xe9sum\xe9\n")
    assert train_main(["--config", str(config), "--train-data", str(corpus)]) == 2
    assert "run.yaml:1:8: not UTF-8 text (byte 0xe9)" in capsys.readouterr().err


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_refuses_changed_settings_unless_overridden(corpus, tmp_path, capsys):
    base = args(
        corpus,
        tmp_path,
        "--name",
        "r",
        "--steps",
        "4",
        "--warmup",
        "2",
        "--save-every",
        "2",
        "--log-every",
        "1",
    )
    assert train_main(base) == 0
    assert train_main([*base, "--resume", "latest", "--lr", "5e-4"]) == 2
    err = capsys.readouterr().err
    assert "lr 0.001 -> 0.0005" in err and "--resume-override lr" in err
    assert train_main([*base, "--resume", "latest", "--embed-dim", "16"]) == 2
    err = capsys.readouterr().err
    assert "embed_dim 32 -> 16" in err and "cannot change on resume" in err
    new = [*base, "--resume", "latest", "--lr", "5e-4", "--steps", "6", "--resume-override", "lr", "steps"]
    assert train_main(new) == 0
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["lr"] == 5e-4 and saved["resumed"][-1]["overrides"] == {"lr": [1e-3, 5e-4], "steps": [4, 6]}
    # fully applied: step 5 runs at the new base rate times the new schedule's factor (0.5 here)
    row = next(r for r in metrics(tmp_path / "r") if r.get("step") == 5)
    assert row["lr"] == pytest.approx(5e-4 * 0.5)


def test_a_damaged_latest_checkpoint_gives_way_to_the_newest_intact_one(corpus, tmp_path, capsys, caplog):
    common = ["--steps", "4", "--save-every", "1", "--keep", "3", "--warmup", "1"]
    assert train_main(args(corpus, tmp_path, "--name", "whole", *common)) == 0
    assert train_main(args(corpus, tmp_path, "--name", "k", *common)) == 0
    checkpoints = tmp_path / "k" / "checkpoints"
    flip(checkpoints / "step_00000004.pt", 1000)
    truncate(checkpoints / "step_00000003.pt", 4096)
    assert train_main(args(corpus, tmp_path, "--name", "k", *common)) == 2  # a new run there: refused
    assert "already holds a run" in capsys.readouterr().err
    damaged = str(checkpoints / "step_00000004.pt")
    assert train_main(args(corpus, tmp_path, "--name", "k", *common, "--resume", damaged)) == 2
    assert "step_00000004.pt: checksum mismatch" in capsys.readouterr().err
    assert train_main(args(corpus, tmp_path, "--name", "k", *common, "--resume", "latest")) == 0
    assert "truncated" in caplog.text and "resuming from" in caplog.text and "step_00000002.pt" in caplog.text
    assert_same_weights(final(tmp_path / "k"), final(tmp_path / "whole"))
    for path in checkpoints.glob("*.pt"):
        flip(path, 2000)
    assert train_main(args(corpus, tmp_path, "--name", "k", *common, "--resume", "latest")) == 2
    assert "every checkpoint is damaged" in capsys.readouterr().err


def test_weights_that_blow_up_never_end_in_a_zero_exit(corpus, tmp_path, capsys, monkeypatch):
    common = ["--grad-clip-norm", "none", "--warmup", "1", "--max-nonfinite", "10", "--steps", "3"]
    # finite but useless weights: the run ends on non-finite steps, so it is not exported
    assert train_main(args(corpus, tmp_path, "--name", "huge", *common, "--lr", "1e30", "--wd", "0")) == 3
    assert "the run ended on 2 steps with a non-finite loss" in capsys.readouterr().err
    assert not (tmp_path / "huge" / "final").exists()
    # weights that turn non-finite are never saved: the run stops at the next save
    step = Trainer.train_step

    def poisoned(self, micro):
        result = step(self, micro)
        if self.step == 1:
            with torch.no_grad():
                self.model.visual_proj.weight[0, 0] = float("inf")
        return result

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    assert train_main(args(corpus, tmp_path, "--name", "inf", *common, "--save-every", "1")) == 3
    err = capsys.readouterr().err
    assert "the weights are not finite after step 2 (visual_proj.weight)" in err and "step_00000001.pt" in err
    assert [p.name for p in (tmp_path / "inf" / "checkpoints").glob("*.pt")] == ["step_00000001.pt"]
    assert not (tmp_path / "inf" / "final").exists()


def damage_one_study(corpus: Path, target: Path) -> str:
    """A copy of ``corpus`` with one study's slice data damaged; returns that study's id."""
    root = copy_corpus(corpus, target)
    shard = sorted(root.glob("*.tar"))[-1]
    with tarfile.open(shard) as tar:
        lz4 = next(m for m in tar.getmembers() if m.name.endswith(".lz4"))
        meta = json.loads(tar.extractfile(lz4.name.replace(".lz4", ".json")).read())
    flip(shard, lz4.offset_data + 3)
    return meta["study_id"]


def test_damaged_studies_stop_the_run_or_are_counted(corpus, tmp_path, capsys):
    data = tmp_path / "damaged"
    study = damage_one_study(corpus, data)
    run = ["--train-data", str(data), "--steps", "3", "--workers", "2"]
    assert train_main([*args(corpus, tmp_path, "--name", "raise"), *run]) == 2
    err = capsys.readouterr().err
    assert (
        f"study '{study}'" in err and "checksum mismatch in its slice data" in err and "Traceback" not in err
    )
    assert (
        train_main(
            [*args(corpus, tmp_path, "--name", "skip"), *run, "--on-error", "skip", "--max-skipped", "2"]
        )
        == 0
    )
    (record,) = [json.loads(line) for line in (tmp_path / "skip" / "skipped.jsonl").read_text().splitlines()]
    assert (
        record["study_id"] == study
        and max(r.get("skipped_studies", 0) for r in metrics(tmp_path / "skip")) == 1
    )
    assert (
        train_main(
            [*args(corpus, tmp_path, "--name", "strict"), *run, "--on-error", "skip", "--max-skipped", "0"]
        )
        == 3
    )
    assert (
        "1 of 16 training studies were damaged and skipped, over --max-skipped 0" in capsys.readouterr().err
    )


@pytest.mark.parametrize("stop_at_call", [1, 3, 6, 9])
def test_a_stop_inside_an_accumulated_step_resumes_exactly(corpus, tmp_path, monkeypatch, stop_at_call):
    """Stop requests are checked between micro-batches (loading, caching and recomputing); the
    abandoned step is redone on resume, so the weights equal an uninterrupted run's."""
    common = [
        "--accum-freq",
        "3",
        "--max-tokens",
        "512",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--save-every",
        "100",
    ]
    common += ["--force-patch-dropout", "0.3", "--no-lock-text"]
    assert train_main(args(corpus, tmp_path, "--name", "whole", *common)) == 0
    calls = []
    original = Trainer._stop_requested

    def stop_once(self) -> bool:
        calls.append(1)
        return len(calls) == stop_at_call or original(self)

    monkeypatch.setattr(Trainer, "_stop_requested", stop_once)
    assert train_main(args(corpus, tmp_path, "--name", "cut", *common)) == 0
    assert not (tmp_path / "cut" / "final").exists()
    monkeypatch.setattr(Trainer, "_stop_requested", original)
    assert train_main(args(corpus, tmp_path, "--name", "cut", *common, "--resume", "latest")) == 0
    assert_same_weights(final(tmp_path / "cut"), final(tmp_path / "whole"))


def test_a_second_trainer_on_one_run_folder_is_refused(corpus, tmp_path, capsys):
    with FolderLock(tmp_path / "busy", "hlip-train (a test)"):
        assert train_main(args(corpus, tmp_path, "--name", "busy", "--steps", "1")) == 2
    assert "is in use by hlip-train (a test)" in capsys.readouterr().err


def test_a_checkpoint_on_a_full_disk_fails_cleanly(small_disk):
    folder = small_disk.mount(256 * 1024) / "checkpoints"
    checkpoints = Checkpoints(folder, keep=3)
    checkpoints.save({"w": torch.ones(100)}, 1)
    with pytest.raises(OSError, match="step_00000002.pt") as caught:
        checkpoints.save({"w": torch.ones(1 << 20)}, 2)
    assert caught.value.errno == 28
    assert [p.name for p in folder.iterdir()] == ["step_00000001.pt", "step_00000001.pt.sum"]
    assert torch.equal(Checkpoints.load(folder / "step_00000001.pt")["w"], torch.ones(100))


def test_a_checkpoint_with_non_finite_weights_is_passed_over_like_a_damaged_one(tmp_path):
    checkpoints = Checkpoints(tmp_path / "checkpoints", keep=3)
    checkpoints.save({"model": {"w": torch.ones(4)}, "step": 1}, 1)
    checkpoints.save({"model": {"w": torch.tensor([1.0, float("nan"), 0.0, 0.0])}, "step": 2}, 2)
    with pytest.raises(IntegrityError, match=r"step_00000002.pt: non-finite values .* in model\.w"):
        Checkpoints.load(checkpoints.folder / "step_00000002.pt")
    path, state = checkpoints.load_latest_good()
    assert path.name == "step_00000001.pt" and state["step"] == 1
