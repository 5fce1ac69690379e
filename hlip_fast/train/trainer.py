"""The training loop: model, data, optimiser, checkpoints, logging; ``hlip-train`` runs it.

One process on the CPU or a GPU, or one per GPU under ``torchrun`` (DDP, or FSDP2 with
``--fsdp``). A step takes ``accum_freq`` token-budget batches; with more than one, features are
cached and each micro-batch is recomputed against the whole set (open_clip's accumulation, so
the contrastive loss sees every pair). Every rank runs the same number of steps: each reads
its own shards and moves to its next epoch on its own.

A run never ends with wrong weights and exit 0: settings that could never train are refused
before any work, the run folder is locked against a second trainer, a resume verifies its
checkpoint (falling back to the newest intact one) and refuses changed settings unless
``--resume-override`` names them, weights are checked finite before every save, damaged
studies stop the run or are counted against ``--max-skipped``, and SIGTERM/SIGINT stop it
cleanly between micro-batches with a checkpoint that resumes exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from hlip_fast.cli_options import autocast_dtype
from hlip_fast.clip import HLIPModel, create_clip
from hlip_fast.console import Console
from hlip_fast.data.batching import Batch
from hlip_fast.errors import RunStopped, problem_list
from hlip_fast.files import read_json, write_json
from hlip_fast.folder_lock import FolderLock
from hlip_fast.losses import ClipLoss, SigLipLoss
from hlip_fast.models.registry import get_config
from hlip_fast.pretrained import save_pretrained
from hlip_fast.text import TextConfig, build_tiny_text_model

from . import distributed as D
from .config import FIXED, RUN_ONLY, TrainConfig
from .data import plan_epoch, plan_problems, train_loader, training_reports
from .evaluate import ZeroShotEval
from .flops import peak_tflops, train_step_flops
from .health import NonfiniteSteps
from .log import MetricsLog
from .optim import cosine_schedule, param_groups
from .profiling import StepProfiler, phase
from .training_state import Checkpoints, rng_state, set_rng_state

log = logging.getLogger("hlip_fast.train")
PROFILE_TRACE = "profile_trace.json"
MAX_LOGIT_SCALE = math.log(100.0)


class TrainingStopped(RunStopped):
    """The run stopped before its last step (divergence, non-finite weights, too many damaged
    studies); the message says what to do."""


class _Interrupted(Exception):
    """A stop signal arrived between the micro-batches of a step: the step is abandoned."""


@dataclass
class _Window:
    """The steps since the last log step (from the start of the first, so saves and evaluations
    between them are not counted): host-side sums, and the last step's device values."""

    start: float = 0.0
    steps: int = 0
    wait: float = 0.0
    studies: int = 0
    tokens: int = 0
    flops: float = 0.0
    lr: float = 0.0
    loss: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None

    def add(self, step: dict, started: float, wait: float) -> None:
        self.start = started if self.steps == 0 else self.start
        self.steps, self.wait = self.steps + 1, self.wait + wait
        self.studies, self.tokens, self.flops = (
            self.studies + step["studies"],
            self.tokens + step["tokens"],
            self.flops + step["flops"],
        )
        self.lr, self.loss, self.grad_norm = step["lr"], step["loss"], step["grad_norm"]


def _reader_description(cfg: TrainConfig) -> str:
    return {
        "cpu": f"{cfg.workers} DataLoader worker(s) per rank",
        "nvcomp": "nvCOMP decoding on the GPU",
        "dali": f"DALI, {max(1, cfg.workers)} thread(s) per rank",
    }[cfg.reader]


def _detached(value: torch.Tensor | None) -> torch.Tensor | None:
    return None if value is None else value.detach()


def _full(param: torch.Tensor) -> torch.Tensor:
    """The whole parameter (gathered from every rank when FSDP2 shards it: a collective)."""
    return param.full_tensor() if hasattr(param, "full_tensor") else param


