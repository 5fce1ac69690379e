"""The README's demo runs and reports every backend."""

from __future__ import annotations

from hlip_fast import demo, list_backends


def test_demo_reports_levels_and_every_backend(capsys):
    demo.main(["--studies", "3", "--repeats", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    for level in ("slice", "scan", "study"):
        assert f"\n{level} " in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    for backend in list_backends():
        assert backend in lines
    # Every backend agrees with the float64 reference to float32 precision.
    for backend in list_backends():
        assert float(lines[backend][3]) < 1e-4
