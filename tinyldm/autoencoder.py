"""The first stage: a KL- or VQ-regularized convolutional autoencoder (LDM, arXiv 2112.10752).

Paper contract
--------------
Sec. 3.1 "Perceptual Image Compression": an encoder E maps an image x (3, H, W) to a latent
z = E(x) of shape (c, h, w) with h = H / f, w = W / f and downsampling factor f = 2^m; a decoder
D maps it back, x_rec = D(z). App. G gives the two regularizers we implement:

* KL-reg.: E outputs the mean and log-variance of a diagonal Gaussian q_E(z|x) = N(E_mu, E_sigma^2);
  training samples z = E_mu + E_sigma * eps and penalizes KL(q_E(z|x) || N(0, I)) with a tiny
  weight (1e-6 in the paper's configs; the weight itself lives in `autoencoder_loss.AELossConfig`).
  The closed-form KL is that of Kingma & Welling (arXiv 1312.6114, App. B).
* VQ-reg.: a codebook of K vectors; every latent pixel is replaced by its nearest code
  (van den Oord et al., arXiv 1711.00937, Eq. (1)-(3)) with a straight-through gradient and the
  codebook + beta * commitment loss. As in the paper (App. G (ii)) the LDM works on the latents
  *before* quantization: `encode` returns them and `decode` quantizes first, i.e. the quantizer is
  "absorbed into the decoder".
* Latent rescaling (App. G, "DM Training in Latent Space"): the LDM trains on z * scale_factor with
  scale_factor = 1 / std of encoded training latents, estimated from data (`latent_statistics`).
  It is stored as a buffer, so it travels with `state_dict()` and with every checkpoint.
* "identity" (the f = 1 end of the paper's Fig. 6): z = x, no parameters, so the "LDM" on top is
  pixel-space diffusion with the same code; only the scale factor is measured from data.

Architecture (the CompVis "Encoder"/"Decoder" family, written from the paper's description):
ResNet blocks (GroupNorm, SiLU, 3x3 convs), one stride-2 conv per downsampling, nearest
upsampling + conv, and a middle block ResBlock -> self-attention (optional) -> ResBlock.
f = 2^(len(channel_mult) - 1), so channel_mult of length 1, 2, 3, 4, 5 gives f = 1, 2, 4, 8, 16.

Deliberate simplifications
--------------------------
* No separate 1x1 `quant_conv` / `post_quant_conv` by default: the encoder's last conv emits the
  moments (KL) or the pre-quantization latent (VQ) directly, and the decoder's first conv reads z.
  The released CompVis models have them (`quant_conv=True`), and pad their downsampling convs on the
  right and bottom only (`downsample_padding="asymmetric"`); `tinyldm.pretrained` sets both when it
  loads one.
* The decoder mirrors the encoder with `num_res_blocks` blocks per level by default; CompVis (and
  diffusers' AutoencoderKL) use one more, which `decoder_res_blocks = num_res_blocks + 1` gives.
* Dead VQ codes are *restarted*: a code whose exponential moving average of assignments falls
  below `vq_restart_threshold` is replaced by a random encoder output of the current batch
  (the "random restarts" of Jukebox, arXiv 2005.00341). Since the usage buffer starts at 0, the
  first training step initializes the whole codebook from data. The codebook is still learned by
  gradient (the codebook loss), not by EMA updates.
* KL: no learned output log-variance (CompVis' `logvar` parameter); the reconstruction loss is a
  plain L1/L2 (see autoencoder_loss.py).

Symbols: x image in [-1, 1]; z latent (B, z_channels, H/f, W/f); mean/logvar: E_mu, log E_sigma^2;
z_e encoder output before quantization, z_q quantized latent, e_k codebook vector k.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Downsample, ResBlock, Upsample, group_norm

REGULARIZERS = ("kl", "vq", "identity")  # AutoencoderConfig.regularizer
DOWNSAMPLE_PADDINGS = ("symmetric", "asymmetric")  # AutoencoderConfig.downsample_padding


@dataclass
class AutoencoderConfig:
    in_channels: int = 3
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4)  # one entry per resolution level; f = 2^(len - 1)
    num_res_blocks: int = 2  # per level, in encoder and decoder
    # per decoder level; None: num_res_blocks (CompVis: num_res_blocks + 1)
    decoder_res_blocks: int | None = None
    z_channels: int = 4  # c, the latent's channel count
    mid_attention: bool = True  # self-attention in the middle block
    norm_groups: int = 32  # GroupNorm groups; every width must be divisible by it
    dropout: float = 0.0
    # "kl" (diagonal Gaussian posterior), "vq" (codebook), or "identity" (f = 1, see below)
    regularizer: str = "kl"
    n_codes: int = 1024  # VQ: codebook size K
    vq_beta: float = 0.25  # VQ: commitment weight beta, VQ-VAE Eq. (3)
    # VQ: restart a code whose EMA count per step falls below this
    vq_restart_threshold: float = 0.03
    vq_usage_decay: float = 0.99  # VQ: decay of that EMA
    # 1x1 convs after the encoder and before the decoder (the CompVis releases have them)
    quant_conv: bool = False
    # "symmetric" (1 pixel all round) or "asymmetric" (right / bottom: CompVis)
    downsample_padding: str = "symmetric"

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        if self.regularizer not in REGULARIZERS:
            raise ValueError("regularizer must be 'kl', 'vq' or 'identity', "
                             f"got {self.regularizer!r}")
        if self.regularizer == "identity" and (self.z_channels != self.in_channels
                                               or self.channel_mult != (1,)):
            raise ValueError("the identity first stage has z = x: set z_channels = in_channels "
                             "and channel_mult = (1,)")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError("channel_mult must be non-empty positive ints, "
                             f"got {self.channel_mult}")
        if self.downsample_padding not in DOWNSAMPLE_PADDINGS:
            raise ValueError("downsample_padding must be 'symmetric' or 'asymmetric', "
                             f"got {self.downsample_padding!r}")
        if self.decoder_res_blocks is not None and self.decoder_res_blocks < 1:
            raise ValueError("decoder_res_blocks must be >= 1 or None, "
                             f"got {self.decoder_res_blocks}")
        for m in self.channel_mult:
            if (self.base_channels * m) % self.norm_groups:
                raise ValueError(
                    f"width base_channels*mult = {self.base_channels}*{m} is not divisible by "
                    f"norm_groups={self.norm_groups}"
                )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


# ----------------------------------------------------------------------------------------------
# Encoder and decoder (ResBlock, Downsample and Upsample come from blocks.py, shared with the UNet)


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of a feature map, with a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # (B, HW, C)
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, (B, HW, C)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


def _middle(channels: int, cfg: AutoencoderConfig) -> nn.Sequential:
    attn = AttnBlock(channels, cfg.norm_groups) if cfg.mid_attention else nn.Identity()
    return nn.Sequential(
        ResBlock(channels, channels, groups=cfg.norm_groups, dropout=cfg.dropout),
        attn,
        ResBlock(channels, channels, groups=cfg.norm_groups, dropout=cfg.dropout),
    )


class Encoder(nn.Module):
    """x (B, in_channels, H, W) -> (B, out_channels, H/f, W/f)."""

    def __init__(self, cfg: AutoencoderConfig, out_channels: int):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        c = widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(c, width, groups=cfg.norm_groups, dropout=cfg.dropout))
                c = width
            if level < len(widths) - 1:
                blocks.append(Downsample(c, asymmetric=cfg.downsample_padding == "asymmetric"))
        self.down = nn.Sequential(*blocks)
        self.mid = _middle(c, cfg)
        self.norm_out = group_norm(c, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> x_rec (B, in_channels, h*f, w*f); mirrors the Encoder."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        c = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _middle(c, cfg)
        blocks: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks if cfg.decoder_res_blocks is None
                           else cfg.decoder_res_blocks):
                blocks.append(ResBlock(c, widths[level], groups=cfg.norm_groups,
                                       dropout=cfg.dropout))
                c = widths[level]
            if level > 0:
                blocks.append(Upsample(c))
        self.up = nn.Sequential(*blocks)
        self.norm_out = group_norm(c, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------
# The two regularizers


class DiagonalGaussian:
    """q_E(z|x) = N(mean, diag(exp(logvar))), built from the encoder's 2c output channels."""

    def __init__(self, moments: torch.Tensor):
        B, C2, h, w = moments.shape
        assert C2 % 2 == 0, f"moments need an even channel count (mean, logvar), got {C2}"
        # (B, c, h, w) each; fp32 even under autocast
        mean, logvar = moments.float().chunk(2, dim=1)
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite, as CompVis does
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device).to(self.mean.device)
        return self.mean + self.std * eps  # reparameterization: z = E_mu + E_sigma * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per image, summed over (c, h, w): shape (B,)."""
        # BEGIN ASSIGNMENT kl_term
        # Kingma & Welling App. B: -KL = 1/2 sum(1 + log sigma^2 - mu^2 - sigma^2)
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))
        # END ASSIGNMENT kl_term


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor  # (B, c, h, w), straight-through: forward value e_k, gradient of z_e
    loss: torch.Tensor  # scalar: codebook + beta * commitment
    indices: torch.Tensor  # (B, h, w) long, in [0, K)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with straight-through gradients and dead-code restarts."""

    def __init__(self, n_codes: int, dim: int, *, beta: float, restart_threshold: float,
                 usage_decay: float):
        super().__init__()
        if n_codes < 2:
            raise ValueError(f"n_codes must be >= 2, got {n_codes}")
        self.beta, self.restart_threshold, self.usage_decay = beta, restart_threshold, usage_decay
        self.codebook = nn.Embedding(n_codes, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / n_codes, 1.0 / n_codes)
        # EMA of how many latent pixels each code received per training step; 0 = "dead", so the
        # first training step initializes every code from the encoder's outputs.
        self.register_buffer("usage", torch.zeros(n_codes))

    @property
    def n_codes(self) -> int:
        return self.codebook.num_embeddings

    def lookup(self, z_e: torch.Tensor) -> torch.Tensor:
        """VQ-VAE Eq. (1): the index of the nearest codebook vector for each latent pixel of
        z_e -> (B, h, w)."""
        B, C, h, w = z_e.shape
        # BEGIN ASSIGNMENT vq_lookup
        flat = z_e.detach().float().permute(0, 2, 3, 1).reshape(-1, C)  # (B*h*w, c)
        e = self.codebook.weight.detach().float()  # (K, c)
        # (B*h*w, K)
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        return dist.argmin(dim=1).reshape(B, h, w)
        # END ASSIGNMENT vq_lookup

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, h, w) -> code vectors (B, c, h, w)."""
        return self.codebook(indices).permute(0, 3, 1, 2)

    @torch.no_grad()
    def _restart_dead_codes(self, z_e: torch.Tensor) -> None:
        dead = self.usage < self.restart_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        flat = z_e.detach().float().permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])
        pick = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
        self.codebook.weight[dead] = flat[pick].to(self.codebook.weight.dtype)
        self.usage[dead] = 1.0  # a grace period of about log(1/threshold)/(1-decay) steps

    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
        B, C, h, w = z_e.shape
        if C != self.codebook.embedding_dim:
            raise ValueError(f"z_e has {C} channels, "
                             f"codebook vectors have {self.codebook.embedding_dim}")
        if self.training:
            self._restart_dead_codes(z_e)
        indices = self.lookup(z_e)
        e_k = self.embed(indices).to(z_e.dtype)
        # VQ-VAE Eq. (3): ||sg[z_e] - e||^2 moves the codes,
        # beta ||z_e - sg[e]||^2 commits the encoder
        loss = F.mse_loss(e_k.float(), z_e.detach().float()) + self.beta * F.mse_loss(
            z_e.float(), e_k.detach().float()
        )
        # BEGIN ASSIGNMENT vq_lookup
        # straight-through: forward e_k, backward d/dz_e = identity
        z_q = z_e + (e_k - z_e).detach()
        # END ASSIGNMENT vq_lookup
        if self.training:
            with torch.no_grad():
                counts = torch.bincount(indices.flatten(), minlength=self.n_codes).float()
                self.usage.mul_(self.usage_decay).add_(counts, alpha=1.0 - self.usage_decay)
        return QuantizerOutput(z_q=z_q, loss=loss, indices=indices)


# ----------------------------------------------------------------------------------------------
# The autoencoder


@dataclass
class AEOutput:
    x_rec: torch.Tensor  # (B, C, H, W)
    z: torch.Tensor  # the latent the decoder saw: a posterior sample (KL) or z_q (VQ)
    kl: torch.Tensor | None = None  # (B,) KL per image, KL-reg. only
    vq_loss: torch.Tensor | None = None  # scalar, VQ-reg. only
    indices: torch.Tensor | None = None  # (B, h, w), VQ-reg. only


class Autoencoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        c = config.z_channels
        if config.regularizer == "identity":  # pixel-space diffusion: z = x, nothing to learn
            self.encoder, self.decoder = nn.Identity(), nn.Identity()
        else:
            moments = 2 * c if config.regularizer == "kl" else c
            self.encoder = Encoder(config, out_channels=moments)
            self.decoder = Decoder(config)
        if config.quant_conv and config.regularizer != "identity":
            self.quant_conv, self.post_quant_conv = (nn.Conv2d(moments, moments, 1),
                                                     nn.Conv2d(c, c, 1))
        else:
            self.quant_conv = self.post_quant_conv = None
        self.quantizer = (
            VectorQuantizer(
                config.n_codes,
                c,
                beta=config.vq_beta,
                restart_threshold=config.vq_restart_threshold,
                usage_decay=config.vq_usage_decay,
            )
            if config.regularizer == "vq"
            else None
        )
        # Latent statistics measured on data (App. G); 1.0 / 0 / 1 until `set_latent_stats`
        # is called.
        self.register_buffer("scale_factor", torch.tensor(1.0))
        self.register_buffer("latent_mean", torch.zeros(c))
        self.register_buffer("latent_std", torch.ones(c))

    # -- shapes -------------------------------------------------------------------------------
    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        f = self.downsample_factor
        if image_size % f:
            raise ValueError(f"image size {image_size} is not divisible by the downsampling "
                             f"factor f={f}")
        return (self.config.z_channels, image_size // f, image_size // f)

    def _check_image(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images (B, {self.config.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        f = self.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image size {tuple(x.shape[2:])} is not divisible by f={f}")

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight, D_L in the adaptive GAN weight (VQGAN Eq. (7))."""
        return self.decoder.conv_out.weight

    # -- the API the LDM uses -----------------------------------------------------------------
    def posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        """KL-reg. only: q_E(z|x)."""
        if self.config.regularizer != "kl":
            raise ValueError("posterior() exists only for regularizer='kl'")
        self._check_image(x)
        return DiagonalGaussian(self._encode(x))

    def encode(
        self, x: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> z (B, c, H/f, W/f), *unscaled* (multiply by scale_factor).

        KL: the posterior mean, or a sample z = E_mu + E_sigma * eps with `sample=True` (what the
        paper's LDM trains on). VQ: the latent *before* quantization (App. G (ii)).
        """
        if self.config.regularizer == "kl":
            q = self.posterior(x)
            return q.sample(generator) if sample else q.mode()
        self._check_image(x)
        return self._encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, c, h, w), unscaled -> x_rec (B, 3, h*f, w*f). VQ: quantizes z first."""
        if z.ndim != 4 or z.shape[1] != self.config.z_channels:
            raise ValueError(f"expected latents (B, {self.config.z_channels}, h, w), "
                             f"got {tuple(z.shape)}")
        if self.quantizer is not None:
            z = self.quantizer.embed(self.quantizer.lookup(z)).to(z.dtype)
        return self._decode(z)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return h if self.quant_conv is None else self.quant_conv(h)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, *, sample_posterior: bool = True,
                eps: torch.Tensor | None = None) -> AEOutput:
        """Training pass: encode, regularize (sample or quantize), decode. KL: the posterior sample
        is z = E_mu + E_sigma * eps (reparameterization), with `eps` (B, c, h, w) ~ N(0, I) the
        caller's draw, or drawn here when None."""
        if self.config.regularizer == "kl":
            q = self.posterior(x)
            if sample_posterior and eps is not None:
                z = q.mean + q.std * eps.to(q.mean.dtype)
            else:
                z = q.sample() if sample_posterior else q.mode()
            return AEOutput(x_rec=self._decode(z), z=z, kl=q.kl())
        self._check_image(x)
        if self.quantizer is None:  # identity
            return AEOutput(x_rec=x, z=x)
        out = self.quantizer(self._encode(x))
        return AEOutput(x_rec=self._decode(out.z_q), z=out.z_q, vq_loss=out.loss,
                        indices=out.indices)

    # -- latent statistics and (de)serialization ------------------------------------------------
    def set_latent_stats(self, stats: LatentStats) -> None:
        self.scale_factor.fill_(stats.scale_factor)
        self.latent_mean.copy_(torch.as_tensor(stats.mean))
        self.latent_std.copy_(torch.as_tensor(stats.std))

    def to_dict(self) -> dict:
        """{"config": plain dict, "state_dict": tensors}: what a checkpoint stores for this
        model."""
        state_dict = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        return {"config": asdict(self.config), "state_dict": state_dict}

    @classmethod
    def from_dict(cls, d: dict) -> Autoencoder:
        if not isinstance(d, dict) or "config" not in d or "state_dict" not in d:
            raise ValueError("an autoencoder entry must be a dict with 'config' and 'state_dict'")
        model = cls(AutoencoderConfig(**d["config"]))
        model.load_state_dict(d["state_dict"])
        return model

    @classmethod
    def from_checkpoint(cls, ckpt: dict, *, prefer_ema: bool = True) -> Autoencoder:
        """Rebuild from a train_ae.py checkpoint dict (see tinyldm.checkpoint.load_checkpoint); EMA
        if present."""
        entry = ckpt.get("ema_autoencoder") if prefer_ema else None
        return cls.from_dict(entry if entry is not None else ckpt["autoencoder"]).eval()


@dataclass
class LatentStats:
    mean: list[float]  # per channel
    std: list[float]  # per channel
    global_mean: float
    global_std: float  # sigma_hat of App. G, over all b, c, h, w
    scale_factor: float  # 1 / sigma_hat
    n_images: int


@torch.no_grad()
def latent_statistics(
    model: Autoencoder, images, *, max_images: int, generator: torch.Generator | None = None
) -> LatentStats:
    """Encode up to `max_images` images (an iterable of (B, 3, H, W) batches) and measure z.

    KL latents are posterior samples (the paper's E(x)); pass a generator to keep the global RNG
    untouched. App. G: sigma_hat^2 = 1/(bchw) sum (z - mu_hat)^2 and z <- z / sigma_hat.
    """
    device = model.scale_factor.device  # a buffer: the identity first stage has no parameters
    zs, n = [], 0
    for x in images:
        x = x[: max_images - n].to(device)
        zs.append(model.encode(x, sample=True, generator=generator).float().cpu())
        n += x.shape[0]
        if n >= max_images:
            break
    if n < 2:
        raise ValueError("latent_statistics needs at least 2 images")
    z = torch.cat(zs)  # (N, c, h, w)
    per_channel = z.transpose(0, 1).reshape(z.shape[1], -1)  # (c, N*h*w)
    global_std = float(z.std())
    if not math.isfinite(global_std) or global_std == 0.0:
        raise ValueError(f"latent std is {global_std}; cannot compute a scale factor")
    return LatentStats(
        mean=per_channel.mean(1).tolist(),
        std=per_channel.std(1).tolist(),
        global_mean=float(z.mean()),
        global_std=global_std,
        scale_factor=1.0 / global_std,
        n_images=n,
    )
