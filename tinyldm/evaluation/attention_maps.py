"""Attention maps: the softmax probabilities of a model's attention layers, for looking at them.

The model runs unchanged (fused kernel or not); a forward hook on each `blocks.Attention` layer
recomputes its queries and keys from the layer's own inputs and applies the paper's formula,
`blocks.attention_weights` (LDM Sec. 3.3), so the maps cost one extra projection per layer and
change no output. Cross-attention maps say which tokens of tau(y) each latent pixel reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from tinyldm.blocks import Attention, attention_weights


def probabilities(layer: Attention, x: Tensor, context: Tensor | None = None,
                  mask: Tensor | None = None) -> Tensor:
    """The (B, heads, N, L) probabilities that `layer` uses for queries x (B, N, C) over `context`
    (B, L, D), or over x itself; mask (B, L) is True where keys count."""
    B, N, C = x.shape
    context = x if context is None else context
    q, k = layer.to_q(x), layer.to_k(context)
    q, k = (a.reshape(B, -1, layer.heads, C // layer.heads).transpose(1, 2) for a in (q, k))
    return attention_weights(q, k, mask=mask)


@contextmanager
def record_attention(model: nn.Module, *, cross_only: bool = True) -> Iterator[dict[str, Tensor]]:
    """Inside the `with` block, every forward of `model` leaves the probabilities of its attention
    layers in the yielded dict: {module name: (B, heads, N, L)}, N = h * w latent pixels of that
    level, L = context tokens. Each forward overwrites the last one; read them in between (e.g. in
    a sampler callback). Cross-attention only by default. The hooks are removed on exit.
    """
    maps: dict[str, Tensor] = {}

    def hook(name: str):
        def save(layer: Attention, args: tuple, kwargs: dict, output: Tensor) -> None:
            inputs = dict(zip(("x", "context", "mask"), args, strict=False)) | kwargs
            with torch.no_grad():
                maps[name] = probabilities(layer, **inputs)
        return save

    handles = [m.register_forward_hook(hook(name), with_kwargs=True)
               for name, m in model.named_modules()
               if isinstance(m, Attention) and (m.is_cross or not cross_only)]
    try:
        yield maps
    finally:
        for h in handles:
            h.remove()
