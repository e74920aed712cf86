"""tinyldm.pretrained: released diffusers-format models converted into tinyldm's own modules, checked against
diffusers itself on random weights (every parameter drawn, norm affines included), offline."""

import pytest
import torch

from tinyldm.unet import UNet, UNetConfig

diffusers = pytest.importorskip("diffusers", reason="the reference implementation: pip install -e '.[dev]'")

from tinyldm.pretrained.unet import unet_config, unet_from_diffusers, unet_state_dict  # noqa: E402

# The released CelebA-HQ LDM-4 UNet's block structure (UNet2DModel's defaults are that model's): plain attention
# at the three lower levels, additive timestep embedding, GroupNorm eps 1e-5, head width 32.
CELEBAHQ = dict(down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                layers_per_block=2, attention_head_dim=32, norm_eps=1e-5, in_channels=3, out_channels=3)


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter replaced by a draw (zero-initialised output convs and unit norm weights would hide
    mismatched names); scaled so that activations stay O(1) through the network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.2
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if p.ndim == 1 and "norm" in name
                                                                    and name.endswith("weight") else 0.0))
    return model.eval()


@pytest.mark.parametrize("variant", ["celebahq", "scale_shift", "concat"])
def test_a_converted_unet_computes_what_diffusers_computes(variant):
    """The released layouts at a quarter of their width: the same outputs to float32 rounding."""
    kw = dict(CELEBAHQ, sample_size=16, block_out_channels=(32, 64, 96, 128))
    concat = 0
    if variant == "scale_shift":
        kw.update(resnet_time_scale_shift="scale_shift", add_attention=False,
                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
    if variant == "concat":  # the super-resolution release: z_t and the low-res image stacked, 6 -> 3 channels
        kw.update(in_channels=6, block_out_channels=(32, 64, 64, 128))
        concat = 3
    reference = randomised(diffusers.UNet2DModel(**kw))
    ours = unet_from_diffusers(reference, concat_channels=concat)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([3, 911])
    c = torch.randn(2, 3, 16, 16, generator=g) if concat else None
    with torch.no_grad():
        want = reference(x if c is None else torch.cat([x, c], 1), t).sample
        got = ours(x, t, concat=c)
    assert want.abs().max() > 0.1  # a real signal, not zeros on both sides
    assert (got - want).abs().max() < 1e-5 * max(1.0, float(want.abs().max()))


def test_every_tensor_of_the_full_size_celebahq_unet_is_mapped():
    """At full size (274 M parameters, built on the meta device: names and shapes only), every diffusers tensor
    has exactly one place in tinyldm's UNet and every tinyldm tensor is filled."""
    with torch.device("meta"):
        reference = diffusers.UNet2DModel(**CELEBAHQ, sample_size=64)
    cfg = unet_config(dict(reference.config))
    assert (cfg.channels, cfg.channel_mult, cfg.attn_resolutions, cfg.head_dim) == (224, (1, 2, 3, 4), (32, 16, 8), 32)
    state = reference.state_dict()
    converted = unet_state_dict(state, cfg)
    assert len(converted) == len(state)
    n = sum(v.numel() for v in converted.values())
    assert n == sum(p.numel() for p in reference.parameters()) and 273e6 < n < 275e6
    with torch.device("meta"):
        assert set(converted) == set(UNet(cfg).state_dict())


def test_a_missing_or_extra_tensor_is_named():
    reference = diffusers.UNet2DModel(**CELEBAHQ, sample_size=16, block_out_channels=(32, 64, 96, 128))
    cfg = unet_config(dict(reference.config))
    state = reference.state_dict()
    dropped = {k: v for k, v in state.items() if k != "mid_block.attentions.0.to_q.bias"}
    with pytest.raises(ValueError, match=r"1 tinyldm tensors unfilled \(\['mid.1.attn.to_q.bias'\]"):
        unet_state_dict(dropped, cfg)
    with pytest.raises(ValueError, match=r"1 diffusers tensors unused \(\['extra.weight'\]"):
        unet_state_dict({**state, "extra.weight": torch.zeros(1)}, cfg)


@pytest.mark.parametrize("key, value", [("class_embed_type", "timestep"), ("freq_shift", 1),
                                        ("time_embedding_type", "fourier"), ("downsample_type", "resnet"),
                                        ("resnet_time_scale_shift", "scale_shift")])
def test_what_tinyldm_cannot_express_is_refused_by_name(key, value):
    """Including diffusers' scale-shift middle block, whose attention has no GroupNorm (CompVis' always has one)."""
    config = {**CELEBAHQ, "sample_size": 16, "block_out_channels": (32, 64, 96, 128), key: value}
    with pytest.raises(ValueError, match=key):
        unet_config(config)


def test_the_new_options_default_to_the_old_model():
    """norm_eps and qkv_bias default to what tinyldm always built: checkpoints made before load unchanged."""
    cfg = UNetConfig(latent_size=8, channels=32, channel_mult=(1, 2), attn_resolutions=(4,), attention_block="plain")
    unet = UNet(cfg)
    assert {m.eps for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)} == {1e-6}
    assert not any(k.endswith(("to_q.bias", "to_k.bias", "to_v.bias")) for k in unet.state_dict())
