"""Tests for tinyldm/autoencoder.py, tinyldm/autoencoder_loss.py and tinyldm/evaluation/metrics.py:
the maths, not just shapes."""

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from tinyldm.autoencoder import (
    AttnBlock,
    Autoencoder,
    AutoencoderConfig,
    DiagonalGaussian,
    VectorQuantizer,
    latent_statistics,
)
from tinyldm.autoencoder_loss import (
    AELoss,
    AELossConfig,
    AETerms,
    adaptive_weight,
    discriminator_hinge,
    discriminator_non_saturating,
)
from tinyldm.evaluation.features import load_lpips
from tinyldm.evaluation.metrics import codebook_stats, psnr, ssim


def tiny(**kw) -> AutoencoderConfig:
    base = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, z_channels=4, norm_groups=4,
                n_codes=32)
    return AutoencoderConfig(**{**base, **kw})


def shapes_batch(n: int = 8, size: int = 16) -> torch.Tensor:
    from tinyldm.data.shapes import ShapesConfig, ShapesDataset

    ds = ShapesDataset(ShapesConfig(image_size=size, n_train=n, n_eval=n))
    return torch.stack([ds[i]["image"] for i in range(n)])


# -------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("levels,f", [(1, 1), (2, 2), (3, 4), (4, 8), (5, 16)])
@pytest.mark.parametrize("regularizer", ["kl", "vq"])
def test_latent_shape_for_each_f(levels, f, regularizer):
    cfg = tiny(channel_mult=(1,) * levels, regularizer=regularizer, mid_attention=True)
    assert cfg.downsample_factor == f
    model = Autoencoder(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    z = model.encode(x)
    assert z.shape == (2, 4, 32 // f, 32 // f) == (2, *model.latent_shape(32))
    assert model.decode(z).shape == x.shape
    assert model(x).x_rec.shape == x.shape


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="regularizer"):
        tiny(regularizer="vae")
    with pytest.raises(ValueError, match="norm_groups"):
        tiny(base_channels=6)
    model = Autoencoder(tiny(channel_mult=(1, 2, 2)))
    with pytest.raises(ValueError, match="divisible"):
        model.encode(torch.randn(1, 3, 30, 30))
    with pytest.raises(ValueError, match="expected images"):
        model.encode(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="expected latents"):
        model.decode(torch.randn(1, 3, 8, 8))


def test_attention_is_softmax_attention():
    torch.manual_seed(1)
    block = AttnBlock(8, groups=4)
    x = torch.randn(2, 8, 4, 5)
    B, C, H, W = x.shape
    q, k, v = block.qkv(block.norm(x)).reshape(B, 3, C, H * W).unbind(1)  # (B, C, HW)
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(C), dim=-1)  # (B, HW_q, HW_k)
    expected = x + block.proj((v @ weights.transpose(1, 2)).reshape(B, C, H, W))
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------- KL


def test_kl_equals_torch_distributions():
    moments = torch.randn(3, 8, 5, 5) * 2  # mean and logvar of 4 latent channels
    q = DiagonalGaussian(moments)
    mean, logvar = moments.chunk(2, dim=1)
    expected = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)),
                             Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(q.kl(), expected, rtol=1e-5, atol=1e-4)
    # q = prior
    assert torch.allclose(DiagonalGaussian(torch.zeros(1, 8, 2, 2)).kl(), torch.zeros(1))


def test_posterior_sample_has_the_posterior_moments():
    mean, logvar = torch.tensor([0.5, -1.0]), torch.tensor([0.0, math.log(0.25)])
    moments = torch.cat([mean, logvar]).view(1, 4, 1, 1).expand(20000, 4, 1, 1)
    q = DiagonalGaussian(moments)
    z = q.sample(torch.Generator().manual_seed(0))[:, :, 0, 0]
    torch.testing.assert_close(z.mean(0), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([1.0, 0.5]), atol=0.03, rtol=0)
    assert torch.equal(q.mode(), q.mean)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(q.sample(g1), q.sample(g2))


