"""The latent cache: encode a training set once with the frozen autoencoder.

The latent cache (Sec. 3 of arXiv 2112.10752 trains the denoiser on z = E(x) with E frozen, so E(x)
never changes): `latent_cache` encodes a dataset once, both orientations if flipping is on, into one
`torch.save` file of plain tensors and lists (`torch.load(weights_only=True)` reads it), written to
a temporary file and renamed, loaded memory-mapped. The file keeps the key it was built with (pass
the autoencoder checkpoint's `tinyldm.files.file_digest` and the data settings); a cache whose key
differs is rebuilt with a warning naming what changed, never used silently. `encode` should return
the posterior mean or mode: a cached sample would freeze one draw of the KL autoencoder's noise for
the whole run.
"""

import json
import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from tinyldm.files import save_atomically

CACHE_FORMAT = "tinyldm-latents-1"


def encode_dataset(dataset: Dataset, encode: Callable[[Tensor], Tensor], *, flip: bool = False,
                   keep: tuple[str, ...] = ("caption", "class_id"), batch_size: int = 64,
                   num_workers: int = 0, device: str | torch.device = "cpu",
                   verbose: bool = True) -> dict:
    """Encode every image once (no grad): {"latents": (N, C, h, w), "latents_flipped" if flip,
    "conditions": {k: tensor or list of str for k in keep}, "bad_files": list}. `encode` maps
    (B, 3, H, W) in [-1, 1] to (B, C, h, w); give it the posterior mean (or mode) for a
    deterministic cache."""
    if getattr(dataset, "hflip", False):
        raise ValueError("encode a dataset without random flips; "
                         "flip=True stores both orientations")
    latents, flipped, conditions = [], [], {k: [] for k in keep}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    with torch.no_grad():
        # tqdm honours TQDM_DISABLE=1
        for batch in tqdm(loader, desc="encoding latents") if verbose else loader:
            x = batch["image"].to(device)  # (B, 3, H, W)
            z = encode(x)
            if z.ndim != 4 or len(z) != len(x):
                raise ValueError("encode must map (B, 3, H, W) to (B, C, h, w); "
                                 f"got {tuple(z.shape)}")
            latents.append(z.float().cpu())
            if flip:
                flipped.append(encode(x.flip(-1)).float().cpu())
            for k in keep:
                if k not in batch:
                    raise KeyError(f"dataset items have no {k!r} to keep; "
                                   f"they have {sorted(batch)}")
                conditions[k] += batch[k] if isinstance(batch[k], list) else [batch[k]]
    cache = {"format": CACHE_FORMAT, "latents": torch.cat(latents),
             "conditions": {k: v if isinstance(v[0], str) else torch.cat(v)
                            for k, v in conditions.items()},
             "bad_files": dataset.bad_files() if hasattr(dataset, "bad_files") else []}
    if flip:
        cache["latents_flipped"] = torch.cat(flipped)
    if cache["bad_files"] and verbose:
        print(dataset.summary())
    return cache


def save_latent_cache(cache: dict, path: str | os.PathLike) -> None:
    """torch.save to a temporary file beside `path`, then rename (`save_atomically`): a crash never
    leaves half a cache, and a failed write (a full disk) ends in one line."""
    save_atomically(cache, path, what="the latent cache", kept="the previous cache")


def _key_text(key: dict) -> str:
    try:
        return json.dumps(key, sort_keys=True)
    except TypeError as err:
        raise TypeError("a cache key must hold plain values "
                        f"(str, numbers, lists, dicts): {err}") from err


def load_latent_cache(path: str | os.PathLike, key: dict) -> dict | None:
    """The cache at `path` (memory-mapped) if it was built with `key`; None, with a warning saying
    why, if it is stale or unreadable; None if there is no file."""
    if not os.path.exists(path):
        return None
    try:
        cache = torch.load(path, weights_only=True, mmap=True)
        stored = json.loads(cache["key"])
    except Exception as err:
        warnings.warn(f"latent cache {path} is unreadable ({type(err).__name__}: {err}); "
                      "rebuilding", stacklevel=2)
        return None
    if cache.get("format") != CACHE_FORMAT or cache["key"] != _key_text(key):
        changed = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
        warnings.warn(f"latent cache {path} is stale (changed: {', '.join(changed) or 'format'}); "
                      "rebuilding", stacklevel=2)
        return None
    return cache


class LatentDataset(Dataset):
    """Items {"z": (C, h, w), plus the kept conditions}; with flip, each access picks a random
    orientation."""

    def __init__(self, cache: dict, flip: bool = False):
        if flip and "latents_flipped" not in cache:
            raise ValueError("this cache holds no flipped latents; build it with flip=True")
        self.latents, self.conditions = cache["latents"], cache["conditions"]
        self.flipped = cache["latents_flipped"] if flip else None
        self.bad_files = cache.get("bad_files", [])

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict:
        z = (self.flipped[i] if self.flipped is not None and torch.rand(()) < 0.5
             else self.latents[i])
        return {"z": z, **{k: v[i] for k, v in self.conditions.items()}}


def latent_cache(dataset: Dataset, encode: Callable[[Tensor], Tensor], *,
                 path: str | os.PathLike, key: dict, flip: bool = False,
                 keep: tuple[str, ...] = ("caption", "class_id"),
                 **encode_options) -> LatentDataset:
    """Latents of `dataset` from the cache at `path`, (re)built first if missing or built with
    another key. `key` must capture all that changes the latents, e.g. {"autoencoder":
    file_digest(ckpt), "data": asdict(data_config)}; the dataset size, `flip` and `keep` are added
    to it."""
    if {"n_images", "flip", "keep"} & set(key):
        raise ValueError("cache key names n_images, flip and keep are reserved")
    full_key = {**key, "n_images": len(dataset), "flip": flip, "keep": list(keep)}
    key_text = _key_text(full_key)  # fails early on a key that cannot be stored
    cache = load_latent_cache(path, full_key)
    if cache is None:
        cache = encode_dataset(dataset, encode, flip=flip, keep=keep, **encode_options)
        cache["key"] = key_text
        save_latent_cache(cache, path)
    return LatentDataset(cache, flip=flip)
