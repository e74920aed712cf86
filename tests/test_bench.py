"""The benchmark's models and fast paths: diffusers counterparts of the same size and compute, and
every fast path (channels_last, bf16 autocast, torch.compile, the recorded sampler) against the
plain path. Speed itself is never asserted here; `python -m tinyldm.tools.bench` prints it."""

import json

import pytest
import torch

from tinyldm.autoencoder import Autoencoder
from tinyldm.ddim import sample
from tinyldm.schedule import NoiseSchedule
from tinyldm.tools import bench
from tinyldm.tools.speed import graphed_sampler
from tinyldm.unet import UNet, UNetConfig

pytestmark = pytest.mark.slow  # speed, FLOPs and memory, and the benchmark tools end to end

diffusers = pytest.importorskip("diffusers",
                                reason="the `bench` extra (diffusers) is not installed")

UNET_CONFIGS = [name for name, cfg in bench.CONFIGS.items() if cfg.unet is not None]
AE_CONFIGS = [name for name, cfg in bench.CONFIGS.items() if cfg.ae is not None]


def count_on_meta(build) -> int:
    with torch.device("meta"):  # parameter shapes only: the 274 M model costs nothing
        return bench.n_params(build())


@pytest.mark.parametrize("name", UNET_CONFIGS)
def test_diffusers_unet_has_the_same_parameters(name):
    cfg = bench.CONFIGS[name].unet
    ours, theirs = (count_on_meta(lambda: UNet(cfg)),
                    count_on_meta(lambda: bench.diffusers_unet(cfg)))
    assert abs(ours / theirs - 1) < 0.001, (ours, theirs)  # same architecture: they agree to 0.1%


def test_the_papers_celebahq_unet_has_274M_parameters():
    """Tab. 14 of the paper lists 274 M for the CelebA-HQ LDM-4; plain attention blocks and an
    additive timestep embedding give exactly that (transformer blocks, as in the text-to-image
    UNets, give 387 M)."""
    cfg = bench.CONFIGS["celebahq_ldm4"].unet
    assert round(count_on_meta(lambda: UNet(cfg)) / 1e6) == 274
    assert count_on_meta(
        lambda: UNet(UNetConfig(**{**vars(cfg), "attention_block": "transformer"}))) > 380e6


@pytest.mark.parametrize("name", AE_CONFIGS)
def test_diffusers_autoencoder_has_the_same_parameters(name):
    cfg = bench.CONFIGS[name].ae
    ours, theirs = (count_on_meta(lambda: Autoencoder(cfg)),
                    count_on_meta(lambda: bench.diffusers_autoencoder(cfg)))
    assert abs(ours / theirs - 1) < 0.001, (ours, theirs)


def test_the_counterparts_do_the_same_work():
    """Same architecture, same FLOPs: forward and backward of the cpu config's UNet and autoencoder
    agree with diffusers' within 2% (differences: diffusers' timestep MLP input and attention bias
    terms)."""
    cfg = bench.smoke_config(bench.CONFIGS["cpu"])
    x, t, context = bench.unet_inputs(cfg, 2, torch.device("cpu"))
    flops = {}
    for library, model in (("tinyldm", UNet(cfg.unet)),
                           ("diffusers", bench.diffusers_unet(cfg.unet))):
        call = bench._unet_call(model, library)
        flops[library] = bench.count_flops(
            lambda: call(x, t, context).square().mean().backward())  # noqa: B023
    assert flops["tinyldm"] > 1e8 and abs(flops["tinyldm"] / flops["diffusers"] - 1) < 0.02, flops
    img = torch.rand(2, 3, cfg.ae_size, cfg.ae_size) * 2 - 1
    ours = bench.count_flops(lambda: Autoencoder(cfg.ae)(img).x_rec.mean().backward())
    theirs = bench.count_flops(
        lambda: bench.diffusers_autoencoder(cfg.ae)(img).sample.mean().backward())
    assert abs(ours / theirs - 1) < 0.02, (ours, theirs)


def test_mismatched_layouts_are_refused():
    with pytest.raises(ValueError, match="plain attention"):
        bench.diffusers_unet(UNetConfig(context_dim=None))
    with pytest.raises(ValueError, match="num_res_blocks \\+ 1"):
        bench.diffusers_autoencoder(bench.CONFIGS["kl_f4"].ae.__class__(num_res_blocks=2))


def test_smoke_run_measures_both_libraries(tmp_path):
    out = tmp_path / "bench.json"
    result = bench.main(["--smoke", "--train_ldm", "--json", str(out)])
    rows = result["rows"]
    measured = ("unet_train", "sample", "sample_cfg", "ae_train", "ae_decode")
    assert {(r["what"], r["library"]) for r in rows} == {(w, lib) for w in measured
                                                         for lib in ("tinyldm", "diffusers")}
    for r in rows:
        assert r["seconds"] > 0
        if "img_per_s" in r:  # images per second is the batch over the median time
            assert r["img_per_s"] == pytest.approx(r["batch"] / r["seconds"])
        if "tflops" in r:
            assert r["tflops"] == pytest.approx(r["flops_per_step"] / r["seconds"] / 1e12)
    for s in result["ratios"]:
        assert s["speedup"] > 0 and s.get("params_ratio", 1.0) == pytest.approx(1.0, abs=1e-3)
    t = result["train_ldm"]
    assert t["ratio"] == pytest.approx(t["train_ldm_img_per_s"] / t["bare_step_img_per_s"])
    assert out.exists() and result["environment"]["diffusers"] == diffusers.__version__