def test_kl_model_encode_is_posterior_mean():
    model = Autoencoder(tiny()).eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model.encode(x), model.posterior(x).mean)
    sampled = model.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(sampled, model.encode(x))


def test_forward_takes_the_reparameterization_draw():
    """z = E_mu + E_sigma * eps with the caller's eps; eps = 0 gives the posterior mean."""
    model = Autoencoder(tiny()).eval()
    x = torch.randn(2, 3, 16, 16)
    q = model.posterior(x)
    eps = torch.randn(q.mean.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, eps=eps)
        torch.testing.assert_close(out.z, q.mean + q.std * eps, rtol=0, atol=0)
        assert torch.equal(model(x, eps=torch.zeros_like(eps)).z, q.mean)
        assert torch.equal(out.x_rec, model.decode(out.z))


# -------------------------------------------------------------------------------- VQ


def test_codebook_indices_are_valid_nearest_neighbours():
    vq = VectorQuantizer(16, 3, beta=0.25, restart_threshold=0.03, usage_decay=0.99).eval()
    z_e = torch.randn(2, 3, 4, 5)
    out = vq(z_e)
    assert out.indices.dtype == torch.long and out.indices.shape == (2, 4, 5)
    assert out.indices.min() >= 0 and out.indices.max() < 16
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 3)
    brute = torch.cdist(flat, vq.codebook.weight).argmin(1).reshape(2, 4, 5)
    assert torch.equal(out.indices, brute)
    torch.testing.assert_close(out.z_q, vq.codebook.weight[out.indices].permute(0, 3, 1, 2))
    # VQ-VAE Eq. (3) in value: codebook term + beta * commitment term = (1 + beta) * mse
    torch.testing.assert_close(out.loss, 1.25 * F.mse_loss(out.z_q, z_e))


def test_straight_through_gradient_reaches_the_encoder():
    model = Autoencoder(tiny(regularizer="vq")).train()
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    out.x_rec.pow(2).mean().backward()  # the reconstruction alone, no VQ loss
    grad = model.encoder.conv_in.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # and the straight-through estimator is the identity: dL/dz_e == dL/dz_q
    vq = model.quantizer
    z_e = torch.randn(1, 4, 3, 3, requires_grad=True)
    w = torch.randn(1, 4, 3, 3)
    (vq(z_e).z_q * w).sum().backward()
    assert torch.equal(z_e.grad, w)


def test_dead_codes_are_restarted_from_encoder_outputs():
    vq = VectorQuantizer(8, 2, beta=0.25, restart_threshold=0.5, usage_decay=0.5).train()
    z_e = torch.randn(1, 2, 4, 4)
    vq(z_e)  # usage starts at 0: every code is dead, so all are drawn from the batch
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 2)
    for code in vq.codebook.weight:
        assert (flat - code).abs().sum(1).min() < 1e-6
    # now feed one repeated point only: every code but the one it hits decays (x0.5 per step) below
    # the threshold and is restarted, i.e. moved onto that point
    point = torch.tensor([5.0, -5.0])
    before = vq.codebook.weight.detach().clone()
    for _ in range(10):
        vq(point.view(1, 2, 1, 1).expand(1, 2, 4, 4))
    moved = (vq.codebook.weight - before).abs().sum(1) > 0
    assert moved.sum() >= 7
    torch.testing.assert_close(vq.codebook.weight[moved], point.expand(int(moved.sum()), 2))


def test_codebook_stats_perplexity():
    uniform = codebook_stats(torch.arange(16).repeat(4), 16)
    assert (uniform["codebook_usage"] == 1.0
            and math.isclose(uniform["perplexity"], 16.0, rel_tol=1e-9))
    single = codebook_stats(torch.zeros(10, dtype=torch.long), 16)
    assert single["codebook_usage"] == 1 / 16 and math.isclose(single["perplexity"], 1.0)


