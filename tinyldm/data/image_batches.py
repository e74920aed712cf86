"""train_ae.py's images: the training and held-out sets, and each step's batch.

A step's batch is a pure function of the step (`batch_indices`), so `--resume` continues the data
order exactly without saving a loader's state; under torchrun each process loads its share of it.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from ..cli import UsageError
from .order import batch_indices, shard


class _Images(Dataset):
    """Keeps only the image of a dataset whose items are dicts with an "image" in [-1, 1]."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.dataset[i]
        return item["image"] if isinstance(item, dict) else item


def make_datasets(config, data_path: str | None) -> tuple[Dataset, Dataset]:
    """(train, held-out) datasets of (3, H, W) images in [-1, 1]."""
    if config.dataset == "shapes":
        from tinyldm.data.shapes import ShapesConfig, ShapesDataset

        shapes = ShapesConfig(image_size=config.image_size, n_train=config.n_train,
                              n_eval=config.n_eval)
        return _Images(ShapesDataset(shapes, "train")), _Images(ShapesDataset(shapes, "eval"))
    if data_path is None:
        raise UsageError(f"--dataset {config.dataset} needs --data PATH")
    from tinyldm.data.images import make_image_datasets

    train, held_out = make_image_datasets(config.dataset, data_path, image_size=config.image_size,
                                          n_eval=config.n_eval, hflip=config.hflip,
                                          max_images=config.n_train or None)
    return _Images(train), _Images(held_out)


class StepBatches:
    """A batch sampler whose k-th batch is `batch_indices(k)`: the order depends on the step alone.
    Under torchrun each process gets its share of that global batch (`shard`)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int,
                 share: tuple[int, int] = (0, 1)):
        self.n, self.batch_size, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self.share = share  # (rank, size): this process's place

    def __iter__(self):
        for step in range(self.start, self.stop):
            idx = batch_indices(step, n=self.n, batch_size=self.batch_size, seed=self.seed).tolist()
            yield shard(idx, *self.share)

    def __len__(self) -> int:
        return self.stop - self.start


def make_loader(train_set: Dataset, config, start: int, share: tuple[int, int],
                device: torch.device, *, endless: bool = False):
    """The training batches of steps start..config.steps (this process's share of each); `endless`
    (a --plan's timed steps, which may outnumber a short run's): on past config.steps."""
    stop = start + 2**40 if endless else config.steps
    batches = StepBatches(len(train_set), config.batch_size, config.seed, start, stop, share)
    # Its own generator: a DataLoader otherwise draws its workers' base seed from the global RNG.
    return DataLoader(train_set, batch_sampler=batches, num_workers=config.num_workers,
                      pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(config.seed + start))


def first_images(dataset: Dataset, n: int, batch_size: int):
    """Batches of the first n images, in order (held-out evaluation, latent statistics)."""
    n = min(n, len(dataset))
    for start in range(0, n, batch_size):
        yield torch.stack([dataset[i] for i in range(start, min(start + batch_size, n))])
