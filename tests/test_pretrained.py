"""tinyldm.pretrained: released diffusers-format models converted into tinyldm's own modules,
checked against diffusers itself on random weights (every parameter drawn, norm affines included),
offline."""

import pytest
import torch

from tinyldm.unet import UNet, UNetConfig

diffusers = pytest.importorskip("diffusers",
                                reason="the reference implementation: pip install -e '.[dev]'")

from tinyldm.pretrained.unet import unet_config, unet_from_diffusers, unet_state_dict  # noqa: E402

# The released CelebA-HQ LDM-4 UNet's block structure (UNet2DModel's defaults are that model's):
# plain attention at the three lower levels, additive timestep embedding, GroupNorm eps 1e-5, head
# width 32.
CELEBAHQ = dict(down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                  "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                layers_per_block=2, attention_head_dim=32, norm_eps=1e-5, in_channels=3,
                out_channels=3)


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter replaced by a draw (zero-initialised output convs and unit norm weights would
    hide mismatched names); scaled so that activations stay O(1) through the network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.2
            p.copy_(torch.randn(p.shape, generator=g) * scale
                    + (1.0 if p.ndim == 1 and "norm" in name and name.endswith("weight") else 0.0))
    return model.eval()


@pytest.mark.parametrize("variant", ["celebahq", "scale_shift", "concat"])
def test_a_converted_unet_computes_what_diffusers_computes(variant):
    """The released layouts at a quarter of their width: the same outputs to float32 rounding."""
    kw = dict(CELEBAHQ, sample_size=16, block_out_channels=(32, 64, 96, 128))
    concat = 0
    if variant == "scale_shift":
        kw.update(resnet_time_scale_shift="scale_shift", add_attention=False,
                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                                    "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
    # the super-resolution release: z_t and the low-res image stacked, 6 -> 3 channels
    if variant == "concat":
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
    """At full size (274 M parameters, built on the meta device: names and shapes only), every
    diffusers tensor has exactly one place in tinyldm's UNet and every tinyldm tensor is filled."""
    with torch.device("meta"):
        reference = diffusers.UNet2DModel(**CELEBAHQ, sample_size=64)
    cfg = unet_config(dict(reference.config))
    assert (cfg.channels, cfg.channel_mult, cfg.attn_resolutions, cfg.head_dim) == (
        224, (1, 2, 3, 4), (32, 16, 8), 32)
    state = reference.state_dict()
    converted = unet_state_dict(state, cfg)
    assert len(converted) == len(state)
    n = sum(v.numel() for v in converted.values())
    assert n == sum(p.numel() for p in reference.parameters()) and 273e6 < n < 275e6
    with torch.device("meta"):
        assert set(converted) == set(UNet(cfg).state_dict())


def test_a_missing_or_extra_tensor_is_named():
    reference = diffusers.UNet2DModel(**CELEBAHQ, sample_size=16,
                                      block_out_channels=(32, 64, 96, 128))
    cfg = unet_config(dict(reference.config))
    state = reference.state_dict()
    dropped = {k: v for k, v in state.items() if k != "mid_block.attentions.0.to_q.bias"}
    with pytest.raises(ValueError,
                       match=r"1 tinyldm tensors unfilled \(\['mid.1.attn.to_q.bias'\]"):
        unet_state_dict(dropped, cfg)
    with pytest.raises(ValueError, match=r"1 diffusers tensors unused \(\['extra.weight'\]"):
        unet_state_dict({**state, "extra.weight": torch.zeros(1)}, cfg)


@pytest.mark.parametrize("key, value", [("class_embed_type", "timestep"), ("freq_shift", 1),
                                        ("time_embedding_type", "fourier"),
                                        ("downsample_type", "resnet"),
                                        ("resnet_time_scale_shift", "scale_shift")])
def test_what_tinyldm_cannot_express_is_refused_by_name(key, value):
    """Including diffusers' scale-shift middle block, whose attention has no GroupNorm (CompVis'
    always has one)."""
    config = {**CELEBAHQ, "sample_size": 16, "block_out_channels": (32, 64, 96, 128), key: value}
    with pytest.raises(ValueError, match=key):
        unet_config(config)


def test_the_new_options_default_to_the_old_model():
    """norm_eps and qkv_bias default to what tinyldm always built: checkpoints made before load
    unchanged."""
    cfg = UNetConfig(latent_size=8, channels=32, channel_mult=(1, 2), attn_resolutions=(4,),
                     attention_block="plain")
    unet = UNet(cfg)
    assert {m.eps for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)} == {1e-6}
    assert not any(k.endswith(("to_q.bias", "to_k.bias", "to_v.bias")) for k in unet.state_dict())


