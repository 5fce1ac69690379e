"""The trainer: config errors, a run whose loss falls, exact resume after SIGKILL, SIGTERM,
divergence handling, and 2-rank DDP equal to one rank with the same global batch."""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from hlip_fast import pack_studies
from hlip_fast.data import synthesize
from hlip_fast.data.batching import collate
from hlip_fast.data.reader import RawStudies, decoded_studies
from hlip_fast.data.synth import SIZES
from hlip_fast.text import build_tiny_text_model
from hlip_fast.train import load_config
from hlip_fast.train import main as train_main
from hlip_fast.train.data import train_transforms

TINY = ["--model", "vit_tiny_multiscan_h2", "--embed-dim", "32", "--max-tokens", "1024", "--workers", "0"]
# a text tower that can learn (tiny, trained) and a warm-up that fits the short runs here
TINY += ["--text-model", "tiny", "--no-lock-text", "--warmup", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    config = replace(
        SIZES["tiny"],
        num_studies=24,
        modality="CT",
        min_scans=2,
        max_scans=2,
        depth_range=(8, 12),
        finding_scale=3.0,
    )
    synthesize(root / "train", config)
    synthesize(root / "val", replace(config, num_studies=12, seed=7, prefix="val"))
    return root


def run_args(corpus: Path, logs: Path, *extra: str) -> list[str]:
    return ["--train-data", str(corpus / "train"), "--logs", str(logs), "--no-progress", *TINY, *extra]


def test_config_errors_before_any_work(corpus, tmp_path, capsys):
    logs = tmp_path / "logs"
    bad = [
        "--lr",
        "-1",
        "--precision",
        "fp8",
        "--model",
        "vit_huge",
        "--prompts",
        "nope",
        "--text-model",
        "/none",
        "--meta-init",
        "--torchcompile",
        "--compile-backend",
        "nonsense",
        "--profile-steps",
        "-1",
    ]
    assert train_main(["--train-data", str(tmp_path), "--logs", str(logs), *bad]) == 2
    err = capsys.readouterr().err
    for fragment in [
        "not a prepared shard folder",
        "lr must be > 0",
        "precision 'fp8'",
        "unknown model 'vit_huge'",
        "prompts need val_data",
        "no prompt file 'nope'",
        "text_model '/none'",
        "meta_init shards the vision weights before they exist; it needs --fsdp",
        "compile_backend 'nonsense' is not a torch.compile backend",
        "profile_steps must be >= 0",
    ]:
        assert fragment in err
    assert not logs.exists()
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"train_data: {corpus / 'train'}\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown keys \['learning_rate'\]"):
        load_config(["--config", str(config_file)])
    config_file.write_text(
        f"train_data: {corpus / 'train'}\nlr: 0.1\nprompts: [synth_mr]\nval_data: {corpus / 'val'}\n"
        "text_model: tiny\n"
    )
    cfg = load_config(["--config", str(config_file), "--lr", "0.02", "--no-lock-text", "--steps", "none"])
    assert (cfg.lr, cfg.lock_text, cfg.prompts, cfg.steps) == (0.02, False, ["synth_mr"], None)


def test_recipes_fill_in_and_explicit_settings_win(corpus, tmp_path, tiny_text):
    train = ["--train-data", str(corpus / "train")]
    cfg = load_config(["--recipe", "scratch-tiny", *train, "--lr", "1e-3"])
    assert (cfg.recipe, cfg.model, cfg.text_model, cfg.lock_text, cfg.vision_pooling) == (
        "scratch-tiny",
        "vit_tiny_multiscan_h2",
        "tiny",
        False,
        "avg",
    )
    assert (cfg.lr, cfg.wd, cfg.text_mlm_steps) == (
        1e-3,
        0.05,
        400,
    )  # the flag wins, the rest is the recipe's
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"recipe: scratch-tiny\ntrain_data: {corpus / 'train'}\nwd: 0.1\n")
    cfg = load_config(["--config", str(config_file), "--embed-dim", "16"])
    assert (cfg.recipe, cfg.wd, cfg.embed_dim, cfg.lr) == ("scratch-tiny", 0.1, 16, 2e-3)
    with pytest.raises(ValueError, match=r"recipe hlip-ct-rate needs: text_model \(a local folder"):
        load_config(["--recipe", "hlip-ct-rate", *train])
    cfg = load_config(["--recipe", "hlip-ct-rate", *train, "--text-model", tiny_text[0]])
    assert (cfg.model, cfg.lr, cfg.wd, cfg.warmup, cfg.drop_path_rate, cfg.lock_text) == (
        "vit_base_singlescan_h2_token2744",
        1e-5,
        0.2,
        377,
        0.2,
        True,
    )
    assert (
        load_config(["--recipe", "hlip-brain-mri", *train, "--text-model", tiny_text[0]]).max_tokens == 16384
    )
    dual = load_config(["--recipe", "hlip-dual-mri", *train, "--text-model", tiny_text[0]])
    assert (dual.model, dual.vision_pooling, dual.loss_kind, dual.lr, dual.max_scans, dual.local_loss) == (
        "vit_base_scan_study_dualdinotxt1568",
        "dinotxt",
        "dual",
        2e-4,
        6,
        True,
    )
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        load_config(["--recipe", "nope", *train, "--text-model", "tiny", "--no-lock-text"])


