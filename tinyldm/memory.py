"""Memory a job needs, estimated before it starts: a request that cannot fit is refused with the
estimate and the largest size or batch that does, instead of being killed by the operating system
(CPU) or running out of GPU memory minutes in.

How. The model runs once on one small input (the size it was trained at) with forward hooks on every
module, which record what a larger input would hold: the activations (they grow with the number of
pixels) and the attention matrices that are really held (heads x queries x keys: cross-attention's
grows with the pixels; self-attention's with their square, but only with the explicit formula, in a
UNet built with `fused_attention=False`: the fused kernel streams over the keys and never holds it).
Sampling holds, per image, the UNet's skip connections plus a few of its largest activations, and
the attention matrix of one layer at a time; training keeps every activation for the backward pass,
plus four copies of the weights (weights, gradients, Adam's two moments) and the EMA's.
Measured against the peak resident memory of `sample.py` on 2 CPU cores (the quickstart model,
guided, 256 to 1024 px): the estimate is about twice what the run holds above the ~0.7 GiB of Python
and torch themselves.
A request is refused above `HEADROOM` of the free memory.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from tinyldm.cli import UsageError

GiB = 2**30
HEADROOM = 0.9  # the share of the free memory a job may be estimated to need


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device`: CUDA's free memory, the CPU's MemAvailable (Linux; physical memory
    elsewhere); None where it cannot be known (mps)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class Profile:
    """What one input of `pixels` positions holds, in bytes, split by how each part grows with the
    pixels."""

    pixels: int
    activations: int       # every module output (what training keeps for backward)
    working: int           # what inference holds at once: the skip connections + the 4 largest
                           # outputs
    self_attention: int    # the largest self-attention matrix (grows with pixels^2)
    cross_attention: int   # the largest cross-attention matrix (grows with pixels)
    all_attention: int     # every attention matrix, self + cross, at the probe size (training
                           # keeps them)
    self_share: float      # the part of all_attention that is self-attention

    def inference(self, pixels: int) -> float:
        r = pixels / self.pixels
        return self.working * r + max(self.self_attention * r * r, self.cross_attention * r)

    def training(self, pixels: int) -> float:
        r = pixels / self.pixels
        attn = self.all_attention * (self.self_share * r * r + (1 - self.self_share) * r)
        return 2 * self.activations * r + attn  # activations and their gradients


def _bytes(t: object) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, tuple | list):
        return sum(_bytes(x) for x in t)
    return 0


@torch.no_grad()
def profile(model: nn.Module, run, pixels: int, skips: list[nn.Module] = ()) -> Profile:
    """Run `run()` (one input, batch 1, `pixels` positions) with hooks on every module of `model`;
    `skips` are the modules whose outputs inference keeps until later (a UNet's skip
    connections)."""
    from tinyldm.autoencoder import AttnBlock
    from tinyldm.blocks import Attention

    outputs: list[int] = []
    kept = [0]
    attn = {"self": 0, "cross": 0, "all_self": 0, "all_cross": 0}
    skip_ids = {id(m) for m in skips}

    def on_output(module, args, out):
        if not list(module.children()):
            outputs.append(_bytes(out))
        if id(module) in skip_ids:
            kept[0] += _bytes(out)

    def on_attention(module, args, kwargs):
        # The fused kernel (F.scaled_dot_product_attention without a mask: flash / memory-efficient
        # on CPU and CUDA) never holds the (queries x keys) matrix; the explicit formula and masked
        # calls do.
        x = args[0]
        # (B, C, H, W): one head over H*W positions, always fused, no mask
        if isinstance(module, AttnBlock):
            return
        context = args[1] if len(args) > 1 else kwargs.get("context")
        explicit = not module.fused
        if context is None and not explicit:
            return
        n = x.shape[1]
        keys = n if context is None else context.shape[1]
        size, kind = (x.shape[0] * module.heads * n * keys * 4,
                      "self" if context is None else "cross")
        attn[kind] = max(attn[kind], size)
        attn[f"all_{kind}"] += size

    handles = [m.register_forward_hook(on_output) for m in model.modules()]
    handles += [m.register_forward_pre_hook(on_attention, with_kwargs=True) for m in model.modules()
                if isinstance(m, Attention | AttnBlock)]
    modes = {m: m.training for m in model.modules()}
    # the probe must not change the model: no batch-norm statistics, no codebook usage updates
    model.eval()
    try:
        run()
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    total = attn["all_self"] + attn["all_cross"]
    largest = sum(sorted(outputs)[-4:])
    return Profile(pixels=pixels, activations=sum(outputs), working=kept[0] + largest,
                   self_attention=attn["self"], cross_attention=attn["cross"], all_attention=total,
                   self_share=attn["all_self"] / total if total else 0.0)


def weights_bytes(*modules: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def describe(nbytes: float) -> str:
    if nbytes >= 1024 * GiB:
        return f"{nbytes / 2**40:.3g} TiB"
    return f"{nbytes / GiB:.1f} GiB" if nbytes >= 0.1 * GiB else f"{nbytes / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------------------------
# Sampling


def unet_profile(denoiser, latent_hw: tuple[int, int]) -> Profile:
    """The profile of the denoiser's UNet on one latent of `latent_hw`, with its condition's context
    length."""
    unet, (h, w) = denoiser.unet, latent_hw
    device = next(denoiser.parameters()).device
    z = torch.zeros(1, unet.cfg.in_channels, h, w, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    extra = {}
    if unet.cfg.concat_channels:
        extra["concat"] = torch.zeros(1, unet.cfg.concat_channels, h, w, device=device)
    if unet.cfg.context_dim:
        cfg = getattr(denoiser.cond, "cfg", None)  # tinyldm's ConditionEncoder; LDMBert has none
        length = (denoiser.cond.tokenizer.max_len if cfg is None else
                  {"text": getattr(cfg, "max_len", 16),
                   "layout": getattr(cfg, "max_objects", 1)}.get(cfg.kind, 1))
        extra["context"] = torch.zeros(1, length, unet.cfg.context_dim, device=device)
    if unet.class_emb is not None:
        extra["class_labels"] = torch.zeros(1, dtype=torch.long, device=device)
    skips = [unet.conv_in] + [stage[-1] for stage in unet.down]
    return profile(unet, lambda: unet(z, t, **extra), h * w, skips)


class SamplingEstimate:
    """Bytes to sample `n` images of (H, W) pixels with `generate` in chunks of `chunk`, for a
    denoiser and autoencoder profiled once at the training size."""

    def __init__(self, denoiser, ae, latent_hw: tuple[int, int]):
        self.f = ae.downsample_factor
        z = torch.zeros(1, ae.config.z_channels, *latent_hw, device=next(ae.parameters()).device)
        self.unet = unet_profile(denoiser, latent_hw)
        self.decoder = profile(ae.decoder, lambda: ae.decode(z), latent_hw[0] * latent_hw[1])
        self.fixed = weights_bytes(denoiser, ae)

    def bytes(self, n: int, H: int, W: int, *, guided: bool, chunk: int = 64) -> float:
        pixels = (H // self.f) * (W // self.f)
        b = min(n, chunk)
        return (self.fixed + (2 if guided else 1) * b * self.unet.inference(pixels)
                + b * self.decoder.inference(pixels) + n * 3 * H * W * 4)

    def check(self, n: int, H: int, W: int, *, guided: bool, device: torch.device, chunk: int = 64,
              step: int = 8, size_from: str = "--height/--width") -> float:
        """Refuse (UsageError) a request whose estimate exceeds the free memory, naming the largest
        --n at this size and the largest square size for --n 1 that fit (`size_from`: where the
        size was set). Returns the estimate."""
        need = self.bytes(n, H, W, guided=guided, chunk=chunk)
        free = available_bytes(device)
        if free is None or need <= HEADROOM * free:
            return need
        fits_n = next((k for k in (64, 32, 16, 8, 4, 2, 1) if k < n
                       and self.bytes(k, H, W, guided=guided, chunk=chunk) <= HEADROOM * free), 0)
        # the largest k with a (k * step)^2 image fitting: binary search
        low, high = 1, 2**20 // step
        while low < high:
            k = (low + high + 1) // 2
            if self.bytes(1, k * step, k * step, guided=guided, chunk=chunk) <= HEADROOM * free:
                low = k
            else:
                high = k - 1
        side = low * step
        lower = f"--n {fits_n} fits at {H}x{W}; " if fits_n else ""
        raise UsageError(f"sampling {n} image(s) of {H}x{W} needs about {describe(need)}, and "
                         f"{device} has {describe(free)} free: {lower}at --n 1 the largest square "
                         f"that fits is about {side}x{side} ({size_from})")


def check_weights(what: str, nbytes: int, device: torch.device | str = "cpu", *,
                  reading: bool = False) -> None:
    """Refuse weights of `nbytes` that the CPU (where they are built) or `device` cannot hold,
    before any is built: `nbytes` from a config already checked against the stored tensors' shapes,
    so a file cannot ask for more than it holds (or, `reading`, a file's size before it is read)."""
    for where in dict.fromkeys([torch.device("cpu"), torch.device(device)]):
        free = available_bytes(where)
        if free is not None and nbytes > HEADROOM * free:
            raise UsageError(f"{what}: {'reading it needs' if reading else 'its weights need'} "
                             f"{describe(nbytes)}, and {where} has {describe(free)} free (a job "
                             f"may take {HEADROOM:.0%} of it); nothing was built. Use a machine "
                             "with more memory (or another --device)")


# ----------------------------------------------------------------------------------------------
# Training


def check_training(name: str, model_bytes: int, per_example: float, batch: int,
                   device: torch.device, extra: float = 0.0) -> float:
    """Refuse a training run whose estimate (weights x 5: weights, gradients, Adam's moments, EMA;
    `per_example` activations per example; `extra`, e.g. a latent cache) exceeds the free memory,
    naming the largest --batch_size that fits. Returns the estimate."""
    need = 5 * model_bytes + batch * per_example + extra
    free = available_bytes(device)
    if free is None or need <= HEADROOM * free:
        return need
    fits = (math.floor((HEADROOM * free - 5 * model_bytes - extra) / per_example)
            if per_example else 0)
    advice = (f"--batch_size {fits} fits" if fits >= 1 else
              "even one example does not fit: use a smaller model (--channels) or image size")
    raise UsageError(f"training {name} with --batch_size {batch} needs about {describe(need)}, and "
                     f"{device} has {describe(free)} free: {advice}")


def check_ldm_training(denoiser, data, batch: int, device: torch.device) -> float:
    """train_ldm.py's check before its first step: the UNet's activations at the latent size for
    `batch` examples, the weights x 5 and the latent cache (`data`), which lives on the device."""
    h, w = data.latents.shape[-2:]
    per_example = unet_profile(denoiser, (h, w)).training(h * w)
    cache = sum(t.numel() * 4 for t in (data.latents, data.std, data.flipped) if t is not None)
    return check_training("the LDM", weights_bytes(denoiser), per_example, batch, device,
                          extra=cache)


def check_ae_training(state, image_size: int, batch: int, device: torch.device) -> float:
    """train_ae.py's check before its first step: the autoencoder's activations and the
    discriminator's (run on real and reconstructed images), and, when LPIPS is on, its backbone's
    (on both), for `batch` images of `image_size` pixels a side."""
    S, loss_fn = image_size, state.loss_fn
    x = torch.zeros(1, state.model.config.in_channels, S, S, device=device)
    parts = [(state.model, lambda: state.model(x), 1),
             (loss_fn.discriminator, lambda: loss_fn.discriminator(x), 2)]
    if loss_fn.perceptual is not None:
        parts.append((loss_fn.perceptual, lambda: loss_fn.perceptual(x, x), 1))
    per_example = sum(times * profile(m, fn, S * S).training(S * S) for m, fn, times in parts)
    trained = weights_bytes(state.model, loss_fn.discriminator)
    return check_training("the autoencoder", trained, per_example, batch, device)
