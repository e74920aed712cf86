"""Benchmark: tinyldm against diffusers, the same model sizes, in the same process, on this machine.

    python -m tinyldm.tools.bench                                 # CPU: the "cpu" config, eager
    python -m tinyldm.tools.bench --device cuda --json bench.json # GPU: tiny_t2i, celebahq_ldm4,
                                                                    kl_f4; every mode
    python -m tinyldm.tools.bench --config tiny_t2i --modes eager compile --no_diffusers
    python -m tinyldm.tools.bench --smoke                         # seconds: what CI runs
    python -m tinyldm.tools.bench --device cuda --config tiny_t2i --profile --modes compile
                                                                  # where the time goes
    python -m tinyldm.tools.bench --activations --config tiny_t2i celebahq_ldm4 kl_f4
                                                                  # activation memory, any device

For each config it measures, for tinyldm and for the matching diffusers model (UNet2DConditionModel,
UNet2DModel or AutoencoderKL built with the same widths, blocks and attention; parameter counts are
printed side by side):

* UNet train step (forward, backward, AdamW): images/s, achieved TFLOP/s (FLOPs of one step from
  `torch.utils.flop_counter.FlopCounterMode`) and peak memory, in each mode: eager, `torch.compile`,
  `torch.compile(mode="reduce-overhead")` (CUDA graphs; GPU only);
* 50-step DDIM sampling, without and with classifier-free guidance: tinyldm's whole loop (UNet +
  update, `ddim.sample`; on a GPU also recorded as one CUDA graph, `tools.speed.graphed_sampler`)
  against diffusers' 50 UNet evaluations alone (no scheduler), in the same modes;
* autoencoder train step (encode, sample, decode, L1 loss, backward, AdamW) and decode throughput.

A summary after the table gives, per measurement, tinyldm's best mode against diffusers' best
(higher is better for tinyldm). On CUDA everything runs in bf16 autocast with channels_last and
fused AdamW, on both sides. Timings are medians after warm-up; the first call (in a compiled mode,
the compilation) is left out of the median and reported on its own. `--train_ldm` adds
train_ldm.py's own steady-state throughput (from its log) against the bare step of its model. Speed
is only ever reported from here, never asserted in a unit test. The configs and the diffusers
counterparts are in `bench_models.py`; the ratios and the table in `bench_report.py`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from tinyldm.autoencoder import Autoencoder
from tinyldm.cli import UsageError
from tinyldm.ddim import sample
from tinyldm.schedule import NoiseSchedule
from tinyldm.tools.bench_models import (  # noqa: F401 -- re-exported: `bench.CONFIGS` and friends
    CONFIGS,
    GPU_CONFIGS,
    BenchConfig,
    diffusers_autoencoder,
    diffusers_unet,
    n_params,
    smoke_config,
)
from tinyldm.tools.bench_report import TABLE_HEADER, format_row, print_summary, ratios  # noqa: F401
from tinyldm.tools.speed import graphed_sampler
from tinyldm.unet import UNet

MODES = ("eager", "compile", "reduce-overhead")
WHATS = ("unet_train", "sample", "sample_cfg", "ae_train", "ae_decode")


# ----------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, *, warmup: int, repeat: int, device: torch.device) -> float:
    """Median seconds of fn() over `repeat` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _compile(fn, mode: str):
    """torch.compile for one model, from a clean slate.

    Dynamo's caches are per code object: every UNet instance shares `UNet.forward`, and after
    `torch._dynamo.config.recompile_limit` instances it would silently fall back to eager. Resetting
    first keeps each row's compiled model its own (and frees the CUDA graphs of the row before).
    """
    torch._dynamo.reset()
    return torch.compile(fn, mode="reduce-overhead" if mode == "reduce-overhead" else None)


def _prepare(model: torch.nn.Module, device: torch.device, mode: str) -> torch.nn.Module:
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model if mode == "eager" else _compile(model, mode)


