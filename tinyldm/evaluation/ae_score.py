"""What a train_ae.py run shows and ends with: reconstruction grids, held-out PSNR / SSIM with the
KL or codebook statistics, and the latent statistics of training images that set the scale factor
the LDM divides by (App. G).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..autoencoder import Autoencoder, latent_statistics
from ..data.image_batches import first_images
from .metrics import codebook_stats, psnr, ssim
from .viz import save_image_grid


@torch.no_grad()
def reconstruct(model: Autoencoder, x: torch.Tensor) -> torch.Tensor:
    """The deterministic path the LDM uses: decode(encode(x)), posterior mean / quantized latent."""
    return model.decode(model.encode(x)).float().clamp(-1, 1)


def save_reconstructions(model: Autoencoder, x: torch.Tensor, path: Path) -> Path:
    """`path`: top row the held-out inputs `x`, bottom row their reconstructions by `model`."""
    training = model.training
    model.eval()
    x_rec = reconstruct(model, x)
    model.train(training)
    return save_image_grid(torch.cat([x, x_rec]), path, nrow=len(x))


@torch.no_grad()
def reconstruction_scores(model: Autoencoder, held_out: Dataset, config,
                          device: torch.device) -> dict:
    """Held-out PSNR / SSIM, and KL (KL-reg.) or codebook usage / perplexity (VQ-reg.)."""
    model.eval()
    psnrs, ssims, kls, stds, indices = [], [], [], [], []
    for x in first_images(held_out, config.n_eval, config.batch_size):
        x = x.to(device)
        x_rec = reconstruct(model, x)
        psnrs.append(psnr(x_rec, x).cpu())
        ssims.append(ssim(x_rec, x).cpu())
        if model.config.regularizer == "kl":
            q = model.posterior(x)
            kls.append(q.kl().cpu())
            stds.append(q.std.mean().cpu()[None])
        else:
            indices.append(model.quantizer.lookup(model.encode(x)).cpu())
    result = {"n_eval": int(torch.cat(psnrs).numel()), "psnr": float(torch.cat(psnrs).mean()),
              "ssim": float(torch.cat(ssims).mean())}
    if kls:
        result.update(kl_per_image=float(torch.cat(kls).mean()),
                      posterior_std=float(torch.cat(stds).mean()))
    else:
        result.update(codebook_stats(torch.cat(indices), model.quantizer.n_codes))
    return result


def final_metrics(state, train_set: Dataset, held_out: Dataset, config,
                  device: torch.device, train_seconds: float) -> dict:
    """The held-out scores of the weights in use, and the latent statistics of training images,
    which set the scale factor the LDM divides by (stored in the model and its EMA)."""
    eval_model = state.eval_model
    metrics = reconstruction_scores(eval_model, held_out, config, device)
    stats = latent_statistics(
        eval_model, first_images(train_set, config.stats_images, config.batch_size),
        max_images=config.stats_images, generator=torch.Generator().manual_seed(config.seed),
    )
    for m in {id(state.model): state.model, id(eval_model): eval_model}.values():
        m.set_latent_stats(stats)
    metrics.update(step=config.steps, train_seconds=round(train_seconds, 1), latent=asdict(stats))
    return metrics


def format_metrics(m: dict) -> str:
    lines = [f"held-out ({m['n_eval']} images): PSNR {m['psnr']:.2f} dB  SSIM {m['ssim']:.4f}"]
    if "kl_per_image" in m:
        lines.append(f"KL per image {m['kl_per_image']:.1f} nats, "
                     f"mean posterior std {m['posterior_std']:.4f}")
    else:
        lines.append(f"codebook usage {m['codebook_usage']:.3f}, perplexity {m['perplexity']:.1f}")
    lat = m["latent"]
    fmt = " ".join(f"{v:+.3f}" for v in lat["mean"]), " ".join(f"{v:.3f}" for v in lat["std"])
    lines.append(f"latent per-channel mean [{fmt[0]}] std [{fmt[1]}] "
                 f"over {lat['n_images']} train images")
    lines.append(f"latent global std {lat['global_std']:.4f} "
                 f"-> scale_factor {lat['scale_factor']:.4f}")
    lines.append(f"train time {m['train_seconds']:.1f} s")
    return "\n".join(lines)

