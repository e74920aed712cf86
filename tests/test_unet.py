"""The UNet: shapes, conditioning behaviour, attention against the explicit formula, gradients,
overfitting."""

import math

import pytest
import torch
import torch.nn.functional as F

from tinyldm.blocks import Attention, attention_weights
from tinyldm.evaluation.attention_maps import probabilities, record_attention
from tinyldm.unet import UNet, UNetConfig, timestep_embedding


def small_config(**overrides) -> UNetConfig:
    base = dict(in_channels=4, out_channels=4, latent_size=8, channels=32, channel_mult=(1, 2),
                num_res_blocks=1, attn_resolutions=(4,), head_dim=16, context_dim=24, norm_groups=8)
    return UNetConfig(**{**base, **overrides})


def randomize_zero_layers(model: torch.nn.Module) -> None:
    """The zero-initialised output layers make a fresh UNet ignore everything; give them weights."""
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 1, 500])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8)
    assert torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # t = 0: cos = 1, sin = 0
    freqs = [10000 ** (-k / 4) for k in range(4)]
    expect = [math.cos(500 * f) for f in freqs] + [math.sin(500 * f) for f in freqs]
    assert torch.allclose(emb[2], torch.tensor(expect), atol=1e-4)


@pytest.mark.parametrize("overrides,shape", [
    ({}, (2, 4, 8, 8)),
    ({"context_dim": None}, (2, 4, 8, 8)),
    ({"in_channels": 3, "out_channels": 6, "channel_mult": (1, 2, 2), "attn_resolutions": (8, 2),
      "scale_shift_norm": False, "num_res_blocks": 2}, (2, 3, 8, 8)),
    ({"concat_channels": 5, "num_classes": 7, "context_dim": None, "mid_attention": False},
     (2, 4, 8, 8)),
    ({}, (2, 4, 16, 24)),  # beyond the training size and non-square: the UNet is convolutional
])
def test_output_shape(overrides, shape):
    cfg = small_config(**overrides)
    model = UNet(cfg).eval()
    B, C, H, W = shape
    kwargs = {}
    if cfg.context_dim:
        kwargs["context"] = torch.randn(B, 5, cfg.context_dim)
    if cfg.concat_channels:
        kwargs["concat"] = torch.randn(B, cfg.concat_channels, H, W)
    if cfg.num_classes:
        kwargs["class_labels"] = torch.tensor([0, 6])
    out = model(torch.randn(shape), torch.tensor([3, 999]), **kwargs)
    assert out.shape == (B, cfg.out_channels, H, W)


def test_context_changes_output_but_padded_tokens_do_not():
    model = UNet(small_config()).eval()
    randomize_zero_layers(model)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    context = torch.randn(2, 6, 24)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    with torch.no_grad():
        out = model(x, t, context=context, context_mask=mask)
        other_context = model(x, t, context=torch.randn(2, 6, 24), context_mask=mask)
        assert not torch.allclose(out, other_context, atol=1e-3)
        other = context.clone()
        other[0, 4:] = 100 * torch.randn(2, 24)  # only padded positions of sample 0 change
        out2 = model(x, t, context=other, context_mask=mask)
        assert torch.allclose(out, out2, atol=1e-5)
        # Padding is the same as leaving the tokens out.
        out3 = model(x[:1], t[:1], context=context[:1, :4])
        assert torch.allclose(out[:1], out3, atol=1e-5)


def test_fused_attention_equals_explicit_softmax():
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.rand(2, 7) > 0.4
    mask[:, 0] = True
    for m in [None, mask]:
        attn_mask = None if m is None else m[:, None, None, :]
        fused = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        assert torch.allclose(fused, attention_weights(q, k, mask=m) @ v, atol=1e-5)
    # And against the formula written out longhand for one head of one sample.
    s = (q[1, 2] @ k[1, 2].T) / math.sqrt(8)
    s[:, ~mask[1]] = -float("inf")
    w = attention_weights(q, k, mask=mask)
    assert torch.allclose(w[1, 2] @ v[1, 2], torch.softmax(s, -1) @ v[1, 2], atol=1e-5)
    # Whole model: the fused path and the explicit path (fused_attention=False) agree, for both
    # attention blocks.
    for overrides in [{}, {"attention_block": "plain", "context_dim": None}]:
        model = UNet(small_config(**overrides)).eval()
        randomize_zero_layers(model)
        explicit = UNet(small_config(**overrides, fused_attention=False)).eval()
        explicit.load_state_dict(model.state_dict())
        assert all(m.fused for m in model.modules() if isinstance(m, Attention))
        assert all(not m.fused for m in explicit.modules() if isinstance(m, Attention))
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 50])
        cond = {} if overrides else {"context": torch.randn(2, 3, 24)}
        with torch.no_grad():
            assert torch.allclose(model(x, t, **cond), explicit(x, t, **cond), atol=1e-5)