def test_runs_that_cannot_learn_are_refused_or_warned(corpus, tmp_path, tiny_text, capsys, caplog):
    train = ["--train-data", str(corpus / "train")]
    with pytest.raises(ValueError, match="text_model is required"):
        load_config(train)
    with pytest.raises(
        ValueError, match=r"locked text tower .* \(text_model tiny with no --text-mlm-steps\)"
    ):
        load_config([*train, "--text-model", "tiny"])
    no_weights = tmp_path / "bert_config_only"
    no_weights.mkdir()
    for path in Path(tiny_text[0]).iterdir():
        if path.suffix != ".safetensors":
            (no_weights / path.name).write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="holds no weights"):
        load_config([*train, "--text-model", str(no_weights)])
    assert load_config([*train, "--text-model", str(no_weights), "--no-lock-text"]).text_model
    assert load_config([*train, "--text-model", "tiny", "--text-mlm-steps", "10"]).lock_text  # warmed up
    assert load_config([*train, "--text-model", tiny_text[0]]).warnings() == []  # HLIP's setting
    assert (
        "vision_pooling token from scratch"
        in load_config([*train, "--text-model", "tiny", "--no-lock-text"]).warnings()[0]
    )
    args = run_args(corpus, tmp_path, "--steps", "5", "--warmup", "6", "--vision-pooling", "avg")
    assert train_main(args) == 2
    assert "warmup 6 is longer than the run (5 steps)" in capsys.readouterr().err
    assert not (tmp_path / "hlip").exists()


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_short_run_loss_falls_and_exports(corpus, tmp_path):
    logs = tmp_path / "logs"
    flags = shlex.split(
        "--recipe scratch-tiny --name short --steps 40 --warmup 4 --max-studies 8 --text-mlm-steps 100 "
        "--log-every 1 "
        "--prompts synth_ct "
        "--zeroshot-every 20 --save-every 20 --keep 1"
    )
    args = run_args(corpus, logs, *flags, "--val-data", str(corpus / "val"))
    assert train_main(args) == 0
    run = logs / "short"
    rows = [r for r in metrics(run) if "loss" in r]
    assert len(rows) == 40 and all(r["nonfinite_steps"] == 0 for r in rows)
    first, last = sum(r["loss"] for r in rows[:8]) / 8, sum(r["loss"] for r in rows[-8:]) / 8
    assert last < first - 0.3, (first, last)
    assert all(r["studies_per_s"] > 0 and r["tokens_per_s"] > 0 and 0 <= r["data_wait"] <= 1 for r in rows)
    evals = [r for r in metrics(run) if "zeroshot/synth_ct" in r]
    assert [r["step"] for r in evals] == [20, 40] and (run / "eval" / "step_00000040.md").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [  # keep 1, with its checksum
        "step_00000040.pt",
        "step_00000040.pt.sum",
    ]
    config = json.loads((run / "config.json").read_text())
    assert (config["recipe"], config["lr"], config["text_mlm_steps"]) == ("scratch-tiny", 2e-3, 100)
    from hlip_fast import load_pretrained

    model = load_pretrained(run / "final")
    assert model.config.vision.max_num_scans == 8 and not model.training


