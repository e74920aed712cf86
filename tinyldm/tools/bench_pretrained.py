"""Memory, FLOPs and time per image of the paper's three released models, run through tinyldm's
modules.

    python -m tinyldm.tools.bench_pretrained  # all three, CPU, 3 timed UNet calls each
    python -m tinyldm.tools.bench_pretrained --release CompVis/ldm-text2im-large-256 --full
                                              # a real 50-step run
    python -m tinyldm.tools.bench_pretrained --device cuda --json bench_pretrained.json

The models are built at their released size from `tinyldm.pretrained.architectures` with random
weights: time and memory do not depend on the weights' values, so no download is needed. Each
release is measured in its own process (peak memory is a per-process high-water mark):

* parameters and fp32 weight memory of each part; peak resident memory (CPU) or peak allocated
  memory (CUDA) while sampling one image;
* FLOPs (`torch.utils.flop_counter.FlopCounterMode`) of one UNet call, the text encoder and the
  decoder, and per image for `--steps` DDIM steps (two UNet calls per step with classifier-free
  guidance, which the text-to-image release is sampled with);
* time: the median of `--repeat` UNet calls, one decode and one text encoding, and the per-image
  time they give for `--steps` steps; with `--full`, one whole `generate()` of one image, timed end
  to end.

The GPU column in docs/pretrained.md is an estimate from these FLOPs where no GPU was measured; the
script prints measured figures only.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from tinyldm.autoencoder import Autoencoder
from tinyldm.cli import UsageError
from tinyldm.conditioning import ConditionConfig, ConditionEncoder
from tinyldm.ldm import Denoiser, DiffusionConfig
from tinyldm.pretrained import RELEASES, PretrainedLDM
from tinyldm.pretrained.architectures import RELEASED
from tinyldm.pretrained.autoencoder import autoencoder_config
from tinyldm.pretrained.ldmbert import LDMBert, LDMBertCondition, LDMBertConfig
from tinyldm.pretrained.unet import unet_config
from tinyldm.unet import UNet


def build(release: str, device: torch.device) -> tuple[PretrainedLDM, LDMBert | None]:
    """The release's modules at full size, random weights, eval mode, and its text encoder
    (or None)."""
    arch, info = RELEASED[release], RELEASES[release]
    unet = UNet(unet_config(arch["unet"], concat_channels=info.concat_channels))
    ae = Autoencoder(autoencoder_config(arch["vqvae"], regularizer=info.first_stage))
    ae.scale_factor.fill_(info.scale_factor)
    bert = (LDMBert(LDMBertConfig.from_diffusers(arch["bert"])).eval().to(device)
            if "bert" in arch else None)
    # (no tokenizer: it needs the release's vocabulary; the benchmark feeds the encoder token ids)
    cond = (LDMBertCondition(bert, None)
            if bert is not None else ConditionEncoder(ConditionConfig(kind="none")))
    denoiser = Denoiser(unet, cond).eval()
    diffusion = DiffusionConfig(**info.schedule)
    model = PretrainedLDM(denoiser, diffusion.make_schedule(), ae.eval(), diffusion,
                          arch["image_size"], release)
    return model.to(device), bert


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _median_seconds(fn, repeat: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure(release: str, device: torch.device, *, steps: int, repeat: int, full: bool) -> dict:
    model, bert = build(release, device)
    unet, ae, info = model.denoiser.unet, model.autoencoder, RELEASES[release]
    # the text-to-image release is sampled with guidance (two UNet calls a step)
    guided = bert is not None
    batch = 2 if guided else 1
    side = model.latent_size
    z = torch.randn(batch, unet.cfg.in_channels, side, side, device=device)
    kw = {}
    if info.concat_channels:
        kw["concat"] = torch.randn(batch, info.concat_channels, side, side, device=device)
    if bert is not None:
        ids = torch.randint(0, bert.cfg.vocab_size, (batch, bert.cfg.max_len), device=device)
        kw["context"] = bert(ids)
    t = torch.full((batch,), 500, device=device)

    def unet_call():
        return unet(z, t, **kw)

    def decode():
        return ae.decode(z[:1] / ae.scale_factor)

    row = {"release": release, "device": str(device), "steps": steps, "guided": guided,
           "params_m": {"unet": _params(unet) / 1e6, "autoencoder": _params(ae) / 1e6,
                        **({"text_encoder": _params(bert) / 1e6} if bert is not None else {})},
           "image": f"{model.image_size}x{model.image_size}",
           "latent": f"{unet.cfg.in_channels}x{side}x{side}"}
    row["weights_gib"] = sum(row["params_m"].values()) * 1e6 * 4 / 2**30
    flops = {"unet_call": _flops(unet_call) / batch, "decode": _flops(decode)}
    seconds = {"unet_call": _median_seconds(unet_call, repeat, device),
               "decode": _median_seconds(decode, 1, device)}
    if bert is not None:
        flops["text_encoder"] = _flops(lambda: bert(ids)) / batch
        seconds["text_encoder"] = _median_seconds(lambda: bert(ids), 1, device)
    calls = steps * (2 if guided else 1)
    row["gflops"] = {k: v / 1e9 for k, v in flops.items()}
    row["gflops_per_image"] = (calls * flops["unet_call"] + flops["decode"]
                               + batch * flops.get("text_encoder", 0.0)) / 1e9
    row["seconds"] = seconds
    # per image: `steps` batched UNet calls (the guided pair runs as one batch of 2), the decode,
    # the encodings
    row["seconds_per_image"] = (steps * seconds["unet_call"] + seconds["decode"]
                                + seconds.get("text_encoder", 0.0))
    if full:
        n = 1
        g = torch.Generator(device).manual_seed(0)
        start = time.perf_counter()
        if bert is None:
            concat = kw["concat"][:1] if info.concat_channels else None
            model.generate(n, steps=steps, concat=concat, generator=g)
        else:  # the guided loop of generate(), with the encoder's output standing in for prompts
            from tinyldm.ddim import sample

            context = kw["context"]
            z0 = sample(unet, model.schedule,
                        torch.randn(1, 4, side, side, generator=g, device=device),
                        steps=steps, cond={"context": context[1:]}, uncond={"context": context[:1]},
                        guidance_scale=5.0)
            ae.decode(z0 / ae.scale_factor)
        if device.type == "cuda":
            torch.cuda.synchronize()
        row["full_run_seconds"] = time.perf_counter() - start
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:  # ru_maxrss is in KiB on Linux
        row["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


def report(row: dict) -> str:
    p = row["params_m"]
    parts = ", ".join(f"{k} {v:.1f} M" for k, v in p.items())
    s = row["seconds"]
    lines = [f"{row['release']}: {row['image']} image from a {row['latent']} latent; {parts} "
             f"({row['weights_gib']:.2f} GiB fp32)",
             f"  FLOPs: UNet call {row['gflops']['unet_call']:.1f} G, decode "
             f"{row['gflops']['decode']:.1f} G"
             + (f", text encoder {row['gflops']['text_encoder']:.1f} G"
                if "text_encoder" in row["gflops"] else "")
             + f"; per image ({row['steps']} steps{', guided' if row['guided'] else ''}): "
               f"{row['gflops_per_image'] / 1e3:.2f} TFLOP",
             f"  time on {row['device']}: UNet call {s['unet_call'] * 1e3:.0f} ms"
             + (" (batch 2: guided)" if row["guided"] else "")
             + f", decode {s['decode'] * 1e3:.0f} ms"
             + (f", text encoder {s['text_encoder'] * 1e3:.0f} ms" if "text_encoder" in s else "")
             + f" -> {row['seconds_per_image']:.1f} s per image; "
               f"peak memory {row['peak_gib']:.2f} GiB"]
    if "full_run_seconds" in row:
        lines.append(f"  one whole {row['steps']}-step generate(): {row['full_run_seconds']:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", action="append", choices=list(RELEASED), help="default: all three")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeat", type=int, default=3, help="timed UNet calls (their median is used)")
    p.add_argument("--full", action="store_true",
                   help="also time one whole generate() of one image")
    p.add_argument("--json", help="write the rows here")
    # one release, this process
    p.add_argument("--in_process", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    releases = args.release or list(RELEASED)
    device = torch.device(args.device)
    if args.in_process:
        rows = [measure(r, device, steps=args.steps, repeat=args.repeat, full=args.full)
                for r in releases]
        print(json.dumps(rows))
        return rows
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {device}")
    rows = []
    for release in releases:  # one process each: peak memory is per process
        cmd = [sys.executable, "-m", "tinyldm.tools.bench_pretrained", "--in_process",
               "--release", release, "--device", args.device, "--steps", str(args.steps),
               "--repeat", str(args.repeat)]
        out = subprocess.run(cmd + (["--full"] if args.full else []), capture_output=True,
                             text=True)
        if out.returncode:
            raise UsageError(f"{release}: the measurement failed:\n{out.stderr[-2000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])[0]
        print(report(row), flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
