"""The autoencoder's training losses: reconstruction + perceptual + patch-adversarial + regularizer.

Paper contract
--------------
LDM (arXiv 2112.10752), App. G: the first stage is trained "in an adversarial manner following
[VQGAN]": a patch-based discriminator D_psi tells images x from reconstructions D(E(x)), and

    L_Autoencoder = min_{E,D} max_psi ( L_rec(x, D(E(x))) - L_adv(D(E(x))) + log D_psi(x)
                                        + L_reg(x; E, D) )

where L_rec is a pixel loss plus the LPIPS perceptual loss (Zhang et al., arXiv 1801.03924) and
L_reg is the KL term (weight ~1e-6) or the VQ codebook loss (see autoencoder.py).
From VQGAN (Esser et al., arXiv 2012.09841) we take:
* the PatchGAN discriminator (Isola et al., pix2pix, arXiv 1611.07004): a stack of stride-2 4x4
  convs with BatchNorm and LeakyReLU(0.2) whose output is one logit per overlapping image patch;
* the adaptive weight, Eq. (7):  lambda = ||grad_{D_L} L_rec|| / (||grad_{D_L} L_GAN|| + delta),
  D_L being the decoder's last layer; it balances the two gradients where they enter the decoder;
* a start delay: the adversarial terms are off before step `disc_start` (as in the VQGAN and CompVis
  training code), so the discriminator does not fight a blurry, untrained autoencoder.
Discriminator losses: hinge (Lim & Ye, arXiv 1705.02894; CompVis' default) or the non-saturating
logistic loss (Goodfellow et al. 2014).

Reductions (a choice the paper leaves to its configs). Every term is a mean: L1 or L2 per pixel,
LPIPS per image, the VQ loss per latent element; the KL is summed over one image's latent and
divided by that image's element count C*H*W. CompVis sums the reconstruction loss over pixels
instead; dividing both by C*H*W gives the same ratio between them, so `kl_weight = 1e-6` means what
it means there.

Left out: CompVis' learned output log-variance, "ActNorm" in the discriminator, LeCam and R1
regularizers, and the perceptual loss's own spatial averaging options.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .autoencoder import AEOutput

REC_LOSSES = ("l1", "l2")  # AELossConfig.rec_loss
LPIPS_NETS = ("vgg", "alex", "squeeze")  # AELossConfig.lpips_net: the backbones lpips ships
DISC_LOSSES = ("hinge", "non_saturating")  # AELossConfig.disc_loss


@dataclass
class AELossConfig:
    rec_loss: str = "l1"  # "l1" or "l2"
    perceptual_weight: float = 1.0  # LPIPS weight; > 0 needs the optional `lpips` package
    lpips_net: str = "vgg"  # LPIPS backbone: "vgg", "alex" or "squeeze"
    # False: a random backbone, no download (--smoke and tests; not a perceptual loss)
    lpips_pretrained: bool = True
    kl_weight: float = 1e-6  # weight of KL(q_E(z|x) || N(0, I)), App. G
    codebook_weight: float = 1.0  # weight of the VQ codebook + commitment loss
    disc_start: int = 50001  # training step at which the adversarial terms switch on
    disc_weight: float = 0.5  # multiplies the adaptive weight lambda
    disc_loss: str = "hinge"  # "hinge" or "non_saturating"
    disc_channels: int = 64
    disc_layers: int = 3  # stride-2 convs; the receptive field grows with it
    adaptive_delta: float = 1e-6  # delta of VQGAN Eq. (7)
    adaptive_max: float = 1e4  # clamp lambda to [0, adaptive_max]

    def __post_init__(self):
        if self.rec_loss not in REC_LOSSES:
            raise ValueError(f"rec_loss must be 'l1' or 'l2', got {self.rec_loss!r}")
        if self.disc_loss not in DISC_LOSSES:
            raise ValueError("disc_loss must be 'hinge' or 'non_saturating', "
                             f"got {self.disc_loss!r}")
        if self.perceptual_weight < 0 or self.kl_weight < 0 or self.disc_weight < 0:
            raise ValueError("loss weights must be >= 0")
        if self.disc_layers < 1:
            raise ValueError(f"disc_layers must be >= 1, got {self.disc_layers}")


# ----------------------------------------------------------------------------------------------
# The PatchGAN discriminator


class PatchDiscriminator(nn.Module):
    """x (B, C, H, W) -> logits (B, 1, H', W'), one per overlapping patch (pix2pix's
    NLayerDiscriminator)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        self.n_layers = n_layers
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for n in range(1, n_layers + 1):
            c_next = channels * min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden conv keeps the resolution
            layers += [nn.Conv2d(c, c_next, 4, stride, 1, bias=False), nn.BatchNorm2d(c_next),
                       nn.LeakyReLU(0.2)]
            c = c_next
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # the DCGAN initialization that pix2pix and VQGAN use
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # n_layers stride-2 convs, then two 4x4 stride-1 convs that each remove one pixel
        if min(H, W) // 2**self.n_layers < 3:
            raise ValueError(f"images of {H}x{W} are too small for a discriminator "
                             f"with {self.n_layers} layers")
        return self.net(x)