def test_a_dual_model_trains_on_sentences_and_reports_and_embeds_one_vector(corpus, tmp_path):
    logs = tmp_path / "logs"
    flags = ["--name", "dual", "--steps", "4", "--max-studies", "8", "--log-every", "1"]
    flags += ["--model", "vit_tiny_multiscan_h3_dualdinotxt", "--vision-pooling", "dinotxt"]
    assert train_main(run_args(corpus, logs, *flags)) == 0
    run = logs / "dual"
    rows = [r for r in metrics(run) if "loss" in r]
    assert len(rows) == 4 and all(r["nonfinite_steps"] == 0 and math.isfinite(r["loss"]) for r in rows)
    from hlip_fast import load_pretrained

    model = load_pretrained(run / "final")
    assert model.config.loss == "dual" and model.config.vision.reg_tokens == 1
    batch = pack_studies(
        [[torch.randn(8, 32, 32)], [torch.randn(12, 32, 32), torch.randn(4, 16, 16)]], (4, 8, 8)
    )
    with torch.no_grad():
        out = model(batch, ["A sentence.", "The report.", "Another.", "Its report."])
        assert out["study_features"].shape == out["text_features"].shape == (2, 2, 32)
        assert model.encode_study(batch).shape == (2, 32)
        torch.testing.assert_close(model.encode_study(batch), out["study_features"][:, 1])


def test_training_from_a_url_equals_training_from_the_local_copy(corpus, tmp_path, monkeypatch):
    """Shards and held-out studies served over HTTP (a brace pattern, a folder URL), with a
    connection dropped in the middle of the training shard and DataLoader workers reading:
    the same weights and evaluation as from the local folders."""
    from loopback_http import LoopbackServer

    key = "zeroshot/synth_ct"
    monkeypatch.setenv("HLIP_FAST_REMOTE_BACKOFF", "0.01")
    flags = ["--steps", "3", "--workers", "2", "--prompts", "synth_ct", "--zeroshot-every", "3"]

    def run(name: str, train: str, val: str) -> int:
        args = ["--train-data", train, "--val-data", val, "--logs", str(tmp_path), "--no-progress", *TINY]
        return train_main([*args, *flags, "--name", name])

    assert run("local", str(corpus / "train"), str(corpus / "val")) == 0
    with LoopbackServer(corpus) as server:
        server.drops["train/shard-000000.tar"] = 1
        assert run("remote", server.url("train/shard-{000000..000000}.tar"), server.url("val")) == 0
        assert server.dropped  # it happened, and was retried
    want, got = final_weights(tmp_path / "local"), final_weights(tmp_path / "remote")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    local, remote = ([r[key] for r in metrics(tmp_path / name) if key in r] for name in ("local", "remote"))
    assert local and local == remote


def test_dali_reader_trains_and_its_ranks_share_each_epoch(corpus, tmp_path):
    pytest.importorskip("nvidia.dali", reason="DALI not installed (pip install hlip-fast[dali])")
    from hlip_fast import load_pretrained
    from hlip_fast.train.data import train_loader
    from hlip_fast.train.distributed import Dist

    logs = tmp_path / "logs"
    args = run_args(
        corpus,
        logs,
        "--name",
        "dali",
        "--reader",
        "dali",
        "--workers",
        "1",
        "--steps",
        "4",
        "--log-every",
        "1",
    )
    assert train_main(args) == 0
    rows = [r for r in metrics(logs / "dali") if "loss" in r]
    assert len(rows) == 4 and all(r["nonfinite_steps"] == 0 for r in rows)
    # The same reader for two ranks: each epoch, every training study exactly once, reshuffled.
    cfg, model = load_config(args), load_pretrained(logs / "dali" / "final")
    everything = sorted(s.study_id for s in RawStudies(corpus / "train", train=False))
    orders = []
    for epoch in (0, 1):
        ranks = [
            [i for b in train_loader(cfg, model, Dist(k, 2, torch.device("cpu")), epoch) for i in b.study_ids]
            for k in range(2)
        ]
        assert sorted(ranks[0] + ranks[1]) == everything and not set(ranks[0]) & set(ranks[1])
        orders.append(ranks[0])
    assert orders[0] != orders[1]


