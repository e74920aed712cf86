"""LDMBert: the text encoder tau_theta of the paper's text-to-image model, and its WordPiece
tokenizer.

Contract with the paper
-----------------------
LDM (Rombach et al., arXiv 2112.10752), Sec. 4.3.1: for text-to-image on LAION-400M, tau_theta is "a
transformer" trained from scratch together with the UNet (Eq. 3), reading a BERT tokenization of the
prompt. The released model (CompVis' txt2img-1p4B config, `BERTEmbedder` with n_embed 1280, n_layer
32):

    ids      = [CLS] wordpieces(prompt) [SEP] [PAD] ...     always 77 tokens, cut at 77 (uncased
                                                             BERT vocabulary)
    h        = token_emb(ids) + pos_emb(0..76)               learned absolute positions
    for each of the 32 layers (pre-LN):
        h    = h + out(attention(LN(h)))                     8 heads of 64 (inner width 512),
                                                             q/k/v without bias
        h    = h + fc2(GELU(fc1(LN(h))))                     1280 -> 5120 -> 1280
    context  = LN(h)                                         (B, 77, 1280): what the UNet
                                                             cross-attends to

There is no attention mask: the padding tokens are attended to, and the empty prompt "" (the null
condition of classifier-free guidance) is [CLS] [SEP] and 75 [PAD]s run through the same network.

Weights come from diffusers' `LDMBertModel` folder (`bert/`): `model.*` is the encoder above;
`to_logits` (the masked-language-model head, 1280 -> 30522) is not used to condition the UNet and is
not loaded.

The tokenizer is BERT's uncased WordPiece (lower-case, accents stripped, punctuation split, the
longest vocabulary prefix first, `##` for a word's continuation), run by the `tokenizers` package
from the release's `tokenizer/` folder (`tokenizer.json`, or `vocab.txt`): the `pretrained` extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyldm.cli import UsageError


@dataclass
class LDMBertConfig:
    vocab_size: int = 30522
    max_len: int = 77  # tokens, [CLS] and [SEP] included; also the number of learned positions
    width: int = 1280  # d_model: the context width the UNet reads
    layers: int = 32
    heads: int = 8
    head_dim: int = 64  # inner attention width heads * head_dim = 512, narrower than the model
    ffn: int = 5120

    @classmethod
    def from_diffusers(cls, config: dict) -> LDMBertConfig:
        """From diffusers' LDMBertConfig (bert/config.json); what this encoder cannot express is
        refused."""
        if config.get("activation_function", "gelu") != "gelu":
            raise ValueError(f"activation_function {config['activation_function']!r}: tinyldm's "
                             "LDMBert uses GELU")
        if config.get("scale_embedding", False):
            raise ValueError("scale_embedding=True (token embeddings times sqrt(d_model)) is not "
                             "supported")
        return cls(vocab_size=config.get("vocab_size", 30522),
                   max_len=config.get("max_position_embeddings", 77),
                   width=config.get("d_model", 1280), layers=config.get("encoder_layers", 32),
                   heads=config.get("encoder_attention_heads", 8),
                   head_dim=config.get("head_dim", 64), ffn=config.get("encoder_ffn_dim", 5120))


class LDMBertLayer(nn.Module):
    """One pre-LN transformer layer: self-attention (no q/k/v bias), then a GELU MLP, each added to
    h."""

    def __init__(self, cfg: LDMBertConfig):
        super().__init__()
        self.heads, inner = cfg.heads, cfg.heads * cfg.head_dim
        self.norm1 = nn.LayerNorm(cfg.width)
        self.to_q = nn.Linear(cfg.width, inner, bias=False)
        self.to_k = nn.Linear(cfg.width, inner, bias=False)
        self.to_v = nn.Linear(cfg.width, inner, bias=False)
        self.to_out = nn.Linear(inner, cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width)
        self.fc1 = nn.Linear(cfg.width, cfg.ffn)
        self.fc2 = nn.Linear(cfg.ffn, cfg.width)

    def forward(self, h: Tensor) -> Tensor:
        B, L, _ = h.shape
        x = self.norm1(h)
        q, k, v = (proj(x).view(B, L, self.heads, -1).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))
        # softmax(q k^T / sqrt(head_dim)) v, every token sees every token
        a = F.scaled_dot_product_attention(q, k, v)
        h = h + self.to_out(a.transpose(1, 2).reshape(B, L, -1))
        return h + self.fc2(F.gelu(self.fc1(self.norm2(h))))  # exact (erf) GELU


class LDMBert(nn.Module):
    """Token ids (B, L <= max_len) -> context (B, L, width)."""

    def __init__(self, cfg: LDMBertConfig):
        super().__init__()
        self.cfg = cfg
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.width)
        self.layers = nn.ModuleList(LDMBertLayer(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.token_emb(ids) + self.pos_emb(torch.arange(ids.shape[1], device=ids.device))
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


class WordPieceTokenizer:
    """The release's uncased BERT WordPiece tokenizer, always `max_len` ids: [CLS] pieces [SEP]
    [PAD]...

    A prompt longer than max_len - 2 pieces is cut (as the release was trained and is sampled);
    `truncated` tells which prompts lost pieces, so callers can say so."""

    def __init__(self, folder: str | Path, max_len: int = 77):
        try:
            from tokenizers import Tokenizer
            from tokenizers.implementations import BertWordPieceTokenizer
        except ImportError as e:
            raise UsageError("the text-to-image release's tokenizer needs the `tokenizers` "
                             "package: pip install -e '.[pretrained]'") from e
        folder = Path(folder)
        if (folder / "tokenizer.json").exists():
            self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.txt").exists():
            self.tok = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=True,
                                              strip_accents=None)
        else:
            raise FileNotFoundError(f"{folder} has neither tokenizer.json nor vocab.txt")
        self.max_len = max_len
        self.pad_id = self.tok.token_to_id("[PAD]")
        if self.pad_id is None or self.tok.token_to_id("[CLS]") is None:
            raise ValueError(f"{folder}: not a BERT vocabulary (no [PAD] or [CLS] token)")
        self.tok.no_padding()
        self.tok.no_truncation()

    def pieces(self, text: str) -> list[str]:
        """The word pieces of one prompt, without [CLS] / [SEP]:
        'Squirrels!' -> ['squirrel', '##s', '!']"""
        return self.tok.encode(text, add_special_tokens=False).tokens

    def truncated(self, texts: list[str]) -> list[bool]:
        return [len(self.tok.encode(t, add_special_tokens=False).ids) > self.max_len - 2
                for t in texts]

    def __call__(self, texts: list[str]) -> Tensor:
        ids = torch.full((len(texts), self.max_len), self.pad_id, dtype=torch.long)
        cls_id, sep_id = self.tok.token_to_id("[CLS]"), self.tok.token_to_id("[SEP]")
        for i, text in enumerate(texts):
            pieces = self.tok.encode(text, add_special_tokens=False).ids[: self.max_len - 2]
            ids[i, : len(pieces) + 2] = torch.tensor([cls_id, *pieces, sep_id])
        return ids


class LDMBertCondition(nn.Module):
    """tau_theta for tinyldm's Denoiser: a list of prompts -> {"context": (B, 77, 1280)}; the null
    prompt is ""."""

    def __init__(self, bert: LDMBert, tokenizer: WordPieceTokenizer):
        super().__init__()
        self.bert, self.tokenizer = bert, tokenizer

    @property
    def context_dim(self) -> int:
        return self.bert.cfg.width

    def null_condition(self, n: int) -> list[str]:
        return [""] * n

    def forward(self, prompts: list[str]) -> dict:
        ids = self.tokenizer(list(prompts)).to(self.bert.token_emb.weight.device)
        return {"context": self.bert(ids)}  # no context_mask: the release attends to its padding


# --- Conversion from diffusers' LDMBertModel ------------------------------------------------------

_LAYER = {"self_attn_layer_norm": "norm1", "self_attn.q_proj": "to_q", "self_attn.k_proj": "to_k",
          "self_attn.v_proj": "to_v", "self_attn.out_proj": "to_out", "final_layer_norm": "norm2",
          "fc1": "fc1", "fc2": "fc2"}
UNUSED = ("to_logits.",)  # the masked-LM head of LDMBertModel: not part of tau_theta


def key_map(cfg: LDMBertConfig) -> dict[str, str]:
    """diffusers name -> tinyldm name, for every tensor of tau_theta."""
    names = {"model.embed_tokens.weight": "token_emb.weight",
             "model.embed_positions.weight": "pos_emb.weight",
             "model.layer_norm.weight": "norm.weight", "model.layer_norm.bias": "norm.bias"}
    for i in range(cfg.layers):
        for theirs, ours in _LAYER.items():
            for p in (("weight",) if theirs.endswith(("q_proj", "k_proj", "v_proj"))
                      else ("weight", "bias")):
                names[f"model.layers.{i}.{theirs}.{p}"] = f"layers.{i}.{ours}.{p}"
    return names


def ldmbert_state_dict(state: dict[str, Tensor], cfg: LDMBertConfig) -> dict[str, Tensor]:
    """diffusers' LDMBertModel state dict -> LDMBert's; every encoder tensor must be used and every
    slot filled."""
    names = key_map(cfg)
    unused = [k for k in state if k not in names and not k.startswith(UNUSED)]
    missing = [k for k in names if k not in state]
    if unused or missing:
        raise ValueError(f"LDMBert weights do not match the config: {len(missing)} tinyldm tensors "
                         f"unfilled ({[names[k] for k in missing][:5]}), {len(unused)} diffusers "
                         f"tensors unused ({unused[:5]})")
    out = {ours: state[theirs] for theirs, ours in names.items()}
    with torch.device("meta"):  # the target's shapes, without allocating its weights
        target = LDMBert(cfg).state_dict()
    wrong = [f"{n} {tuple(t.shape)} vs {tuple(target[n].shape)}" for n, t in out.items()
             if n in target and tuple(t.shape) != tuple(target[n].shape)]
    if wrong or set(out) != set(target):
        raise ValueError(f"LDMBert weights do not match the config: shapes differ: {wrong[:3]}, "
                         f"names differ: {sorted(set(out) ^ set(target))[:3]}")
    return out


def build_ldmbert(config: dict, state: dict[str, Tensor]) -> LDMBert:
    cfg = LDMBertConfig.from_diffusers(config)
    weights = ldmbert_state_dict(state, cfg)  # checked against cfg's shapes before building
    bert = LDMBert(cfg)
    bert.load_state_dict(weights)
    return bert.eval()


def ldmbert_from_diffusers(model: nn.Module) -> LDMBert:
    """A diffusers LDMBertModel instance -> tinyldm's LDMBert (same weights)."""
    return build_ldmbert(model.config.to_dict(), model.state_dict())
