"""One training step: autocast forward, the contrastive loss, backward (with open_clip's
accumulation over micro-batches), and the AdamW update with its schedule, gradient clipping and
loss scaling, skipped on the device when the loss or gradient is not finite."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from hlip_fast.data.batching import Batch
from hlip_fast.losses import build_loss

from . import distributed as D
from .config import TrainConfig
from .flops import train_step_flops
from .health import Interrupted, NonfiniteSteps
from .model import WrappedModel
from .optim import cosine_schedule, param_groups
from .profiling import phase
from .random_state import rng_state, set_rng_state

MAX_LOGIT_SCALE = math.log(100.0)


def _detached(value: torch.Tensor | None) -> torch.Tensor | None:
    return None if value is None else value.detach()


class TrainStep:
    """The optimiser, its schedule, the loss scaler and the non-finite count of a run, and the
    step that uses them. ``stop_requested()`` is asked between micro-batches."""

    def __init__(
        self,
        wrapped: WrappedModel,
        loss: torch.nn.Module,
        dtype: torch.dtype | None,
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        wd: float,
        warmup: int,
        total_steps: int,
        grad_clip_norm: float | None,
        stop_requested: Callable[[], bool],
    ) -> None:
        self.wrapped, self.model, self.loss, self.dtype = wrapped, wrapped.model, loss, dtype
        self.device = wrapped.dist.device
        self.grad_clip_norm, self.stop_requested = grad_clip_norm, stop_requested
        # fused: it takes the step's non-finite flag on the device and skips the update there
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, wd), lr=lr, betas=betas, eps=eps, fused=True
        )
        self.scheduler = cosine_schedule(self.optimizer, warmup, total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == torch.float16)
        self.health = NonfiniteSteps(self.device)

    @classmethod
    def build(
        cls,
        cfg: TrainConfig,
        wrapped: WrappedModel,
        dtype: torch.dtype | None,
        total_steps: int,
        stop_requested: Callable[[], bool],
    ) -> TrainStep:
        """The step of ``cfg``: its loss (of the model's kind) and optimisation settings."""
        loss = build_loss(
            wrapped.model.config.loss, local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad
        )
        return cls(
            wrapped,
            loss,
            dtype,
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            wd=cfg.wd,
            warmup=cfg.warmup,
            total_steps=total_steps,
            grad_clip_norm=cfg.grad_clip_norm,
            stop_requested=stop_requested,
        )

    def state_dict(self) -> dict:
        """The schedule's, the scaler's and the non-finite count's state (the optimizer's is
        saved with the model's, by ``torch.distributed.checkpoint``)."""
        return {
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "nonfinite": self.health.count(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.health.restore(state["nonfinite"])

    def set_hyperparameters(self, cfg: TrainConfig) -> None:
        """``cfg``'s optimiser settings over the ones restored from a checkpoint (equal unless
        ``--resume-override`` changed them), the learning rate recomputed for the current step."""
        lr, betas, eps, wd = cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps, cfg.wd
        scheduler = self.scheduler
        scheduler.base_lrs = [lr] * len(self.optimizer.param_groups)
        for group, lr_lambda in zip(self.optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"] = lr
            group["lr"] = lr * lr_lambda(scheduler.last_epoch)
            group["betas"], group["eps"], group["fused"] = betas, eps, True
            if group["weight_decay"]:
                group["weight_decay"] = wd

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def _tokens(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The batch's text tokens: made by the reader, or here for a batch made without them."""
        return batch.text if batch.text is not None else self.model.tokenize(batch.texts)

    def __call__(self, micro: list[Batch]) -> dict:
        """Forward, backward and update on ``micro`` (``accum_freq`` batches), with no host sync:
        a loss or gradient norm that is not finite on any rank skips the update on the device
        and is counted there (:class:`NonfiniteSteps`). Returns the loss and gradient norm (device
        scalars) and the step's host-side numbers: learning rate, studies, tokens, FLOPs."""
        self.wrapped.net.train()
        inputs = [(b.studies.to(self.device, non_blocking=True), self._tokens(b)) for b in micro]
        if len(micro) == 1:
            with phase("forward"), self._autocast():
                out = self.wrapped.net(*inputs[0])
                loss = self.loss(
                    out["study_features"], out["text_features"], out["logit_scale"], out["logit_bias"]
                )
            with phase("backward"):
                self.scaler.scale(loss).backward()
        else:
            loss = self._accumulated(inputs)
        with phase("optimizer"):
            return self._update(loss.detach().float(), inputs)

    def _update(self, loss: torch.Tensor, inputs: list) -> dict:
        """The update of a step, skipped on the device when not finite."""
        bad = D.any_rank((~torch.isfinite(loss)).to(torch.float32))
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.grad_clip_norm if self.grad_clip_norm else float("inf")
        grad_norm = D.full_tensor(torch.nn.utils.clip_grad_norm_(params, clip)).float()
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
            if self.stop_requested():
                set_rng_state(states[0])
                raise Interrupted

        with phase("forward"), torch.no_grad(), self._autocast():
            for j, (batch, tokens) in enumerate(inputs):
                states.append(rng_state())
                if j:
                    check_stop()
                out = self.wrapped.net(batch, tokens)
                cached.append((out["study_features"], out["text_features"]))
        after = rng_state()
        for j, (batch, tokens) in enumerate(inputs):
            check_stop()
            set_rng_state(states[j])
            last = j == len(inputs) - 1
            with self.wrapped.gradient_sync(last):
                with phase("forward"), self._autocast():
                    out = self.wrapped.net(batch, tokens)
                    scale, bias = out["logit_scale"], out["logit_bias"]
                    if not last:
                        scale, bias = _detached(scale), _detached(bias)
                    study = torch.cat(
                        [out["study_features"] if i == j else c[0] for i, c in enumerate(cached)]
                    )
                    text = torch.cat([out["text_features"] if i == j else c[1] for i, c in enumerate(cached)])
                    loss = self.loss(study, text, scale, bias)
                with phase("backward"):
                    self.scaler.scale(loss).backward()
        set_rng_state(after)
        return loss

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
