"""The model a run trains: built from the config (text tower, vision encoder, pretrained weights,
attention backend, compilation), wrapped for DDP or sharded with FSDP2, checked finite and
exported as one plain model."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_model_state_dict
from torch.nn.parallel import DistributedDataParallel

from hlip_fast.clip import HLIPModel, create_clip
from hlip_fast.console import Console
from hlip_fast.text import TextConfig, build_tiny_text_model

from . import distributed as D
from .config import TrainConfig
from .data import training_reports


def text_model_source(cfg: TrainConfig, run_dir: Path, console: Console) -> str:
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


def build_model(cfg: TrainConfig, text_source: str, dist: D.Dist) -> HLIPModel:
    """The CLIP model of ``cfg`` on ``dist.device``; with ``meta_init`` the vision weights of
    every rank but 0 stay on the meta device (they arrive from rank 0 after sharding)."""
    text = TextConfig(
        text_source,
        pooling=cfg.text_pooling,
        lock=cfg.lock_text,
        unlocked_layers=cfg.lock_text_unlocked_layers,
    )
    meta = cfg.meta_init and not dist.main
    model = create_clip(
        cfg.model,
        text,
        vision_device="meta" if meta else None,
        embed_dim=cfg.embed_dim,
        loss=cfg.loss_kind,
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
    return model if cfg.meta_init else model.to(dist.device)  # meta_init: sharding moves it


class WrappedModel:
    """``model`` (the plain module: parameters, tokenizer, config) and ``net`` (what runs the
    forward: ``model`` itself, DDP around it, or the FSDP2-sharded ``model``)."""

    def __init__(
        self, model: HLIPModel, dist: D.Dist, *, fsdp: bool, meta_init: bool, dtype: torch.dtype | None
    ) -> None:
        self.model, self.dist, self.fsdp = model, dist, fsdp
        self.net = self._sharded(meta_init, dtype) if fsdp else self._replicated()

    def _replicated(self) -> torch.nn.Module:
        return DistributedDataParallel(self.model) if self.dist.world_size > 1 else self.model

    def _sharded(self, meta_init: bool, dtype: torch.dtype | None) -> torch.nn.Module:
        """FSDP2 sharding every vision block and text layer on its own (then the rest), computing
        in bf16 and reducing gradients in fp32 when the autocast ``dtype`` is bf16."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model = self.model
        initial = model.state_dict() if meta_init and self.dist.main else {}
        options = {}
        if dtype == torch.bfloat16:
            options["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32
            )
        for layer in [*model.visual.blocks, *model.text.transformer.encoder.layer]:
            fully_shard(layer, **options)
        net = fully_shard(model, **options)
        if meta_init:
            self._receive_initial_weights(initial)
        return net

    def _receive_initial_weights(self, initial: dict) -> None:
        """``--meta-init``, after sharding: give the shards built on the meta device storage (module
        by module, so that loaded modules keep their non-persistent buffers), then broadcast rank
        0's initial weights (``initial``, empty on the other ranks) into every rank's shards."""
        for module in self.model.modules():
            if any(t.is_meta for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]):
                module.to_empty(device=self.dist.device, recurse=False)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(self.model, initial, options=options)

    def gradient_sync(self, enabled: bool):
        """Whether this backward reduces gradients across ranks: accumulation reduces only on
        its last micro-batch (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``)."""
        if hasattr(self.net, "set_requires_gradient_sync"):
            self.net.set_requires_gradient_sync(enabled)
            return contextlib.nullcontext()
        if enabled or not hasattr(self.net, "no_sync"):
            return contextlib.nullcontext()
        return self.net.no_sync()

    def nonfinite_weights(self) -> list[str]:
        """The parameters with a non-finite value in this rank's part (one host sync)."""
        params = list(self.model.named_parameters())
        finite = torch.stack([torch.isfinite(D.local_tensor(p)).all() for _, p in params]).tolist()
        return [name for (name, _), ok in zip(params, finite) if not ok]

    def export(self) -> HLIPModel | None:
        """The plain model with full weights; under FSDP gathered from the shards (a collective)
        onto rank 0, the others get ``None``."""
        if not self.fsdp:
            return self.model
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state, _ = get_state_dict(self.net, [], options=options)
        if not self.dist.main:
            return None
        plain = HLIPModel(self.model.config)
        plain.load_state_dict(state)
        return plain
