"""Feature extractors for the distribution metrics of `tinyldm.evaluation.metrics` (Frechet distance, KID, precision /
recall), and the names their numbers go by.

* **Inception-v3** (Szegedy et al. 2016), the 2048-d pool features of the TensorFlow FID network, through
  the optional `pytorch-fid` package (`pip install -e ".[metrics]"`). Only these features make the
  Frechet distance "FID" and the kernel distance "KID". The network's weights come from the pytorch-fid
  release (pt_inception-2015-12-05-6726825d.pth): downloaded on first use where there is internet, or
  given as a file (`weights=`). Without either, a clear error says so; nothing is downloaded silently in
  tests or CI.
* **A small classifier trained by tinyldm** on a labelled dataset (the shapes dataset's 18 colour-shape
  classes, or class sub-folders): its 128-d penultimate features. The Frechet distance on them is reported
  as "FD (tinyldm classifier)", never as FID: the numbers are not comparable with anyone else's, but they
  are reproducible offline, fast on a CPU, and sensitive to what this data set is about.

Images go in as (N, 3, H, W) in [-1, 1], like everywhere in tinyldm.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyldm.training.checkpoint import load_checkpoint, save_checkpoint

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # the name pytorch-fid's downloader looks for


class FeatureClassifier(nn.Module):
    """Four stride-2 conv stages (GroupNorm, SiLU), global average pooling, a 128-d feature layer, a linear head."""

    def __init__(self, num_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width, "feature_dim": feature_dim}
        layers, c = [], 3
        for w in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
            c = w
        self.body = nn.Sequential(*layers)
        self.feature = nn.Linear(c, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return F.silu(self.feature(self.body(x).mean(dim=(2, 3))))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _collate(dataset, indices: list[int]) -> tuple[Tensor, Tensor]:
    items = [dataset[i] for i in indices]
    return torch.stack([it["image"] for it in items]), torch.tensor([it["class_id"] for it in items])


def train_classifier(train_set, eval_set, num_classes: int, *, steps: int = 600, batch_size: int = 64,
                     lr: float = 2e-3, device: str | torch.device = "cpu", seed: int = 0,
                     max_eval: int = 1000) -> tuple[FeatureClassifier, dict]:
    """Train on the items' `class_id` with cross-entropy (AdamW, random flips as augmentation); returns the
    model (eval mode) and {"accuracy": held-out accuracy, "train_seconds", "steps"}."""
    device = torch.device(device)
    torch.manual_seed(seed)
    labels = [train_set[i]["class_id"] for i in range(min(len(train_set), 256))]
    if min(labels) < 0:
        raise ValueError("the classifier needs class labels (class_id >= 0): class sub-folders, or the shapes data")
    model = FeatureClassifier(num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        x, y = _collate(train_set, torch.randint(0, len(train_set), (batch_size,), generator=g).tolist())
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(-1), x)  # flips keep the class
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    n = min(len(eval_set), max_eval)
    x, y = _collate(eval_set, list(range(n)))
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 256].to(device)).argmax(1).cpu() for i in range(0, n, 256)])
    return model, {"accuracy": float((pred == y).float().mean()), "train_seconds": seconds, "steps": steps,
                   "eval_images": n}


def save_classifier(path: str | Path, model: FeatureClassifier, meta: dict) -> Path:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_checkpoint(path, {"config": model.config, "state_dict": state, "meta": meta}, kind="classifier")


def load_classifier(path: str | Path) -> tuple[FeatureClassifier, dict]:
    ckpt = load_checkpoint(path, kind="classifier")
    model = FeatureClassifier(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt["meta"]


class InceptionFeatures:
    """The 2048-d pool features of pytorch-fid's Inception-v3 (images resized to 299 inside the network)."""

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu"):
        try:
            from pytorch_fid.inception import InceptionV3
        except ImportError:
            raise SystemExit("FID / KID need the pytorch-fid package: pip install -e '.[metrics]' (or use "
                             "--features classifier, which needs nothing beyond tinyldm)") from None
        hub_dir = torch.hub.get_dir()
        if weights is not None:  # put the file where pytorch-fid's downloader looks, so nothing is downloaded
            weights = Path(weights).resolve()
            if not weights.is_file():
                raise SystemExit(f"Inception weights {weights} do not exist")
            tmp = Path(tempfile.mkdtemp(prefix="tinyldm-hub-"))
            (tmp / "checkpoints").mkdir()
            (tmp / "checkpoints" / INCEPTION_FILE).symlink_to(weights)
            torch.hub.set_dir(str(tmp))
        try:
            self.model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()
        except Exception as e:  # no internet, a proxy, a truncated file: say what to do instead
            raise SystemExit(f"could not load the Inception-v3 weights for FID ({type(e).__name__}: {e}). Download "
                             f"{INCEPTION_FILE} from the pytorch-fid releases on a machine with internet and pass "
                             "it with --inception_weights PATH, or use --features classifier") from None
        finally:
            torch.hub.set_dir(hub_dir)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        x = ((images.float() + 1) / 2).clamp(0, 1).to(self.device)  # pytorch-fid wants [0, 1]
        return self.model(x)[0].flatten(1).cpu()


@torch.no_grad()
def extract(feature_fn, images: Tensor, batch_size: int = 256) -> Tensor:
    """feature_fn over images (N, 3, H, W) in batches -> (N, D) on the CPU."""
    return torch.cat([feature_fn(images[i : i + batch_size]).float().cpu() for i in range(0, len(images), batch_size)])
