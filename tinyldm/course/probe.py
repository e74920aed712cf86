"""The process a student's code runs in when it is checked or graded: it calls the library on inputs
sent as data and sends back what came out, as data.

    python -m tinyldm.course.probe      # requests on stdin, replies on stdout

A message is an 8-byte big-endian length and an .npz archive: arrays, numbers and strings (read
with allow_pickle=False, never code). A request names a probe and holds its inputs; the reply holds
the probe's outputs, or `error`: the exception and where it was raised. A probe calls the library
the way a test would and judges nothing: the process that sent the request compares the outputs.

No probe needs another assignment's code. Where an assignment builds on another's result (the
forward process needs alpha_bar, the training step needs x_t), the request carries that result.
"""

from __future__ import annotations

import io
import os
import sys
import traceback
import zipfile

import numpy as np
import torch
import torch.nn.functional as F

from tinyldm.autoencoder import DiagonalGaussian, VectorQuantizer
from tinyldm.autoencoder_loss import adaptive_weight
from tinyldm.blocks import TransformerBlock, attention_weights
from tinyldm.conditioning import ConditionConfig, ConditionEncoder
from tinyldm.ddim import ddim_step, guided_prediction
from tinyldm.ldm import Denoiser, DiffusionConfig, ldm_loss
from tinyldm.schedule import NoiseSchedule
from tinyldm.unet import UNet, UNetConfig

MAX_MESSAGE = 256 * 2**20  # bytes


# --- Messages -------------------------------------------------------------------------------------