def _measure(step, device: torch.device, *, mode: str, warmup: int, repeat: int) -> dict:
    """Time `step`, and record how long its first call took (the compilation, in a compiled mode),
    how many graph breaks Dynamo met, and the peak memory (CUDA) in MiB."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    breaks_before = sum(torch._dynamo.utils.counters["graph_break"].values())
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    first_call = time.perf_counter() - start
    seconds = _time(step, warmup=warmup, repeat=repeat, device=device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    out = {"seconds": seconds, "peak_mib": peak, "first_call_s": first_call}
    if mode != "eager":
        out["graph_breaks"] = (sum(torch._dynamo.utils.counters["graph_break"].values())
                               - breaks_before)
    return out


def count_flops(fn) -> int:
    """FLOPs of one call of fn (matmuls, convolutions and attention, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def saved_for_backward_mib(fn, exclude=()) -> float:
    """MiB of tensors that autograd keeps from the forward of one call of fn for its backward: the
    activation memory of a train step, measured on any device (a proxy for its peak memory that the
    CPU can give). Each storage counts once (views of one tensor share it); `exclude` (the
    parameters, which exist anyway) does not count."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def _libraries(with_diffusers: bool) -> list[str]:
    return ["tinyldm"] + (["diffusers"] if with_diffusers else [])


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _cuda_graph_step():
    """Before each call of a reduce-overhead model: a new step begins, earlier outputs may be
    overwritten."""
    torch.compiler.cudagraph_mark_step_begin()


# ----------------------------------------------------------------------------------------------
# The measurements


def unet_inputs(cfg: BenchConfig, batch: int, device: torch.device) -> tuple:
    u = cfg.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, u.in_channels, u.latent_size, u.latent_size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    context = (torch.randn(batch, cfg.tokens, u.context_dim, generator=g).to(device)
               if u.context_dim else None)
    if device.type == "cuda":
        x = x.to(memory_format=torch.channels_last)
    return x, t, context


def _unet_call(model: torch.nn.Module, library: str):
    """A uniform call model(x, t, context) -> prediction for both libraries."""
    if library == "tinyldm":
        return lambda x, t, c: model(x, t, context=c) if c is not None else model(x, t)
    return lambda x, t, c: (model(x, t, encoder_hidden_states=c)
                            if c is not None else model(x, t)).sample


def unet_train_step(cfg: BenchConfig, library: str, mode: str, device: torch.device):
    """(step, fwd_bwd, params, model): one optimiser step of the UNet on a fixed batch, and its
    eager forward and backward (what the FLOP counter sees)."""
    torch.manual_seed(0)
    base = UNet(cfg.unet) if library == "tinyldm" else diffusers_unet(cfg.unet)
    params = n_params(base)
    model = _prepare(base, device, mode)
    call = _unet_call(model, library)
    x, t, context = unet_inputs(cfg, cfg.train_batch, device)
    opt = torch.optim.AdamW(base.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        if mode == "reduce-overhead":
            _cuda_graph_step()
        with _autocast(device):
            loss = F.mse_loss(call(x, t, context).float(), x.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def fwd_bwd():
        with _autocast(device):
            loss = F.mse_loss(_unet_call(base, library)(x, t, context).float(), x.float())
        loss.backward()
        base.zero_grad(set_to_none=True)

    return step, fwd_bwd, params, base


def _measure_train(made: tuple, batch: int, device: torch.device, *, mode: str, warmup: int,
                   repeat: int) -> dict:
    """A train step's row from `made` = (step, fwd_bwd, params, model): images/s, FLOPs and TFLOP/s,
    the activations saved for backward (eager rows), and what `_measure` records."""
    step, fwd_bwd, params, base = made
    flops = count_flops(fwd_bwd)
    saved = ({"saved_mib": saved_for_backward_mib(fwd_bwd, base.parameters())}
             if mode == "eager" else {})
    m = _measure(step, device, mode=mode, warmup=warmup, repeat=repeat)
    return {"params": params, "flops_per_step": flops, "img_per_s": batch / m["seconds"],
            "tflops": flops / m["seconds"] / 1e12, **saved, **m}


def bench_unet_train(cfg: BenchConfig, library: str, mode: str, device: torch.device, *,
                     warmup: int, repeat: int) -> dict:
    return _measure_train(unet_train_step(cfg, library, mode, device), cfg.train_batch, device,
                          mode=mode, warmup=warmup, repeat=repeat)


def bench_sampling(cfg: BenchConfig, library: str, mode: str, device: torch.device, *,
                   guidance: bool, warmup: int, repeat: int) -> dict:
    """tinyldm: the whole `sample_steps` DDIM loop; diffusers: `sample_steps` UNet evaluations
    alone."""
    torch.manual_seed(0)
    base = (UNet(cfg.unet)
            if library == "tinyldm" else diffusers_unet(cfg.unet)).eval().requires_grad_(False)
    graph = mode == "cuda-graph"
    model = _prepare(base, device, "eager" if graph else mode)
    call = _unet_call(model, library)
    B = cfg.sample_batch
    x, _, context = unet_inputs(cfg, B, device)
    steps = cfg.sample_steps

    if library == "tinyldm":
        schedule = NoiseSchedule().to(device)
        options = dict(steps=steps)
        if context is not None:
            options["cond"] = {"c": context}
            if guidance:
                options.update(uncond={"c": torch.zeros_like(context)}, guidance_scale=3.0)

        def model_fn(x_t, t, c=None):
            if mode == "reduce-overhead":
                _cuda_graph_step()
            return call(x_t, t, c)

        if graph:
            with _autocast(device):
                run_graph = graphed_sampler(model_fn, schedule, x, **options)

        def run():
            with _autocast(device):
                return run_graph(x) if graph else sample(model_fn, schedule, x, **options)
    else:
        xs, cs = x, context  # with guidance: the unconditional and conditional halves in one batch
        if guidance and context is not None:
            xs, cs = torch.cat([x, x]), torch.cat([torch.zeros_like(context), context])
        ts = torch.full((len(xs),), 500, device=device)

        @torch.no_grad()
        def run():
            with _autocast(device):
                for _ in range(steps):
                    if mode == "reduce-overhead":
                        _cuda_graph_step()
                    call(xs, ts, cs)

    m = _measure(run, device, mode="eager" if graph else mode, warmup=warmup, repeat=repeat)
    return {"batch": B, "steps": steps, **m}


def autoencoder_train_step(cfg: BenchConfig, library: str, mode: str, device: torch.device):
    """(step, fwd_bwd, params, model): one optimiser step of the autoencoder (L1 reconstruction) on
    a fixed batch, and its eager forward and backward."""
    torch.manual_seed(0)
    base = Autoencoder(cfg.ae) if library == "tinyldm" else diffusers_autoencoder(cfg.ae)
    params = n_params(base)
    model = _prepare(base, device, mode)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(cfg.ae_batch, 3, cfg.ae_size, cfg.ae_size, generator=g) * 2 - 1).to(device)
    if device.type == "cuda":
        x = x.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(base.parameters(), lr=1e-4, fused=device.type == "cuda")

    def reconstruct(m, x):
        if library == "tinyldm":
            return m(x).x_rec
        return m(x, sample_posterior=True).sample

    def step():
        if mode == "reduce-overhead":
            _cuda_graph_step()
        with _autocast(device):
            loss = (reconstruct(model, x).float() - x.float()).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def fwd_bwd():
        with _autocast(device):
            loss = (reconstruct(base, x).float() - x.float()).abs().mean()
        loss.backward()
        base.zero_grad(set_to_none=True)

    return step, fwd_bwd, params, base


def bench_autoencoder(cfg: BenchConfig, library: str, mode: str, device: torch.device, *,
                      warmup: int, repeat: int) -> tuple[dict, dict]:
    """(train step, decode) measurements."""
    made = autoencoder_train_step(cfg, library, mode, device)
    train = _measure_train(made, cfg.ae_batch, device, mode=mode, warmup=warmup, repeat=repeat)
    base = made[3]
    f = 2 ** (len(cfg.ae.channel_mult) - 1)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(cfg.ae_batch, cfg.ae.z_channels, cfg.ae_size // f, cfg.ae_size // f,
                    generator=g).to(device)
    base.eval()
    decode = base.decode if library == "tinyldm" else (lambda z: base.decode(z).sample)
    if mode != "eager":
        decode = _compile(decode, mode)

    @torch.no_grad()
    def run_decode():
        if mode == "reduce-overhead":
            _cuda_graph_step()
        with _autocast(device):
            decode(z)

    dec = _measure(run_decode, device, mode=mode, warmup=warmup, repeat=repeat)
    return train, {"img_per_s": cfg.ae_batch / dec["seconds"], **dec}


def bench_train_ldm(device: torch.device, *, smoke: bool, warmup: int, repeat: int) -> dict:
    """train_ldm.py's steady-state images/s from its own log (latent cache, EMA, logging, condition
    encoder included) against the bare train step of the same denoiser on random latents and
    captions."""
    import train_ldm
    from tinyldm.checkpoint import build_denoiser, load_checkpoint
    from tinyldm.ldm import DiffusionConfig, ldm_loss

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        if device.type == "cuda":
            argv = ["--preset", "shapes64", "--steps", "300", "--n_train", "4096",
                    "--ae_steps", "200"]
        else:
            argv = ["--preset", "shapes", "--steps", "60", "--n_train", "512", "--ae_steps", "20"]
        if smoke:
            argv = ["--preset", "shapes", "--smoke"]
        argv += ["--out", str(out), "--device", device.type, "--eval_images", "0",
                 "--log_every", "10" if not smoke else "2", "--sample_every", "1000000",
                 "--curve_every", "0"]
        train_ldm.main(argv)
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()
                   if '"loss"' in line]
        steady = (statistics.median(r["img_per_s"] for r in records[1:])
                  if len(records) > 1 else records[0]["img_per_s"])
        ckpt = load_checkpoint(out / "ldm.pt", kind="ldm")
    train = ckpt["train_config"]
    denoiser = build_denoiser(ckpt["unet_config"], ckpt["cond_config"]).to(device)
    diffusion = DiffusionConfig(**ckpt["diffusion_config"])
    schedule = diffusion.make_schedule().to(device)
    u = denoiser.unet.cfg
    z0 = torch.randn(train["batch_size"], u.in_channels, u.latent_size, u.latent_size,
                     device=device)
    captions = (["a red circle in the top left"] * train["batch_size"]
                if denoiser.cond.cfg.kind == "text" else None)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        t = torch.randint(0, schedule.T, (len(z0),), device=device)
        eps = torch.randn_like(z0)
        with torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=train["amp"] and device.type == "cuda"):
            loss = ldm_loss(denoiser, schedule, z0, t, eps, captions, diffusion)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
        opt.step()

    bare = train["batch_size"] / _time(step, warmup=warmup, repeat=repeat, device=device)
    return {"argv": argv, "batch": train["batch_size"], "train_ldm_img_per_s": steady,
            "bare_step_img_per_s": bare, "ratio": steady / bare}


def activation_rows(config_names: list[str], device: torch.device, *, with_diffusers: bool,
                    batch: int = 4) -> list[dict]:
    """Per config and library: MiB saved for backward per image by the eager train step (UNet and
    autoencoder), at a small batch, so that it runs on a CPU for the GPU-sized configs too."""
    rows = []
    for name in config_names:
        cfg = replace(CONFIGS[name], train_batch=batch, ae_batch=batch)
        for library in _libraries(with_diffusers):
            for what, make, present in (("unet_train", unet_train_step, cfg.unet),
                                        ("ae_train", autoencoder_train_step, cfg.ae)):
                if present is not None:
                    _, fwd_bwd, params, base = make(cfg, library, "eager", device)
                    rows.append({"config": name, "what": what, "library": library, "batch": batch,
                                 "params": params, "saved_mib_per_image":
                                     saved_for_backward_mib(fwd_bwd, base.parameters()) / batch})
    return rows


def profile_unet_train(cfg: BenchConfig, library: str, mode: str, device: torch.device, *,
                       steps: int = 5, top: int = 25) -> str:
    """Where a train step's time goes: torch.profiler's table of the `top` operators and kernels by
    time spent on the device (CPU time on a CPU), over `steps` steps after a warm-up (and the
    compilation)."""
    from torch.profiler import ProfilerActivity, profile

    step = unet_train_step(cfg, library, mode, device)[0]
    for _ in range(3):
        step()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=60)


# ----------------------------------------------------------------------------------------------
# The command


def _unet_train_rows(cfg: BenchConfig, library: str, mode: str, device: torch.device,
                     **kw) -> list[dict]:
    return [{"what": "unet_train", "batch": cfg.train_batch,
             **bench_unet_train(cfg, library, mode, device, **kw)}]


def _sampling_rows(cfg: BenchConfig, library: str, mode: str, device: torch.device, guidance: bool,
                   **kw) -> list[dict]:
    return [{"what": "sample_cfg" if guidance else "sample",
             **bench_sampling(cfg, library, mode, device, guidance=guidance, **kw)}]


def _autoencoder_rows(cfg: BenchConfig, library: str, mode: str, device: torch.device,
                      whats: list[str], **kw) -> list[dict]:
    train, decode = bench_autoencoder(cfg, library, mode, device, **kw)
    return [{"what": w, "batch": cfg.ae_batch, **m}
            for w, m in (("ae_train", train), ("ae_decode", decode)) if w in whats]


def _guarded(on_row, head: dict, whats: list[str], measure, *args, **kw) -> list[dict]:
    """The rows of `measure(*args, **kw)`, each passed to `on_row` as it is made. On an error, one
    row per wanted measurement saying what went wrong: one failing mode (out of memory, a compiler
    error) costs its own rows, not the run."""
    try:
        bodies = measure(*args, **kw)
    except Exception as e:  # noqa: BLE001 -- reported in the row; the run goes on
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        bodies = [{"what": w, "error": f"{type(e).__name__}: {message}"[:300]} for w in whats]
    rows = [{**head, **body} for body in bodies]
    for row in rows:
        on_row(row)
    return rows


def run(config_names: list[str], device: torch.device, modes: list[str], *, with_diffusers: bool,
        smoke: bool, warmup: int, repeat: int, whats: tuple[str, ...] = WHATS,
        diffusers_modes: list[str] | None = None, on_row=lambda row: None) -> list[dict]:
    """Every measurement as a flat row {config, what, library, mode, ...}; `on_row` sees each as it
    is made.

    On a GPU tinyldm's sampling also runs in mode "cuda-graph" (the whole loop recorded as one
    graph). `diffusers_modes` (default: `modes`) skips diffusers' modes known to be slower, when GPU
    time is short.
    """
    rows = []
    for name in config_names:
        cfg = smoke_config(CONFIGS[name]) if smoke else CONFIGS[name]
        kw = dict(warmup=warmup, repeat=repeat)
        for library in _libraries(with_diffusers):
            lib_modes = list(diffusers_modes
                             if library == "diffusers" and diffusers_modes else modes)
            if library == "tinyldm" and cfg.unet is not None and device.type == "cuda":
                lib_modes.append("cuda-graph")
            for mode in lib_modes:
                head = {"config": name, "library": library, "mode": mode}
                if cfg.unet is not None:
                    if mode != "cuda-graph" and "unet_train" in whats:
                        rows += _guarded(on_row, head, ["unet_train"], _unet_train_rows, cfg,
                                         library, mode, device, **kw)
                    for guidance in (False, True) if cfg.unet.context_dim else (False,):
                        what = "sample_cfg" if guidance else "sample"
                        if what in whats:
                            rows += _guarded(on_row, head, [what], _sampling_rows, cfg, library,
                                             mode, device, guidance, **kw)
                ae_whats = [w for w in ("ae_train", "ae_decode") if w in whats]
                if cfg.ae is not None and mode != "cuda-graph" and ae_whats:
                    rows += _guarded(on_row, head, ae_whats, _autoencoder_rows, cfg, library, mode,
                                     device, ae_whats, **kw)
    return rows


def matmul_peak_tflops(device: torch.device, n: int = 8192, repeat: int = 10) -> float:
    """The chip's practical bf16 peak: an n x n x n matrix product on random data (2 n^3 FLOPs)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds = _time(lambda: a @ b, warmup=3, repeat=repeat, device=device)
    return 2 * n**3 / seconds / 1e12


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
           "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["bf16_matmul_peak_tflops"] = matmul_peak_tflops(device)
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    return env


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", choices=list(CONFIGS), help="default: cpu on a CPU, "
                   f"{' '.join(GPU_CONFIGS)} on a GPU")
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", nargs="+", choices=MODES,
                   help="default: eager on a CPU, all three on a GPU")
    p.add_argument("--diffusers_modes", nargs="+", choices=MODES,
                   help="diffusers' modes (default: --modes)")
    p.add_argument("--what", nargs="+", choices=WHATS, default=list(WHATS),
                   help="which measurements (default: all)")
    p.add_argument("--no_diffusers", action="store_true",
                   help="tinyldm only (diffusers is the `bench` extra)")
    p.add_argument("--train_ldm", action="store_true",
                   help="also train_ldm.py's steady state against its bare step")
    p.add_argument("--smoke", action="store_true", help="batch 2, 3 sampling steps, one repeat")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--activations", action="store_true", help="instead of timing: MiB saved for "
                   "backward per image by each train step (eager, batch 4); runs on a CPU for "
                   "every config")
    p.add_argument("--profile", action="store_true", help="instead of timing: torch.profiler's top "
                   "operators of the UNet train step, per config and library, in the "
                   "first of --modes")
    p.add_argument("--json", help="also write the rows, the ratios and the environment here")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    names = args.config or (list(GPU_CONFIGS) if device.type == "cuda" else ["cpu"])
    modes = args.modes or (list(MODES) if device.type == "cuda" else ["eager"])
    if device.type != "cuda" and "reduce-overhead" in modes + (args.diffusers_modes or []):
        raise UsageError("mode reduce-overhead records CUDA graphs: it needs --device cuda")
    with_diffusers = not args.no_diffusers
    if with_diffusers:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            raise UsageError("diffusers is not installed: pip install -e '.[bench]', or pass "
                             "--no_diffusers") from None
    repeat, warmup = (1, 1) if args.smoke else (args.repeat, 2)
    env = environment(device)
    result = {"environment": env, "argv": argv if argv is not None else sys.argv[1:], "rows": [],
              "ratios": []}

    def save():  # after every row: a run stopped part-way still leaves what it measured
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, default=str))

    def on_row(row: dict) -> None:
        result["rows"].append(row)
        print(format_row(row), flush=True)
        save()

    if args.activations:
        result["activations"] = activation_rows(names, device, with_diffusers=with_diffusers)
        print(f"{env}\n\nMiB saved for backward per image, eager train step, batch 4")
        for r in result["activations"]:
            print(f"  {r['config']:<14}{r['what']:<11}{r['library']:<10}"
                  f"{r['params'] / 1e6:>8.2f} M params{r['saved_mib_per_image']:>9.1f} MiB")
        save()
        return result
    if args.profile:
        result["profiles"] = {}
        for name in names:
            cfg = smoke_config(CONFIGS[name]) if args.smoke else CONFIGS[name]
            for library in _libraries(with_diffusers):
                if cfg.unet is None:
                    continue
                table = profile_unet_train(cfg, library, modes[0], device,
                                           steps=1 if args.smoke else 5)
                result["profiles"][f"{name}/{library}/{modes[0]}"] = table
                print(f"\n{name}, {library}, {modes[0]}: UNet train step\n{table}", flush=True)
                save()
        return result
    print(f"{env}\n\n{TABLE_HEADER}", flush=True)
    run(names, device, modes, with_diffusers=with_diffusers, smoke=args.smoke, warmup=warmup,
        repeat=repeat, whats=tuple(args.what), diffusers_modes=args.diffusers_modes, on_row=on_row)
    result["ratios"] = ratios(result["rows"], env.get("bf16_matmul_peak_tflops"))
    print_summary(result["ratios"])
    save()
    if args.train_ldm:
        t = result["train_ldm"] = _guarded(lambda row: None, {}, ["train_ldm"], lambda: [
            bench_train_ldm(device, smoke=args.smoke, warmup=warmup, repeat=repeat)])[0]
        if "error" in t:
            print(f"\ntrain_ldm.py steady state: FAILED {t['error']}")
        else:
            print(f"\ntrain_ldm.py steady state {t['train_ldm_img_per_s']:.1f} img/s against its "
                  f"bare step {t['bare_step_img_per_s']:.1f} img/s (x{t['ratio']:.2f}), "
                  f"batch {t['batch']}")
        save()
    return result


if __name__ == "__main__":
    main()
