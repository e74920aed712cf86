"""Feature extractors for the distribution metrics of `tinyldm.evaluation.metrics` (Frechet
distance, KID, precision / recall), and the names their numbers go by.

* **LPIPS** (Zhang et al., arXiv 1801.03924), the perceptual loss of train_ae.py (`load_lpips`),
  through the optional `lpips` package.
* **Inception-v3** (Szegedy et al. 2016), the 2048-d pool features of the TensorFlow FID network,
  through the optional `pytorch-fid` package (`pip install -e ".[metrics]"`). Only these features
  make the Frechet distance "FID" and the kernel distance "KID". The network's weights come from the
  pytorch-fid release (pt_inception-2015-12-05-6726825d.pth): downloaded on first use where there is
  internet, or given as a file (`weights=`). Without either, a clear error says so; nothing is
  downloaded silently in tests or CI.
* **A small classifier trained by tinyldm** on a labelled dataset (the shapes dataset's 18
  colour-shape classes, or class sub-folders): its 128-d penultimate features. The Frechet distance
  on them is reported as "FD (tinyldm classifier)", never as FID: the numbers are not comparable
  with anyone else's, but they are reproducible offline, fast on a CPU, and sensitive to what this
  data set is about.
* **A small contrastive encoder trained by tinyldm** on the training images alone, for data without
  labels (a folder of photos): SimCLR (Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for
  Contrastive Learning of Visual Representations", ICML 2020, arXiv 2002.05709). Two random views of
  each image (Sec. 3: crop, flip, colour jitter; here crop and flip only, see `augment`) go through
  the encoder f and a projection head g; the NT-Xent loss (Eq. 1) pulls the two views of an image
  together and pushes the other 2N - 2 views of the batch away. As in the paper (Sec. 4.2), the
  features are the representation h = f(x) *before* the projection head (128-d). Reported as "FD
  (tinyldm contrastive features)", never as FID. Left out: SimCLR's ResNet-50, LARS, its large
  batches (64 here) and its colour jitter and greyscale: features made invariant to brightness or
  colour cannot see a generated image get them wrong. Measured on 46 vs 46 LFW faces: FD 8.6 between
  real halves, 14.6 with one half darkened by 0.3 (in [-1, 1]), 28.6 against Gaussian noise, but 7.9
  with noise of std 0.3 added: these features catch gross failures and wrong tones, not fine pixel
  noise.

Both tinyldm networks share one body (`FeatureNet`: four stride-2 conv stages, global average
pooling, a 128-d feature layer) and are saved the same way (`save_feature_net` /
`load_feature_net`).

Images go in as (N, 3, H, W) in [-1, 1], like everywhere in tinyldm.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyldm.checkpoint import load_checkpoint, save_checkpoint
from tinyldm.cli import UsageError

# the name pytorch-fid's downloader looks for
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


class FeatureNet(nn.Module):
    """Four stride-2 conv stages (GroupNorm, SiLU), global average pooling, a `feature_dim` feature
    layer: the body both feature networks share. Any image size works (the pooling is global)."""

    kind = ""  # the checkpoint kind of a subclass

    def __init__(self, width: int = 32, feature_dim: int = 128):
        super().__init__()
        layers, c = [], 3
        for w in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
            c = w
        self.body = nn.Sequential(*layers)
        self.feature = nn.Linear(c, feature_dim)

    def features(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        if C != 3:
            raise ValueError(f"expected RGB images (B, 3, H, W), got {tuple(x.shape)}")
        return F.silu(self.feature(self.body(x).mean(dim=(2, 3))))  # (B, feature_dim)


class FeatureClassifier(FeatureNet):
    """FeatureNet + a linear head over the classes."""

    kind = "classifier"

    def __init__(self, num_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__(width, feature_dim)
        self.config = {"num_classes": num_classes, "width": width, "feature_dim": feature_dim}
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class ContrastiveEncoder(FeatureNet):
    """SimCLR's f (FeatureNet: h = f(x), the features) and projection head g (Sec. 2.1: z = W2
    sigma(W1 h), where the loss is taken). `forward` returns z."""

    kind = "contrastive"

    def __init__(self, width: int = 32, feature_dim: int = 128, projection_dim: int = 64):
        super().__init__(width, feature_dim)
        self.config = {"width": width, "feature_dim": feature_dim, "projection_dim": projection_dim}
        self.projection = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.SiLU(),
                                        nn.Linear(feature_dim, projection_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(self.features(x))


def labelled(dataset) -> bool:
    """Whether every item of `dataset` has a class (class_id >= 0): shapes, class sub-folders, a
    CelebA attribute. Image datasets keep their labels in a list (nothing is decoded); others are
    asked item by item (the first 256)."""
    ids = getattr(dataset, "class_ids", None)
    if ids is None:
        ids = [dataset[i]["class_id"] for i in range(min(len(dataset), 256))]
    return len(ids) > 0 and min(ids) >= 0


def _collate(dataset, indices: list[int]) -> tuple[Tensor, Tensor]:
    items = [dataset[i] for i in indices]
    return (torch.stack([it["image"] for it in items]),
            torch.tensor([it["class_id"] for it in items]))


def train_classifier(train_set, eval_set, num_classes: int, *, steps: int = 600,
                     batch_size: int = 64, lr: float = 2e-3, device: str | torch.device = "cpu",
                     seed: int = 0, max_eval: int = 1000) -> tuple[FeatureClassifier, dict]:
    """Train on the items' `class_id` with cross-entropy (AdamW, random flips as augmentation);
    returns the model (eval mode) and {"accuracy": held-out accuracy, "train_seconds", "steps"}."""
    device = torch.device(device)
    torch.manual_seed(seed)
    if not labelled(train_set):
        raise ValueError("the classifier needs class labels (class_id >= 0): class sub-folders, or "
                         "the shapes data")
    model = FeatureClassifier(num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        x, y = _collate(train_set,
                        torch.randint(0, len(train_set), (batch_size,), generator=g).tolist())
        # flips keep the class
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(-1), x)
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    n = min(len(eval_set), max_eval)
    x, y = _collate(eval_set, list(range(n)))
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 256].to(device)).argmax(1).cpu()
                          for i in range(0, n, 256)])
    return model, {"accuracy": float((pred == y).float().mean()), "train_seconds": seconds,
                   "steps": steps, "eval_images": n}


# ----------------------------------------------------------------------------------------------
# SimCLR


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.2) -> Tensor:
    """SimCLR's NT-Xent loss (Eq. 1), averaged over all 2N views: z1[k] and z2[k] (N, D) are the
    projections of two views of image k, the positive pair; the other 2N - 2 views of the batch are
    the negatives.

        l(i, j) = -log( exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) ),
        sim = cosine

    tau = `temperature` (the paper tunes it with the batch size; 0.2 suits the batches of 64 here).
    """
    N, D = z1.shape
    assert z2.shape == (N, D), (f"the two views' projections differ in shape: {tuple(z1.shape)}, "
                                f"{tuple(z2.shape)}")
    # (2N, D) unit vectors, so z_i . z_k = sim(z_i, z_k)
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    # (2N, 2N); k != i: no view is its own negative
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    # view i of image k <-> the other
    positive = torch.cat([torch.arange(N, 2 * N), torch.arange(N)]).to(z.device)
    # Eq. (1): the softmax over k != i of the positive, -log, mean
    return F.cross_entropy(logits, positive)


def augment(x: Tensor, generator: torch.Generator, *, min_scale: float = 0.5, jitter: float = 0.0,
            noise_std: float = 0.0) -> Tensor:
    """One random view of each image x (B, 3, H, W) in [-1, 1], at the same size (SimCLR Sec. 3 and
    App. A, for photos at any size from 16 to 256 px): a random resized crop (a `min_scale`..1 share
    of the area, aspect ratio 3/4..4/3, bilinear back to H x W), a horizontal flip with probability
    1/2, brightness and contrast factors in 1 -+ `jitter` (torchvision ColorJitter's ranges), and
    Gaussian noise of std 0..`noise_std`. The random numbers come from `generator` (on the CPU), so
    a seed gives the same views on any device. Jitter and noise are off by default: the evaluator's
    features should see tones and noise, not be taught to ignore them."""
    B, C, H, W = x.shape
    rand = lambda *shape: torch.rand(*shape, generator=generator).to(x.device)  # noqa: E731
    # crop + flip as one affine map from output to input coordinates (both in [-1, 1]):
    # u_in = s u_out + t
    area = min_scale + (1 - min_scale) * rand(B)
    log_ratio = (2 * rand(B) - 1) * math.log(4 / 3)  # log(w / h), uniform in log(3/4)..log(4/3)
    sx = (area * log_ratio.exp()).sqrt().clamp(max=1)  # crop width / W
    sy = (area / log_ratio.exp()).sqrt().clamp(max=1)  # crop height / H
    # the crop stays inside the image
    tx, ty = (1 - sx) * (2 * rand(B) - 1), (1 - sy) * (2 * rand(B) - 1)
    flip = torch.where(rand(B) < 0.5, -1.0, 1.0)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx * flip, zero, tx], 1),
                         torch.stack([zero, sy, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, (B, C, H, W), align_corners=False)
    x = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    # brightness scales the [0, 1] pixel values; contrast scales their distance from the image's
    # mean grey
    x01 = (x + 1) / 2 * (1 + jitter * (2 * rand(B, 1, 1, 1) - 1))
    grey = x01.mean(dim=(1, 2, 3), keepdim=True)
    x01 = ((x01 - grey) * (1 + jitter * (2 * rand(B, 1, 1, 1) - 1)) + grey).clamp(0, 1)
    noise = torch.randn(x.shape, generator=generator).to(x.device) * noise_std * rand(B, 1, 1, 1)
    return (x01 * 2 - 1 + noise).clamp(-1, 1)


@torch.no_grad()
def view_retrieval(model: FeatureNet, images: Tensor, generator: torch.Generator) -> float:
    """A label-free check of the features: the share of images whose augmented view has the image
    itself as its nearest neighbour (cosine) among the originals' features. Chance is 1 / N."""
    device = next(model.parameters()).device
    h = F.normalize(model.features(images.to(device)), dim=1)
    h_view = F.normalize(model.features(augment(images, generator).to(device)), dim=1)
    return float(((h_view @ h.T).argmax(1).cpu() == torch.arange(len(images))).float().mean())


def train_contrastive(train_set, eval_set, *, steps: int = 600, batch_size: int = 64,
                      lr: float = 2e-3, temperature: float = 0.2,
                      device: str | torch.device = "cpu", seed: int = 0,
                      max_eval: int = 256) -> tuple[ContrastiveEncoder, dict]:
    """SimCLR on the training images (their labels and captions unused): each step, `batch_size`
    distinct images (fewer when the set is smaller), two `augment`ed views of each, NT-Xent at
    `temperature`, AdamW. Returns the model (eval mode) and {"loss" (mean of the last 50 steps),
    "view_retrieval" on up to `max_eval` held-out images, "train_seconds", "steps", "train_images",
    "eval_images"}. Seeded: the same arguments give the same weights (on the CPU); the caller's
    global random state is left as it was."""
    device = torch.device(device)
    # the initial weights come from the seed, not from the caller's state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ContrastiveEncoder().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(train_set))
    if batch_size < 2:
        raise ValueError("contrastive training needs at least 2 training images, got "
                         f"{len(train_set)}")
    losses = []
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        x, _ = _collate(train_set,
                        torch.randperm(len(train_set), generator=g)[:batch_size].tolist())
        x1, x2 = augment(x, g).to(device), augment(x, g).to(device)  # two views of each image
        loss = nt_xent(model(x1), model(x2), temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    model.eval()
    n = min(len(eval_set), max_eval)
    x, _ = _collate(eval_set, list(range(n)))
    retrieval = view_retrieval(model, x, torch.Generator().manual_seed(seed + 1))
    return model, {"loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
                   "view_retrieval": retrieval, "train_seconds": seconds, "steps": steps,
                   "train_images": len(train_set), "eval_images": n}


# ----------------------------------------------------------------------------------------------
# Saving and loading both networks


def save_feature_net(path: str | Path, model: FeatureNet, meta: dict) -> Path:
    """One checkpoint of plain tensors and values (kind "classifier" or "contrastive"): config,
    weights, meta."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_checkpoint(path, {"config": model.config, "state_dict": state, "meta": meta},
                           kind=model.kind)


def load_feature_net(path: str | Path, net: type[FeatureNet]) -> tuple[FeatureNet, dict]:
    """(model in eval mode, meta) from a `save_feature_net` file of `net`'s kind (another kind is
    refused)."""
    ckpt = load_checkpoint(path, kind=net.kind)
    model = net(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt["meta"]


def save_classifier(path: str | Path, model: FeatureClassifier, meta: dict) -> Path:
    return save_feature_net(path, model, meta)


def load_classifier(path: str | Path) -> tuple[FeatureClassifier, dict]:
    return load_feature_net(path, FeatureClassifier)


def load_lpips(net: str = "vgg", *, pretrained: bool = True) -> nn.Module:
    """A frozen LPIPS module; raises a clear error when the package or its weights are missing."""
    try:
        import lpips
    except ImportError as e:
        raise ImportError(
            "perceptual_weight > 0 needs the optional `lpips` package: pip install lpips "
            "(or pip install 'tinyldm[lpips]'); or train without it with --perceptual_weight 0"
        ) from e
    try:
        # pretrained=False: a random backbone (pnet_rand, nothing downloaded) under the linear heads
        # that ship inside the lpips package (non-negative weights, so the distance stays >= 0 and
        # is 0 for x = x).
        with warnings.catch_warnings():
            # lpips passes torchvision the `pretrained=` argument it deprecated
            warnings.filterwarnings("ignore", message="Arguments other than a weight enum",
                                    category=UserWarning)
            warnings.filterwarnings("ignore", message="The parameter 'pretrained' is deprecated",
                                    category=UserWarning)
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=not pretrained, verbose=False)
    except Exception as e:  # a failed download surfaces as URLError, OSError, RuntimeError, ...
        raise RuntimeError(
            f"could not load the LPIPS weights (net={net!r}): {type(e).__name__}: {e}. "
            "LPIPS needs its backbone's ImageNet weights from torchvision (downloaded once into "
            "the torch hub cache, ~/.cache/torch/hub/checkpoints) and the linear heads shipped "
            "inside the lpips package. Fetch them on a machine with internet access, or train "
            "with --perceptual_weight 0."
        ) from e
    return model.eval().requires_grad_(False)


class InceptionFeatures:
    """The 2048-d pool features of pytorch-fid's Inception-v3 (images resized to 299 inside the
    network)."""

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu"):
        try:
            from pytorch_fid.inception import InceptionV3
        except ImportError:
            raise UsageError("FID / KID need the pytorch-fid package: pip install -e '.[metrics]' "
                             "(or use --features classifier or contrastive, which need nothing "
                             "beyond tinyldm)") from None
        hub_dir = torch.hub.get_dir()
        with tempfile.TemporaryDirectory(prefix="tinyldm-hub-") as tmp:
            # put the file where pytorch-fid's downloader looks, so nothing is downloaded
            if weights is not None:
                weights = Path(weights).resolve()
                if not weights.is_file():
                    raise UsageError(f"Inception weights {weights} do not exist")
                (Path(tmp) / "checkpoints").mkdir()
                (Path(tmp) / "checkpoints" / INCEPTION_FILE).symlink_to(weights)
                torch.hub.set_dir(tmp)
            try:
                self.model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()
            except Exception as e:  # no internet, a proxy, a truncated file: say what to do instead
                raise UsageError("could not load the Inception-v3 weights for FID "
                                 f"({type(e).__name__}: {e}). Download {INCEPTION_FILE} from the "
                                 "pytorch-fid releases on a machine with internet and pass it with "
                                 "--inception_weights PATH, or use --features classifier / "
                                 "contrastive") from None
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
    return torch.cat([feature_fn(images[i : i + batch_size]).float().cpu()
                      for i in range(0, len(images), batch_size)])
