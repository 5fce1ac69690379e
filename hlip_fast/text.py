"""The text tower: a Hugging Face BERT-family encoder from a local folder (or a cached hub
name), CLS or mean pooling, and a linear projection into the shared embedding space."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .console import Console


@dataclass(frozen=True)
class TextConfig:
    """``model``: a local model folder or a hub name already in the local cache (no network is
    used). ``pretrained=False`` builds the architecture from the folder's config only (weights
    then come from a checkpoint). ``lock`` freezes the encoder except its LayerNorms and the
    last ``unlocked_layers`` layers, as HLIP does."""

    model: str
    pretrained: bool = True
    pooling: str = "cls"
    context_length: int = 256
    lock: bool = True
    unlocked_layers: int = 0

    def __post_init__(self) -> None:
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")


def _load(model: str, pretrained: bool):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
        if pretrained:
            return tokenizer, AutoModel.from_pretrained(model, local_files_only=True)
        return tokenizer, AutoModel.from_config(AutoConfig.from_pretrained(model, local_files_only=True))
    except (OSError, ValueError) as error:
        raise OSError(
            f"text model {model!r} is not available locally (hlip_fast never downloads at run time): "
            f"give a local model folder, or fetch it once into the Hugging Face cache ({error})"
        ) from error


@dataclass
class ReportTokenizer:
    """Reports → padded token tensors (``input_ids``, ``attention_mask``, ...), truncated to the
    text tower's context. Holds only the tokenizer, so DataLoader workers can take it and
    tokenise each batch's reports beside decoding its scans."""

    tokenizer: Any
    context_length: int

    def __call__(self, texts: Iterable[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return dict(encoded)


@torch.compiler.assume_constant_result  # a fact of the installed transformers, not traced
def _takes_prepared_masks() -> bool:
    """Whether transformers builds encoder masks in ``masking_utils``, which returns a 4D mask as
    it is (older versions refuse one)."""
    try:
        from transformers.masking_utils import create_bidirectional_mask  # noqa: F401
    except ImportError:
        return False
    return True


class TextTower(nn.Module):
    """``tokenize(texts)`` → ``forward(tokens)`` → ``(batch, embed_dim)`` projected embeddings."""

    def __init__(self, config: TextConfig, embed_dim: int):
        super().__init__()
        self.config = config
        self.tokenizer, self.transformer = _load(config.model, config.pretrained)
        if getattr(self.transformer, "pooler", None) is not None:
            # Pooling happens here (CLS or mean); an unused pooler would also stall DDP.
            self.transformer.pooler = None
        self.proj = nn.Linear(self.transformer.config.hidden_size, embed_dim, bias=False)
        if config.lock:
            self.lock(config.unlocked_layers)

    def lock(self, unlocked_layers: int = 0) -> None:
        """Freeze the encoder except LayerNorm parameters and the last ``unlocked_layers`` layers."""
        layers = self.transformer.encoder.layer
        if not 0 <= unlocked_layers <= len(layers):
            raise ValueError(f"unlocked_layers must be in [0, {len(layers)}], got {unlocked_layers}")
        open_layers = {
            id(p) for layer in list(layers)[len(layers) - unlocked_layers :] for p in layer.parameters()
        }
        for module in self.transformer.modules():
            for param in module.parameters(recurse=False):
                param.requires_grad = isinstance(module, nn.LayerNorm) or id(param) in open_layers

    def _prepared_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The padding mask as a prepared ``(B, 1, 1, L)`` boolean mask where the installed
        transformers takes one as it is and the encoder runs SDPA: given the 2D mask, transformers
        asks whether it pads anything (``mask.all()``), a device-to-host sync every forward.
        Otherwise the 2D mask."""
        if _takes_prepared_masks() and self.transformer.config._attn_implementation == "sdpa":
            return mask[:, None, None, :].bool()
        return mask

    def save_architecture(self, out_dir: str | Path) -> None:
        """Write the tokenizer and the encoder's config (not its weights) as a local model folder."""
        self.tokenizer.save_pretrained(out_dir)
        self.transformer.config.save_pretrained(out_dir)

    def report_tokenizer(self) -> ReportTokenizer:
        """This tower's tokenisation, as an object a DataLoader worker can take."""
        return ReportTokenizer(self.tokenizer, self.config.context_length)

    def tokenize(self, texts: Iterable[str]) -> dict[str, torch.Tensor]:
        return self.report_tokenizer()(texts)

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = tokens["attention_mask"]
        attention = self._prepared_mask(mask)
        hidden = self.transformer(input_ids=tokens["input_ids"], attention_mask=attention).last_hidden_state
        if self.config.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
        return self.proj(pooled)


def build_tiny_text_model(
    out_dir: str | Path,
    texts: Iterable[str],
    *,
    vocab_size: int = 1000,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 2,
    dropout: float = 0.1,
    mlm_steps: int = 0,
    seed: int = 0,
    console: Console | None = None,
) -> Path:
    """A randomly initialised tiny BERT plus a WordPiece vocabulary of the words of ``texts``
    (split by tokenizers' BERT normaliser and pre-tokeniser), saved as a normal local model
    folder (for tests, the demo and runs without a pretrained model). ``mlm_steps`` > 0 warms it
    up with masked-language modelling on ``texts`` (a bar on ``console``). Same texts, same folder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    texts = list(texts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(
        word for text in texts for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text))
    )
    # Deterministic (the tokenizers WordPiece trainer breaks ties differently run to run, which
    # would break exact resume): every character and its "##" continuation, then whole words,
    # most frequent first.
    chars = sorted({c for word in counts for c in word})
    words = sorted(counts, key=lambda w: (-counts[w], w))
    tokens = list(dict.fromkeys([*specials, *chars, *(f"##{c}" for c in chars), *words]))
    tokens = tokens[: max(vocab_size, len(specials) + 2 * len(chars))]
    wordpiece = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    wordpiece.normalizer, wordpiece.pre_tokenizer = normalizer, splitter
    wordpiece.decoder = decoders.WordPiece()
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece, do_lower_case=True)
    tokenizer.save_pretrained(out)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=512,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
        torch.manual_seed(seed)
        if mlm_steps:
            model = _pretrain_mlm(config, tokenizer, texts, mlm_steps, console or Console.silent())
        else:
            model = BertModel(config)
        model.save_pretrained(out)
    return out


def _pretrain_mlm(config, tokenizer, texts: list[str], steps: int, console: Console, batch_size: int = 32):
    """A few steps of masked-language modelling on ``texts`` (a domain warm start, as
    BiomedBERT is for HLIP); returns the encoder without its MLM head."""
    from transformers import BertForMaskedLM, BertModel, DataCollatorForLanguageModeling

    model = BertForMaskedLM(config).train()
    collate = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    encoded = tokenizer(texts, truncation=True, max_length=128)["input_ids"]
    order = torch.randperm(len(encoded))
    bar = console.progress(steps, "text MLM warm-up", "steps")
    for step in range(steps):
        picks = order[(torch.arange(batch_size) + step * batch_size) % len(encoded)]
        batch = collate([{"input_ids": encoded[i]} for i in picks.tolist()])
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1, loss=f"{loss.item():.3f}")
    bar.close()
    encoder = BertModel(config)  # with the (unused) pooler, so that it reloads without warnings
    encoder.load_state_dict(model.bert.state_dict(), strict=False)
    return encoder
