"""A model trained with tinyldm, saved in the diffusers format, for diffusers' classes to sample.

    python -m tinyldm.pretrained.export runs/ldm-celeba64/ldm.pt exported/  # then, in diffusers:
    # DiffusionPipeline.from_pretrained("exported")                         (unconditional models)

What is written (each part with diffusers' own `save_pretrained`):

    unconditional, plain attention (the photo presets)
        an LDMPipeline folder: unet/ (UNet2DModel), vqvae/ (VQModel or AutoencoderKL), scheduler/,
        model_index.json
    class-conditional (cross-attention to a class token)
        unet/ (UNet2DConditionModel), vqvae/, scheduler/, and class_embeddings.safetensors +
        class_embeddings.json

diffusers has no pipeline for an LDM whose UNet cross-attends to one learned token per class, so the
class model's folder holds the class embedding table (`embeddings`: (num_classes + 1, context_dim),
the last row the null class that classifier-free guidance uses) and its names; `class_condition`
below reads them, and docs/pretrained.md shows the ten-line DDIM loop with diffusers' scheduler that
samples it. The text models trained here read captions with tinyldm's own word-level encoder, which
diffusers does not have: refused.

The scheduler is diffusers' DDIMScheduler set to tinyldm's sampler: the model's betas and prediction
type, CompVis' "uniform" spacing (t = 1, 21, ... for 50 steps: `steps_offset` 1), the last step to
alpha_bar = 1, no clipping. The EMA weights are exported when the checkpoint has them, as sample.py
uses them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor

from tinyldm.checkpoint import load_ldm
from tinyldm.cli import ArgumentParser, UsageError, run
from tinyldm.ldm import DiffusionConfig
from tinyldm.pretrained.autoencoder import autoencoder_to_diffusers
from tinyldm.pretrained.unet import unet_to_diffusers
from tinyldm.schedule import DEFAULT_BETA_RANGE

_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
_PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def diffusers_scheduler_config(cfg: DiffusionConfig) -> dict:
    """DDIMScheduler settings that reproduce tinyldm's DDIM for a model trained with `cfg`."""
    lo, hi = DEFAULT_BETA_RANGE.get(cfg.schedule, (None, None))
    config = dict(num_train_timesteps=cfg.T, beta_schedule=_SCHEDULES[cfg.schedule],
                  prediction_type=_PREDICTIONS[cfg.prediction], clip_sample=False,
                  set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading")
    if cfg.schedule != "cosine":
        config.update(beta_start=cfg.beta_start if cfg.beta_start is not None else lo,
                      beta_end=cfg.beta_end if cfg.beta_end is not None else hi)
    return config


def export_checkpoint(ckpt: dict, out: str | Path) -> Path:
    """Write a tinyldm LDM checkpoint (the dict `load_checkpoint` returns) as a diffusers-format
    folder."""
    import diffusers

    kind = ckpt["cond_config"]["kind"]
    if kind not in ("none", "class"):
        raise ValueError(f"a {kind}-conditional model reads its condition with tinyldm's own "
                         "encoder, which diffusers has no counterpart for; unconditional and "
                         "class-conditional models export")
    denoiser, _, autoencoder, cfg = load_ldm(ckpt)
    if denoiser.unet.cfg.concat_channels:
        raise ValueError("concat-conditioned models (inpainting, super-resolution, semantic maps) "
                         "do not export: diffusers' LDM pipelines take no image condition")
    out = Path(out)
    unet = unet_to_diffusers(denoiser.unet)
    vqvae = autoencoder_to_diffusers(autoencoder)
    scheduler = diffusers.DDIMScheduler(**diffusers_scheduler_config(cfg))
    if kind == "none":
        diffusers.LDMPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler).save_pretrained(out)
    else:
        for part, module in (("unet", unet), ("vqvae", vqvae), ("scheduler", scheduler)):
            module.save_pretrained(out / part)
    # the latent scale, which diffusers reads from the VQ config but tinyldm.pretrained.load does
    # not (the CelebA-HQ release's VQ config lacks it): kept beside, for loading it back
    (out / "tinyldm.json").write_text(json.dumps(
        {"scale_factor": float(autoencoder.scale_factor),
         "written_by": "python -m tinyldm.pretrained.export"}, indent=1))
    if kind == "none":
        return out
    from safetensors.torch import save_file

    table = denoiser.cond.class_emb.weight.detach().contiguous()
    save_file({"embeddings": table}, str(out / "class_embeddings.safetensors"))
    names = list(ckpt.get("class_names") or [])
    (out / "class_embeddings.json").write_text(json.dumps(
        {"class_names": names, "num_classes": table.shape[0] - 1,
         "null_class": table.shape[0] - 1}, indent=1))
    return out


def class_condition(folder: str | Path, labels: Tensor) -> Tensor:
    """The `encoder_hidden_states` (B, 1, context_dim) of an exported class model for class ids
    `labels` (B,); id num_classes is the null class."""
    from safetensors.torch import load_file

    table = load_file(str(Path(folder) / "class_embeddings.safetensors"))["embeddings"]
    return table[labels][:, None, :]


def main(argv: list[str] | None = None) -> Path:
    p = ArgumentParser(prog="python -m tinyldm.pretrained.export", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="ldm.pt written by train_ldm.py")
    p.add_argument("out", help="the folder to write (diffusers format)")
    args = p.parse_args(argv)
    from tinyldm.checkpoint import load_checkpoint

    try:
        out = export_checkpoint(load_checkpoint(args.ckpt, kind="ldm"), args.out)
    except ImportError as e:
        raise UsageError("exporting needs diffusers and safetensors: pip install diffusers "
                         f"safetensors ({e})") from e
    except ValueError as e:
        raise UsageError(f"{args.ckpt}: {e}") from e
    print(f"{args.ckpt} -> {out} (diffusers format: "
          f"{', '.join(sorted(q.name for q in out.iterdir()))})")
    return out


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run(main)
