"""The condition encoder tau: turns a caption or a class into the `context` the UNet cross-attends
to.

Contract with the paper
-----------------------
LDM (Rombach et al., arXiv 2112.10752), Sec. 3.3: a domain-specific encoder tau_theta maps the
condition y to an intermediate representation tau_theta(y) in R^{M x d_tau}, which the UNet reads
through cross-attention (Sec. 3.3). For text-to-image (Sec. 4.3.1) tau is a transformer over the
tokenized prompt, *trained jointly with the UNet* (Eq. 3):

    L_LDM = E_{E(x), y, eps, t} || eps - eps_theta(z_t, t, tau_theta(y)) ||^2

For class-conditional models tau is an embedding table, one token per image (App. D). For
layout-to-image (Sec. 4.3.1, App. D.3) tau is a transformer over the objects of a layout, each a
class and a bounding box.

Classifier-free guidance (Ho & Salimans, arXiv 2207.12598) needs an unconditional prediction from
the same network: during training the condition is replaced by a "null" one with probability
p_uncond, and at sampling time pred_u uses it. Here the null text is the empty caption (a lone
<bos> token, encoded by the same learned transformer), the null class is an extra learned row of
the embedding table and the null layout is the empty one, read as a single learned null token: all
learned, not zeros.

Deliberate choices
------------------
* Word-level tokenizer built from the training captions, stored in the checkpoint as a plain list
  (no download, no BPE). Lower-cased; words and punctuation are separate tokens. A word that is
  not in the vocabulary becomes <unk> and is *reported* (returned, and warned about by callers),
  never silently dropped. Captions longer than `max_len` are an error, not truncated quietly.
* The text transformer is a stack of the UNet's own `blocks.TransformerBlock` without a context
  (pre-norm self-attention and GEGLU; same key padding mask convention: True = real token), with
  learned absolute positions.
* Layout tokens: one token per object, a learned class embedding plus a linear map of Fourier
  features of its box, [sin, cos](2^k pi x) for each coordinate x of (x0, y0, x1, y1) and
  k = 0..box_freqs-1 (the NeRF positional encoding; GLIGEN, arXiv 2301.07093, also feeds boxes
  through Fourier features). The paper (App. D.3) instead quantizes the corners onto a grid and
  spends three tokens per object (class, top-left, bottom-right) in a sequence with positions, as
  its released code's layout tokenizer does. Fourier features keep the box continuous (a box
  moved by one pixel gets a nearby token, not an unrelated grid token), need no grid size, and
  keep one token per object. The same pre-norm blocks then run over the objects with *no*
  positional embedding, so the layout is a set: permuting the objects permutes the tokens and
  leaves the UNet's output unchanged. The context is always 1 + max_objects tokens (slot 0 is the
  null token, used only by the empty layout), so conditional and null contexts batch together
  for guidance, as for text.

Left out: pretrained text encoders (CLIP, BERT: they need downloads); object masks or keypoints
in layouts; box-aware cross-attention (GLIGEN's gated self-attention): layouts enter only through
the context, as in the paper.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .blocks import TransformerBlock

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
        """Token ids (B, max_len) and mask (B, max_len), True for real tokens:
        <bos> words <eos> <pad>..."""
        ids = torch.zeros(len(texts), max_len, dtype=torch.long)  # <pad> = 0
        for i, text in enumerate(texts):
            tokens = [BOS, *split_words(text), EOS]
            if len(tokens) > max_len:
                raise ValueError(f"caption {text!r} has {len(tokens)} tokens with <bos>/<eos>; "
                                 f"max_len is {max_len}")
            ids[i, : len(tokens)] = torch.tensor([self.index.get(w, self.index[UNK])
                                                  for w in tokens])
        return ids, ids != 0


@dataclass
class ConditionConfig:
    kind: str = "text"  # "text", "class", "layout" or "none"
    context_dim: int = 256  # d_tau: the width of each context token (the UNet's context_dim)
    # text
    vocab: list[str] = field(default_factory=list)
    max_len: int = 16
    layers: int = 2  # transformer blocks (text and layout)
    head_dim: int = 32
    # class (and the object classes of a layout)
    num_classes: int = 0
    # layout
    max_objects: int = 9  # objects per layout; the shapes data has at most 9 (one per grid cell)
    box_freqs: int = 8  # Fourier frequencies 2^k pi, k < box_freqs, per box coordinate


def transformer_blocks(cfg: ConditionConfig) -> nn.ModuleList:
    """`layers` pre-norm transformer blocks (self-attention and GEGLU, no context); they add no
    positions."""
    return nn.ModuleList(TransformerBlock(cfg.context_dim, cfg.head_dim) for _ in range(cfg.layers))


def run_blocks(blocks: nn.ModuleList, h: Tensor, mask: Tensor) -> Tensor:
    """h (B, L, D) through the blocks; keys where mask (B, L) is False are never attended to."""
    for block in blocks:
        h = block(h, mask=mask)
    return h


class TextEncoder(nn.Module):
    """tau for text: token + position embeddings, pre-norm transformer blocks, a final LayerNorm."""

    def __init__(self, cfg: ConditionConfig):
        super().__init__()
        self.tokenizer = Tokenizer(cfg.vocab)
        self.max_len = cfg.max_len
        D = cfg.context_dim
        self.token_emb = nn.Embedding(len(self.tokenizer), D)
        self.pos_emb = nn.Parameter(torch.randn(cfg.max_len, D) * 0.02)
        self.blocks = transformer_blocks(cfg)
        self.norm = nn.LayerNorm(D)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        B, L = ids.shape
        h = self.token_emb(ids) + self.pos_emb[:L]  # (B, L, D)
        return self.norm(run_blocks(self.blocks, h, mask))


class LayoutEncoder(nn.Module):
    """tau for layouts: per object, class embedding + linear(Fourier features of its box); a set
    transformer.

    Slot 0 of the output is a learned null token, real only for the empty layout (the null
    condition).
    """

    def __init__(self, cfg: ConditionConfig):
        super().__init__()
        D = cfg.context_dim
        self.class_emb = nn.Embedding(cfg.num_classes, D)
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(cfg.box_freqs),
                             persistent=False)
        self.box_proj = nn.Linear(4 * 2 * cfg.box_freqs, D)
        self.null = nn.Parameter(torch.randn(D) * 0.02)
        self.blocks = transformer_blocks(cfg)  # no positional embedding: the objects are a set
        self.norm = nn.LayerNorm(D)

    def forward(self, box_classes: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """box_classes (B, K) with -1 = padding, boxes (B, K, 4) -> context (B, 1 + K, D),
        mask (B, 1 + K)."""
        B, K = box_classes.shape
        real = box_classes >= 0  # (B, K)
        angles = boxes[..., None] * self.freqs  # (B, K, 4, F)
        fourier = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(2)  # (B, K, 8F)
        objects = self.class_emb(box_classes.clamp(min=0)) + self.box_proj(fourier)  # (B, K, D)
        # padding carries nothing, whatever its box says
        objects = torch.where(real[..., None], objects, 0.0)
        h = torch.cat([self.null.expand(B, 1, -1), objects], dim=1)  # (B, 1 + K, D)
        # the null token only if no object
        mask = torch.cat([~real.any(dim=1, keepdim=True), real], dim=1)
        return self.norm(run_blocks(self.blocks, h, mask)), mask


def batch_size(condition: list[str] | Tensor | dict) -> int:
    """How many conditions a batch holds: captions, class ids or a layout dict."""
    return len(condition["box_classes"]) if isinstance(condition, dict) else len(condition)


class ConditionEncoder(nn.Module):
    """Condition -> (context (B, L, D), context_mask (B, L)) for the UNet, plus the null condition.

    encoder(["a red circle in the top left", ...]) for kind="text",
    encoder(torch.tensor([3, 7])) for kind="class" (ids in 0..num_classes-1; num_classes is the
    null class),
    encoder({"box_classes": (B, K) int64, "boxes": (B, K, 4) float}) for kind="layout": the keys and
    conventions of a ShapesDataset batch (class -1 pads; boxes (x0, y0, x1, y1) in [0, 1];
    K <= max_objects; other keys are ignored). The empty layout (every class -1) is the null
    condition.
    """

    def __init__(self, cfg: ConditionConfig):
        super().__init__()
        if cfg.kind not in ("text", "class", "layout", "none"):
            raise ValueError(f"unknown condition kind {cfg.kind!r}; "
                             "choose 'text', 'class', 'layout' or 'none'")
        self.cfg = cfg
        self.text = TextEncoder(cfg) if cfg.kind == "text" else None
        if cfg.kind in ("class", "layout") and cfg.num_classes < 1:
            raise ValueError(f"a {cfg.kind} condition needs num_classes >= 1")
        self.class_emb = (nn.Embedding(cfg.num_classes + 1, cfg.context_dim)
                          if cfg.kind == "class" else None)
        self.layout = LayoutEncoder(cfg) if cfg.kind == "layout" else None

    @property
    def context_dim(self) -> int | None:
        """What the UNet's `context_dim` must be (None: no cross-attention)."""
        return None if self.cfg.kind == "none" else self.cfg.context_dim

    def null_condition(self, n: int) -> list[str] | Tensor | dict | None:
        """The condition that means "no condition": the empty caption, the extra null class, the
        empty layout."""
        if self.cfg.kind == "text":
            return [""] * n
        if self.cfg.kind == "class":
            return torch.full((n,), self.cfg.num_classes, dtype=torch.long)
        if self.cfg.kind == "layout":
            K = self.cfg.max_objects
            return {"box_classes": torch.full((n, K), -1, dtype=torch.long),
                    "boxes": torch.zeros(n, K, 4)}
        return None

    def drop(self, condition: list[str] | Tensor | dict, drop: Tensor):
        """The conditions with those where `drop` (B,) bool is True replaced by the null condition
        (CFG training: the caller draws `drop` with probability p_uncond)."""
        n = batch_size(condition)
        drop = drop.cpu()
        null = self.null_condition(n)
        if self.cfg.kind == "text":
            return [null[i] if drop[i] else condition[i] for i in range(n)]
        if self.cfg.kind == "class":
            return torch.where(drop.to(condition.device), null.to(condition.device), condition)
        if self.cfg.kind == "layout":  # a dropped layout becomes empty: every object is padding
            box_classes, boxes = condition["box_classes"], condition["boxes"]
            drop = drop.to(box_classes.device)
            return {**condition, "box_classes": torch.where(drop[:, None], -1, box_classes),
                    "boxes": torch.where(drop[:, None, None], 0.0, boxes)}
        return condition

    def check_layout(self, box_classes: Tensor, boxes: Tensor) -> None:
        """One clear error for a malformed layout; padded objects (class -1) are not looked at."""
        if box_classes.ndim != 2 or box_classes.dtype != torch.long:
            raise ValueError(f"box_classes must be int64 of shape (B, K), got {box_classes.dtype} "
                             f"{tuple(box_classes.shape)}")
        B, K = box_classes.shape
        if boxes.shape != (B, K, 4) or not boxes.is_floating_point():
            raise ValueError(f"boxes must be float of shape ({B}, {K}, 4) to match box_classes, "
                             f"got {boxes.dtype} {tuple(boxes.shape)}")
        if K > self.cfg.max_objects:
            raise ValueError(f"a layout has {K} object slots; "
                             f"max_objects is {self.cfg.max_objects}")
        if (box_classes < -1).any() or (box_classes >= self.cfg.num_classes).any():
            raise ValueError(f"box class ids must be in 0..{self.cfg.num_classes - 1}, "
                             "or -1 for padding")
        real_boxes = boxes[box_classes >= 0]  # (N, 4)
        if not ((real_boxes >= 0) & (real_boxes <= 1)).all():  # (NaN fails too)
            raise ValueError("boxes must be (x0, y0, x1, y1) fractions of the image side, "
                             "in [0, 1]")
        x0, y0, x1, y1 = real_boxes.unbind(-1)
        if not ((x0 <= x1) & (y0 <= y1)).all():
            raise ValueError("boxes must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1")

    def forward(self, condition: list[str] | Tensor | dict | None) -> dict:
        """Keyword arguments for the UNet: {"context": (B, L, D), "context_mask": (B, L)}, or {}."""
        device = next(self.parameters()).device if self.cfg.kind != "none" else None
        if self.cfg.kind == "text":
            # Always max_len tokens: conditional and null contexts then batch together for guidance,
            # and shapes stay static (torch.compile, CUDA graphs). Padding is never attended to.
            ids, mask = self.text.tokenizer(list(condition), self.cfg.max_len)
            ids, mask = ids.to(device), mask.to(device)
            return {"context": self.text(ids, mask), "context_mask": mask}
        if self.cfg.kind == "class":
            condition = torch.as_tensor(condition, device=device)
            if condition.min() < 0 or condition.max() > self.cfg.num_classes:
                raise ValueError(f"class ids must be in 0..{self.cfg.num_classes} "
                                 "(the last is the null class)")
            return {"context": self.class_emb(condition)[:, None, :]}  # (B, 1, D)
        if self.cfg.kind == "layout":
            if not isinstance(condition, dict):
                raise ValueError("a layout condition is a dict "
                                 "{'box_classes': (B, K), 'boxes': (B, K, 4)}")
            box_classes, boxes = condition["box_classes"].to(device), condition["boxes"].to(device)
            self.check_layout(box_classes, boxes)
            # Pad to max_objects, for the same reason text pads to max_len.
            pad = self.cfg.max_objects - box_classes.shape[1]
            box_classes = nn.functional.pad(box_classes, (0, pad), value=-1)  # (B, max_objects)
            boxes = nn.functional.pad(boxes.float(), (0, 0, 0, pad))  # (B, max_objects, 4)
            context, mask = self.layout(box_classes, boxes)
            # (B, 1 + max_objects, D), (B, 1 + max_objects)
            return {"context": context, "context_mask": mask}
        return {}