def test_recorded_attention_maps_are_the_softmax_and_change_nothing():
    """evaluation.attention_maps.record_attention: the probabilities each layer applies,
    recomputed by a hook from the layer's own inputs; the model's output is bit for bit the same."""
    model = UNet(small_config(attn_resolutions=(8, 4))).eval()
    randomize_zero_layers(model)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 6, 24)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    with torch.no_grad():
        plain = model(x, t, context=context, context_mask=mask)
        with record_attention(model) as maps:
            recorded = model(x, t, context=context, context_mask=mask)
    # One cross-attention per transformer block: down 8 and 4, mid, up 4 (x2) and 8 (x2).
    assert len(maps) == 7 and all(name.endswith("cross_attn") for name in maps)
    assert torch.equal(recorded, plain)
    for name, w in maps.items():
        # (B, heads, h * w, L): 8 x 8 latent pixels with 32 channels = 2 heads, or 4 x 4 with 64 = 4
        # heads.
        assert tuple(w.shape) in [(2, 2, 64, 6), (2, 4, 16, 6)], (name, tuple(w.shape))
        # Each query's row is a distribution; padded tokens get weight 0.
        assert torch.allclose(w.sum(-1), torch.ones(()), atol=1e-5)
        assert torch.equal(w[0, ..., 4:], torch.zeros_like(w[0, ..., 4:]))
        assert (w[1] > 0).all()  # sample 1 has no padding
    # The hooks are gone after the block; with cross_only=False self-attention is recorded too.
    kept = dict(maps)
    with torch.no_grad():
        model(x, t, context=context, context_mask=mask)
    assert maps.keys() == kept.keys() and all(maps[name] is kept[name] for name in kept)
    with torch.no_grad(), record_attention(model, cross_only=False) as maps:
        model(x, t, context=context, context_mask=mask)
    self_w = [w for name, w in maps.items() if name.endswith("self_attn")]
    assert len(maps) == 14 and len(self_w) == 7 and all(w.shape[-1] == w.shape[-2] for w in self_w)


def test_recorded_probabilities_are_the_ones_the_layer_applies():
    """Those probabilities times the layer's values, through its output projection, give the
    layer's output."""
    layer = Attention(16, 8, context_dim=12)
    x, context = torch.randn(2, 5, 16), torch.randn(2, 3, 12)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    with torch.no_grad():
        w = probabilities(layer, x, context, mask)  # (B, heads, N, L)
        v = layer.to_v(context).reshape(2, 3, 2, 8).transpose(1, 2)  # (B, heads, L, d)
        out = layer.to_out((w @ v).transpose(1, 2).reshape(2, 5, 16))
        assert torch.allclose(out, layer(x, context, mask), atol=1e-5)


def test_every_parameter_gets_a_gradient():
    cfg = small_config(num_classes=3, concat_channels=2, channel_mult=(1, 2, 2),
                       attn_resolutions=(8, 4, 2))
    model = UNet(cfg)
    randomize_zero_layers(model)
    kwargs = dict(context=torch.randn(3, 4, 24), class_labels=torch.tensor([0, 1, 2]),
                  concat=torch.randn(3, 2, 8, 8))
    model(torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), **kwargs).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_small_unet_overfits_one_batch():
    model = UNet(small_config(dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    x, t, c = torch.randn(4, 4, 8, 8), torch.tensor([1, 200, 600, 999]), torch.randn(4, 3, 24)
    target = torch.randn(4, 4, 8, 8)
    losses = []
    for _ in range(150):
        loss = (model(x, t, context=c) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.8 and losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])


def test_gradient_checkpointing_gives_the_same_gradients():
    a = UNet(small_config())
    randomize_zero_layers(a)
    b = UNet(small_config(gradient_checkpointing=True))
    b.load_state_dict(a.state_dict())
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([3, 300]), torch.randn(2, 3, 24)
    for m in (a, b):
        m(x, t, context=c).square().sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), n