# ----------------------------------------------------------------------------------------------
# autoencoders

from tinyldm.autoencoder import Autoencoder, AutoencoderConfig  # noqa: E402
from tinyldm.pretrained.autoencoder import (  # noqa: E402
    autoencoder_config,
    autoencoder_from_diffusers,
    autoencoder_state_dict,
)

# the CelebA-HQ / super-resolution releases
VQ_F4 = dict(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
             layers_per_block=2, latent_channels=3, vq_embed_dim=3)
KL_F8 = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             layers_per_block=2, latent_channels=4)  # the text-to-image release


def test_a_converted_vq_autoencoder_encodes_quantizes_and_decodes_like_diffusers():
    reference = randomised(diffusers.VQModel(**VQ_F4, block_out_channels=(32, 64, 128),
                                             num_vq_embeddings=64))
    ours = autoencoder_from_diffusers(reference, regularizer="vq")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        # the latent before quantization (what the LDM sees)
        h_ref, h = reference.encode(x).latents, ours.encode(x)
        _, _, (_, _, indices_ref) = reference.quantize(h_ref)
        x_ref, x_rec = reference.decode(h_ref).sample, ours.decode(h_ref)  # both quantize first
    assert h.shape == (2, 3, 8, 8) and (h - h_ref).abs().max() < 1e-5 * float(h_ref.abs().max())
    assert torch.equal(ours.quantizer.lookup(h_ref).flatten(), indices_ref.flatten())
    assert len(indices_ref.unique()) > 8  # many codes in play, so the lookup is really compared
    assert (x_rec - x_ref).abs().max() < 1e-5 * float(x_ref.abs().max())


def test_a_converted_kl_autoencoder_has_diffusers_posterior_and_decoder():
    reference = randomised(diffusers.AutoencoderKL(**KL_F8, block_out_channels=(32, 64, 128, 128)))
    ours = autoencoder_from_diffusers(reference, regularizer="kl", scale_factor=0.5)
    g = torch.Generator().manual_seed(1)
    x, z = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.randn(2, 4, 4, 4, generator=g)
    with torch.no_grad():
        want, got = reference.encode(x).latent_dist, ours.posterior(x)
        x_ref, x_rec = reference.decode(z).sample, ours.decode(z)
    assert (got.mean - want.mean).abs().max() < 1e-5 and (got.std - want.std).abs().max() < 1e-5
    assert ((x_rec - x_ref).abs().max() < 1e-5 * float(x_ref.abs().max())
            and float(ours.scale_factor) == 0.5)


@pytest.mark.parametrize("name, kw, regularizer", [
    ("vq-f4", dict(VQ_F4, block_out_channels=(128, 256, 512), num_vq_embeddings=8192), "vq"),
    ("kl-f8", dict(KL_F8, block_out_channels=(128, 256, 512, 512)), "kl")])
