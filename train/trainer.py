"""The training loop: model, data, optimiser, checkpoints, logging; ``hlip-train`` runs it.

One process on the CPU or a GPU, or one per GPU under ``torchrun`` (DDP, or FSDP2 with
``--fsdp``). A step takes ``accum_freq`` token-budget batches; with more than one, features are
cached and each micro-batch is recomputed against the whole set (open_clip's accumulation, so
the contrastive loss sees every pair). Every rank runs the same number of steps: each reads
its own shards and moves to its next epoch on its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from hlip_fast.checkpoint import save_pretrained
from hlip_fast.clip import HLIPModel, create_clip
from hlip_fast.data.batching import Batch
from hlip_fast.data.reader import RawStudies
from hlip_fast.data.shards import read_shard
from hlip_fast.losses import ClipLoss, SigLipLoss
from hlip_fast.text import TextConfig, build_tiny_text_model

from . import distributed as D
from .checkpoint import Checkpoints, rng_state, set_rng_state
from .config import TrainConfig
from .data import steps_per_epoch, train_loader
from .evaluate import ZeroShotEval
from .flops import peak_tflops, train_step_flops
from .log import MetricsLog
from .optim import cosine_schedule, param_groups

log = logging.getLogger("hlip_fast.train")
MAX_LOGIT_SCALE = math.log(100.0)


class TrainingStopped(RuntimeError):
    """The run stopped before its last step (divergence); the message says what to do."""


def _full(param: torch.Tensor) -> torch.Tensor:
    """The whole parameter (gathered from every rank when FSDP2 shards it: a collective)."""
    return param.full_tensor() if hasattr(param, "full_tensor") else param


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        precision = "amp_bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "amp_bf16": torch.bfloat16, "amp": torch.float16}[precision]


def _build_text_model(cfg: TrainConfig, run_dir: Path, dist: D.Dist) -> str:
    """``text_model`` or, for ``tiny``, a tiny BERT whose vocabulary comes from the training
    reports (warmed up by ``text_mlm_steps`` of masked-language modelling on them), built once
    per run (rank 0) in ``run_dir/text_model``."""
    if cfg.text_model != "tiny":
        return cfg.text_model
    folder = run_dir / "text_model"
    if dist.main and not (folder / "config.json").is_file():
        reports = [s.meta["report"] for shard in RawStudies(cfg.train_data).shards for s in read_shard(shard)]
        build_tiny_text_model(folder, reports, mlm_steps=cfg.text_mlm_steps, seed=cfg.seed)
    D.barrier()
    return str(folder)


class Trainer:
    def __init__(self, cfg: TrainConfig, dist: D.Dist):
        self.cfg, self.dist = cfg, dist
        name = cfg.name or D.broadcast(datetime.now().strftime("hlip-%Y%m%d-%H%M%S"))
        self.run_dir = Path(cfg.logs) / name
        if dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps({**cfg.to_dict(), "name": name}, indent=2))
        D.barrier()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = self._build_model()
        self.net = self._wrap(self.model)  # before the optimizer: FSDP2 replaces the parameters
        self.dtype = _autocast_dtype(cfg.precision, dist.device)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.wd), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
        )
        self.steps_per_epoch = steps_per_epoch(cfg, self.model, dist.world_size)
        self.total_steps = cfg.steps or cfg.epochs * self.steps_per_epoch
        self.scheduler = cosine_schedule(self.optimizer, cfg.warmup, self.total_steps)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.dtype == torch.float16)
        self.loss = SigLipLoss() if cfg.siglip else ClipLoss(cfg.local_loss, cfg.gather_with_grad)
        self.checkpoints = Checkpoints(self.run_dir / "checkpoints", cfg.keep)
        self.step, self.epoch, self.batch_in_epoch, self.nonfinite = 0, 0, 0, 0
        self.saved_step = -1
        self.peak = cfg.peak_tflops or peak_tflops(dist.device)
        self.evaluator = ZeroShotEval(cfg, self.model) if cfg.prompts else None
        self.stop_signal: str | None = None
        torch.manual_seed(cfg.seed + 1000 * dist.rank)  # per-rank randomness from here on
        if cfg.resume:
            self._resume(cfg.resume)

    # --- setup ---------------------------------------------------------------------------
    def _build_model(self) -> HLIPModel:
        cfg = self.cfg
        text = TextConfig(
            _build_text_model(cfg, self.run_dir, self.dist),
            pooling=cfg.text_pooling,
            lock=cfg.lock_text,
            unlocked_layers=cfg.lock_text_unlocked_layers,
        )
        model = create_clip(
            cfg.model,
            text,
            embed_dim=cfg.embed_dim,
            loss="siglip" if cfg.siglip else "clip",
            input_mean=cfg.input_mean,
            input_std=cfg.input_std,
            drop_path_rate=cfg.drop_path_rate,
            patch_dropout=cfg.force_patch_dropout,
            pooling=cfg.vision_pooling,
            **({"max_num_scans": cfg.max_scans} if cfg.max_scans else {}),
        )
        if cfg.pretrained:
            from hlip_fast.checkpoint import load_pretrained

            model.load_state_dict(load_pretrained(cfg.pretrained).state_dict())
        model.visual.set_grad_checkpointing(cfg.grad_checkpointing)
        model.visual.set_attention_backend(cfg.attn_backend)
        if cfg.torchcompile:
            for i, block in enumerate(model.visual.blocks):
                model.visual.blocks[i] = torch.compile(block, dynamic=True)
        return model.to(self.dist.device)

    def _wrap(self, model: HLIPModel) -> torch.nn.Module:
        if self.cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in model.visual.blocks:
                fully_shard(block)
            return fully_shard(model)
        if self.dist.world_size > 1:
            return DistributedDataParallel(model)
        return model

    # --- checkpoints ---------------------------------------------------------------------
    def _state(self) -> dict:
        model_state, optim_state = get_state_dict(
            self.net, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        position = {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "rng": rng_state()}
        return {
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "nonfinite": self.nonfinite,
            "ranks": D.gather(position),  # every rank's data position and RNG states
            "config": json.dumps(self.cfg.to_dict()),
        }

    def save(self) -> Path | None:
        state = self._state()
        path = self.checkpoints.save(state, self.step) if self.dist.main else None
        self.saved_step = self.step
        D.barrier()
        return path

    def _resume(self, what: str) -> None:
        path = self.checkpoints.latest() if what == "latest" else Path(what)
        if path is None:
            log.info("no checkpoint in %s: starting from scratch", self.checkpoints.folder)
            return
        state = Checkpoints.load(path)
        if len(state["ranks"]) != self.dist.world_size:
            raise ValueError(
                f"{path} was written by {len(state['ranks'])} ranks; this run has {self.dist.world_size}"
            )
        set_state_dict(
            self.net,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.nonfinite = state["step"], state["nonfinite"]
        self.saved_step = self.step
        mine = state["ranks"][self.dist.rank]
        self.epoch, self.batch_in_epoch = mine["epoch"], mine["batch_in_epoch"]
        set_rng_state(mine["rng"])
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            path,
            self.step,
            self.epoch,
            self.batch_in_epoch,
        )

    # --- data ----------------------------------------------------------------------------
    def batches(self) -> Iterator[Batch]:
        """This rank's batches, epoch after epoch, from the saved position on."""
        while True:
            skip = self.batch_in_epoch
            for index, batch in enumerate(train_loader(self.cfg, self.model, self.dist, self.epoch)):
                if index < skip:
                    continue
                self.batch_in_epoch = index + 1
                yield batch
            if self.batch_in_epoch == 0:
                raise ValueError(f"{self.cfg.train_data}: rank {self.dist.rank} got no training batch")
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    # --- one step ------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.dist.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def _loss(self, study, text, out) -> torch.Tensor:
        if self.cfg.siglip:
            return self.loss(study, text, out["logit_scale"], out["logit_bias"])
        return self.loss(study, text, out["logit_scale"])

    def train_step(self, micro: list[Batch]) -> dict:
        """Forward, backward and update on ``micro`` (``accum_freq`` batches); skips the update
        (and counts it) when the loss or the gradient norm is not finite on any rank."""
        self.net.train()
        inputs = [
            (b.studies.to(self.dist.device, non_blocking=True), self.model.tokenize(b.reports)) for b in micro
        ]
        if len(micro) == 1:
            with self._autocast():
                out = self.net(*inputs[0])
                loss = self._loss(out["study_features"], out["text_features"], out)
            self.scaler.scale(loss).backward()
        else:
            loss = self._accumulated(inputs)
        finite = D.reduce_sum(float(not torch.isfinite(loss).item()), self.dist.device) == 0
        grad_norm = float("nan")
        if finite:
            self.scaler.unscale_(self.optimizer)
            params = [p for p in self.model.parameters() if p.grad is not None]
            clip = self.cfg.grad_clip_norm if self.cfg.grad_clip_norm else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            finite = math.isfinite(grad_norm)
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.nonfinite += 1
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return {
            "loss": float(loss.detach()),
            "lr": lr,
            "grad_norm": grad_norm,
            "finite": finite,
            "inputs": inputs,
        }

    def _accumulated(self, inputs) -> torch.Tensor:
        """open_clip's accumulation: cache all micro-batches' features without gradients, then
        recompute each one (same random draws) and back-propagate the loss over the whole set."""
        cached, states = [], []
        with torch.no_grad(), self._autocast():
            for batch, tokens in inputs:
                states.append(rng_state())
                out = self.net(batch, tokens)
                cached.append((out["study_features"], out["text_features"]))
        after = rng_state()
        for j, (batch, tokens) in enumerate(inputs):
            set_rng_state(states[j])
            last = j == len(inputs) - 1
            sync = (
                contextlib.nullcontext() if last or not hasattr(self.net, "no_sync") else self.net.no_sync()
            )
            with sync:
                with self._autocast():
                    out = self.net(batch, tokens)
                    study = torch.cat(
                        [out["study_features"] if i == j else c[0] for i, c in enumerate(cached)]
                    )
                    text = torch.cat([out["text_features"] if i == j else c[1] for i, c in enumerate(cached)])
                    loss = self._loss(study, text, out)
                self.scaler.scale(loss).backward()
        set_rng_state(after)
        return loss

    # --- the loop ------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signal.Signals(signum).name

    def fit(self) -> dict:
        cfg, dist = self.cfg, self.dist
        previous = signal.signal(signal.SIGTERM, self._on_signal)
        metrics = MetricsLog(self.run_dir, cfg.report_to, enabled=dist.main)
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (dist.main and cfg.progress),
        )
        data = self.batches()
        streak, last = 0, {}
        try:
            while self.step < self.total_steps:
                started = time.perf_counter()
                micro = [next(data) for _ in range(cfg.accum_freq)]
                if dist.device.type == "cuda":
                    torch.cuda.synchronize(dist.device)
                loaded = time.perf_counter()
                result = self.train_step(micro)
                if dist.device.type == "cuda":
                    torch.cuda.synchronize(dist.device)
                done = time.perf_counter()
                streak = 0 if result["finite"] else streak + 1
                if streak == 1 and self.saved_step != self.step:
                    self.save()  # the weights from just before the first non-finite step
                self.step += 1
                last = self._record(metrics, micro, result, started, loaded, done)
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", studies_s=f"{last['studies_per_s']:.1f}")
                if streak and streak >= cfg.max_nonfinite:
                    raise TrainingStopped(
                        f"{streak} consecutive steps with a non-finite loss or gradient (step {self.step}); "
                        f"stopped. Weights from before the first of them: {self.checkpoints.latest()}. "
                        "Lower --lr, raise --warmup or use --precision fp32 and resume from there."
                    )
                if self.evaluator and cfg.zeroshot_every and self.step % cfg.zeroshot_every == 0:
                    metrics.write(self.step, self.evaluator.run(self.step, self.run_dir, dist))
                stop = D.reduce_sum(float(self.stop_signal is not None), dist.device) > 0
                if self.step % cfg.save_every == 0 or stop:
                    self.save()
                if stop:
                    log.warning(
                        "stopped by %s at step %d; checkpoint saved; resume with --resume latest",
                        self.stop_signal,
                        self.step,
                    )
                    return {"step": self.step, "stopped": self.stop_signal, **last}
            if self.saved_step != self.step:
                self.save()
            if self.evaluator and cfg.zeroshot_every != 0 and self.step % cfg.zeroshot_every:
                metrics.write(self.step, self.evaluator.run(self.step, self.run_dir, dist))
            export = self.model_for_export()  # collective under FSDP: every rank takes part
            if dist.main:
                save_pretrained(export, self.run_dir / "final")
            D.barrier()
            return {"step": self.step, "stopped": None, **last}
        finally:
            bar.close()
            metrics.close()
            signal.signal(signal.SIGTERM, previous)

    def model_for_export(self) -> HLIPModel | None:
        """The plain model with full weights; under FSDP gathered from the shards (a collective)
        onto rank 0, the others get ``None``."""
        if not self.cfg.fsdp:
            return self.model
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state, _ = get_state_dict(self.net, [], options=options)
        if not self.dist.main:
            return None
        plain = HLIPModel(self.model.config)
        plain.load_state_dict(state)
        return plain

    def _record(self, metrics: MetricsLog, micro, result, started, loaded, done) -> dict:
        studies = sum(m.studies.num_studies for m in micro)
        tokens = sum(m.studies.layout.num_tokens for m in micro)
        flops = sum(train_step_flops(self.model, b.layout, t["attention_mask"]) for b, t in result["inputs"])
        studies, tokens, flops = (D.reduce_sum(v, self.dist.device) for v in (studies, tokens, flops))
        seconds = done - started
        row = {
            "epoch": self.epoch,
            "loss": result["loss"],
            "lr": result["lr"],
            "logit_scale": float(_full(self.model.logit_scale).detach().exp()),
            "grad_norm": result["grad_norm"],
            "nonfinite_steps": self.nonfinite,
            "studies": int(studies),
            "tokens": int(tokens),
            "studies_per_s": studies / seconds,
            "tokens_per_s": tokens / seconds,
            "data_wait": (loaded - started) / seconds,
            "tflops_per_s": flops / seconds / 1e12,
            "mfu": flops / seconds / (self.peak * 1e12 * self.dist.world_size) if self.peak else None,
            "step_s": seconds,
        }
        if self.step % self.cfg.log_every == 0 or self.step == 1 or not result["finite"]:
            metrics.write(self.step, row)
        return row


def main(argv: list[str] | None = None) -> int:
    """``hlip-train``: parse and check the config, train, print where everything went."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .config import load_config

    try:
        cfg = load_config(argv)
    except (ValueError, OSError) as error:
        print(f"hlip-train: {error}", file=sys.stderr)
        return 2
    dist = D.setup(cfg.device)
    try:
        trainer = Trainer(cfg, dist)
        result = trainer.fit()
    except (TrainingStopped, ValueError) as error:
        print(f"hlip-train: {error}", file=sys.stderr)
        return 3
    finally:
        D.teardown()
    if dist.main:
        kept = {k: v for k, v in result.items() if k in ("step", "stopped", "loss", "studies_per_s")}
        print(f"hlip-train: {json.dumps(kept)}; run folder {trainer.run_dir}")
    return 0