def test_vq_decode_quantizes_its_input():
    model = Autoencoder(tiny(regularizer="vq")).eval()
    z = model.encode(torch.randn(2, 3, 16, 16))
    z_q = model.quantizer(z).z_q
    torch.testing.assert_close(model.decode(z), model.decoder(z_q))
    torch.testing.assert_close(model.decode(z + 1e-4 * torch.randn_like(z)), model.decode(z))


# -------------------------------------------------------------------------------- latent statistics


def test_latent_statistics_and_scale_factor():
    model = Autoencoder(tiny()).eval()
    x = torch.randn(6, 3, 16, 16)
    stats = latent_statistics(model, [x[:4], x[4:]], max_images=5,
                              generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    z = torch.cat([model.encode(x[:4], sample=True, generator=g),
                   model.encode(x[4:5], sample=True, generator=g)])
    assert stats.n_images == 5
    assert math.isclose(stats.scale_factor, 1 / z.std().item(), rel_tol=1e-5)
    torch.testing.assert_close(torch.tensor(stats.std), z.transpose(0, 1).reshape(4, -1).std(1))
    # App. G: unit std
    assert math.isclose((z * stats.scale_factor).std().item(), 1.0, rel_tol=1e-5)
    model.set_latent_stats(stats)
    assert math.isclose(model.scale_factor.item(), stats.scale_factor, rel_tol=1e-6)
    assert "scale_factor" in model.state_dict() and "latent_std" in model.state_dict()


def test_to_dict_round_trip():
    model = Autoencoder(tiny(regularizer="vq")).eval()
    model.scale_factor.fill_(0.37)
    clone = Autoencoder.from_dict(model.to_dict()).eval()
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(clone.decode(clone.encode(x)), model.decode(model.encode(x)))
    assert clone.scale_factor.item() == pytest.approx(0.37)


# -------------------------------------------------------------------------------- losses


def test_adaptive_weight_matches_its_formula():
    w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    t, c = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([3.0, 0.0, -4.0])
    rec = ((w - t) ** 2).sum()  # gradient 2 (w - t)
    adv = (c * w).sum()  # gradient c
    terms = AETerms(rec=rec, reg=torch.zeros(()), g_adv=adv, logs={})
    grad_rec, grad_adv = AELoss(AELossConfig(perceptual_weight=0.0)).last_layer_gradients(terms, w)
    torch.testing.assert_close(grad_rec, 2 * (w - t).detach())
    torch.testing.assert_close(grad_adv, c)
    lam = adaptive_weight(2 * (w - t), c, delta=1e-6, max_value=1e4)  # gradients with a graph
    expected = (2 * (w - t)).norm() / (c.norm() + 1e-6)
    torch.testing.assert_close(lam, expected.detach())
    assert not lam.requires_grad
    assert adaptive_weight(grad_rec, 1e-12 * c, delta=1e-6, max_value=10.0) == 10.0  # clamped


def test_discriminator_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    # hinge: relu(1 - real) = [0, 0.5], relu(1 + fake) = [0, 1]
    assert discriminator_hinge(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    expected = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    assert discriminator_non_saturating(real, fake).item() == pytest.approx(expected.item())


def loss_setup(**loss_kw):
    model = Autoencoder(tiny()).train()
    cfg = AELossConfig(**{**dict(perceptual_weight=0.0, disc_start=5, disc_channels=8,
                                 disc_layers=1), **loss_kw})
    return model, cfg


def ae_loss(loss_fn: AELoss, x, out, *, step: int, model: Autoencoder):
    """The E, D player's loss on one process, as train_ae.py's step computes it."""
    terms = loss_fn.autoencoder_terms(x, out, step=step)
    return loss_fn.autoencoder_loss(terms, loss_fn.last_layer_gradients(terms, model.last_layer))


def test_loss_terms_before_the_discriminator_starts():
    model, cfg = loss_setup(kl_weight=1e-2)
    loss_fn = AELoss(cfg)
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    loss, logs = ae_loss(loss_fn, x, out, step=4, model=model)
    expected = (out.x_rec - x).abs().mean() + 1e-2 * out.kl.mean() / (3 * 16 * 16)
    torch.testing.assert_close(loss, expected)
    assert "g_adv" not in logs
    loss_d, logs_d = loss_fn.discriminator_loss(x, out.x_rec, step=4)
    assert loss_d.item() == 0.0 and logs_d == {}
    _, logs = ae_loss(loss_fn, x, out, step=5, model=model)
    assert "g_adv" in logs and logs["adaptive_weight"] > 0
    with torch.no_grad():  # evaluation: no gradients to balance, lambda = disc_weight
        _, logs = loss_fn.autoencoder_loss(loss_fn.autoencoder_terms(x, model(x), step=5))
    assert logs["adaptive_weight"] == cfg.disc_weight


def _decoder_grad(model: Autoencoder, loss: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return sum(p.grad.abs().sum().item() for p in model.decoder.parameters() if p.grad is not None)


def test_adversarial_term_sends_gradient_into_the_decoder():
    model, cfg = loss_setup()
    loss_fn = AELoss(cfg)
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    assert _decoder_grad(model, loss_fn.generator_adv(out.x_rec)) > 0
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # and through it into the encoder
    # the full loss includes lambda * g_adv: its gradient differs from the reconstruction's alone
    loss, _ = ae_loss(loss_fn, x, out, step=10, model=model)
    rec_only, _ = ae_loss(loss_fn, x, out, step=0, model=model)
    _decoder_grad(model, loss)
    g_full = model.last_layer.grad.clone()
    _decoder_grad(model, rec_only)
    assert not torch.allclose(g_full, model.last_layer.grad)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_perceptual_term_sends_gradient_into_the_decoder(net):
    """The lpips package itself (random backbone, its shipped linear heads; offline): a distance,
    >= 0, zero between an image and itself, larger for a more distorted copy; its gradient reaches
    the decoder."""
    pytest.importorskip("lpips")
    model, cfg = loss_setup(perceptual_weight=1.0, lpips_net=net, lpips_pretrained=False)
    loss_fn = AELoss(cfg, perceptual=load_lpips(net, pretrained=False))  # random backbone
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    d = [loss_fn.perceptual(x + s * noise, x).flatten() for s in (0.0, 0.1, 0.5)]
    assert torch.all(d[0].abs() < 1e-6) and torch.all(d[1] > 0) and torch.all(d[2] > d[1])
    out = model(x)
    _, perceptual = loss_fn.reconstruction(x, out.x_rec)
    assert perceptual.item() > 0.0
    assert _decoder_grad(model, perceptual) > 0
    assert not any(p.requires_grad for p in loss_fn.perceptual.parameters())  # LPIPS stays frozen


def test_missing_lpips_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # makes `import lpips` raise ImportError
    with pytest.raises(ImportError, match="pip install lpips"):
        load_lpips("vgg")
    with pytest.raises(ValueError, match="perceptual_weight > 0 needs the LPIPS network"):
        AELoss(AELossConfig(perceptual_weight=1.0))
    AELoss(AELossConfig(perceptual_weight=0.0))  # not asked for: fine


def test_lpips_weights_that_cannot_load_are_a_clear_error(monkeypatch):
    def offline(**kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=offline))
    with pytest.raises(RuntimeError, match="could not load the LPIPS weights.*perceptual_weight 0"):
        load_lpips("vgg")


# -------------------------------------------------------------------------------- training


def test_overfit_one_batch_reaches_psnr():
    x = shapes_batch(4, 16)
    model = Autoencoder(tiny(base_channels=16, mid_attention=False)).train()  # f = 2, z (4, 8, 8)
    loss_fn = AELoss(AELossConfig(rec_loss="l2", perceptual_weight=0.0, disc_start=10**9))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(150):
        loss, _ = ae_loss(loss_fn, x, model(x), step=step, model=model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        quality = psnr(model.decode(model.encode(x)).clamp(-1, 1), x).mean().item()
    assert quality > 28.0, quality  # the mean image of the batch alone scores ~22 dB


# -------------------------------------------------------------------------------- metrics


def test_psnr_known_value():
    x = torch.zeros(2, 3, 8, 8)  # 0.5 on the [0, 1] scale
    y = x + 0.2  # +0.1 on the [0, 1] scale: MSE 0.01 -> 20 dB
    torch.testing.assert_close(psnr(y, x), torch.tensor([20.0, 20.0]))


def test_ssim_closed_forms():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    # two constant images a, b on [0, 1]: sigma = 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.3, 0.7, 0.01**2
    x, y = torch.full((1, 1, 16, 16), 2 * a - 1), torch.full((1, 1, 16, 16), 2 * b - 1)
    assert ssim(x, y).item() == pytest.approx((2 * a * b + c1) / (a**2 + b**2 + c1), rel=1e-6)
    # an image and its negative about the mean has negative structure term
    noise = torch.randn(1, 1, 16, 16) * 0.2
    assert ssim(noise, -noise).item() < 0


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    x = torch.rand(2, 3, 24, 24) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    ours = ssim(x, y)
    for i in range(2):
        a, b = (((x[i] + 1) / 2).permute(1, 2, 0).double().numpy(),
                ((y[i] + 1) / 2).permute(1, 2, 0).double().numpy())
        ref = metrics.structural_similarity(
            a, b, channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False
        )
        assert ours[i].item() == pytest.approx(ref, abs=1e-5)


def test_decoder_res_blocks():
    """None keeps the decoder as before (num_res_blocks per level, so old checkpoints load); CompVis
    and diffusers use one more block per decoder level."""
    from tinyldm.autoencoder import ResBlock

    small = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8,
                 mid_attention=False)
    default = Autoencoder(AutoencoderConfig(**small))
    same = Autoencoder(AutoencoderConfig(**small, decoder_res_blocks=1))
    assert default.state_dict().keys() == same.state_dict().keys()
    deeper = Autoencoder(AutoencoderConfig(**small, decoder_res_blocks=2))
    count = lambda m: sum(isinstance(b, ResBlock) for b in m.decoder.up)  # noqa: E731
    assert (count(default), count(deeper)) == (2, 4)
    assert deeper.decode(torch.randn(1, 4, 4, 4)).shape == (1, 3, 8, 8)
    old = default.to_dict()
    old["config"].pop("decoder_res_blocks")  # a checkpoint written before the field existed
    Autoencoder.from_dict(old)
    with pytest.raises(ValueError, match="decoder_res_blocks"):
        AutoencoderConfig(**small, decoder_res_blocks=0)


def test_identity_first_stage_is_pixel_space():
    """regularizer="identity": z = x exactly, f = 1, no parameters; refused unless z has the image's
    shape."""
    ae = Autoencoder(AutoencoderConfig(regularizer="identity", z_channels=3, channel_mult=(1,)))
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert ae.downsample_factor == 1 and sum(p.numel() for p in ae.parameters()) == 0
    assert (torch.equal(ae.encode(x), x) and torch.equal(ae.decode(x), x)
            and torch.equal(ae(x).x_rec, x))
    stats = latent_statistics(ae, [x], max_images=2)
    assert stats.global_std == pytest.approx(float(x.std()), rel=1e-6)
    with pytest.raises(ValueError, match="z = x"):
        AutoencoderConfig(regularizer="identity", z_channels=4, channel_mult=(1,))
    with pytest.raises(ValueError, match="z = x"):
        AutoencoderConfig(regularizer="identity", z_channels=3, channel_mult=(1, 2))