def test_every_tensor_of_the_full_size_first_stages_is_mapped(name, kw, regularizer):
    """The released first stages at full size (built on the meta device): every diffusers tensor
    used once, every tinyldm weight filled, the same parameter count."""
    with torch.device("meta"):
        reference = (diffusers.VQModel if regularizer == "vq" else diffusers.AutoencoderKL)(**kw)
    cfg = autoencoder_config(dict(reference.config), regularizer=regularizer)
    assert cfg.downsample_factor == (4 if name == "vq-f4" else 8) and cfg.decoder_res_blocks == 3
    converted = autoencoder_state_dict(reference.state_dict(), cfg)
    with torch.device("meta"):
        ours = Autoencoder(cfg)
    assert (sum(p.numel() for p in ours.parameters())
            == sum(p.numel() for p in reference.parameters()))
    assert set(converted) == set(ours.state_dict())


def test_autoencoder_conversion_refuses_what_it_cannot_express():
    with pytest.raises(ValueError, match="vq_embed_dim"):
        autoencoder_config(dict(VQ_F4, block_out_channels=(32, 64), vq_embed_dim=4),
                           regularizer="vq")
    with pytest.raises(ValueError, match="down_block_types"):
        autoencoder_config(dict(KL_F8, block_out_channels=(32, 64, 64, 64),
                                down_block_types=("DownBlock2D",) * 4), regularizer="kl")


def test_the_autoencoder_options_default_to_the_old_model():
    """quant_conv and downsample_padding default to what tinyldm always built: old checkpoints load
    unchanged, and the asymmetric padding really is another function (one pixel on the right and
    bottom only)."""
    cfg = AutoencoderConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4)
    old = Autoencoder(cfg)
    assert not any("quant_conv" in k for k in old.state_dict())
    new = Autoencoder(AutoencoderConfig(**{**cfg.__dict__, "downsample_padding": "asymmetric"}))
    new.load_state_dict(old.state_dict())  # same tensors: only the padding differs
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert (old.encode(x).shape == new.encode(x).shape
                and not torch.allclose(old.encode(x), new.encode(x)))


# ----------------------------------------------------------------------------------------------
# whole pipelines

from tinyldm.pretrained import load  # noqa: E402


def _ldm_pipeline(tmp_path, *, steps_offset: int = 1, scaling_factor: float = 1.0):
    """A CelebA-HQ-shaped LDMPipeline at a quarter of the width with random weights, saved as
    diffusers saves it."""
    unet = randomised(diffusers.UNet2DModel(**CELEBAHQ, sample_size=8,
                                            block_out_channels=(32, 64, 96, 128)), 2)
    vqvae = randomised(diffusers.VQModel(**VQ_F4, block_out_channels=(32, 64, 128),
                                         num_vq_embeddings=64, scaling_factor=scaling_factor), 3)
    scheduler = diffusers.DDIMScheduler(beta_start=0.0015, beta_end=0.0195,
                                        beta_schedule="scaled_linear", clip_sample=False,
                                        set_alpha_to_one=True, steps_offset=steps_offset)
    pipe = diffusers.LDMPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "ldm-celebahq-256")
    return pipe, tmp_path / "ldm-celebahq-256"


def test_a_saved_pipeline_samples_the_same_images_through_tinyldm(tmp_path):
    """The whole loop: diffusers' LDMPipeline (DDIM, 10 steps, CompVis' spacing, scale 1) and
    tinyldm's sampler on the loaded folder, from the same starting noise, give the same images."""
    pipe, folder = _ldm_pipeline(tmp_path)
    # the folder's name is the CelebA-HQ release's: the paper's scale and schedule
    model = load(folder)
    assert float(model.autoencoder.scale_factor) == 1.0 and model.image_size == 32
    want = pipe(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                output_type="np").images  # (2, 32, 32, 3) in [0, 1]
    # what the pipeline drew
    z_T = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    got = (model.generate(2, steps=10, z_T=z_T) + 1) / 2
    want = torch.from_numpy(want).permute(0, 3, 1, 2)
    assert want.std() > 0.05 and (got - want).abs().max() < 1e-4