def launch(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "hlip_fast.train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


@pytest.mark.parametrize("accum", [1, 2])
def test_an_ordinary_step_makes_no_host_sync(corpus, tmp_path, monkeypatch, accum):
    """Every way a tensor's value reaches the host (``.item()``, ``.tolist()``, ``float()``,
    ``int()``, ``bool()``; ``.numpy()`` refuses device tensors) and ``torch.cuda.synchronize``
    are counted per step, reading the data aside: none on a step that neither logs nor saves."""
    from hlip_fast.train.trainer import Trainer

    counts, state = Counter(), {"step": 0, "on": False}

    def counted(name, original):
        def wrapper(*args, **kwargs):
            if state["on"]:
                counts[state["step"]] += 1
                counts[(state["step"], name)] += 1
            return original(*args, **kwargs)

        return wrapper

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", counted("synchronize", torch.cuda.synchronize))
    original_batches, original_step = Trainer.batches, Trainer.train_step

    def batches(self):  # reading the data is not the step's work: not counted
        source = original_batches(self)
        while True:
            state["on"] = False
            batch = next(source)
            state["on"] = True
            yield batch

    def train_step(self, micro):
        state["step"] += 1
        return original_step(self, micro)

    monkeypatch.setattr(Trainer, "batches", batches)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    flags = ["--steps", "8", "--log-every", "4", "--save-every", "100", "--accum-freq", str(accum)]
    assert train_main(run_args(corpus, tmp_path, "--name", "syncs", *flags)) == 0
    log_steps = {1, 4, 8}
    assert all(counts[step] > 0 for step in log_steps)  # the counter does count: one packed read there
    quiet = {step: counts[step] for step in range(1, 9) if step not in log_steps}
    assert quiet == dict.fromkeys(quiet, 0), {k: v for k, v in counts.items() if isinstance(k, tuple)}


def test_torchcompile_trains_to_the_weights_of_eager_mode(corpus, tmp_path):
    """``--torchcompile`` compiles both towers (here with ``aot_eager``: eager's arithmetic, no
    C++ build), with dropout, stochastic depth and patch dropout drawing inside the graph; the
    run ends on the eager run's weights, and its state dict keeps the eager names. (sdpa: compiled,
    ``auto`` would pick the Triton op, which the interpreter runs slowly here.)"""
    common = ["--steps", "4", "--log-every", "2", "--force-patch-dropout", "0.3", "--drop-path-rate", "0.1"]
    compiled = ["--torchcompile", "--compile-backend", "aot_eager", "--attn-backend", "sdpa"]
    for name, extra in (("eager", []), ("compiled", compiled)):
        assert train_main(run_args(corpus, tmp_path, "--name", name, *common, *extra)) == 0
    want, got = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


def test_sigkill_then_resume_equals_an_uninterrupted_run(corpus, tmp_path):
    common = [
        "--steps",
        "8",
        "--lr",
        "1e-3",
        "--warmup",
        "2",
        "--save-every",
        "1",
        "--keep",
        "2",
        "--no-lock-text",
        "--force-patch-dropout",
        "0.3",
        "--drop-path-rate",
        "0.1",
        "--jitter",
        "0.1",
    ]
    whole = launch(run_args(corpus, tmp_path, "--name", "whole", *common))
    assert whole.wait(timeout=600) == 0, whole.stdout.read()

    kill_at = random.randint(2, 6)
    victim = launch(run_args(corpus, tmp_path, "--name", "killed", *common))
    wait_for(tmp_path / "killed" / "checkpoints" / f"step_{kill_at:08d}.pt", victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert not (tmp_path / "killed" / "final").exists()
    resumed = launch(run_args(corpus, tmp_path, "--name", "killed", "--resume", "latest", *common))
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output
    want, got = final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(
            got[key], want[key], rtol=0, atol=0, msg=f"{key} differs (killed at {kill_at})"
        )


def launch_ranks(ranks: int, args: list[str], launcher: list[str] | None = None) -> subprocess.Popen:
    """``torchrun`` with ``ranks`` processes on this machine (gloo; or ``launcher``'s torchrun
    flags), in a session of its own. ``--logs`` goes in a config file: torchrun's parser takes
    it for its own ``--logs-specs``."""
    at = args.index("--logs")
    config = Path(args[at + 1]) / f"ranks_{os.getpid()}_{time.monotonic_ns()}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f"logs: {args[at + 1]}\n")
    args = [*args[:at], *args[at + 2 :], "--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = launcher or ["--standalone"]
    command = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc-per-node={ranks}"]
    return subprocess.Popen(
        [*command, "-m", "hlip_fast.train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_fsdp_resume_after_sigkill_equals_an_uninterrupted_run_and_reshards(corpus, tmp_path):
    """Two FSDP2 ranks with accumulation (gradients reduced on the last micro-batch only): killed
    mid-run and resumed, the weights equal the uninterrupted run's; the 2-rank checkpoint then
    resumes in one process (resharded) with exactly those weights."""
    common = ["--steps", "5", "--lr", "1e-3", "--warmup", "2", "--save-every", "1", "--keep", "2"]
    common += ["--fsdp", "--accum-freq", "2", "--max-studies", "3", "--log-every", "2"]
    whole = launch_ranks(2, run_args(corpus, tmp_path, "--name", "whole", *common))
    assert whole.wait(timeout=600) == 0, whole.stdout.read()
    victim = launch_ranks(2, run_args(corpus, tmp_path, "--name", "killed", *common))
    wait_for(tmp_path / "killed" / "checkpoints" / "step_00000003.pt", victim)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=60)
    assert not (tmp_path / "killed" / "final").exists()
    resumed = launch_ranks(2, run_args(corpus, tmp_path, "--name", "killed", "--resume", "latest", *common))
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0 and "resumed from" in output, output
    want = final_weights(tmp_path / "whole")
    got = final_weights(tmp_path / "killed")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    one = [a for a in common if a != "--fsdp"] + ["--resume", "latest", "--resume-override", "fsdp"]
    assert train_main(run_args(corpus, tmp_path, "--name", "whole", *one)) == 0
    again = final_weights(tmp_path / "whole")
    assert all(torch.equal(want[k], again[k]) for k in want)


GLOO_RANK_THAT_EXITS = """
import atexit, os, sys, torch, torch.distributed as dist
from hlip_fast.train.distributed import exit_process
rank, init, status = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
atexit.register(print, "interpreter teardown")
os.environ["WORLD_SIZE"] = "2"  # as torchrun sets it
dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(64, 64))
for _ in range(3):
    model(torch.randn(8, 64)).sum().backward()
for _ in range(3):
    dist.broadcast_object_list([{"step": 1} if rank == 0 else None])
dist.destroy_process_group()
print("last words", flush=False)
exit_process(status)
"""


def test_a_gloo_rank_exits_with_its_status_and_output_and_skips_interpreter_teardown(tmp_path):
    """After DDP and ``broadcast_object_list`` on gloo, Python's interpreter teardown can abort a
    rank that finished its work (SIGABRT, "terminate called without an active exception": about
    1 ``hlip-train`` launch in 40 on 2 CPU ranks). ``exit_process`` skips that teardown (an
    ``atexit`` handler must not run) yet keeps the exit status and flushes the output."""
    for status in (0, 3):
        init = tmp_path / f"init_{status}"
        ranks = [
            subprocess.Popen(
                [sys.executable, "-c", GLOO_RANK_THAT_EXITS, str(rank), str(init), str(status)],
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for rank in range(2)
        ]
        for rank, process in enumerate(ranks):
            output = process.communicate(timeout=120)[0]
            assert process.returncode == status, f"status {status}, rank {rank}: {output}"
            assert output.rstrip().endswith("last words"), output
    one = "import atexit; from hlip_fast.train.distributed import exit_process; "
    one += "atexit.register(print, 'interpreter teardown'); exit_process(3)"
    single = subprocess.run([sys.executable, "-c", one], capture_output=True, text=True, timeout=120)
    assert (single.returncode, single.stdout.strip()) == (3, "interpreter teardown")  # one process: as usual


def test_two_nodes_on_loopback_train_as_two_ranks_on_one_node(corpus, tmp_path):
    """Two torchrun launches as two "nodes" (c10d rendezvous at 127.0.0.1, one process each,
    gloo) train to the weights of one launch with two processes. The rendezvous store is this
    test's, as on a cluster's head node: when a node's store is the rendezvous, the other node's
    agent fails if that node finishes first and takes the store with it."""
    common = ["--steps", "3", "--lr", "1e-3", "--warmup", "1", "--max-studies", "3", "--local-loss"]
    one_node = launch_ranks(2, run_args(corpus, tmp_path, "--name", "one_node", *common))
    assert one_node.wait(timeout=600) == 0, one_node.stdout.read()
    port = free_port()
    store = torch.distributed.TCPStore(
        "127.0.0.1", port, is_master=True, multi_tenant=True, wait_for_workers=False
    )
    rendezvous = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]
    rendezvous += [f"--rdzv-id=nodes-{os.getpid()}", "--rdzv-conf=is_host=false"]
    nodes = [
        launch_ranks(1, run_args(corpus, tmp_path, "--name", "two_nodes", *common), rendezvous)
        for _ in range(2)
    ]
    for node in nodes:
        assert node.wait(timeout=600) == 0, node.stdout.read()
    del store
    want, got = final_weights(tmp_path / "one_node"), final_weights(tmp_path / "two_nodes")
    for key in want:  # the rendezvous may number the nodes either way: equal up to summation order
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=2e-5, msg=key)


def test_profile_steps_break_a_step_down_by_phase(corpus, tmp_path):
    """``--profile-steps 2`` under DDP on 2 ranks: the mean seconds of data wait, forward,
    backward, optimizer and communication (gloo's all-reduces) per step in metrics.jsonl after
    the profiled steps 2-3, a console line, and a Chrome trace."""
    args = ["--name", "profiled", "--steps", "4", "--profile-steps", "2", "--max-studies", "3"]
    process = launch_ranks(2, run_args(corpus, tmp_path, *args))
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    rows = [r for r in metrics(tmp_path / "profiled") if "profile/forward_s" in r]
    assert [r["step"] for r in rows] == [3], rows
    phases = ("data_wait", "forward", "backward", "optimizer", "communication")
    assert all(rows[0][f"profile/{name}_s"] > 0 for name in phases), rows[0]
    assert "profile, per step over 2" in output
    assert json.loads((tmp_path / "profiled" / "profile_trace.json").read_text())["traceEvents"]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_checkpoints_and_exits_cleanly(corpus, tmp_path, stop):
    process = launch(run_args(corpus, tmp_path, "--name", "term", "--steps", "1000", "--save-every", "1000"))
    wait_for(tmp_path / "term" / "metrics.jsonl", process)
    process.send_signal(stop)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    assert f"stopped by {stop.name}" in output
    (checkpoint,) = (tmp_path / "term" / "checkpoints").glob("*.pt")
    state = torch.load(checkpoint, weights_only=True)
    assert 1 <= state["step"] < 1000 and checkpoint.name == f"step_{state['step']:08d}.pt"


def test_divergence_stops_with_the_last_good_checkpoint(corpus, tmp_path, capsys):
    args = run_args(
        corpus,
        tmp_path,
        "--name",
        "nan",
        "--steps",
        "30",
        "--lr",
        "1e30",
        "--warmup",
        "1",
        "--max-nonfinite",
        "3",
        "--save-every",
        "100",
        "--grad-clip-norm",
        "none",
        "--wd",
        "0",
    )
    assert train_main(args) == 3
    err = capsys.readouterr().err
    # Decided on the device, read at log steps (every 10): steps 2-10 had non-finite losses.
    assert "9 consecutive steps with a non-finite loss or gradient (step 10)" in err
    (checkpoint,) = (tmp_path / "nan" / "checkpoints").glob("*.pt")
    state = torch.load(checkpoint, weights_only=True)
    assert state["step"] == 10 and state["nonfinite"] == 9
    # Their updates were skipped on the device: the weights are those after step 1, exactly.
    one = args[: args.index("--steps") + 1] + ["1"] + args[args.index("--steps") + 2 :]
    assert train_main([*one, "--name", "one"]) == 0
    after_one = final_weights(tmp_path / "one")
    assert all(torch.equal(state["model"][k], v) for k, v in after_one.items())
    rows = [r for r in metrics(tmp_path / "nan") if "loss" in r]
    assert [r["nonfinite_streak"] for r in rows] == [0, 9] and not math.isfinite(rows[-1]["loss"])


# --- 2 ranks against 1 -------------------------------------------------------------------


def fixed_batches(trainer, ranks: int, rank: int, micro: int = 1, steps: int = 3, per_step: int = 8):
    """The same global batches for any number of ranks; rank r takes the r-th share of each, as
    ``micro`` micro-batches."""
    model, cfg = trainer.model, trainer.cfg
    raws = RawStudies(cfg.train_data, train=False, rank=0, world_size=1)
    studies = list(decoded_studies(raws, train_transforms(cfg, model), False, 0))
    share = per_step // ranks
    for step in range(steps):
        members = studies[step * per_step + rank * share : step * per_step + (rank + 1) * share]
        size = share // micro
        parts = [members[i * size : (i + 1) * size] for i in range(micro)]
        yield [collate(part, model.config.vision.patch_size) for part in parts]


def ddp_worker(rank: int, world: int, port: int, corpus: Path, text: str, out: Path, tag: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from hlip_fast.train import distributed as D
    from hlip_fast.train.trainer import Trainer

    dist = D.setup("cpu")
    flags = shlex.split(
        f"--name {tag} --model vit_tiny_singlescan_h2 --embed-dim 16 --no-lock-text --lr 1e-3 --warmup 1 "
        "--steps 3 --local-loss --gather-with-grad --wd 0.1"
        + (" --fsdp" if "fsdp" in tag else "")
        + (" --meta-init" if "meta" in tag else "")
        + (" --precision bf16" if "bf16" in tag else "")
    )
    cfg = load_config(
        ["--train-data", str(corpus / "train"), "--logs", str(out), "--text-model", text, *flags]
    )
    trainer = Trainer(cfg, dist)
    seen: dict[str, str] = {}  # the dtype a block's weight has inside the forward
    qkv = trainer.model.visual.blocks[0].attn.qkv
    qkv.register_forward_pre_hook(lambda module, args: seen.update(forward=str(module.weight.dtype)))
    trainer.optimizer.register_step_pre_hook(lambda *_: seen.update(grad=str(qkv.weight.grad.dtype)))
    grads = []  # each step's whole gradients, as the optimiser receives them (gathered under FSDP)
    trainer.optimizer.register_step_pre_hook(lambda *_: grads.append(full_gradients(trainer.model)))
    initial = trainer.model_for_export()  # gathered on rank 0 under FSDP
    if dist.main:
        torch.save(initial.state_dict(), out / f"initial_{tag}.pt")
    for micro in fixed_batches(trainer, world, rank, micro=2 if "accum" in tag else 1):
        trainer.train_step(micro)
    seen["stored"] = str(qkv.weight.dtype)
    (out / f"dtypes_{tag}_{rank}.json").write_text(json.dumps(seen))
    trained = trainer.model_for_export()
    if dist.main:
        torch.save(trained.state_dict(), out / f"{tag}.pt")
        torch.save(grads, out / f"grads_{tag}.pt")
    D.barrier()  # no rank tears down while another still works, as in hlip-train (its export is a collective)
    D.teardown()
    D.exit_process(0)  # as hlip-train ends: interpreter teardown can abort a rank that used gloo


def full_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, whole (FSDP2's sharded gradients gathered, as the trainer
    gathers parameters: a collective)."""
    from hlip_fast.train.distributed import full_tensor

    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return {name: full_tensor(grad).detach().clone() for name, grad in grads.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_ddp_and_fsdp_equal_one_rank_with_the_same_global_batch(corpus, tmp_path):
    text = str(
        build_tiny_text_model(tmp_path / "bert", ["no mass.", "a small mass in the left lobe."], dropout=0.0)
    )
    # accum: 2 micro-batches a rank; meta: rank 1 shards an empty vision side and receives rank 0's
    runs = [(1, "one"), (2, "ddp"), (2, "fsdp"), (2, "fsdp_accum"), (2, "fsdp_meta")]
    for world, tag in runs:
        mp.start_processes(
            ddp_worker,
            args=(world, free_port(), corpus, text, tmp_path, tag),
            nprocs=world,
            start_method="spawn",
        )
    one, initial = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "initial_one.pt")
    one_grads = torch.load(tmp_path / "grads_one.pt")
    for _, tag in runs[1:]:
        torch.testing.assert_close(torch.load(tmp_path / f"initial_{tag}.pt"), initial, rtol=0, atol=0)
        # The same global batch gives the same gradient at every step, up to fp32 summation order
        # (the temperature's too: accumulation counts it once, not once per micro-batch).
        grads = torch.load(tmp_path / f"grads_{tag}.pt")
        assert len(grads) == len(one_grads) == 3
        for step, (got, want) in enumerate(zip(grads, one_grads)):
            assert got.keys() == want.keys(), tag
            for key, g in want.items():
                error = (got[key] - g).norm().item()
                assert error <= 1e-3 * g.norm().item() + 1e-7, f"{tag}: step {step}, {key}: {error}"
        # Weights after 3 AdamW steps: an element whose gradient is near eps moves by g / (|g| + eps),
        # so rounding in its gradient moves it by up to a few percent of the learning rate (1e-3).
        other = torch.load(tmp_path / f"{tag}.pt")
        for key in one:
            torch.testing.assert_close(other[key], one[key], rtol=0, atol=2e-4, msg=f"{tag}: {key}")
    for key in ("visual_proj.weight", "text.proj.weight", "visual.blocks.0.attn.qkv.weight", "logit_scale"):
        assert (one[key] - initial[key]).abs().max() > 1e-4, f"{key} did not train"


def test_fsdp_under_bf16_computes_in_bf16_and_keeps_fp32_weights_and_gradients(corpus, tmp_path):
    """FSDP2's mixed-precision policy under ``--precision bf16``: a block's weight is bf16 inside
    the forward (gathered in bf16), while the stored shards and their reduced gradients are fp32."""
    text = str(build_tiny_text_model(tmp_path / "bert", ["no mass.", "a small mass in the left lobe."]))
    tag = "fsdp_bf16"
    mp.start_processes(
        ddp_worker, args=(2, free_port(), corpus, text, tmp_path, tag), nprocs=2, start_method="spawn"
    )
    for rank in range(2):
        seen = json.loads((tmp_path / f"dtypes_{tag}_{rank}.json").read_text())
        assert seen == {"forward": "torch.bfloat16", "stored": "torch.float32", "grad": "torch.float32"}, seen
    trained, initial = torch.load(tmp_path / f"{tag}.pt"), torch.load(tmp_path / f"initial_{tag}.pt")
    assert all(torch.isfinite(value).all() for value in trained.values())
    assert (
        trained["visual.blocks.0.attn.qkv.weight"] - initial["visual.blocks.0.attn.qkv.weight"]
    ).abs().max() > 0


def test_accumulation_equals_the_whole_batch(corpus, tmp_path):
    """--accum-freq 2 on two halves takes the same step as one batch of both (open_clip's
    accumulation: the loss of each recomputed half is taken over the whole cached set)."""
    from hlip_fast.train import distributed as D
    from hlip_fast.train.trainer import Trainer

    text = str(
        build_tiny_text_model(
            tmp_path / "bert", ["no nodule.", "a large nodule in the left lung."], dropout=0
        )
    )
    weights = {}
    for accum in (1, 2):
        flags = shlex.split(
            f"--name a{accum} --model vit_tiny_singlescan_h2 --embed-dim 16 --no-lock-text --lr 1e-3 "
            f"--warmup 1 --steps 2 --accum-freq {accum} --max-tokens 1024"
        )
        cfg = load_config(
            ["--train-data", str(corpus / "train"), "--logs", str(tmp_path), "--text-model", text, *flags]
        )
        trainer = Trainer(cfg, D.setup("cpu"))
        halves = [*next(fixed_batches(trainer, 2, 0, steps=1)), *next(fixed_batches(trainer, 2, 1, steps=1))]
        trainer.train_step(halves if accum == 2 else next(fixed_batches(trainer, 1, 0, steps=1)))
        weights[accum] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    # AdamW turns rounding-level gradient differences on near-zero gradients into steps of up to a
    # few 1e-5 here; a wrong accumulation moves many weights by a good part of lr (1e-3).
    for key, value in weights[1].items():
        torch.testing.assert_close(weights[2][key], value, rtol=1e-4, atol=1e-4, msg=key)


def test_output_is_one_line_per_phase_plain_lines_or_quiet(corpus, tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as in a fresh process: the trainer must turn them off itself
    common = run_args(corpus, tmp_path, "--steps", "4", "--log-every", "2", "--text-mlm-steps", "3")
    assert train_main([*common, "--name", "plain", "--vision-pooling", "avg"]) == 0  # --no-progress
    out, err = capsys.readouterr()
    for phase in (
        "[hlip-train] building a tiny text model from the training reports",
        "[hlip-train] text MLM warm-up: 3/3 steps",
        "[hlip-train] waiting for the first batch",
        "[hlip-train] first step done in",
    ):
        assert phase in out, phase
    trained = [line.split()[2] for line in out.splitlines() if line.startswith("[hlip-train] train: ")]
    assert trained == ["2/4", "4/4"]  # a plain line every --log-every steps
    assert "Loading weights" not in err and "Writing model shards" not in err and "%|" not in err
    hf_logging.enable_progress_bar()
    assert train_main([*common, "--name", "quiet", "--vision-pooling", "avg", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and out.startswith("hlip-train: {") and err == ""
