"""The LDM's training set in latent space: stage one's cached latents, their conditions, and each
step's batch.

`LatentTrainingSet.build` encodes the training images once with the frozen autoencoder (the latent
cache, `tinyldm.data.latents`), keeps the latents on the device, scaled by the autoencoder's scale
factor (App. G), and `batch(step, generator)` returns this process's share of the step's global
batch: its latents z0 (a fresh posterior draw z ~ q(z|x) with a KL autoencoder and
--posterior sample), its conditions (captions, class ids, layouts) and its concatenated task input
(a segmentation map, a low-resolution image, or the masked image's latent and the mask, with a fresh
mask every step). Every draw is seeded by the step, so `--resume` continues exactly and N processes
train like one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..autoencoder import Autoencoder
from ..files import file_digest
from .image_conditions import random_mask
from .images import make_dataset
from .latents import latent_cache
from .order import Stream, batch_indices, seed_stream, shard
from .tasks import TaskInputs, TaskSpec, cache_keys, data_configs, inpaint_concat, task_concat


def task_spec(config) -> TaskSpec:
    """The task of a train_ldm.py config (its cond, task and sr_factor)."""
    return TaskSpec(task=config.task, cond=config.cond, sr_factor=config.sr_factor)


@dataclass
class LatentTrainingSet:
    """The training set on the device. Latents are scaled; `std` is the posterior's (None: train on
    the mean); the `flipped` twins exist with --hflip; `pixels` (uint8 images) only for
    inpainting."""

    config: object  # the run's TrainLDMConfig
    rank: int  # this process's place among `size` (torchrun's RANK and WORLD_SIZE)
    size: int
    ae: Autoencoder  # inpainting encodes each step's masked images
    conditions: dict  # captions, class ids, layouts, on the CPU
    latents: Tensor  # (N, c, h, w)
    std: Tensor | None
    flipped: Tensor | None
    flipped_std: Tensor | None
    concat: Tensor | None  # (N, C_c, h, w): semantic maps or low-resolution images
    concat_flipped: Tensor | None
    pixels: Tensor | None  # (N, 3, H, W) uint8
    class_names: list[str]
    ae_digest: str = ""  # SHA-256 of the autoencoder file the latents were encoded with

    @classmethod
    def build(cls, ae: Autoencoder, ae_path, config, data_root: str | None, out,
              device: torch.device, *, rank: int = 0, size: int = 1) -> LatentTrainingSet:
        """Encode the training set once (cached in <out>/latents.pt, keyed by the autoencoder file
        and the data settings); with --posterior sample and a KL autoencoder the cache holds each
        posterior's mean and std."""
        data, shapes = data_configs(asdict(config), data_root)
        spec = task_spec(config)
        dataset = TaskInputs.wrap(make_dataset(data, "train", shapes=shapes), spec)
        with_std = config.posterior == "sample" and ae.config.regularizer == "kl"
        digest = file_digest(ae_path)
        key = {"autoencoder": digest, "data": asdict(data),
               "shapes": asdict(shapes) if shapes else None,
               "sr_factor": config.sr_factor if config.task == "superres" else None,
               "posterior": "mean_and_std" if with_std else "mean"}

        def encode(x: Tensor) -> Tensor:
            if not with_std:
                return ae.encode(x.to(device))
            q = ae.posterior(x.to(device))
            return torch.cat([q.mean, q.std], dim=1)  # (B, 2c, h, w), split again below

        cached = latent_cache(dataset, encode, path=out / "latents.pt", key=key, flip=config.hflip,
                              device=device, keep=cache_keys(spec))
        scale = float(ae.scale_factor)

        def split(z: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
            if z is None:
                return None, None
            mean, std = z.chunk(2, dim=1) if with_std else (z, None)
            return mean.to(device) * scale, std.to(device) * scale if std is not None else None

        (mean, std), (flipped, flipped_std) = split(cached.latents), split(cached.flipped)
        conditions = cached.conditions
        concat = None
        # the task input of every image; inpainting masks afresh
        if config.task in ("semantic", "superres"):
            concat = task_concat(spec, conditions, tuple(mean.shape[-2:])).to(device)
        concat_flipped = concat.flip(-1) if concat is not None and flipped is not None else None
        pixels = conditions["pixels"].to(device) if config.task == "inpaint" else None
        return cls(config, rank, size, ae, conditions, mean, std, flipped, flipped_std, concat,
                   concat_flipped, pixels, list(getattr(dataset, "class_names", [])), digest)

    def batch(self, step: int, generator: torch.Generator) -> tuple[Tensor, object, Tensor | None]:
        """(z0, condition, concat): this process's share of the global batch of `step`. The flips
        are the first draw from `generator` (made with or without --hflip, so the draws after them
        do not depend on it)."""
        config, device = self.config, self.latents.device
        rank, size = self.rank, self.size
        idx_all = batch_indices(step, n=len(self.latents), batch_size=config.batch_size,
                                seed=config.seed).to(device)
        flip = shard(torch.rand(len(idx_all), 1, 1, 1, generator=generator, device=device) < 0.5,
                     rank, size)
        idx = shard(idx_all, rank, size)
        z0, std = self.latents[idx], self.std[idx] if self.std is not None else None
        concat = self.concat[idx] if self.concat is not None else None
        # each image in either orientation (its task input flipped with it)
        if self.flipped is not None:
            z0 = torch.where(flip, self.flipped[idx], z0)
            std = torch.where(flip, self.flipped_std[idx], std) if std is not None else None
            concat = (torch.where(flip, self.concat_flipped[idx], concat)
                      if concat is not None else None)
        if std is not None:  # a fresh draw z ~ q(z|x) = N(mu, sigma^2) for this step (App. G)
            g = torch.Generator(device).manual_seed(seed_stream(config.seed, step,
                                                                Stream.POSTERIOR))
            noise = torch.randn((len(idx_all), *z0.shape[1:]), generator=g, device=device)
            z0 = z0 + std * shard(noise, rank, size)
        if self.pixels is not None:  # inpainting: this step's masks
            x = self.pixels[idx].float() / 127.5 - 1
            x = torch.where(flip, x.flip(-1), x) if self.flipped is not None else x
            g = torch.Generator().manual_seed(seed_stream(config.seed, step, Stream.MASK))
            masks = random_mask(len(idx_all), *x.shape[-2:], generator=g)
            concat = inpaint_concat(self.ae, x, shard(masks, rank, size).to(device))
        return z0, self.condition(idx), concat

    def condition(self, idx: Tensor) -> object:
        """The conditions of examples `idx`: captions (list), class ids (B,) or a layout dict;
        None."""
        if self.config.cond == "text":
            return [self.conditions["caption"][i] for i in idx.tolist()]
        if self.config.cond == "class":
            return self.conditions["class_id"][idx.cpu()].to(idx.device)
        if self.config.cond == "layout":
            return {k: self.conditions[k][idx.cpu()].to(idx.device)
                    for k in ("box_classes", "boxes")}
        return None