def test_the_hub_scale_factor_would_break_the_celebahq_release(tmp_path):
    """The released VQ config has no scaling_factor, so diffusers divides by its default 0.18215;
    tinyldm uses the paper's 1.0 for that release whatever the config says (and would read the
    config for an unknown folder)."""
    _, folder = _ldm_pipeline(tmp_path, scaling_factor=0.18215)
    assert float(load(folder).autoencoder.scale_factor) == 1.0
    renamed = folder.rename(tmp_path / "some-other-model")
    # VQ latents: unscaled unless told otherwise
    assert float(load(renamed).autoencoder.scale_factor) == 1.0


def test_loading_says_what_is_wrong(tmp_path, monkeypatch):
    import sys

    with pytest.raises(SystemExit, match="neither a folder nor a known release"):
        load(tmp_path / "nowhere")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(SystemExit, match=r"pip install -e '.\[pretrained\]'"):
        load("CompVis/ldm-celebahq-256")
    with pytest.raises(FileNotFoundError, match="no unet/"):
        load(tmp_path)


def test_sample_script_runs_a_released_model_folder(tmp_path):
    import sample

    pipe, folder = _ldm_pipeline(tmp_path)
    r = sample.main(["--pretrained", str(folder), "--n", "2", "--steps", "3", "--device", "cpu",
                     "--out", str(tmp_path / "grid.png")])
    assert r["images"] == 2 and (tmp_path / "grid.png").exists()
    for sampler in ("plms", "dpmpp"):
        r = sample.main(["--pretrained", str(folder), "--n", "1", "--steps", "3", "--sampler",
                         sampler, "--device", "cpu", "--out", str(tmp_path / f"{sampler}.png")])
        assert r["images"] == 1
    with pytest.raises(SystemExit, match="takes no --image"):
        sample.main(["--pretrained", str(folder), "--image", str(tmp_path / "grid.png"),
                     "--device", "cpu"])
    with pytest.raises(SystemExit, match="takes no --prompt"):
        sample.main(["--pretrained", str(folder), "--prompt", "a face", "--device", "cpu"])


SUPER_RES = dict(down_block_types=("DownBlock2D",) * 3 + ("AttnDownBlock2D",),
                 up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * 3, layers_per_block=2,
                 attention_head_dim=32, norm_eps=1e-5, in_channels=6,
                 out_channels=3)  # the super-resolution release's layout


def test_the_super_resolution_release_upscales_as_diffusers_pipeline_does(tmp_path):
    """The super-resolution layout (z_t and the low-res image stacked, 6 -> 3 channels, vq-f4) at a
    fifth of its width: a folder named as the release reads as concat-conditioned with its own
    schedule (beta_end 0.0155), and samples what diffusers' LDMSuperResolutionPipeline samples from
    the same image and noise."""
    unet = randomised(diffusers.UNet2DModel(**SUPER_RES, sample_size=8,
                                            block_out_channels=(32, 64, 64, 128)), 4)
    vqvae = randomised(diffusers.VQModel(**VQ_F4, block_out_channels=(32, 64, 128),
                                         num_vq_embeddings=64), 5)
    scheduler = diffusers.DDIMScheduler(beta_start=0.0015, beta_end=0.0155,
                                        beta_schedule="scaled_linear", clip_sample=False,
                                        set_alpha_to_one=True, steps_offset=1)
    pipe = diffusers.LDMSuperResolutionPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path / "ldm-super-resolution-4x-openimages"
    pipe.save_pretrained(folder)
    model = load(folder)
    assert (model.denoiser.unet.cfg.concat_channels == 3
            and float(model.autoencoder.scale_factor) == 1.0)
    assert abs(float(model.schedule.betas[-1]) - 0.0155) < 1e-9
    small = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    want = pipe(small, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                output_type="pt").images
    # what the pipeline drew
    z_T = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    got = (model.generate(steps=10, concat=small, z_T=z_T) + 1) / 2
    assert want.shape == (2, 3, 32, 32) and want.std() > 0.05 and (got - want).abs().max() < 1e-4