def discriminator_hinge(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def discriminator_non_saturating(logits_real: torch.Tensor,
                                 logits_fake: torch.Tensor) -> torch.Tensor:
    # -log sigmoid(l) = softplus(-l) for reals, -log(1 - sigmoid(l)) = softplus(l) for fakes
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adaptive_weight(grad_rec: torch.Tensor, grad_adv: torch.Tensor, *, delta: float,
                    max_value: float) -> torch.Tensor:
    """VQGAN Eq. (7): the adaptive weight lambda from the gradients of both losses at the decoder's
    last layer D_L (`AELoss.last_layer_gradients`), clamped to [0, max_value], without gradient."""
    # BEGIN ASSIGNMENT adaptive_weight
    lam = grad_rec.float().norm() / (grad_adv.float().norm() + delta)  # Eq. (7)
    return lam.clamp(0.0, max_value).detach()
    # END ASSIGNMENT adaptive_weight


# ----------------------------------------------------------------------------------------------
# The loss module


@dataclass
class AETerms:
    """The E, D player's loss terms at one step, each a differentiable scalar."""

    rec: torch.Tensor  # L_rec: the pixel loss + perceptual_weight * LPIPS
    reg: torch.Tensor  # L_reg: kl_weight * KL per image element, or codebook_weight * VQ loss
    g_adv: torch.Tensor | None  # -L_adv for the autoencoder; None before disc_start
    logs: dict[str, torch.Tensor]  # the terms, detached


class AELoss(nn.Module):
    """Holds the discriminator (trained) and LPIPS (frozen; `perceptual`, given where
    perceptual_weight > 0); computes both players' losses."""

    def __init__(self, config: AELossConfig, *, in_channels: int = 3,
                 perceptual: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.discriminator = PatchDiscriminator(in_channels, config.disc_channels,
                                                config.disc_layers)
        if perceptual is None and config.perceptual_weight > 0:
            raise ValueError("perceptual_weight > 0 needs the LPIPS network: pass perceptual="
                             "tinyldm.evaluation.features.load_lpips(config.lpips_net)")
        self.perceptual = perceptual  # registered as a submodule, but frozen; not in any optimizer

    def disc_active(self, step: int) -> bool:
        return step >= self.config.disc_start

    def reconstruction(self, x: torch.Tensor,
                       x_rec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel loss, perceptual loss); both means, both differentiable w.r.t. x_rec."""
        diff = x_rec.float() - x.float()
        pixel = diff.abs().mean() if self.config.rec_loss == "l1" else diff.pow(2).mean()
        if self.config.perceptual_weight > 0:
            if self.perceptual is None:
                raise RuntimeError("perceptual_weight > 0 but no perceptual network is loaded")
            # LPIPS takes inputs in [-1, 1]
            perceptual = self.perceptual(x_rec.float(), x.float()).mean()
        else:
            perceptual = torch.zeros((), device=x.device)
        return pixel, perceptual

    def generator_adv(self, x_rec: torch.Tensor) -> torch.Tensor:
        """-L_adv for the autoencoder: make the discriminator call reconstructions real."""
        logits_fake = self.discriminator(x_rec).float()
        if self.config.disc_loss == "hinge":
            return -logits_fake.mean()
        return F.softplus(-logits_fake).mean()

    def autoencoder_terms(self, x: torch.Tensor, out: AEOutput, *, step: int) -> AETerms:
        """The E, D player's loss terms at training `step`: L_rec, L_reg and, once the
        discriminator is on, -L_adv."""
        cfg = self.config
        B, C, H, W = x.shape
        if out.x_rec.shape != x.shape:
            raise ValueError(f"reconstruction {tuple(out.x_rec.shape)} does not match "
                             f"input {tuple(x.shape)}")
        pixel, perceptual = self.reconstruction(x, out.x_rec)
        rec = pixel + cfg.perceptual_weight * perceptual  # L_rec
        logs = {"rec": pixel.detach(), "perceptual": perceptual.detach()}

        if out.kl is not None:  # KL-reg., normalized per image element (see the module docstring)
            reg = cfg.kl_weight * out.kl.mean() / (C * H * W)
            logs["kl"] = out.kl.mean().detach()
        elif out.vq_loss is not None:  # VQ-reg.
            reg = cfg.codebook_weight * out.vq_loss
            logs["vq"] = out.vq_loss.detach()
        else:
            raise ValueError("AEOutput carries neither a KL nor a VQ term")

        g_adv = self.generator_adv(out.x_rec) if self.disc_active(step) else None
        return AETerms(rec=rec, reg=reg, g_adv=g_adv, logs=logs)

    def last_layer_gradients(self, terms: AETerms,
                             last_layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(grad_{D_L} L_rec, grad_{D_L} L_GAN): the two gradients that VQGAN Eq. (7) compares at
        the decoder's last layer D_L; None before disc_start. The graph is kept for the backward
        pass."""
        if terms.g_adv is None:
            return None
        grad_rec = torch.autograd.grad(terms.rec, last_layer, retain_graph=True)[0]
        grad_adv = torch.autograd.grad(terms.g_adv, last_layer, retain_graph=True)[0]
        return grad_rec, grad_adv

    def autoencoder_loss(
        self, terms: AETerms, grads: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The E, D player's loss L_rec + L_reg + lambda * (-L_adv), the last term once the
        discriminator is on, with lambda = disc_weight * Eq. (7) of `grads` = (grad_rec, grad_adv)
        at D_L (`last_layer_gradients`); without them (evaluation) lambda = disc_weight. Also
        returns each term, detached, for logging."""
        cfg = self.config
        loss, logs = terms.rec + terms.reg, dict(terms.logs)
        if terms.g_adv is not None:
            if grads is not None:
                lam = cfg.disc_weight * adaptive_weight(*grads, delta=cfg.adaptive_delta,
                                                        max_value=cfg.adaptive_max)
            else:  # evaluation: no gradients to balance
                lam = torch.tensor(cfg.disc_weight, device=terms.rec.device)
            loss = loss + lam * terms.g_adv
            logs.update(g_adv=terms.g_adv.detach(), adaptive_weight=lam)
        logs["loss_ae"] = loss.detach()
        return loss, logs

    def discriminator_loss(
        self, x: torch.Tensor, x_rec: torch.Tensor, *, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The D_psi player's loss on real x and detached reconstructions (0 before disc_start)."""
        if not self.disc_active(step):
            return torch.zeros((), device=x.device), {}
        logits_real = self.discriminator(x.detach()).float()
        logits_fake = self.discriminator(x_rec.detach()).float()
        if self.config.disc_loss == "hinge":
            loss = discriminator_hinge(logits_real, logits_fake)
        else:
            loss = discriminator_non_saturating(logits_real, logits_fake)
        logs = {"loss_disc": loss.detach(), "logits_real": logits_real.mean().detach()}
        logs["logits_fake"] = logits_fake.mean().detach()
        return loss, logs