def encode(values: dict) -> bytes:
    """An .npz archive (stored, not compressed) of tensors, numbers, bools and strings."""
    arrays = {}
    for key, v in values.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            v = (v.float() if v.dtype in (torch.bfloat16, torch.float16) else v).numpy()
        arrays[key] = np.asarray(v)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def decode(data: bytes, limit: int = MAX_MESSAGE) -> dict:
    """The values of an .npz archive: 0-d arrays as Python numbers and strings, the rest as tensors.
    Refuses compressed members (their size could exceed `limit`) and pickled objects."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = archive.infolist()
        if len(members) > 4096 or any(m.compress_type != zipfile.ZIP_STORED
                                      or m.file_size > limit for m in members):
            raise ValueError("a message must be an uncompressed .npz of at most 4096 arrays")
    out = {}
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        for key in archive.files:
            a = archive[key]
            out[key] = a.item() if a.ndim == 0 else torch.from_numpy(a.copy())
    return out


def read_message(stream) -> dict | None:
    header = stream.read(8)
    if len(header) < 8:
        return None
    size = int.from_bytes(header, "big")
    if size > MAX_MESSAGE:
        raise ValueError(f"a message of {size} bytes")
    return decode(stream.read(size))


def write_message(stream, values: dict) -> None:
    data = encode(values)
    stream.write(len(data).to_bytes(8, "big") + data)
    stream.flush()


# --- Shared builders: the checking side builds the same modules from the same seeds ---------------

def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn (norm weights around 1, biases around 0): defaults would hide a swapped
    layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(generator=g).mul_(p[0].numel() ** -0.5 if p.ndim > 1 else 0.3)
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm | torch.nn.GroupNorm) and m.weight is not None:
                m.weight.add_(1.0)
    return module


def tiny_unet(seed: int, *, context_dim: int | None = None, fused: bool = True,
              attention: bool = True) -> UNet:
    torch.manual_seed(seed)
    return UNet(UNetConfig(in_channels=3, out_channels=3, latent_size=8, channels=32,
                           channel_mult=(1, 2), num_res_blocks=1,
                           attn_resolutions=(8, 4) if attention else (), head_dim=16,
                           context_dim=context_dim, norm_groups=8, fused_attention=fused))


def tiny_denoiser(seed: int, *, drawn: bool = True) -> Denoiser:
    """An unconditional denoiser whose UNet has no attention: the training step needs no other
    assignment's code. drawn=True draws every weight (`randomise`): the fresh network's zero
    layers would hide a prediction that ignores t."""
    unet = tiny_unet(seed, attention=False)
    return Denoiser(randomise(unet, seed) if drawn else unet,
                    ConditionEncoder(ConditionConfig(kind="none")))


def transformer_block(seed: int) -> TransformerBlock:
    return randomise(TransformerBlock(32, 8, context_dim=12), seed).eval()


def schedule_from_table(alpha_bar: torch.Tensor, betas: torch.Tensor) -> NoiseSchedule:
    """A NoiseSchedule holding the given tables (float64, (T,)), built without the code that
    computes alpha_bar."""
    s = NoiseSchedule.__new__(NoiseSchedule)
    s.T, s._alpha_bar_exact, s.alpha_bar = len(alpha_bar), alpha_bar.tolist(), alpha_bar.float()
    s.betas = betas.float()
    return s


class GivenForwardProcess:
    """Stands in for NoiseSchedule.q_sample: returns the x_t given for the call it expects (set
    `step` to choose which), and refuses any other."""

    def __init__(self, x0: list, t: list, noise: list, x_t: list):
        self.expected, self.step = list(zip(x0, t, noise, x_t, strict=True)), 0

    def __call__(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        want_x0, want_t, want_noise, x_t = self.expected[self.step]
        if not (torch.equal(torch.as_tensor(t), want_t) and torch.equal(x0, want_x0)
                and torch.equal(noise, want_noise)):
            raise ValueError("schedule.q_sample was called with other arguments than the batch's "
                             "(z0, t, eps)")
        return x_t.clone()


def attention_run(seed: int, steps: int, *, fused: bool) -> tuple[list[float], UNet]:
    """A short training run of a UNet whose attention layers run the fused kernel, or
    attention_weights (fused=False): its losses and the trained network."""
    unet = tiny_unet(seed, fused=fused)
    opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 3, 8, 8, generator=g)
        t = torch.randint(0, 1000, (16,), generator=g)
        loss = F.mse_loss(unet(x, t), x.flip(-1) * 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, unet


# --- Probes: one library call each ----------------------------------------------------------------

def probe_noise_schedule(kind: str, T: int) -> dict:
    s = NoiseSchedule(kind, T=T)
    return {"alpha_bar": torch.tensor(s._alpha_bar_exact, dtype=torch.float64),
            "alpha_bar_float32": s.alpha_bar}


def probe_forward_process(alpha_bar, betas, x0, t, noise) -> dict:
    return {"x_t": schedule_from_table(alpha_bar, betas).q_sample(x0, t, noise)}


def probe_training_step(alpha_bar, betas, z0, t, eps, z_t, prediction: str, loss: str,
                        seed: int) -> dict:
    cfg = DiffusionConfig(prediction=prediction, loss=loss, p_uncond=0.0)
    denoiser, schedule = tiny_denoiser(seed), schedule_from_table(alpha_bar, betas)
    schedule.q_sample = GivenForwardProcess([z0], [t], [eps], [z_t])
    value = ldm_loss(denoiser, schedule, z0, t, eps, None, cfg)
    value.backward()
    grads = {f"grad.{n}": p.grad for n, p in denoiser.named_parameters() if p.grad is not None}
    return {"loss": value, **grads}


def probe_training_run(alpha_bar, betas, images, index, t, eps, z_t, seed: int,
                       lr: float) -> dict:
    """Adam on the training step's loss, one batch per row of index / t / eps / z_t: the losses and
    the trained weights."""
    cfg = DiffusionConfig(p_uncond=0.0)
    denoiser = tiny_denoiser(seed, drawn=False)
    schedule = schedule_from_table(alpha_bar, betas)
    batches = [images[i] for i in index]
    stand_in = GivenForwardProcess(batches, list(t), list(eps), list(z_t))
    schedule.q_sample = stand_in
    opt = torch.optim.Adam(denoiser.parameters(), lr=lr)
    losses = []
    for step, batch in enumerate(batches):
        stand_in.step = step
        value = ldm_loss(denoiser, schedule, batch, t[step], eps[step], None, cfg)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.detach())
    weights = {f"weight.{k}": v for k, v in denoiser.state_dict().items()}
    return {"losses": torch.stack(losses), **weights}


def probe_ddim_step(x0, eps, alpha_bar_t: float, alpha_bar_prev: float, eta: float,
                    noise=None) -> dict:
    return {"x_prev": ddim_step(x0, eps, alpha_bar_t, alpha_bar_prev, eta=eta, noise=noise)}


def probe_classifier_free_guidance(x, c, u, a: float, b: float, scale: float) -> dict:
    def model(x_t, t, c):
        return x_t * a + c * b

    return {"guided": guided_prediction(model, x, torch.zeros(len(x)), cond={"c": c},
                                        uncond={"c": u}, guidance_scale=scale)}


def probe_attention(q, k, mask=None) -> dict:
    return {"weights": attention_weights(q, k, mask=mask)}


def probe_unet_attention(seed: int, x, t) -> dict:
    """A UNet built with fused_attention=False, its weights drawn from `seed`."""
    with torch.no_grad():
        return {"out": randomise(tiny_unet(seed, fused=False), seed).eval()(x, t)}


def probe_attention_run(seed: int, steps: int) -> dict:
    losses, unet = attention_run(seed, steps, fused=False)
    return {"losses": torch.tensor(losses, dtype=torch.float64),
            **{f"weight.{k}": v for k, v in unet.state_dict().items()}}


def probe_cross_attention(seed: int, x, context, mask=None) -> dict:
    with torch.no_grad():
        return {"out": transformer_block(seed)(x, context, mask)}


def probe_unet_context(seed: int, x, t, context, mask) -> dict:
    with torch.no_grad():
        unet = randomise(tiny_unet(seed, context_dim=16), seed).eval()
        return {"out": unet(x, t, context=context, context_mask=mask)}


def probe_kl_term(mean, logvar) -> dict:
    return {"kl": DiagonalGaussian(torch.cat([mean, logvar], dim=1)).kl()}


def _quantizer(codebook: torch.Tensor) -> VectorQuantizer:
    q = VectorQuantizer(codebook.shape[0], codebook.shape[1], beta=0.25, restart_threshold=0.0,
                        usage_decay=0.99).eval()
    with torch.no_grad():
        q.codebook.weight.copy_(codebook)
    return q


def probe_vq_lookup(codebook, z) -> dict:
    return {"indices": _quantizer(codebook).lookup(z)}


def probe_vq_forward(codebook, z, weights) -> dict:
    """The quantizer's forward pass, and the gradient of sum(z_q * weights) at z."""
    z = z.clone().requires_grad_()
    out = _quantizer(codebook)(z)
    (grad,) = torch.autograd.grad((out.z_q * weights).sum(), z, allow_unused=True)
    return {"z_q": out.z_q, "indices": out.indices,
            "grad": torch.zeros_like(z) if grad is None else grad}