def test_sample_py_upscales_an_image_with_the_super_resolution_release(tmp_path):
    from PIL import Image

    import sample

    unet = randomised(diffusers.UNet2DModel(**SUPER_RES, sample_size=8,
                                            block_out_channels=(32, 64, 64, 128)), 4)
    vqvae = randomised(diffusers.VQModel(**VQ_F4, block_out_channels=(32, 64, 128),
                                         num_vq_embeddings=64), 5)
    folder = tmp_path / "ldm-super-resolution-4x-openimages"
    diffusers.LDMSuperResolutionPipeline(vqvae=vqvae, unet=unet,
                                         scheduler=diffusers.DDIMScheduler()).save_pretrained(folder)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "small.png")
    r = sample.main(["--pretrained", str(folder), "--image", str(tmp_path / "small.png"),
                     "--n", "1", "--steps", "2", "--device", "cpu",
                     "--out", str(tmp_path / "big.png")])
    assert (r["images"] == 1
            and Image.open(tmp_path / "big.png").size == (32 + 4, 32 + 4))  # 32 px, 2 px border
    with pytest.raises(SystemExit, match="pass it with --image"):
        sample.main(["--pretrained", str(folder), "--device", "cpu"])


# ----------------------------------------------------------------------------------------------
# at full size

from tinyldm.pretrained.architectures import RELEASED  # noqa: E402


def test_the_released_shapes_are_the_ones_tested_here():
    celebahq = RELEASED["CompVis/ldm-celebahq-256"]
    assert celebahq["unet"] == {**CELEBAHQ, "sample_size": 64,
                                "block_out_channels": (224, 448, 672, 896)}
    assert celebahq["vqvae"] == {**VQ_F4, "block_out_channels": (128, 256, 512),
                                 "num_vq_embeddings": 8192}
    assert RELEASED["CompVis/ldm-text2im-large-256"]["vqvae"] == {
        **KL_F8, "block_out_channels": (128, 256, 512, 512)}


@pytest.mark.slow
@pytest.mark.parametrize("release", ["CompVis/ldm-celebahq-256",
                                     "CompVis/ldm-super-resolution-4x-openimages"])
