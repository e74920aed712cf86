"""What a run says about itself before it trains: its model, its data, and `health:` lines for
what would spoil it (a first stage under its preset's PSNR gate or unfinished, scaled latents far
from unit std, fewer images than a batch, so many passes over few images that they are memorised).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..autoencoder import AutoencoderConfig
from ..autoencoder_loss import AELossConfig
from ..data.latent_batches import LatentTrainingSet
from ..ldm import Denoiser
from .distributed import World
from .presets import AE_GATES_DB


def describe_latents(data: LatentTrainingSet, ae, ae_ckpt: dict, ae_path: Path, config) -> None:
    """The latents the LDM trains on, and the health of the first stage and the data: a held-out
    PSNR under the preset's gate, scaled latents whose std is far from 1, too few images."""
    N, c, h, w = data.latents.shape
    z = (f"a fresh posterior sample each step, mean sigma {float(data.std.mean()):.4f} scaled"
         if data.std is not None else "posterior means" if ae.config.regularizer == "kl" else
         "pre-quantization latents (VQ)")
    # what the UNet sees: the means' spread, plus the posterior's noise when it samples
    std = float((data.latents.var() + (data.std.pow(2).mean() if data.std is not None else 0))
                .sqrt())
    print(f"latents: {N} x {c} x {h} x {w}, scale factor {float(ae.scale_factor):.4f} "
          f"(from the autoencoder's data), scaled std {std:.3f}; trains on {z}")
    if ae_ckpt.get("plan"):  # --plan's untrained stand-in, on a few batches: nothing to say
        return
    for line in (first_stage_health(ae_ckpt, ae_path, config) + latent_health(std, ae)
                 + memorising(N, config.steps, config.batch_size)):
        print(f"health: {line}")


def first_stage_health(ae_ckpt: dict, ae_path: Path, config) -> list[str]:
    """A first stage that has not reached its preset's held-out PSNR gate (`AE_GATES_DB`): an
    untrained, unfinished or wrongly chosen autoencoder, found before the LDM trains on it."""
    if ae_ckpt["autoencoder"]["config"].get("regularizer") == "identity":
        return []
    gate = AE_GATES_DB.get(config.ae_preset, AE_GATES_DB["photos"])
    psnr = (ae_ckpt.get("metrics") or {}).get("psnr")
    if psnr is None:
        return [f"the autoencoder {ae_path} has no held-out score (it stopped at step "
                f"{ae_ckpt.get('step')} of {ae_ckpt.get('train_config', {}).get('steps')}): finish "
                "it (python train_ae.py --resume --out ITS_FOLDER) before training an LDM on it"]
    if psnr < gate:
        return [f"the autoencoder {ae_path} reconstructs held-out images at {psnr:.1f} dB, under "
                f"the {gate:.0f} dB that a first stage for --ae_preset {config.ae_preset} should "
                "reach: the LDM's samples can be no sharper than its reconstructions. Train it "
                "longer, or check that --ae is the file you meant"]
    return []


def latent_health(std: float, ae) -> list[str]:
    """Scaled latents whose std is far from 1: samples come out flat or as noise (a scale factor
    that does not fit the latents; diffusers#2164, latent-diffusion#187)."""
    if 0.5 <= std <= 2.0:
        return []
    return [f"the scaled latents' std is {std:.3f}, not about 1 (scale factor "
            f"{float(ae.scale_factor):.4f}): the noise schedule assumes unit variance, and samples "
            "come out flat or as noise. Use the scale factor train_ae.py measured (1 / std of the "
            "training latents): retrain or re-measure the autoencoder rather than setting it"]


def describe_denoiser(denoiser: Denoiser, config, device: torch.device, world: World) -> None:
    n_params, n_unet = (sum(p.numel() for p in m.parameters()) / 1e6
                        for m in (denoiser, denoiser.unet))
    print(f"denoiser: {n_params:.2f} M parameters (UNet {n_unet:.2f} M), cond={config.cond}, "
          f"task={config.task}, device={device}"
          + (f", process {world.rank} of {world.size}" if world.enabled else ""))


def describe_loss(loss: AELossConfig, ae: AutoencoderConfig) -> str:
    """The training objective in one line, e.g.
    "L1 + 1 x LPIPS (vgg) + 1e-06 x KL + 0.5 x PatchGAN from step 50001"."""
    terms = [loss.rec_loss.upper()]
    if loss.perceptual_weight > 0:
        backbone = ("" if loss.lpips_pretrained else
                    ", random backbone: a plumbing check, not a perceptual loss")
        terms.append(f"{loss.perceptual_weight:g} x LPIPS ({loss.lpips_net}{backbone})")
    if ae.regularizer == "kl":
        terms.append(f"{loss.kl_weight:g} x KL")
    elif ae.regularizer == "vq":
        terms.append(f"{loss.codebook_weight:g} x codebook")
    if loss.disc_weight > 0:
        terms.append(f"{loss.disc_weight:g} x PatchGAN ({loss.disc_loss}) "
                     f"from step {loss.disc_start}")
    return " + ".join(terms)


def describe_autoencoder(state, config, train_set: Dataset, held_out: Dataset,
             device: torch.device) -> None:
    model, ae_config = state.model, state.model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"autoencoder: {n_params / 1e6:.2f}M params, f={ae_config.downsample_factor}, "
          f"{ae_config.regularizer}, latent {model.latent_shape(config.image_size)} for "
          f"{config.image_size}px; {len(train_set)} train / {len(held_out)} held-out images; "
          f"device {device}; steps {state.start}..{config.steps}")
    print(f"loss: {describe_loss(state.loss_fn.config, ae_config)}; "
          f"bf16 autocast {'on' if config.amp else 'off'} (CUDA only)")
    if len(train_set) < config.batch_size:  # (memorising shows in the held-out score it measures)
        print(f"health: {memorising(len(train_set), config.steps, config.batch_size)[0]}")


def memorising(images: int, steps: int, batch: int) -> list[str]:
    """Notes on data too small for the run: fewer images than a batch; so many passes over few
    images that the model will reproduce them (a note, not a refusal)."""
    notes = []
    if images < batch:
        notes.append(f"warning: {images} training images, fewer than a batch of {batch}: "
                     "each batch repeats images")
    epochs = steps * batch / max(images, 1)
    if images < 1000 and epochs > 500:
        notes.append(f"note: {epochs:.0f} passes over {images} images: expect samples close to the "
                     "training images (memorised); more images, or fewer --steps")
    return notes