def test_channels_last_and_bf16_autocast_agree_with_fp32():
    model = UNet(small_config()).eval()
    randomize_zero_layers(model)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([3, 300]), torch.randn(2, 3, 24)
    with torch.no_grad():
        ref = model(x, t, context=c)
        model = model.to(memory_format=torch.channels_last)
        cl = model(x.to(memory_format=torch.channels_last), t, context=c)
        assert torch.allclose(ref, cl, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, context=c)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().mean() < 0.05 * ref.abs().mean()


@pytest.mark.slow
def test_compiles_without_graph_breaks():
    """Dynamo traces the whole forward and backward (aot_eager: no C++ compiler needed, and
    fast)."""
    model = UNet(small_config())
    randomize_zero_layers(model)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([3, 300]), torch.randn(2, 3, 24)
    mask = torch.ones(2, 3, dtype=torch.bool)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x, t, context=c, context_mask=mask)
    out.sum().backward()
    assert torch.allclose(out, model(x, t, context=c, context_mask=mask), atol=1e-5)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="attn_resolutions"):
        UNet(small_config(attn_resolutions=(3,)))
    with pytest.raises(ValueError, match="norm_groups"):
        UNet(small_config(channels=20))
    with pytest.raises(ValueError, match="head_dim"):
        UNet(small_config(head_dim=24))
    model = UNet(small_config())
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([1])
    with pytest.raises(ValueError, match="context"):
        model(x, t)
    with pytest.raises(ValueError, match="context must have shape"):
        model(x, t, context=torch.randn(1, 3, 7))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 4, 7, 7), t, context=torch.randn(1, 3, 24))
    with pytest.raises(ValueError, match="at least one True"):
        model(x, t, context=torch.randn(1, 3, 24), context_mask=torch.zeros(1, 3, dtype=torch.bool))


def test_plain_attention_block_is_residual_multi_head_self_attention():
    """attention_block="plain" (the paper's unconditional UNets): x + W_o softmax(q k^T / sqrt(d)) v
    over the H * W positions of GroupNorm(x), per head; no feed-forward, no cross-attention."""
    from tinyldm.unet import SelfAttentionBlock

    cfg = UNetConfig(head_dim=8, norm_groups=4, context_dim=None, attention_block="plain")
    block = SelfAttentionBlock(16, cfg)
    torch.nn.init.normal_(block.attn.to_out.weight, std=0.2)  # zero-initialised: make it count
    x = torch.randn(2, 16, 3, 5)
    normed = torch.nn.functional.group_norm(x, 4, block.norm.weight, block.norm.bias, eps=1e-6)
    tokens = normed.flatten(2).mT  # (B, HW, C)
    a = block.attn
    q, k, v = (m(tokens).reshape(2, 15, 2, 8).transpose(1, 2) for m in (a.to_q, a.to_k, a.to_v))
    heads = torch.softmax(q @ k.mT / math.sqrt(8), dim=-1) @ v  # (B, heads, HW, d)
    expected = x + a.to_out(heads.transpose(1, 2).reshape(2, 15, 16)).mT.reshape(2, 16, 3, 5)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
    assert not any("ff" in name or "cross" in name for name, _ in block.named_parameters())


def test_plain_attention_needs_no_context_and_known_names():
    with pytest.raises(ValueError, match="no cross-attention"):
        UNet(UNetConfig(context_dim=32, attention_block="plain"))
    with pytest.raises(ValueError, match="attention_block must be"):
        UNet(UNetConfig(attention_block="linear"))
    model = UNet(UNetConfig(latent_size=8, channels=32, channel_mult=(1, 2), attn_resolutions=(4,),
                            attention_block="plain"))
    assert model(torch.randn(2, 4, 8, 8), torch.tensor([1, 999])).shape == (2, 4, 8, 8)