def test_the_full_size_unets_compute_what_diffusers_computes(release):
    """The released UNets' exact size (CelebA-HQ 274 M parameters, super-resolution 114 M), random
    weights, a 64 x 64 latent: ~10 s each on 2 cores."""
    reference = randomised(diffusers.UNet2DModel(**RELEASED[release]["unet"]))
    concat = RELEASED[release]["unet"]["in_channels"] - 3
    ours = unet_from_diffusers(reference, concat_channels=concat)
    x = torch.randn(1, 3 + concat, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = reference(x, torch.tensor([500])).sample, ours(
            x[:, :3], torch.tensor([500]), concat=x[:, 3:] if concat else None)
    assert want.abs().max() > 0.5 and (got - want).abs().max() < 1e-5 * float(want.abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("regularizer", ["vq", "kl"])
def test_the_full_size_first_stages_compute_what_diffusers_computes(regularizer):
    """vq-f4 (55 M) and kl-f8 (84 M) at their release size, on a 256 x 256 image: encode, codes,
    decode."""
    if regularizer == "vq":
        reference = randomised(diffusers.VQModel(**VQ_F4, block_out_channels=(128, 256, 512),
                                                 num_vq_embeddings=8192))
    else:
        reference = randomised(diffusers.AutoencoderKL(**KL_F8,
                                                       block_out_channels=(128, 256, 512, 512)))
    ours = autoencoder_from_diffusers(reference, regularizer=regularizer)
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        if regularizer == "vq":
            h_ref, h = reference.encode(x).latents, ours.encode(x)
            _, _, (_, _, indices) = reference.quantize(h_ref)
            assert torch.equal(ours.quantizer.lookup(h_ref).flatten(), indices.flatten())
            want, got = reference.decode(h_ref).sample, ours.decode(h_ref)
        else:
            h_ref, h = reference.encode(x).latent_dist.mean, ours.posterior(x).mean
            want, got = reference.decode(h_ref).sample, ours.decode(h_ref)
    assert (h - h_ref).abs().max() < 1e-5 * float(h_ref.abs().max())
    assert (got - want).abs().max() < 1e-5 * float(want.abs().max())


# ----------------------------------------------------------------------------------------------
# the reverse way

from tinyldm.pretrained.autoencoder import autoencoder_to_diffusers  # noqa: E402
from tinyldm.pretrained.unet import unet_to_diffusers  # noqa: E402


@pytest.mark.parametrize("regularizer", ["vq", "kl"])
def test_a_model_trained_here_samples_the_same_images_in_diffusers_pipeline(tmp_path, regularizer):
    """A tinyldm LDM of the photo presets' kind (plain attention, no condition; the first stage with
    num_res_blocks + 1 decoder blocks) exported to diffusers, saved, and sampled by LDMPipeline:
    tinyldm's own images."""
    from tinyldm.conditioning import ConditionConfig, ConditionEncoder
    from tinyldm.ldm import Denoiser, decode_latents, generate_latents
    from tinyldm.schedule import NoiseSchedule

    unet = randomised(UNet(UNetConfig(in_channels=3, out_channels=3, latent_size=8, channels=32,
                                      channel_mult=(1, 2, 3, 4), attn_resolutions=(4, 2, 1),
                                      attention_block="plain", scale_shift_norm=False)), 6)
    ae = randomised(Autoencoder(AutoencoderConfig(base_channels=32, channel_mult=(1, 2, 4),
                                                  num_res_blocks=1, decoder_res_blocks=2,
                                                  z_channels=3, regularizer=regularizer,
                                                  n_codes=64)), 7)
    ae.scale_factor.fill_(0.7)
    schedule = NoiseSchedule("scaled_linear", T=1000, beta_start=0.0015, beta_end=0.0195)
    scheduler = diffusers.DDIMScheduler(beta_start=0.0015, beta_end=0.0195,
                                        beta_schedule="scaled_linear", clip_sample=False,
                                        set_alpha_to_one=True, steps_offset=1)
    pipe = diffusers.LDMPipeline(vqvae=autoencoder_to_diffusers(ae), unet=unet_to_diffusers(unet),
                                 scheduler=scheduler)
    pipe.save_pretrained(tmp_path / "exported")
    # what a diffusers user would load
    pipe = diffusers.LDMPipeline.from_pretrained(tmp_path / "exported")
    pipe.set_progress_bar_config(disable=True)
    want = pipe(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                output_type="np").images
    z_T = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    denoiser = Denoiser(unet, ConditionEncoder(ConditionConfig(kind="none"))).eval()
    with torch.no_grad():
        got = (decode_latents(ae, generate_latents(denoiser, schedule, z_T, steps=10)) + 1) / 2
    want = torch.from_numpy(want).permute(0, 3, 1, 2)
    assert want.std() > 0.05 and (got - want).abs().max() < 1e-4


def test_what_diffusers_cannot_express_is_not_exported():
    small = dict(latent_size=8, channels=32, channel_mult=(1, 2), attn_resolutions=(4,))
    with pytest.raises(ValueError, match="transformer blocks without cross-attention"):
        unet_to_diffusers(UNet(UNetConfig(**small)))
    with pytest.raises(ValueError, match="drop that block's GroupNorm"):
        unet_to_diffusers(UNet(UNetConfig(**small, attention_block="plain", scale_shift_norm=True)))
    with pytest.raises(ValueError, match="num_res_blocks \\+ 1 = 2"):
        autoencoder_to_diffusers(Autoencoder(AutoencoderConfig(base_channels=32,
                                                               channel_mult=(1, 2),
                                                               num_res_blocks=1,
                                                               decoder_res_blocks=3)))


# ----------------------------------------------------------------------------------------------
# cross-attention UNets

COND = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16, attention_head_dim=(1, 2, 2), norm_num_groups=8,
            norm_eps=1e-5)  # head counts: a head width of 32


@pytest.mark.parametrize("depth", [1, 2])
def test_a_converted_cross_attention_unet_computes_what_diffusers_computes(depth):
    """UNet2DConditionModel (transformer blocks: self-attention, cross-attention to the context,
    GEGLU) -> tinyldm's UNet with attention_block='transformer'; diffusers' `encoder_hidden_states`
    is tinyldm's `context`."""
    reference = randomised(diffusers.UNet2DConditionModel(**COND,
                                                          transformer_layers_per_block=depth))
    ours = unet_from_diffusers(reference)
    assert (ours.cfg.attention_block == "transformer" and ours.cfg.head_dim == 32
            and ours.cfg.context_dim == 16)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        want = reference(x, torch.tensor([3, 900]), encoder_hidden_states=context).sample
        got = ours(x, torch.tensor([3, 900]), context=context)
        other = ours(x, torch.tensor([3, 900]), context=context.flip(1) * 0.5)
    assert (got - want).abs().max() < 1e-5 * float(want.abs().max())
    assert (other - want).abs().max() > 1e-2  # the context is really read


def test_one_head_count_at_every_level_converts_as_num_heads():
    """The text-to-image release has 8 heads at every level (head widths 40, 80, 160): tinyldm's
    num_heads. Here 2 heads on widths 32 and 64 (head widths 16 and 32), against diffusers on random
    weights."""
    reference = randomised(diffusers.UNet2DConditionModel(**{**COND, "attention_head_dim": 2}))
    ours = unet_from_diffusers(reference)
    assert ours.cfg.num_heads == 2
    assert [m.heads for m in ours.modules() if type(m).__name__ == "Attention"][:2] == [2, 2]
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        want = reference(x, torch.tensor([7, 500]), encoder_hidden_states=context).sample
        got = ours(x, torch.tensor([7, 500]), context=context)
    assert (got - want).abs().max() < 1e-5 * float(want.abs().max())
    with pytest.raises(ValueError, match="neither one head width nor one head count"):
        unet_config({**COND, "attention_head_dim": (1, 4, 2)})


# ----------------------------------------------------------------------------------------------
# exporting checkpoints

def _trained_here(kind: str, prediction: str):
    """A tinyldm checkpoint as train_ldm.py writes it, random weights: the CPU presets' kind of
    model (transformer blocks, scale-shift ResBlocks, a decoder with as many ResBlocks as the
    encoder, symmetric padding) for a class-conditional model, the photo presets' kind for an
    unconditional one."""
    from tinyldm.checkpoint import ldm_payload
    from tinyldm.conditioning import ConditionConfig, ConditionEncoder
    from tinyldm.ldm import Denoiser, DiffusionConfig

    if kind == "class":
        # the shapes_class preset's sizes (train_ldm.py --preset shapes_class and its autoencoder)
        unet_cfg = UNetConfig(latent_size=8, channels=64, channel_mult=(1, 2), num_res_blocks=1,
                              attn_resolutions=(8, 4), head_dim=32, context_dim=128)
        ae_cfg = AutoencoderConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                                   z_channels=4, norm_groups=8, mid_attention=False)
        cond = ConditionEncoder(ConditionConfig(kind="class", context_dim=128, num_classes=3))
    else:
        unet_cfg = UNetConfig(in_channels=3, out_channels=3, latent_size=8, channels=32,
                              channel_mult=(1, 2), attn_resolutions=(4,), attention_block="plain",
                              scale_shift_norm=False, norm_groups=8)
        ae_cfg = AutoencoderConfig(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                                   decoder_res_blocks=2, z_channels=3, regularizer="vq", n_codes=32,
                                   norm_groups=8)
        cond = ConditionEncoder(ConditionConfig(kind="none"))
    denoiser = randomised(Denoiser(UNet(unet_cfg), cond), 8)
    ae = randomised(Autoencoder(ae_cfg), 9)
    ae.scale_factor.fill_(0.8)
    cfg = DiffusionConfig(schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
                          prediction=prediction)
    return {"kind": "ldm", **ldm_payload(denoiser, None, ae, cfg, image_size=32),
            "class_names": ["a", "b", "c"]}


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_a_class_conditional_model_trained_here_samples_the_same_images_in_diffusers(
        tmp_path, prediction):
    """Exported (UNet2DConditionModel, AutoencoderKL with identity-padded decoder, DDIMScheduler,
    the class table), loaded back by diffusers' classes and sampled by diffusers' scheduler with
    guidance: tinyldm's own images."""
    from tinyldm.checkpoint import load_ldm
    from tinyldm.ldm import decode_latents, generate_latents
    from tinyldm.pretrained.export import class_condition, export_checkpoint

    ckpt = _trained_here("class", prediction)
    folder = export_checkpoint(ckpt, tmp_path / "exported")
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vqvae").eval()
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler")
    labels, null, scale = torch.tensor([0, 2]), torch.tensor([3, 3]), 4.0
    z_T = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    latents = z_T
    scheduler.set_timesteps(10)
    with torch.no_grad():
        context = torch.cat([class_condition(folder, null), class_condition(folder, labels)])
        for t in scheduler.timesteps:  # classifier-free guidance as diffusers' pipelines write it
            uncond, cond = unet(torch.cat([latents] * 2), t,
                                encoder_hidden_states=context).sample.chunk(2)
            latents = scheduler.step(uncond + scale * (cond - uncond), t, latents).prev_sample
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
        want = decoded.clamp(-1, 1)
        denoiser, schedule, ae, cfg = load_ldm(ckpt)
        got = decode_latents(ae, generate_latents(denoiser, schedule, z_T, labels,
                                                  prediction=prediction, steps=10,
                                                  guidance_scale=scale))
    assert want.std() > 0.05 and (got - want).abs().max() < 1e-4
    with torch.no_grad():  # the identity-padded decoder is the same map, unclamped
        assert ((ae.decode(latents / ae.scale_factor) - decoded).abs().max()
                < 1e-5 * float(decoded.abs().max()))