def test_a_failing_measurement_costs_only_its_own_row_and_rows_are_saved_as_they_come(
        tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    plain_sampling, seen_on_disk = bench.bench_sampling, []

    def sampling(cfg, library, mode, device, *, guidance, **kw):
        # what a run killed now would leave
        seen_on_disk.append(len(json.loads(out.read_text())["rows"]))
        if guidance:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return plain_sampling(cfg, library, mode, device, guidance=guidance, **kw)

    monkeypatch.setattr(bench, "bench_sampling", sampling)
    result = bench.main(["--smoke", "--no_diffusers", "--what", "unet_train", "sample",
                         "sample_cfg", "--json", str(out)])
    rows = {r["what"]: r for r in result["rows"]}
    assert list(rows) == ["unet_train", "sample", "sample_cfg"]  # --what: no autoencoder rows
    assert (rows["sample_cfg"]["error"]
            == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert rows["sample"]["seconds"] > 0 and rows["unet_train"]["first_call_s"] > 0
    assert seen_on_disk == [1, 2]  # the JSON held every earlier row when each sampling run began
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert {s["what"] for s in result["ratios"] if "tinyldm_best" in s} == {"unet_train", "sample"}
    assert bench.format_row(rows["sample_cfg"]).endswith("FAILED RuntimeError: CUDA out of memory. "
                                                         "Tried to allocate 2.00 GiB")


def test_ratios_take_each_library_best_mode_and_the_fraction_of_peak():
    def row(library, mode, img_per_s, tflops, peak_mib):
        return {"config": "c", "what": "unet_train", "library": library, "mode": mode,
                "img_per_s": img_per_s, "tflops": tflops, "params": 10, "peak_mib": peak_mib}

    rows = [row("tinyldm", "eager", 100, 50, 900), row("tinyldm", "compile", 150, 75, 1000),
            row("diffusers", "eager", 80, 40, 1200),
            row("diffusers", "reduce-overhead", 120, 60, 1500),
            {"config": "c", "what": "unet_train", "library": "diffusers", "mode": "compile",
             "error": "OOM"},
            {"config": "c", "what": "sample", "library": "tinyldm", "mode": "eager",
             "seconds": 2.0},
            {"config": "c", "what": "sample", "library": "diffusers", "mode": "eager",
             "seconds": 3.0}]
    samp, train = bench.ratios(rows, peak_tflops=300.0)  # sorted by (config, what)
    assert ((train["tinyldm_best_mode"], train["diffusers_best_mode"])
            == ("compile", "reduce-overhead"))
    assert (train["speedup"] == pytest.approx(150 / 120)
            and train["peak_memory_ratio"] == pytest.approx(1000 / 1500))
    assert train["tinyldm_fraction_of_peak"] == pytest.approx(0.25)
    assert train["diffusers_fraction_of_peak"] == pytest.approx(0.2)
    # lower time is better
    assert samp["metric"] == "seconds" and samp["speedup"] == pytest.approx(1.5)


def test_profile_names_where_the_train_step_spends_its_time(tmp_path):
    result = bench.main(["--smoke", "--profile", "--json", str(tmp_path / "p.json")])
    assert set(result["profiles"]) == {"cpu/tinyldm/eager", "cpu/diffusers/eager"}
    for table in result["profiles"].values():
        assert "aten::convolution_backward" in table and "Self CPU" in table
    assert json.loads((tmp_path / "p.json").read_text())["profiles"] == result["profiles"]


def test_saved_for_backward_counts_each_activation_once():
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 1))
    x = torch.randn(32, 64)
    # Linear 1 keeps its input x (32 x 64); ReLU keeps its output (32 x 128), which Linear 2 also
    # keeps (one storage, counted once); the output layer's weight (128) is kept to reach the ReLU's
    # gradient.
    activations = 4 * (32 * 64 + 32 * 128)
    run = lambda: net(x).sum().backward()  # noqa: E731
    assert bench.saved_for_backward_mib(run, net.parameters()) * 2**20 == activations
    assert bench.saved_for_backward_mib(run) * 2**20 == activations + 4 * 128


def test_activation_memory_per_image_does_not_depend_on_the_batch():
    cpu = torch.device("cpu")
    two, four = (bench.activation_rows(["cpu"], cpu, with_diffusers=True, batch=b) for b in (2, 4))
    assert [(r["what"], r["library"]) for r in two] == [
        ("unet_train", "tinyldm"), ("ae_train", "tinyldm"),
        ("unet_train", "diffusers"), ("ae_train", "diffusers")]
    for a, b in zip(two, four, strict=True):
        assert b["saved_mib_per_image"] > 0.1
        assert a["saved_mib_per_image"] == pytest.approx(b["saved_mib_per_image"], rel=0.02)