def _build_text_model(cfg: TrainConfig, run_dir: Path, dist: D.Dist, console: Console) -> str:
    """``text_model`` or, for ``tiny``, a tiny BERT whose vocabulary comes from the training
    reports (warmed up by ``text_mlm_steps`` of masked-language modelling on them), built once
    per run (rank 0) in ``run_dir/text_model``."""
    if cfg.text_model != "tiny":
        console.say(f"loading the text model from {cfg.text_model}")
        return cfg.text_model
    folder = run_dir / "text_model"

    def build() -> None:
        if (folder / "config.json").is_file():
            console.say(f"text model: {folder} (built earlier in this run)")
            return
        console.say(f"building a tiny text model from the training reports in {folder}")
        reports = training_reports(cfg)
        build_tiny_text_model(folder, reports, mlm_steps=cfg.text_mlm_steps, seed=cfg.seed, console=console)

    D.on_main(build)
    return str(folder)


def _config_changes(saved: dict, cfg: TrainConfig, source: Path) -> dict[str, tuple]:
    """The run-altering fields whose values differ from the checkpoint's config; refused unless
    ``--resume-override`` names them (and always for the fields that shape the model)."""
    defaults = TrainConfig().to_dict()
    current = cfg.to_dict()
    changes = {
        key: (saved.get(key, defaults[key]), value)
        for key, value in current.items()
        if key not in RUN_ONLY and saved.get(key, defaults[key]) != value
    }
    if fixed := {k: v for k, v in changes.items() if k in FIXED}:
        raise ValueError(
            f"{source} was trained with other model settings, which cannot change on resume: "
            + _listed(fixed)
        )
    if refused := {k: v for k, v in changes.items() if k not in cfg.resume_override}:
        names = " ".join(sorted(refused))
        raise ValueError(
            f"{source} was trained with other settings: {_listed(refused)}. Drop those flags to resume "
            f"as it was, or add --resume-override {names} to apply the new values"
        )
    return changes