def test_the_export_command_writes_a_folder_diffusers_pipeline_loads(tmp_path, capsys):
    from tinyldm.checkpoint import save_checkpoint
    from tinyldm.pretrained.export import main

    path = save_checkpoint(tmp_path / "ldm.pt",
                           {k: v for k, v in _trained_here("none", "eps").items() if k != "kind"},
                           kind="ldm")
    main([str(path), str(tmp_path / "out")])
    assert "model_index.json" in capsys.readouterr().out
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert type(pipe).__name__ == "LDMPipeline" and pipe.scheduler.config.steps_offset == 1
    # loaded back, the VQ latents keep the model's own scale (0.8), which tinyldm.json holds
    assert float(load(tmp_path / "out").autoencoder.scale_factor) == pytest.approx(0.8)
    (tmp_path / "out" / "tinyldm.json").write_text('{"scale_factor": -3}')
    with pytest.raises(SystemExit, match="tinyldm.json: scale_factor must be a positive number"):
        load(tmp_path / "out")
    text = _trained_here("class", "eps")
    text["cond_config"] = {**text["cond_config"], "kind": "text",
                           "vocab": ["<pad>", "<bos>", "<eos>", "<unk>"], "head_dim": 32}
    from tinyldm.checkpoint import build_denoiser  # weights that fit the text encoder's config

    weights = build_denoiser(text["unet_config"], text["cond_config"]).state_dict()
    text.update(denoiser=weights, **({"ema": weights} if text.get("ema") is not None else {}))
    with pytest.raises(SystemExit, match="text-conditional model reads its condition with "
                                         "tinyldm's own encoder"):
        path = save_checkpoint(tmp_path / "text.pt", {k: v for k, v in text.items() if k != "kind"},
                               kind="ldm")
        main([str(path), str(tmp_path / "out2")])
