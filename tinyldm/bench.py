"""Benchmark: UNet parameter counts, forward time and train-step throughput on this machine.

    python -m tinyldm.bench                      # CPU-sized run of every config
    python -m tinyldm.bench --config tiny_t2i --batch 8 --json out.json

The configurations are the ones whose reference figures live in shared/DESIGN.md ("tiny
text-to-image": 16x16x4 latents, channels (128, 256, 256), cross-attention at 16 and 8 to 32 tokens
of width 256; "celebahq_ldm4": the paper's CelebA-HQ LDM-4 UNet). Timings are wall-clock medians
after warm-up; on CUDA the step runs under bf16 autocast. Numbers from a timed unit test would be
noise, so speed is only ever reported from here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict

import torch

from .unet import UNet, UNetConfig

CONFIGS: dict[str, tuple[UNetConfig, int]] = {  # name -> (config, number of context tokens)
    "cpu_small": (UNetConfig(latent_size=8, channels=64, channel_mult=(1, 2), attn_resolutions=(4,),
                             context_dim=128), 16),
    "tiny_t2i": (UNetConfig(latent_size=16, channels=128, channel_mult=(1, 2, 2), num_res_blocks=2,
                            attn_resolutions=(16, 8), head_dim=32, context_dim=256, scale_shift_norm=False), 32),
    "celebahq_ldm4": (UNetConfig(in_channels=3, out_channels=3, latent_size=64, channels=224,
                                 channel_mult=(1, 2, 3, 4), num_res_blocks=2, attn_resolutions=(32, 16, 8),
                                 head_dim=32, context_dim=None), 0),
}


def _time(fn, *, warmup: int, repeat: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
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


def bench_unet(name: str, batch: int, device: torch.device, repeat: int = 5) -> dict:
    cfg, tokens = CONFIGS[name]
    model = UNet(cfg).to(device)
    S = cfg.latent_size
    x = torch.randn(batch, cfg.in_channels, S, S, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    kwargs = {"context": torch.randn(batch, tokens, cfg.context_dim, device=device)} if cfg.context_dim else {}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def forward():
        with torch.no_grad(), autocast:
            model(x, t, **kwargs)

    def train_step():
        with autocast:
            loss = model(x, t, **kwargs).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    fwd = _time(forward, warmup=1, repeat=repeat, device=device)
    step = _time(train_step, warmup=1, repeat=repeat, device=device)
    params_M = sum(p.numel() for p in model.parameters()) / 1e6
    return {"config": name, "device": str(device), "batch": batch, "params_M": params_M,
            "forward_s": fwd, "train_step_s": step, "train_img_per_s": batch / step, "unet_config": asdict(cfg)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=list(CONFIGS), action="append", help="repeatable; default: all")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = [bench_unet(name, args.batch, device, args.repeat) for name in args.config or list(CONFIGS)]
    print(f"{'config':<15}{'device':<8}{'batch':>6}{'params (M)':>12}{'forward (s)':>13}"
          f"{'train step (s)':>16}{'img/s':>9}")
    for r in results:
        print(f"{r['config']:<15}{r['device']:<8}{r['batch']:>6}{r['params_M']:>12.2f}{r['forward_s']:>13.3f}"
              f"{r['train_step_s']:>16.3f}{r['train_img_per_s']:>9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
