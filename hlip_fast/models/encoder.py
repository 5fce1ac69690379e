"""HLIP's vision encoder on packed ragged studies."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn as nn
from timm.models.vision_transformer import init_weights_vit_timm
from torch.utils.checkpoint import checkpoint

from ..attention import plan_attention
from ..layers import (
    HierarchicalBlock,
    PatchEmbed3D,
    RotaryTables,
    keep_patches,
    plan_switch,
    resample_3d,
    rope_chunk,
    sincos_1d,
    sincos_3d,
    switch_level,
    switch_rows,
    token_positions,
)
from ..layout import LEVELS, Layout
from ..packing import StudyBatch, pack_studies, to_3tuple

POOLINGS = ("token", "avg", "dinotxt")


@dataclass(frozen=True)
class VisionConfig:
    """Shape of an HLIP vision encoder.

    ``img_size`` only sets the grid of the spatial position table (``img_size // patch_size``);
    scans of any size divisible by the patch are accepted and the table is resampled to each.
    ``levels`` names the attention level of every block: any sequence of slice, scan and study.
    ``max_num_scans`` is the length of the per-scan sequential position table (1: single-scan
    studies, no sequential embedding; 0: no sequential embedding and any number of scans, as
    HLIP's ``ablate_seqposemb`` and dual models). ``reg_tokens`` register tokens join the class
    token as prefix tokens, each following the level-switch rule (averaged to a coarser level,
    replicated to a finer one). ``pooling``: the class token, the patch mean, or ``"dinotxt"``
    (DINO.txt: each prefix token beside the patch mean, ``2 × embed_dim`` features).
    ``patch_dropout`` drops that share of every slice's patch tokens in training mode.
    ``rope`` adds 3D axial rotary embedding inside every attention (HLIP's ``ablate_rope``
    models; see :mod:`~hlip_fast.layers.rope`), beside the additive position tables.
    """

    img_size: tuple[int, int, int] = (48, 224, 224)
    patch_size: tuple[int, int, int] = (8, 16, 16)
    in_chans: int = 1
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False
    drop_path_rate: float = 0.0
    patch_dropout: float = 0.0
    max_num_scans: int = 40
    levels: tuple[str, ...] = field(default=("scan", "scan", "study") * 4)
    pooling: str = "token"
    reg_tokens: int = 0
    rope: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "img_size", to_3tuple(self.img_size, "img_size"))
        object.__setattr__(self, "patch_size", to_3tuple(self.patch_size, "patch_size"))
        object.__setattr__(self, "levels", tuple(self.levels))
        problems = []
        if len(self.levels) != self.depth:
            problems.append(f"levels has {len(self.levels)} entries for depth {self.depth}")
        if bad := [lv for lv in self.levels if lv not in LEVELS]:
            problems.append(f"unknown levels {bad}; expected entries of {LEVELS}")
        if self.embed_dim % 2:
            problems.append(f"embed_dim {self.embed_dim} must be even (3D sin-cos table)")
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}")
        if any(i % p for i, p in zip(self.img_size, self.patch_size)):
            problems.append(f"img_size {self.img_size} not divisible by patch_size {self.patch_size}")
        if self.max_num_scans < 0:
            problems.append(f"max_num_scans must be >= 0, got {self.max_num_scans}")
        if self.rope and self.num_heads and not self.embed_dim % self.num_heads:
            try:
                rope_chunk(self.embed_dim // self.num_heads)
            except ValueError as error:
                problems.append(str(error))
        if self.reg_tokens < 0:
            problems.append(f"reg_tokens must be >= 0, got {self.reg_tokens}")
        if self.pooling not in POOLINGS:
            problems.append(f"pooling {self.pooling!r} not in {POOLINGS}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            problems.append(f"drop_path_rate {self.drop_path_rate} not in [0, 1)")
        if not 0.0 <= self.patch_dropout < 1.0:
            problems.append(f"patch_dropout {self.patch_dropout} not in [0, 1)")
        if problems:
            raise ValueError("invalid VisionConfig: " + "; ".join(problems))

    @property
    def grid_size(self) -> tuple[int, int, int]:
        return tuple(i // p for i, p in zip(self.img_size, self.patch_size))

    @property
    def num_prefix_tokens(self) -> int:
        """The class token and the register tokens."""
        return 1 + self.reg_tokens

    @property
    def num_embeddings(self) -> int:
        """Embeddings per study: one per prefix token with DINO.txt pooling, else one."""
        return self.num_prefix_tokens if self.pooling == "dinotxt" else 1

    @property
    def num_features(self) -> int:
        """Width of a pooled embedding: ``2 × embed_dim`` with DINO.txt pooling."""
        return 2 * self.embed_dim if self.pooling == "dinotxt" else self.embed_dim


class HLIPVisionEncoder(nn.Module):
    """Hierarchical ViT over a :class:`~hlip_fast.packing.StudyBatch`: one embedding per study.

    Patch tokens stay packed in one ``(num_tokens, C)`` tensor for the whole forward pass. The
    class-token copies ride behind them, with room for one per segment of the finest level in
    the schedule (at a coarser level the rows past its copies are spare); at a level change only
    the copies are averaged (to a coarser level) or replicated (to a finer one), in place: the
    patch rows are never copied (see ``switch_rows``).
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed3D(config.patch_size, config.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.reg_token = nn.Parameter(torch.zeros(1, config.reg_tokens, dim)) if config.reg_tokens else None
        self.register_buffer("spatial_posemb", sincos_3d(config.grid_size, dim)[None])
        if config.max_num_scans > 1:
            positions = torch.arange(config.max_num_scans)
            self.register_buffer("sequential_posemb", sincos_1d(positions, dim)[None])
        else:
            self.sequential_posemb = None
        # Stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last.
        rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(
            HierarchicalBlock(
                dim,
                config.num_heads,
                mlp_ratio=config.mlp_ratio,
                qkv_bias=config.qkv_bias,
                qk_norm=config.qk_norm,
                drop_path=rate,
                norm_layer=norm_layer,
            )
            for rate in rates
        )
        self.norm = norm_layer(dim)
        # The finest level of the schedule: the rows hold one class-token copy per segment of it.
        self.class_rows_level = min(config.levels, key=LEVELS.index)
        self.grad_checkpointing = False
        self.compiled_device_work = None
        self.apply(init_weights_vit_timm)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def num_features(self) -> int:
        return self.config.num_features

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations."""
        self.grad_checkpointing = enable

    def set_attention_backend(self, backend: str) -> None:
        """Run every block's attention with ``backend`` (``"auto"`` restores the default)."""
        for block in self.blocks:
            block.attn.backend = backend

    def position_embedding(self, layout: Layout) -> torch.Tensor:
        """``(num_tokens, C)``: spatial table resampled to each scan's grid + scan position.

        Scan positions are the scan's index in its study in eval mode; in training mode each
        study draws distinct random positions from the table, as HLIP does.
        """
        tables = {}
        for grid in map(tuple, layout.grids.tolist()):
            if grid not in tables:
                tables[grid] = resample_3d(self.spatial_posemb[0], grid).reshape(-1, self.embed_dim)
        pos = torch.cat([tables[grid] for grid in map(tuple, layout.grids.tolist())])
        if self.sequential_posemb is None:
            return pos
        positions = layout.scan_position
        if self.training:
            draws = torch.rand(layout.num_studies, self.config.max_num_scans, device=pos.device)
            positions = draws.argsort(dim=1)[layout.scan_study_index, positions]
        # A token's scan-level segment id is the index of its scan.
        return pos + self.sequential_posemb[0, positions][layout.segment_ids("scan")]

    def forward_features(self, batch: StudyBatch | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-normed ``(num_tokens, C)`` patch tokens and ``(num_studies, prefix, C)`` prefix
        tokens (class token, then registers; in training with patch dropout: the kept tokens only).
        ``batch``: packed studies, or HLIP's dense ``(B, N, C, D, H, W)`` / ``(B, C, D, H, W)``
        tensor (packed here)."""
        return self._features(batch)[:2]

    def pack(self, x: torch.Tensor) -> StudyBatch:
        """HLIP's dense input as packed studies: ``(B, N, C, D, H, W)`` (``N`` scans a study,
        each its own scan in the hierarchy) or ``(B, C, D, H, W)`` (one scan a study)."""
        expected = "HLIP's dense (B, N, C, D, H, W) or (B, C, D, H, W) tensor, or a StudyBatch (pack_studies)"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected {expected}, got {type(x).__name__}")
        if x.dim() not in (5, 6):
            raise ValueError(f"expected {expected}, got a tensor of shape {tuple(x.shape)}")
        studies = x.unsqueeze(1) if x.dim() == 5 else x
        if studies.shape[2] != self.config.in_chans:
            raise ValueError(
                f"expected {expected} with C = {self.config.in_chans} channels, got shape {tuple(x.shape)}"
            )
        return pack_studies(list(studies.unbind(0)), self.config.patch_size)

    def compile(self, **options) -> None:
        """``torch.compile`` the forward's device work in place: patch embedding, every block and
        level switch, the final norm. The host work (checks, position tables, patch-dropout draws,
        attention backends and their plans) runs eagerly before it and leaves what the graph reads
        in the layout's cache, so the graph has no breaks. ``options`` go to ``torch.compile``."""
        # The unbound function, so that a copy of the model runs its own weights.
        self.compiled_device_work = torch.compile(type(self)._device_work, **options)

    def _features(self, batch: StudyBatch | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Layout]:
        batch = batch if isinstance(batch, StudyBatch) else self.pack(batch)
        self._check_batch(batch)
        batch = batch.normalised()  # a reader's integer patches that were not moved with .to()
        self._check_tensors(batch)
        pos = self.position_embedding(batch.layout)
        keep, layout = None, batch.layout
        if self.training and self.config.patch_dropout > 0:
            keep, layout = keep_patches(layout, self.config.patch_dropout)
        backends = self._plan(layout)
        rope = None
        if self.config.rope:
            positions = batch.layout.cached(("rope_positions",), lambda: token_positions(batch.layout))
            head_dim = self.embed_dim // self.config.num_heads
            rope = RotaryTables.of(positions if keep is None else positions[keep], head_dim)
        device_work = self.compiled_device_work or type(self)._device_work
        tokens, cls = device_work(self, batch.patches, pos, keep, layout, backends, rope)
        return tokens, cls, layout

    def _plan(self, layout: Layout) -> tuple[str, ...]:
        """The forward's host work on ``layout``, cached there: each block's attention backend
        (returned) and plan, and the index tensors of the level switches and of stochastic depth.
        Compiled, ``"auto"`` prefers backends that keep one graph for every layout."""
        device_type = layout.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else self.cls_token.dtype
        levels = self.config.levels
        backends = []
        for block, level in zip(self.blocks, levels):
            attn = block.attn
            name = plan_attention(
                layout,
                level,
                heads=attn.num_heads,
                head_dim=attn.head_dim,
                dtype=dtype,
                class_tokens=self.class_rows_level,
                requires_grad=torch.is_grad_enabled(),
                backend=attn.backend,
                fixed_graph=self.compiled_device_work is not None,
                prefix=self.config.num_prefix_tokens,
            )
            backends.append(name)
            if self.training and block.drop_path1.drop_prob > 0:
                layout.segment_ids(level, self.class_rows_level, self.config.num_prefix_tokens)
        for src, dst in zip(levels, (*levels[1:], "study")):
            plan_switch(layout, src, dst)
        return tuple(backends)

    def _device_work(
        self,
        patches: torch.Tensor,
        pos: torch.Tensor,
        keep: torch.Tensor | None,
        layout: Layout,
        backends: tuple[str, ...],
        rope: RotaryTables | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-normed patch tokens and ``(studies, prefix, C)`` prefix tokens; the part
        :meth:`compile` compiles."""
        x = self.patch_embed(patches) + pos
        if keep is not None:
            x = x[keep]
        num_tokens, prefix = layout.num_tokens, self.config.num_prefix_tokens
        level = self.config.levels[0]
        tokens = self.cls_token if self.reg_token is None else torch.cat([self.cls_token, self.reg_token], 1)
        copies = tokens.expand(layout.num_segments(self.class_rows_level), -1, -1).reshape(-1, self.embed_dim)
        rows = torch.cat([x, copies])
        for block, next_level, backend in zip(self.blocks, self.config.levels, backends):
            if next_level != level:
                rows, level = switch_rows(rows, layout, level, next_level, prefix), next_level
            if self.grad_checkpointing and torch.is_grad_enabled():
                rows = checkpoint(block, rows, layout, level, backend, prefix, rope, use_reentrant=False)
            else:
                rows = block(rows, layout, level, backend, prefix, rope)
        held = rows[num_tokens : num_tokens + prefix * layout.num_segments(level)]
        studies = switch_level(held, layout, level, "study", prefix)
        return self.norm(rows[:num_tokens]), self.norm(studies).unflatten(0, (-1, prefix))

    def pool(self, tokens: torch.Tensor, prefix: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Study embeddings from the patch tokens and the ``(studies, P, C)`` prefix tokens:
        the class token ``(studies, C)``, the patch mean ``(studies, C)``, or DINO.txt's each
        prefix token beside the patch mean, ``(studies, 2C)`` for one prefix token and
        ``(studies, P, 2C)`` for several (HLIP's dual models: the class token for a report
        sentence, the register for the whole report)."""
        if self.config.pooling == "token":
            return prefix[:, 0]
        ids = layout.segment_ids("study")
        summed = tokens.new_zeros(layout.num_studies, tokens.shape[1]).index_add(0, ids, tokens)
        counts = layout.level("study").cu_seqlens.diff().to(tokens.dtype)
        mean = summed / counts.unsqueeze(1)
        if self.config.pooling == "avg":
            return mean
        pooled = torch.cat([prefix, mean[:, None].expand_as(prefix)], dim=-1)
        return pooled[:, 0] if pooled.shape[1] == 1 else pooled

    def forward(self, batch: StudyBatch | torch.Tensor) -> torch.Tensor:
        """Study embeddings (see :meth:`pool`) of packed studies or HLIP's dense tensor (see
        :meth:`forward_features`)."""
        return self.pool(*self._features(batch))

    def _check_tensors(self, batch: StudyBatch) -> None:
        """The batch on the model's device and, outside autocast, in its weights' dtype: said here,
        naming both, rather than by the first matrix multiply."""
        weight, patches = self.patch_embed.proj.weight, batch.patches
        if patches.device != weight.device:
            raise ValueError(
                f"the batch (studies {list(batch.study_ids[:3])}...) is on {patches.device}, the model on "
                f"{weight.device}: move it with batch.to(device)"
            )
        if patches.dtype != weight.dtype and not torch.is_autocast_enabled(weight.device.type):
            raise ValueError(
                f"study {batch.study_ids[0]!r}, scan 0: volumes of dtype {patches.dtype}; the model's "
                f"weights are {weight.dtype}: pack {weight.dtype} volumes (e.g. volume.float()) or cast "
                "the model"
            )

    def _check_batch(self, batch: StudyBatch) -> None:
        cfg = self.config
        if batch.patch_size != cfg.patch_size or batch.in_chans != cfg.in_chans:
            raise ValueError(
                f"batch has patch {batch.patch_size} with {batch.in_chans} channels; the model "
                f"expects patch {cfg.patch_size} with {cfg.in_chans} channels"
            )
        scans_per_study = np.bincount(batch.layout.scan_study)
        if cfg.max_num_scans and scans_per_study.max() > cfg.max_num_scans:
            worst = int(scans_per_study.argmax())
            raise ValueError(
                f"study {batch.study_ids[worst]!r} has {scans_per_study[worst]} scans; "
                f"this model's positional table allows at most {cfg.max_num_scans}"
            )
