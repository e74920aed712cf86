"""The latent-diffusion wiring: Eq. 3's loss, generation through the decoder, the self-contained
checkpoint."""

from dataclasses import asdict

import pytest
import torch

from tinyldm.autoencoder import Autoencoder, AutoencoderConfig
from tinyldm.checkpoint import (
    build_denoiser,
    ldm_payload,
    load_checkpoint,
    load_ldm,
    save_checkpoint,
)
from tinyldm.conditioning import ConditionConfig, ConditionEncoder, Tokenizer
from tinyldm.ddim import make_timesteps, sample
from tinyldm.ldm import (
    Denoiser,
    DiffusionConfig,
    decode_latents,
    generate,
    generate_latents,
    ldm_loss,
)
from tinyldm.schedule import eps_x0_from_prediction
from tinyldm.unet import UNet, UNetConfig

CAPTIONS = ["a red circle", "a blue square"]


def tiny_parts(prediction="eps"):
    ae = Autoencoder(AutoencoderConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                       z_channels=3, norm_groups=4, mid_attention=False)).eval()
    cond = ConditionEncoder(ConditionConfig(kind="text", context_dim=32,
                                            vocab=Tokenizer.from_texts(CAPTIONS).vocab, max_len=6,
                                            layers=1, head_dim=16))
    unet = UNet(UNetConfig(in_channels=3, out_channels=3, latent_size=8, channels=32,
                           channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                           head_dim=16, context_dim=32, norm_groups=8))
    return ae, Denoiser(unet, cond), DiffusionConfig(T=100, prediction=prediction)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ldm_loss_learns_two_conditional_latents(prediction):
    """Two captions, two fixed latents: the model must learn to tell them apart through the context,
    which shows in the conditional x0-predictions at a noisy t."""
    torch.manual_seed(0)
    _, den, cfg = tiny_parts(prediction)
    cfg.p_uncond = 0.0
    schedule = cfg.make_schedule()
    z_a, z_b = torch.ones(3, 8, 8), -torch.ones(3, 8, 8)
    opt = torch.optim.AdamW(den.parameters(), lr=2e-3)
    first = None
    for _ in range(200):
        z0 = torch.stack([z_a, z_b] * 4)
        # t ~ U{0..T-1}, eps ~ N(0, I)
        t, eps = torch.randint(0, schedule.T, (len(z0),)), torch.randn_like(z0)
        loss = ldm_loss(den, schedule, z0, t, eps, CAPTIONS * 4, cfg)
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    den.eval()
    with torch.no_grad():
        t = torch.full((2,), 60)
        z_t = schedule.q_sample(torch.stack([z_a, z_b]), t, torch.randn(2, 3, 8, 8))
        eps, x0 = eps_x0_from_prediction(den(z_t, t, CAPTIONS), z_t, schedule.alpha_bar_at(t, z_t),
                                         prediction)
    assert x0[0].mean() > 0.5 and x0[1].mean() < -0.5


def test_generate_shapes_guidance_and_size_beyond_training():
    ae, den, cfg = tiny_parts()
    den.eval()
    schedule = cfg.make_schedule()
    g = torch.Generator().manual_seed(0)
    img = generate(den, schedule, ae, CAPTIONS, latent_size=(8, 8), steps=5, guidance_scale=3.0,
                   generator=g)
    assert img.shape == (2, 3, 16, 16) and img.min() >= -1 and img.max() <= 1
    big = generate(den, schedule, ae, CAPTIONS, latent_size=(16, 16), steps=3, generator=g)
    assert big.shape == (2, 3, 32, 32)
    a = generate(den, schedule, ae, CAPTIONS, latent_size=(8, 8), steps=4, eta=1.0,
                 generator=torch.Generator().manual_seed(7))
    b = generate(den, schedule, ae, CAPTIONS, latent_size=(8, 8), steps=4, eta=1.0,
                 generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)  # same seed, same images
    # The image is the decoder applied to the unscaled latent that the sampler reaches from a
    # drawn z_T: generate = draw, generate_latents, decode_latents.
    ae.scale_factor.fill_(2.0)
    g = torch.Generator().manual_seed(1)
    z_T = torch.randn(2, 3, 8, 8, generator=g)
    z0 = generate_latents(den, schedule, z_T, CAPTIONS, steps=2, eta=1.0, generator=g)
    img = generate(den, schedule, ae, CAPTIONS, latent_size=(8, 8), steps=2, eta=1.0,
                   generator=torch.Generator().manual_seed(1))
    assert torch.equal(img, decode_latents(ae, z0))
    torch.testing.assert_close(decode_latents(ae, z0), ae.decode(z0 / 2.0).clamp(-1, 1))


def test_generate_latents_from_given_noise_with_callback_equals_the_sampler():
    """z_T and callback pass straight through: the same start gives the sampler's own result, and
    the callback sees every step's z0 prediction, the last of which is the returned latent (DDIM,
    eta 0)."""
    _, den, cfg = tiny_parts()
    den.eval()
    schedule = cfg.make_schedule()
    z_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    seen = []
    z0 = generate_latents(den, schedule, z_T.clone(), CAPTIONS, steps=4, guidance_scale=2.0,
                          callback=lambda i, t, z_t, z0_pred: seen.append((i, t, z0_pred.clone())))
    with torch.no_grad():
        ref = sample(den.unet, schedule, z_T, steps=4, cond=den.cond(CAPTIONS),
                     uncond=den.cond(den.cond.null_condition(2)), guidance_scale=2.0)
    assert torch.allclose(z0, ref, atol=1e-6)
    assert [(i, t) for i, t, _ in seen] == list(enumerate(make_timesteps(cfg.T, 4)))
    assert torch.allclose(seen[-1][2], z0, atol=1e-6)
    with pytest.raises(ValueError, match="z_T has shape"):
        generate_latents(den, schedule, torch.randn(3, 3, 8, 8), CAPTIONS, steps=2)
    with pytest.raises(ValueError, match="z_T has shape"):
        generate_latents(den, schedule, torch.randn(2, 4, 8, 8), CAPTIONS, steps=2)