def _listed(changes: dict[str, tuple]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(changes.items()))


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter (its shard under FSDP2)."""
    return param.to_local() if hasattr(param, "to_local") else param


class Trainer:
    """One run: checks the data plan, locks the run folder (released by :meth:`close` or on
    leaving a ``with`` block), resumes when asked, builds model, optimiser and schedule."""

    def __init__(self, cfg: TrainConfig, dist: D.Dist, console: Console | None = None):
        self.cfg, self.dist = cfg, dist
        self.console = console or Console.silent()
        vision = get_config(cfg.model)
        self.plan = plan_epoch(cfg, vision.patch_size, cfg.max_scans or vision.max_num_scans)
        if problems := plan_problems(cfg, self.plan, vision.patch_size, dist.world_size):
            raise ValueError(problem_list("these data and settings cannot train", problems))
        name = cfg.name or D.broadcast(datetime.now().strftime("hlip-%Y%m%d-%H%M%S"))
        self.run_dir = Path(cfg.logs) / name
        self.lock = D.on_main(FolderLock(self.run_dir, "hlip-train").acquire)
        try:
            self._setup(name)
        except BaseException:
            self.close()
            raise

    def _setup(self, name: str) -> None:
        cfg, dist = self.cfg, self.dist
        self.checkpoints = Checkpoints(self.run_dir / "checkpoints", cfg.keep)
        self.overrides: dict[str, tuple] = {}
        resumed = self._checkpoint_to_resume()
        D.on_main(lambda: self._write_config(name, resumed))
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = self._build_model()
        self.net = self._wrap(self.model)  # before the optimizer: FSDP2 replaces the parameters
        self.dtype = autocast_dtype(cfg.precision, dist.device.type)
        # fused: it takes the step's non-finite flag on the device and skips the update there
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.wd), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True
        )
        self.steps_per_epoch = self.plan.steps_per_rank(dist.world_size, cfg.accum_freq)
        self.total_steps = cfg.steps or cfg.epochs * self.steps_per_epoch
        self.console.say(
            f"{self.plan.studies} training studies, about {self.steps_per_epoch} steps per epoch and rank; "
            f"{self.total_steps} steps on {dist.world_size} rank(s), {dist.device}"
        )
        self.scheduler = cosine_schedule(self.optimizer, cfg.warmup, self.total_steps)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.dtype == torch.float16)
        self.loss = SigLipLoss() if cfg.siglip else ClipLoss(cfg.local_loss, cfg.gather_with_grad)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.health = NonfiniteSteps(dist.device)
        self.saved_step = -1
        self.skipped: dict[tuple, dict] = {}  # damaged studies left out, over the whole run
        self._new_skips: list[dict] = []
        limit = cfg.max_skipped
        self.max_skipped = int(limit) if limit >= 1 else math.floor(limit * self.plan.studies)
        self.peak = cfg.peak_tflops or peak_tflops(dist.device)
        self.evaluator = ZeroShotEval(cfg, self.model, self.console) if cfg.prompts else None
        self.stop_signal: str | None = None
        torch.manual_seed(cfg.seed + 1000 * dist.rank)  # per-rank randomness from here on
        if resumed is not None:
            self._restore(*resumed)

    def close(self) -> None:
        """Release the run folder's lock."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- setup ---------------------------------------------------------------------------
    def _build_model(self) -> HLIPModel:
        cfg = self.cfg
        text = TextConfig(
            _build_text_model(cfg, self.run_dir, self.dist, self.console),
            pooling=cfg.text_pooling,
            lock=cfg.lock_text,
            unlocked_layers=cfg.lock_text_unlocked_layers,
        )
        meta = cfg.meta_init and not self.dist.main  # the weights arrive from rank 0 after sharding
        model = create_clip(
            cfg.model,
            text,
            vision_device="meta" if meta else None,
            embed_dim=cfg.embed_dim,
            loss="siglip" if cfg.siglip else "clip",
            input_mean=cfg.input_mean,
            input_std=cfg.input_std,
            drop_path_rate=cfg.drop_path_rate,
            patch_dropout=cfg.force_patch_dropout,
            pooling=cfg.vision_pooling,
            **({"max_num_scans": cfg.max_scans} if cfg.max_scans else {}),
        )
        if cfg.pretrained and not meta:
            from hlip_fast.pretrained import load_pretrained

            model.load_state_dict(load_pretrained(cfg.pretrained).state_dict())
        model.visual.set_grad_checkpointing(cfg.grad_checkpointing)
        model.visual.set_attention_backend(cfg.attn_backend)
        if cfg.torchcompile:
            model.visual.compile(backend=cfg.compile_backend, dynamic=True)
            model.text.compile(backend=cfg.compile_backend, dynamic=True)
        return model if cfg.meta_init else model.to(self.dist.device)  # meta_init: sharding moves it

    def _wrap(self, model: HLIPModel) -> torch.nn.Module:
        """DDP, or FSDP2 sharding every vision block and text layer on its own (then the rest),
        computing in bf16 and reducing gradients in fp32 when autocast is bf16 (``--precision bf16``,
        or ``auto`` on a GPU)."""
        if self.cfg.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            initial = model.state_dict() if self.cfg.meta_init and self.dist.main else {}
            bf16 = autocast_dtype(self.cfg.precision, self.dist.device.type) == torch.bfloat16
            policy = (
                MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
            )
            options = {"mp_policy": policy} if policy else {}
            for layer in [*model.visual.blocks, *model.text.transformer.encoder.layer]:
                fully_shard(layer, **options)
            net = fully_shard(model, **options)
            if self.cfg.meta_init:
                self._receive_initial_weights(model, initial)
            return net
        if self.dist.world_size > 1:
            return DistributedDataParallel(model)
        return model

    def _receive_initial_weights(self, model: HLIPModel, initial: dict) -> None:
        """``--meta-init``, after sharding: give the shards built on the meta device storage (module
        by module, so that loaded modules keep their non-persistent buffers), then broadcast rank
        0's initial weights (``initial``, empty on the other ranks) into every rank's shards."""
        for module in model.modules():
            if any(t.is_meta for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]):
                module.to_empty(device=self.dist.device, recurse=False)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, initial, options=options)

    def _gradient_sync(self, enabled: bool):
        """Whether this backward reduces gradients across ranks: accumulation reduces only on
        its last micro-batch (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``)."""
        if hasattr(self.net, "set_requires_gradient_sync"):
            self.net.set_requires_gradient_sync(enabled)
            return contextlib.nullcontext()
        if enabled or not hasattr(self.net, "no_sync"):
            return contextlib.nullcontext()
        return self.net.no_sync()

    # --- checkpoints ---------------------------------------------------------------------
    def _state(self) -> dict:
        # Before the first update the optimizer has no state; get_state_dict would create it with
        # a dummy step (and so change the run), so then only the model is saved.
        optimizers = self.optimizer if self.optimizer.state else []
        model_state, optim_state = get_state_dict(
            self.net, optimizers, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        position = {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "rng": rng_state()}
        return {
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "nonfinite": self.health.count(),
            "ranks": D.gather(position),  # every rank's data position and RNG states
            "skipped": list(self.skipped.values()),
            "config": json.dumps(self.cfg.to_dict()),
        }

    def _check_weights(self) -> None:
        """Stop (nothing saved) when any weight is not finite, on any rank."""
        params = list(self.model.named_parameters())
        finite = torch.stack([torch.isfinite(_local(p)).all() for _, p in params]).tolist()  # one sync
        bad = [name for (name, _), ok in zip(params, finite) if not ok]
        if D.reduce_sum(len(bad), self.dist.device):
            raise TrainingStopped(
                f"the weights are not finite after step {self.step} "
                f"({', '.join(bad[:3]) or 'on another rank'}"
                f"{', ...' if len(bad) > 3 else ''}); they were not saved. Newest good checkpoint: "
                f"{self.checkpoints.latest()}. Lower --lr (or keep --grad-clip-norm) and resume from it"
            )

    def save(self) -> Path | None:
        self._check_weights()
        state = self._state()
        path = D.on_main(lambda: self.checkpoints.save(state, self.step))
        self.saved_step = self.step
        return path

    def _checkpoint_to_resume(self) -> tuple[Path, dict] | None:
        """The verified checkpoint ``--resume`` names (``latest``: the newest intact one), its
        config checked against this run's; ``None`` to start from scratch."""
        cfg = self.cfg
        if not cfg.resume:
            if existing := self.checkpoints.latest():
                raise ValueError(
                    f"{self.run_dir} already holds a run (newest checkpoint {existing.name}): continue "
                    "it with --resume latest, or give this run another --name"
                )
            return None
        if cfg.resume == "latest":
            found = self.checkpoints.load_latest_good()
            if found is None:
                log.info("no checkpoint in %s: starting from scratch", self.checkpoints.folder)
                return None
        else:
            found = (Path(cfg.resume), Checkpoints.load(cfg.resume))
        path, state = found
        self.overrides = _config_changes(json.loads(state["config"]), cfg, path)
        return path, state

    def _write_config(self, name: str, resumed: tuple[Path, dict] | None) -> None:
        """``config.json``: this run's config, and each resume with the overrides it applied."""
        path = self.run_dir / "config.json"
        history = read_json(path).get("resumed", []) if resumed and path.is_file() else []
        if resumed:
            checkpoint, state = resumed
            history.append(
                {
                    "step": state["step"],
                    "checkpoint": str(checkpoint),
                    "overrides": {k: list(v) for k, v in self.overrides.items()},
                }
            )
            if self.overrides:
                log.warning("resume overrides the checkpoint's settings: %s", _listed(self.overrides))
        write_json(path, {**self.cfg.to_dict(), "name": name, "resumed": history})

    def _restore(self, path: Path, state: dict) -> None:
        set_state_dict(
            self.net,
            self.optimizer if state["optimizer"] else [],
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.health.restore(state["nonfinite"])
        self.skipped = {_skip_key(r): r for r in state.get("skipped", [])}
        self.saved_step = self.step
        ranks = state["ranks"]
        if len(ranks) == self.dist.world_size:
            mine = ranks[self.dist.rank]
            self.epoch, self.batch_in_epoch = mine["epoch"], mine["batch_in_epoch"]
            set_rng_state(mine["rng"])
        else:  # resharded: the full weights and optimizer state load on any number of ranks
            self.epoch, self.batch_in_epoch = min(r["epoch"] for r in ranks), 0
            torch.manual_seed(self.cfg.seed + 1000 * self.dist.rank + self.step)
            log.warning(
                "%s was written by %d rank(s), this run has %d: weights, optimizer and schedule resume as "
                "saved; the data order restarts at the beginning of epoch %d and the random draws differ "
                "from an uninterrupted run",
                path,
                len(ranks),
                self.dist.world_size,
                self.epoch,
            )
        self._apply_hyperparameters()
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            path,
            self.step,
            self.epoch,
            self.batch_in_epoch,
        )

    def _apply_hyperparameters(self) -> None:
        """This run's optimiser settings over the ones restored from the checkpoint (equal unless
        ``--resume-override`` changed them), the learning rate recomputed for the current step."""
        cfg, scheduler = self.cfg, self.scheduler
        scheduler.base_lrs = [cfg.lr] * len(self.optimizer.param_groups)
        for group, lr_lambda in zip(self.optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"] = cfg.lr
            group["lr"] = cfg.lr * lr_lambda(scheduler.last_epoch)
            group["betas"], group["eps"], group["fused"] = (cfg.beta1, cfg.beta2), cfg.eps, True
            if group["weight_decay"]:
                group["weight_decay"] = cfg.wd

    # --- data ----------------------------------------------------------------------------
    def batches(self) -> Iterator[Batch]:
        """This rank's batches, epoch after epoch, from the saved position on; the studies the
        reader skips as damaged are collected in ``_new_skips``."""
        while True:
            skip = self.batch_in_epoch
            loader = train_loader(self.cfg, self.model, self.dist, self.epoch)
            seen = 0
            for index, batch in enumerate(loader):
                self._new_skips += loader.skipped[seen:]
                seen = len(loader.skipped)
                if index < skip:
                    continue
                self.batch_in_epoch = index + 1
                yield batch
            self._new_skips += loader.skipped[seen:]
            if self.batch_in_epoch == 0:
                raise ValueError(f"{self.cfg.train_data}: rank {self.dist.rank} got no training batch")
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _next_micro_batches(self, data: Iterator[Batch]) -> list[Batch]:
        """``accum_freq`` batches; a stop signal between two of them abandons the step."""
        micro = []
        for i in range(self.cfg.accum_freq):
            if i and self._stop_requested():
                raise _Interrupted
            try:
                micro.append(next(data))
            except RuntimeError:
                if self.stop_signal:  # Ctrl-C also reached the DataLoader workers
                    raise _Interrupted from None
                raise
        return micro

    def _stop_requested(self) -> bool:
        """Whether to abandon a step between its micro-batches: a stop signal, in one process.
        Ranks agree on theirs at the next log step, in the collective that step makes anyway."""
        return self.dist.world_size == 1 and self.stop_signal is not None

    def _absorb_skips(self) -> None:
        """Gather the studies every rank skipped since the last call, count them once each,
        record them in ``skipped.jsonl``, and stop the run past ``--max-skipped``."""
        new = [r for records in D.gather(self._new_skips) for r in records]
        self._new_skips = []
        fresh = [r for r in new if _skip_key(r) not in self.skipped]
        for record in fresh:
            self.skipped.setdefault(_skip_key(record), record)
        if fresh and self.dist.main:
            with open(self.run_dir / "skipped.jsonl", "a") as handle:
                handle.writelines(json.dumps({"step": self.step, **r}) + "\n" for r in fresh)
        if len(self.skipped) > self.max_skipped:
            first = next(iter(self.skipped.values()))
            raise TrainingStopped(
                f"{len(self.skipped)} of {self.plan.studies} training studies were damaged and skipped, over "
                f"--max-skipped {self.cfg.max_skipped} ({self.max_skipped} studies); "
                f"first: {first['reason']}. All are listed in {self.run_dir / 'skipped.jsonl'}; "
                "repair or re-prepare the data and resume"
            )

    # --- one step ------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.dist.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def _loss(self, study, text, out) -> torch.Tensor:
        if self.cfg.siglip:
            return self.loss(study, text, out["logit_scale"], out["logit_bias"])
        return self.loss(study, text, out["logit_scale"])

    def _tokens(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The batch's report tokens: made by the reader, or here for a batch made without them."""
        return batch.text if batch.text is not None else self.model.tokenize(batch.reports)

    def train_step(self, micro: list[Batch]) -> dict:
        """Forward, backward and update on ``micro`` (``accum_freq`` batches), with no host sync:
        a loss or gradient norm that is not finite on any rank skips the update on the device
        and is counted there (:class:`NonfiniteSteps`). Returns the loss and gradient norm (device
        scalars) and the step's host-side numbers: learning rate, studies, tokens, FLOPs."""
        self.net.train()
        inputs = [(b.studies.to(self.dist.device, non_blocking=True), self._tokens(b)) for b in micro]
        if len(micro) == 1:
            with phase("forward"), self._autocast():
                out = self.net(*inputs[0])
                loss = self._loss(out["study_features"], out["text_features"], out)
            with phase("backward"):
                self.scaler.scale(loss).backward()
        else:
            loss = self._accumulated(inputs)
        with phase("optimizer"):
            return self._update(loss.detach().float(), inputs)

    def _update(self, loss: torch.Tensor, inputs: list) -> dict:
        """The update of :meth:`train_step`, skipped on the device when not finite."""
        bad = D.any_rank((~torch.isfinite(loss)).to(torch.float32))
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.grad_clip_norm if self.cfg.grad_clip_norm else float("inf")
        grad_norm = _full(torch.nn.utils.clip_grad_norm_(params, clip)).float()
        bad = torch.maximum(bad, (~torch.isfinite(grad_norm)).to(torch.float32))
        self.optimizer.found_inf = bad
        self.optimizer.step()
        self.scaler.update()
        self.health.record(bad)
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "studies": sum(b.num_studies for b, _ in inputs),
            "tokens": sum(b.layout.num_tokens for b, _ in inputs),
            "flops": sum(train_step_flops(self.model, b.layout, t["attention_mask"]) for b, t in inputs),
        }

    def _accumulated(self, inputs) -> torch.Tensor:
        """open_clip's accumulation: cache all micro-batches' features without gradients, then
        recompute each one (same random draws) and back-propagate the loss over the whole set.
        Each pass's loss sees every pair, so the loss's own parameters (temperature, SigLIP bias)
        take their gradient from the last pass only: summed over the passes it would be
        ``accum_freq`` times too large (as in open_clip), inflating the clipped gradient norm.
        A stop signal between micro-batches abandons the step with the RNG as it began."""
        cached, states = [], []

        def check_stop() -> None:
            if self._stop_requested():
                set_rng_state(states[0])
                raise _Interrupted

        with phase("forward"), torch.no_grad(), self._autocast():
            for j, (batch, tokens) in enumerate(inputs):
                states.append(rng_state())
                if j:
                    check_stop()
                out = self.net(batch, tokens)
                cached.append((out["study_features"], out["text_features"]))
        after = rng_state()
        for j, (batch, tokens) in enumerate(inputs):
            check_stop()
            set_rng_state(states[j])
            last = j == len(inputs) - 1
            with self._gradient_sync(last):
                with phase("forward"), self._autocast():
                    out = self.net(batch, tokens)
                    if not last:
                        out = {**out, **{k: _detached(out[k]) for k in ("logit_scale", "logit_bias")}}
                    study = torch.cat(
                        [out["study_features"] if i == j else c[0] for i, c in enumerate(cached)]
                    )
                    text = torch.cat([out["text_features"] if i == j else c[1] for i, c in enumerate(cached)])
                    loss = self._loss(study, text, out)
                with phase("backward"):
                    self.scaler.scale(loss).backward()
        set_rng_state(after)
        return loss

    # --- the loop ------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.stop_signal = signal.Signals(signum).name

    def _stopped(self, last: dict) -> dict:
        log.warning(
            "stopped by %s at step %d; checkpoint saved; resume with --resume latest",
            self.stop_signal,
            self.step,
        )
        return {"step": self.step, "stopped": self.stop_signal, **last}

    def fit(self) -> dict:
        """Steps to ``total_steps``. An ordinary step makes no host sync; a log step makes one
        (:meth:`_log`), as do saves and evaluations."""
        cfg = self.cfg
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        metrics = MetricsLog(self.run_dir, cfg.report_to, enabled=self.dist.main)
        bar = self.console.progress(
            self.total_steps, "train", "steps", every=cfg.log_every, initial=self.step
        )
        self.console.say(f"waiting for the first batch ({_reader_description(cfg)})")
        data, window, last = self.batches(), _Window(), {}
        profiler = self._profiler()
        try:
            while self.step < self.total_steps:
                position, started = (self.epoch, self.batch_in_epoch), time.perf_counter()
                profiler.begin(self.step)
                try:
                    with phase("data_wait"):
                        micro = self._next_micro_batches(data)
                    waited = time.perf_counter() - started
                    window.add(self.train_step(micro), started, waited)
                except _Interrupted:
                    self.epoch, self.batch_in_epoch = position  # the abandoned step is redone on resume
                    self.optimizer.zero_grad(set_to_none=True)
                    self.save()
                    return self._stopped(last)
                self.step += 1
                if not last or self._is_log_step():  # the first step of a run or resume too
                    last, stop = self._log(metrics, window, first=not last)
                    window = _Window()
                else:
                    stop = self._local_checks()
                bar.update(1, loss=f"{last['loss']:.4f}", studies_s=f"{last['studies_per_s']:.1f}")
                if self.evaluator and cfg.zeroshot_every and self.step % cfg.zeroshot_every == 0:
                    metrics.write(self.step, self.evaluator.run(self.step, self.run_dir, self.dist))
                if self.step % cfg.save_every == 0 or stop:
                    self.save()
                if profiler.done(self.step):
                    paused = time.perf_counter()
                    self._report_profile(metrics, profiler.steps, profiler.finish())
                    window.start += time.perf_counter() - paused  # not step time
                if stop:
                    return self._stopped(last)
            return self._finish(metrics, last)
        finally:
            bar.close()
            metrics.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _profiler(self) -> StepProfiler:
        """``--profile-steps`` steps from the second of this run (the first compiles and warms up),
        as many as the run has."""
        first = self.step + 1
        steps = max(0, min(self.cfg.profile_steps, self.total_steps - first))
        if steps < self.cfg.profile_steps:
            log.warning(
                "--profile-steps %d: this run has %d step(s) after its first, so %d are profiled",
                self.cfg.profile_steps,
                max(0, self.total_steps - first),
                steps,
            )
        trace = self.run_dir / PROFILE_TRACE if self.dist.main else None
        return StepProfiler(first, steps, self.dist.device, trace)

    def _report_profile(self, metrics: MetricsLog, steps: int, seconds: dict[str, float]) -> None:
        """The ``steps`` profiled steps' mean seconds per phase: a metrics row and one console line."""
        metrics.write(self.step, {f"profile/{name}_s": value for name, value in seconds.items()})
        parts = ", ".join(f"{name.replace('_', ' ')} {value * 1e3:.1f} ms" for name, value in seconds.items())
        clock = "GPU" if self.dist.device.type == "cuda" else "CPU"
        self.console.say(
            f"profile, per step over {steps} ({clock} time; communication overlaps the backward): {parts}; "
            f"trace: {self.run_dir / PROFILE_TRACE}"
        )

    def _finish(self, metrics: MetricsLog, last: dict) -> dict:
        """After the last step (a log step): refuse to export weights that end a non-finite
        streak, save, evaluate, export."""
        if last.get("nonfinite_streak"):
            raise TrainingStopped(
                f"the run ended on {last['nonfinite_streak']} steps with a non-finite loss or gradient: its "
                f"weights give non-finite results and were not exported. Weights from before them: "
                f"{self.checkpoints.latest()}. Lower --lr or raise --warmup and resume from there."
            )
        if self.saved_step != self.step:
            self.save()
        if self.evaluator and self.cfg.zeroshot_every != 0 and self.step % self.cfg.zeroshot_every:
            metrics.write(self.step, self.evaluator.run(self.step, self.run_dir, self.dist))
        export = self.model_for_export()  # collective under FSDP: every rank takes part
        D.on_main(lambda: save_pretrained(export, self.run_dir / "final"))
        return {"step": self.step, "stopped": None, **last}

    def _is_log_step(self) -> bool:
        return self.step % self.cfg.log_every == 0 or self.step in (1, self.total_steps)

    def _local_checks(self) -> bool:
        """Between log steps, in one process only (host values, no collective): absorb the
        studies the reader skipped, and say whether a stop signal came. Ranks agree on both at
        log steps."""
        if self.dist.world_size > 1:
            return False
        if self._new_skips:
            self._absorb_skips_saving()
        return self.stop_signal is not None

    def _absorb_skips_saving(self) -> None:
        try:
            self._absorb_skips()
        except TrainingStopped:
            self.save()  # the weights are sound: keep them for a resume once the data is repaired
            raise

    def _log(self, metrics: MetricsLog, window: _Window, first: bool) -> tuple[dict, bool]:
        """A log step: the steps since the last one (host numbers), every rank's stop signal and
        damaged-study count, and the device values (the last step's loss and gradient norm, the
        non-finite counts, the temperature) summed over ranks in one collective and read in one
        host sync; writes the metrics row; saves at the start of a non-finite streak (the updates
        of its steps were skipped: the weights from before it), stops past ``--max-nonfinite``
        or ``--max-skipped``. Returns the row and whether a stop signal reached any rank."""
        world, device = self.dist.world_size, self.dist.device
        host = [window.studies, window.tokens, window.flops, float(self.stop_signal is not None)]
        host.append(float(len(self._new_skips)))
        values = [window.loss, window.grad_norm, self.health.total, self.health.streak]
        values.append(_full(self.model.logit_scale).detach().exp().reshape(()))
        packed = torch.cat([torch.tensor(host, dtype=torch.float64).to(device), torch.stack(values).double()])
        studies, tokens, flops, stops, new_skips, *means = D.reduce_packed(packed)
        loss, grad_norm, nonfinite, streak, logit_scale = (v / world for v in means)
        seconds = time.perf_counter() - window.start
        if first:
            self.console.say(f"first step done in {seconds:.1f} s (loss {loss:.4f})")
        if new_skips:
            self._absorb_skips_saving()
        row = {
            "epoch": self.epoch,
            "loss": loss,
            "lr": window.lr,
            "logit_scale": logit_scale,
            "grad_norm": grad_norm,
            "nonfinite_steps": round(nonfinite),
            "nonfinite_streak": round(streak),
            "skipped_studies": len(self.skipped),
            "studies": int(studies),
            "tokens": int(tokens),
            "studies_per_s": studies / seconds,
            "tokens_per_s": tokens / seconds,
            "data_wait": window.wait / seconds,
            "tflops_per_s": flops / seconds / 1e12,
            "mfu": flops / seconds / (self.peak * 1e12 * world) if self.peak else None,
            "step_s": seconds / window.steps,
        }
        metrics.write(self.step, row)
        if streak and self.saved_step != self.step:
            self.save()
        if streak >= self.cfg.max_nonfinite:
            raise TrainingStopped(
                f"{round(streak)} consecutive steps with a non-finite loss or gradient (step {self.step}); "
                f"stopped. Weights from before the first of them: {self.checkpoints.latest()}. "
                "Lower --lr, raise --warmup or use --precision fp32 and resume from there."
            )
        return row, stops > 0

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


def _skip_key(record: dict) -> tuple:
    return record["shard"], record["key"], record["study_id"]