def probe_adaptive_weight(layer, x, rec_scale: float, adv_scale: float, delta: float,
                          max_value: float) -> dict:
    """lambda for rec = rec_scale * mean(h^2) and adv = adv_scale * sum(sin h), h = x @ layer."""
    layer = layer.clone().requires_grad_()
    h = x @ layer
    # create_graph: the gradients carry a graph, so an answer that forgets to detach lambda shows
    grad_rec = torch.autograd.grad(h.pow(2).mean() * rec_scale, layer, create_graph=True)[0]
    grad_adv = torch.autograd.grad(h.sin().sum() * adv_scale, layer, create_graph=True)[0]
    lam = adaptive_weight(grad_rec, grad_adv, delta=delta, max_value=max_value)
    return {"lambda": lam, "requires_grad": bool(torch.as_tensor(lam).requires_grad)}


PROBES = {name.removeprefix("probe_"): f for name, f in globals().items()
          if name.startswith("probe_")}


# --- The process ----------------------------------------------------------------------------------

def where(error: BaseException) -> str:
    """The innermost line of the library that raised `error`, as 'tinyldm/ddim.py, line 170'."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        parts = frame.filename.replace(os.sep, "/").rsplit("/tinyldm/", 1)
        if len(parts) == 2 and not parts[1].startswith("course/"):
            return f"tinyldm/{parts[1]}, line {frame.lineno}"
    return ""


def serve(requests, replies) -> None:
    write_message(replies, {"ready": True})
    while (request := read_message(requests)) is not None:
        name = request.pop("probe", "")
        try:
            if name not in PROBES:
                raise ValueError(f"no probe named {name!r}")
            reply = PROBES[name](**request)
        except Exception as e:  # the student's code raised: that is the reply
            at = where(e)
            reply = {"error": f"{type(e).__name__}: {e}"[:600] + (f" ({at})" if at else "")}
        write_message(replies, reply)


def main() -> None:
    if sys.argv[1:] or sys.stdin.isatty():  # run by hand: say what this is
        print(__doc__.strip())
        return
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # what the code prints goes to stderr, never into a reply
    torch.set_grad_enabled(True)
    serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
