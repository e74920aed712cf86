"""The condition encoder tau: turns a caption or a class into the `context` the UNet cross-attends to.

Contract with the paper
-----------------------
LDM (Rombach et al., arXiv 2112.10752), Sec. 3.3: a domain-specific encoder tau_theta maps the
condition y to an intermediate representation tau_theta(y) in R^{M x d_tau}, which the UNet reads
through cross-attention (Eq. 2). For text-to-image (Sec. 4.3.1) tau is a transformer over the
tokenized prompt, *trained jointly with the UNet* (Eq. 3):

    L_LDM = E_{E(x), y, eps, t} || eps - eps_theta(z_t, t, tau_theta(y)) ||^2

For class-conditional models tau is an embedding table, one token per image (App. D).

Classifier-free guidance (Ho & Salimans, arXiv 2207.12598) needs an unconditional prediction from
the same network: during training the condition is replaced by a "null" one with probability
p_uncond, and at sampling time pred_u uses it. Here the null text is the empty caption (a lone
<bos> token, encoded by the same learned transformer) and the null class is an extra learned row
of the embedding table: both are learned, not zeros.

Deliberate choices
------------------
* Word-level tokenizer built from the training captions, stored in the checkpoint as a plain list
  (no download, no BPE). Lower-cased; words and punctuation are separate tokens. A word that is
  not in the vocabulary becomes <unk> and is *reported* (returned, and warned about by callers),
  never silently dropped. Captions longer than `max_len` are an error, not truncated quietly.
* The text transformer reuses the UNet's `Attention` (same key padding mask convention: True =
  real token) and `GEGLU` feed-forward; pre-norm blocks, learned absolute positions.

Left out: pretrained text encoders (CLIP, BERT: they need downloads), layout tokens (the
paper-tasks issue adds them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .unet import GEGLU, Attention

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def split_words(text: str) -> list[str]:
    """'Top left: a RED circle.' -> ['top', 'left', ':', 'a', 'red', 'circle', '.']"""
    return _WORD.findall(text.lower())


class Tokenizer:
    """Word-level tokenizer; ids 0..3 are <pad>, <bos>, <eos>, <unk>."""

    def __init__(self, vocab: list[str]):
        if vocab[: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"a vocabulary must start with the special tokens {SPECIALS}")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def from_texts(cls, texts: list[str]) -> Tokenizer:
        words = sorted({w for text in texts for w in split_words(text)})
        return cls(SPECIALS + words)

    def __len__(self) -> int:
        return len(self.vocab)

    def unknown_words(self, text: str) -> list[str]:
        return [w for w in split_words(text) if w not in self.index]

    def __call__(self, texts: list[str], max_len: int) -> tuple[Tensor, Tensor]:
        """Token ids (B, max_len) and mask (B, max_len), True for real tokens: <bos> words <eos> <pad>..."""
        ids = torch.zeros(len(texts), max_len, dtype=torch.long)  # <pad> = 0
        for i, text in enumerate(texts):
            tokens = [BOS, *split_words(text), EOS]
            if len(tokens) > max_len:
                raise ValueError(f"caption {text!r} has {len(tokens)} tokens with <bos>/<eos>; max_len is {max_len}")
            ids[i, : len(tokens)] = torch.tensor([self.index.get(w, self.index[UNK]) for w in tokens])
        return ids, ids != 0


@dataclass
class ConditionConfig:
    kind: str = "text"  # "text", "class" or "none"
    context_dim: int = 256  # d_tau: the width of each context token (the UNet's context_dim)
    # text
    vocab: list[str] = field(default_factory=list)
    max_len: int = 16
    layers: int = 2
    head_dim: int = 32
    # class
    num_classes: int = 0


class TextEncoder(nn.Module):
    """tau for text: token + position embeddings, pre-norm transformer blocks, a final LayerNorm."""

    def __init__(self, cfg: ConditionConfig):
        super().__init__()
        self.tokenizer = Tokenizer(cfg.vocab)
        self.max_len = cfg.max_len
        D = cfg.context_dim
        self.token_emb = nn.Embedding(len(self.tokenizer), D)
        self.pos_emb = nn.Parameter(torch.randn(cfg.max_len, D) * 0.02)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm1": nn.LayerNorm(D), "attn": Attention(D, cfg.head_dim),
                           "norm2": nn.LayerNorm(D), "ff": GEGLU(D)})
            for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(D)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        B, L = ids.shape
        h = self.token_emb(ids) + self.pos_emb[:L]  # (B, L, D)
        for block in self.blocks:
            h = h + block["attn"](block["norm1"](h), mask=mask)
            h = h + block["ff"](block["norm2"](h))
        return self.norm(h)


class ConditionEncoder(nn.Module):
    """Condition -> (context (B, L, D), context_mask (B, L)) for the UNet, plus the null condition.

    encode(["a red circle in the top left", ...]) for kind="text",
    encode(torch.tensor([3, 7])) for kind="class" (ids in 0..num_classes-1; num_classes is the null class).
    """

    def __init__(self, cfg: ConditionConfig):
        super().__init__()
        if cfg.kind not in ("text", "class", "none"):
            raise ValueError(f"unknown condition kind {cfg.kind!r}; choose 'text', 'class' or 'none'")
        self.cfg = cfg
        self.text = TextEncoder(cfg) if cfg.kind == "text" else None
        if cfg.kind == "class" and cfg.num_classes < 1:
            raise ValueError("a class condition needs num_classes >= 1")
        self.class_emb = nn.Embedding(cfg.num_classes + 1, cfg.context_dim) if cfg.kind == "class" else None

    @property
    def context_dim(self) -> int | None:
        """What the UNet's `context_dim` must be (None: no cross-attention)."""
        return None if self.cfg.kind == "none" else self.cfg.context_dim

    def null_condition(self, n: int) -> list[str] | Tensor | None:
        """The condition that means "no condition": the empty caption, or the extra null class."""
        if self.cfg.kind == "text":
            return [""] * n
        if self.cfg.kind == "class":
            return torch.full((n,), self.cfg.num_classes, dtype=torch.long)
        return None

    def drop(self, condition: list[str] | Tensor, p_uncond: float, generator: torch.Generator | None = None):
        """Replace each condition by the null one with probability p_uncond (CFG training)."""
        n = len(condition)
        drop = torch.rand(n, generator=generator) < p_uncond
        null = self.null_condition(n)
        if self.cfg.kind == "text":
            return [null[i] if drop[i] else condition[i] for i in range(n)]
        if self.cfg.kind == "class":
            return torch.where(drop.to(condition.device), null.to(condition.device), condition)
        return condition

    def forward(self, condition: list[str] | Tensor | None) -> dict:
        """Keyword arguments for the UNet: {"context": (B, L, D), "context_mask": (B, L)}, or {}."""
        device = next(self.parameters()).device if self.cfg.kind != "none" else None
        if self.cfg.kind == "text":
            # Always max_len tokens: conditional and null contexts then batch together for guidance, and
            # shapes stay static (torch.compile, CUDA graphs). Padding is never attended to.
            ids, mask = self.text.tokenizer(list(condition), self.cfg.max_len)
            ids, mask = ids.to(device), mask.to(device)
            return {"context": self.text(ids, mask), "context_mask": mask}
        if self.cfg.kind == "class":
            condition = torch.as_tensor(condition, device=device)
            if condition.min() < 0 or condition.max() > self.cfg.num_classes:
                raise ValueError(f"class ids must be in 0..{self.cfg.num_classes} (the last is the null class)")
            return {"context": self.class_emb(condition)[:, None, :]}  # (B, 1, D)
        return {}
