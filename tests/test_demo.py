"""The README's demo runs and reports every backend."""

from __future__ import annotations

from hlip_fast import demo, list_backends


def test_demo_reports_levels_and_every_backend(capsys):
    demo.main(["--studies", "3", "--repeats", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    for level in ("slice", "scan", "study"):
        assert f"\n{level} " in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    ran = [b for b in list_backends() if b in rows and len(rows[b]) == 5]
    assert {"reference", "sdpa", "flex"} <= set(ran)
    # Every backend that ran agrees with the float64 reference to float32 precision; the
    # others are listed with the reason they could not run here.
    for backend in list_backends():
        if backend in ran:
            assert float(rows[backend][3]) < 1e-4
        else:
            assert f"{backend}: not run here (" in out


def test_training_demo_runs_end_to_end_small(tmp_path, capsys):
    from hlip_fast.train import demo as train_demo

    args = ["--out", str(tmp_path), "--studies", "16", "--val-studies", "12", "--steps", "4", "--quiet"]
    assert train_demo.main(args) == 0
    out = capsys.readouterr().out
    assert "zero-shot macro AUC" in out and "| **macro** |" in out
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "eval_final" / "results.md").is_file()