def test_reduce_overhead_needs_a_gpu():
    with pytest.raises(SystemExit, match="needs --device cuda"):
        bench.main(["--smoke", "--modes", "reduce-overhead"])


# --- fast paths against the plain path ------------------------------------------------------------

def small_unet() -> tuple[UNet, tuple]:
    torch.manual_seed(0)
    model = UNet(UNetConfig(latent_size=8, channels=32, channel_mult=(1, 2), attn_resolutions=(4,),
                            context_dim=16))
    # the zero-initialised output layers would make every comparison trivial
    for p in model.parameters():
        if p.ndim > 1:
            torch.nn.init.normal_(p, std=0.05)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 5, 16)
    return model.eval(), (x, t, c)


def test_channels_last_gives_the_same_output():
    model, (x, t, c) = small_unet()
    ref = model(x, t, context=c)
    assert ref.abs().mean() > 0.01
    out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t,
                                                      context=c)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_stays_close_to_float32():
    model, (x, t, c) = small_unet()
    ref = model(x, t, context=c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, context=c)
    rel = (out.float() - ref).norm() / ref.norm()
    # bf16 has 8 bits of mantissa: ~1% per layer
    assert out.dtype == torch.bfloat16 and rel < 0.05, rel


def test_torch_compile_gives_the_same_output():
    model, (x, t, c) = small_unet()
    ref = model(x, t, context=c)
    torch.testing.assert_close(torch.compile(model)(x, t, context=c), ref, atol=1e-4, rtol=1e-4)


def test_recorded_sampler_on_cpu_is_the_plain_loop():
    model, (x, t, c) = small_unet()
    schedule = NoiseSchedule()
    options = dict(steps=4, cond={"context": c})
    run = graphed_sampler(model, schedule, x, **options)
    torch.testing.assert_close(run(x), sample(model, schedule, x, **options))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_recorded_sampler_on_a_gpu_matches_the_plain_loop():
    model, (x, t, c) = small_unet()
    model, x, c = model.cuda(), x.cuda(), c.cuda()
    schedule = NoiseSchedule().cuda()
    options = dict(steps=10, cond={"context": c}, uncond={"context": torch.zeros_like(c)},
                   guidance_scale=3.0)
    run = graphed_sampler(model, schedule, x, **options)
    ref = sample(model, schedule, x, **options)
    torch.testing.assert_close(run(x), ref, atol=1e-4, rtol=1e-4)
    x2 = torch.randn_like(x)  # a second input through the same recording
    torch.testing.assert_close(run(x2), sample(model, schedule, x2, **options), atol=1e-4,
                               rtol=1e-4)
    with pytest.raises(ValueError, match="deterministic DDIM"):
        graphed_sampler(model, schedule, x, steps=10, eta=1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_recorded_sampler_on_a_gpu_under_bf16_autocast_survives_the_autocast_block():
    # Weights that require grad are what autocast caches casts of; the cache is freed when the block
    # ends.
    model, (x, t, c) = small_unet()
    model, x, c = model.cuda().requires_grad_(True), x.cuda(), c.cuda()
    schedule = NoiseSchedule().cuda()
    options = dict(steps=10, cond={"context": c})
    with torch.autocast("cuda", dtype=torch.bfloat16):
        run = graphed_sampler(model, schedule, x, **options)
        ref = sample(model, schedule, x, **options)
    # reuse freed memory
    junk = [torch.full((1 << 20,), float("nan"), device="cuda") for _ in range(64)]
    out = run(x)
    del junk
    assert torch.isfinite(out).all()
    rel = (out.float() - ref.float()).norm() / ref.float().norm()
    assert rel < 1e-2, rel  # the same bf16 kernels; only reduction order may differ


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_reduce_overhead_on_a_gpu_matches_eager_call_after_call():
    model, (x, t, c) = small_unet()
    model, x, t, c = model.cuda(), x.cuda(), t.cuda(), c.cuda()
    compiled = bench._compile(model, "reduce-overhead")
    for i in range(4):  # the first calls compile and record; later ones replay with new inputs
        xi = x + i
        bench._cuda_graph_step()
        out = compiled(xi, t, context=c).clone()
        torch.testing.assert_close(out, model(xi, t, context=c), atol=1e-3, rtol=1e-3)


def test_the_released_models_benchmark_prints_its_figures(capsys):
    """The smallest release, one step: the figures add up (FLOPs per image = steps x UNet call +
    decode) and the parameter count is the release's."""
    from tinyldm.tools.bench_pretrained import main

    rows = main(["--release", "CompVis/ldm-super-resolution-4x-openimages", "--steps", "1",
                 "--repeat", "1"])
    row = rows[0]
    assert (abs(row["params_m"]["unet"] - 113.6) < 0.1
            and abs(row["params_m"]["autoencoder"] - 55.3) < 0.1)
    assert abs(row["gflops_per_image"] - row["gflops"]["unet_call"]
               - row["gflops"]["decode"]) < 1e-6
    assert row["seconds_per_image"] > 0 and row["peak_gib"] > row["weights_gib"]
    assert "super-resolution" in capsys.readouterr().out