def concat_parts():
    """An unconditional (no cross-attention) denoiser with one concat channel, as for image-to-image
    tasks."""
    cond = ConditionEncoder(ConditionConfig(kind="none"))
    unet = UNet(UNetConfig(in_channels=3, out_channels=3, concat_channels=1, latent_size=8,
                           channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                           context_dim=None, norm_groups=8))
    return Denoiser(unet, cond), DiffusionConfig(T=1000, p_uncond=0.0, prediction="x0")


def test_ldm_loss_learns_the_target_from_the_concat_condition():
    """Two concat maps (a left or a right half-plane) determine two latents: only the concatenated
    channel tells the model which one to denoise towards."""
    torch.manual_seed(0)
    den, cfg = concat_parts()
    schedule = cfg.make_schedule()
    left = torch.zeros(1, 8, 8)
    left[:, :, :4] = 1
    maps = torch.stack([left, left.flip(-1)])  # (2, 1, 8, 8)
    z0 = torch.stack([torch.ones(3, 8, 8), -torch.ones(3, 8, 8)])
    opt = torch.optim.AdamW(den.parameters(), lr=2e-3)
    first = None
    for _ in range(150):
        t, eps = torch.randint(0, schedule.T, (8,)), torch.randn(8, *z0.shape[1:])
        loss = ldm_loss(den, schedule, z0.repeat(4, 1, 1, 1), t, eps, None, cfg,
                        concat=maps.repeat(4, 1, 1, 1))
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    den.eval()
    with torch.no_grad():  # the same pure noise for both: only the concat map can tell them apart
        t = torch.full((2,), 900)
        z_t = torch.randn(1, 3, 8, 8).expand(2, -1, -1, -1)  # no signal in it at all
        x0 = den(z_t, t, concat=maps)  # an x0-predicting model: its output is the clean latent
    assert x0[0].mean() > 0.3 and x0[1].mean() < -0.3


def test_generate_passes_concat_to_every_call_and_both_guidance_halves():
    ae, _, _ = tiny_parts()
    den, cfg = concat_parts()
    den.eval()
    seen = []
    forward = den.unet.forward
    den.unet.forward = lambda *a, **kw: seen.append(kw["concat"]) or forward(*a, **kw)
    concat = torch.randn(2, 1, 8, 8)
    img = generate(den, cfg.make_schedule(), ae, None, latent_size=(8, 8), steps=3, concat=concat)
    assert img.shape == (2, 3, 16, 16) and len(seen) == 3
    assert all(torch.equal(c, concat) for c in seen)
    # A text model with a concat map: guidance batches [uncond; cond], the map goes into both
    # halves.
    ae, den_t, cfg_t = tiny_parts()
    unet = UNet(UNetConfig(**{**asdict(den_t.unet.cfg), "concat_channels": 1,
                              "channel_mult": (1, 2), "attn_resolutions": (4,)}))
    den_t = Denoiser(unet, den_t.cond).eval()
    seen.clear()
    forward = den_t.unet.forward
    den_t.unet.forward = lambda *a, **kw: seen.append(kw["concat"]) or forward(*a, **kw)
    generate(den_t, cfg_t.make_schedule(), ae, CAPTIONS, latent_size=(8, 8), steps=2,
             guidance_scale=3.0, concat=concat)
    assert len(seen) == 2 and all(torch.equal(c, torch.cat([concat, concat])) for c in seen)


def test_checkpoint_is_self_contained_and_weights_only(tmp_path):
    ae, den, cfg = tiny_parts()
    ema = build_denoiser(ldm_payload(den, None, ae, cfg, 16)["unet_config"],
                         ldm_payload(den, None, ae, cfg, 16)["cond_config"])
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01)
    path = save_checkpoint(tmp_path / "ldm.pt", ldm_payload(den, ema, ae, cfg, 16), kind="ldm")
    ckpt = torch.load(path, weights_only=True)  # plain tensors and values only
    assert ckpt["kind"] == "ldm"
    den2, schedule, ae2, cfg2 = load_ldm(load_checkpoint(path, kind="ldm"))
    assert cfg2 == cfg and torch.equal(schedule.alpha_bar, cfg.make_schedule().alpha_bar)
    for (k, p), q in zip(ema.state_dict().items(), den2.state_dict().values(), strict=True):
        assert torch.equal(p, q), k  # the EMA weights are the ones used for sampling
    den3, *_ = load_ldm(ckpt, use_ema=False)
    assert all(torch.equal(p, q)
               for p, q in zip(den.state_dict().values(), den3.state_dict().values(), strict=True))
    for p, q in zip(ae.state_dict().values(), ae2.state_dict().values(), strict=True):
        assert torch.equal(p, q)
