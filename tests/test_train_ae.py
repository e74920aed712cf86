"""Tests for train_ae.py and tinyldm/training/ (checkpoints, flags, EMA, random state): exact
resume, presets."""

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from torch import nn

import train_ae  # a top-level script (pyproject puts the repository root on pytest's path)
from tinyldm.autoencoder import Autoencoder, AutoencoderConfig
from tinyldm.autoencoder_loss import AELossConfig
from tinyldm.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tinyldm.data.order import batch_indices
from tinyldm.evaluation.viz import save_image_grid
from tinyldm.training.flags import add_config_args, build_config
from tinyldm.training.loop import EMA, JSONLLogger, pick_device

pytestmark = pytest.mark.slow  # train_ae.py end to end, in its smoke settings


def run(tmp_path: Path, *flags: str, out: str = "run") -> dict:
    return train_ae.main(["--out", str(tmp_path / out), "--device", "cpu", *flags])


# ----------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path / "a" / "ckpt.pt",
                           {"model": model.state_dict(), "opt": opt.state_dict(),
                            "config": {"x": (1, 2)}, "rng": rng_state()}, kind="demo")
    assert not list(path.parent.glob(".*tmp"))  # no temp file left behind
    raw = torch.load(path, weights_only=True)  # plain tensors and values only
    assert raw["kind"] == "demo"
    data = load_checkpoint(path, kind="demo")
    for k, v in model.state_dict().items():
        assert torch.equal(data["model"][k], v)
    opt2 = torch.optim.Adam(nn.Linear(3, 2).parameters())
    opt2.load_state_dict(data["opt"])
    assert data["config"] == {"x": (1, 2)}


def test_bad_checkpoints_are_refused_clearly(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", {"w": torch.randn(1000)}, kind="autoencoder")
    with pytest.raises(CheckpointError, match="'autoencoder' checkpoint, expected a 'ldm'"):
        load_checkpoint(path, kind="ldm")
    blob = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a tinyldm checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


# ----------------------------------------------------------------------------------------------
# small utilities


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cuda", "mps", "cpu")
    if not torch.cuda.is_available():
        assert pick_device("auto") != torch.device("cuda")
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


def test_ema_follows_its_formula():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay_1 = min(0.9, 2 / 11)
    torch.testing.assert_close(ema.model.weight, torch.full((1, 2), 1 - 2 / 11))
    for _ in range(100):
        ema.update(model)
    torch.testing.assert_close(ema.model.weight, torch.ones(1, 2), atol=1e-4, rtol=0)
    clone = EMA(model, decay=0.5)
    clone.load_state_dict(ema.state_dict())
    assert clone.num_updates == 101 and clone.decay == 0.9


def test_batch_indices_are_epochs_of_permutations_and_pure():
    n, b = 10, 4
    # 20 = 2 epochs
    stream = torch.cat([batch_indices(s, n=n, batch_size=b, seed=7) for s in range(5)])
    assert (sorted(stream[:10].tolist()) == list(range(10))
            and sorted(stream[10:].tolist()) == list(range(10)))
    assert torch.equal(batch_indices(3, n=n, batch_size=b, seed=7), stream[12:16])
    assert not torch.equal(batch_indices(0, n=n, batch_size=b, seed=8), stream[:4])


def test_jsonl_logger_drops_records_past_the_resumed_step(tmp_path):
    log = JSONLLogger(tmp_path / "log.jsonl")
    for step in (1, 2, 3):
        log.log(step=step, loss=torch.tensor(float(step)))
    JSONLLogger(tmp_path / "log.jsonl", resume_step=2).log(step=3, loss=9.0)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 9.0)]


@dataclass
class _Demo:
    width: int = 4
    mult: tuple[int, ...] = (1, 2)
    rate: float = 0.5
    name: str = "a"
    flag: bool = False


def test_dataclass_flags_override_presets():
    parser = argparse.ArgumentParser()
    add_config_args(parser, _Demo)
    args = parser.parse_args(["--mult", "1,2,4", "--flag", "true", "--rate", "1e-3"])
    cfg = build_config(_Demo, {"width": 8, "rate": 0.1, "unrelated": 1}, vars(args))
    assert cfg == _Demo(width=8, mult=(1, 2, 4), rate=1e-3, name="a", flag=True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--flag", "maybe"])


def test_save_image_grid(tmp_path):
    import numpy as np
    from PIL import Image

    images = torch.full((3, 3, 4, 5), -1.0)
    images[1] = 1.0
    path = save_image_grid(images, tmp_path / "grid.png", nrow=2, pad=1)
    array = torch.from_numpy(np.array(Image.open(path)))
    assert array.shape == (2 * (4 + 1) + 1, 2 * (5 + 1) + 1, 3)
    assert array[1, 1].tolist() == [0, 0, 0] and array[1, 7].tolist() == [255, 255, 255]


# ----------------------------------------------------------------------------------------------
# presets


def test_presets_build_valid_configs_with_their_named_factor_and_regularizer():
    for name, preset in train_ae.PRESETS.items():
        assert (set(preset)
                <= {f for cls in train_ae.CONFIGS for f in cls.__dataclass_fields__}), name
        ae = build_config(AutoencoderConfig, preset)
        build_config(AELossConfig, preset)
        build_config(train_ae.TrainAEConfig, preset)
        if name.endswith("_f8") or name == "folder256":
            assert ae.downsample_factor == 8 and ae.regularizer == "kl"
        elif name.endswith("_vq") or name in ("folder64", "folder128"):
            assert ae.downsample_factor == 4 and ae.regularizer == "vq"
        else:
            assert ae.downsample_factor == 4 and ae.regularizer == "kl"
    assert {"shapes", "shapes_vq", "celeba64", "celeba128", "lsun64", "lsun128", "celeba128_f8",
            "lsun64_vq"} <= set(train_ae.PRESETS)


# ----------------------------------------------------------------------------------------------
# the script


def test_smoke_run_writes_a_loadable_checkpoint_and_metrics(tmp_path):
    metrics = run(tmp_path, "--smoke", "--ema_decay", "0.9")
    out = tmp_path / "run"
    assert {"autoencoder.pt", "metrics.json", "log.jsonl"} <= {p.name for p in out.iterdir()}
    assert list(out.glob("recon_*.png")) and (out / "loss.png").exists()  # grids and the loss curve
    assert json.loads((out / "metrics.json").read_text())["psnr"] == pytest.approx(metrics["psnr"])
    ckpt = load_checkpoint(out / "autoencoder.pt", kind="autoencoder")
    assert ckpt["step"] == 6 and ckpt["ae_config"]["base_channels"] == 8
    # the EMA weights, with the measured latent statistics
    model = Autoencoder.from_checkpoint(ckpt)
    assert model.scale_factor.item() == pytest.approx(metrics["latent"]["scale_factor"])
    assert model.scale_factor.item() == pytest.approx(1 / metrics["latent"]["global_std"])
    assert 0 < metrics["ssim"] <= 1 and metrics["psnr"] > 5
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6


def test_resume_continues_exactly(tmp_path, monkeypatch):
    flags = ["--smoke", "--steps", "6", "--disc_start", "2", "--ckpt_every", "4",
             "--ema_decay", "0.9"]
    straight = run(tmp_path, *flags, out="straight")

    real_save = train_ae.save_checkpoint

    def save_then_crash(*args, **kwargs):  # the run dies right after its step-4 checkpoint
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_ae, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, *flags, out="resumed")
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "resumed" / "autoencoder.pt")["step"] == 4
    resumed = run(tmp_path, "--resume", out="resumed")

    a = load_checkpoint(tmp_path / "straight" / "autoencoder.pt")
    b = load_checkpoint(tmp_path / "resumed" / "autoencoder.pt")
    assert b["step"] == 6
    for part in ("autoencoder", "ema_autoencoder"):
        for k, v in a[part]["state_dict"].items():
            assert torch.equal(v, b[part]["state_dict"][k]), (part, k)
    for k, v in a["discriminator"].items():
        assert torch.equal(v, b["discriminator"][k]), k
    assert straight == {**resumed, "train_seconds": straight["train_seconds"]}
    log = [json.loads(line)
           for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    log_straight = [json.loads(line)
                    for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    strip = ("img_per_s",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in log] == [
        {k: v for k, v in r.items() if k not in strip} for r in log_straight
    ]


def test_vq_smoke_run_reports_codebook_stats(tmp_path):
    metrics = run(tmp_path, "--preset", "shapes_vq", "--smoke")
    assert 0 < metrics["codebook_usage"] <= 1 and 1 <= metrics["perplexity"] <= 16
    ckpt = load_checkpoint(tmp_path / "run" / "autoencoder.pt", kind="autoencoder")
    assert ckpt["ae_config"]["regularizer"] == "vq"


def test_flags_override_the_preset(tmp_path):
    run(tmp_path, "--smoke", "--steps", "1", "--z_channels", "3", "--channel_mult", "1,2,2",
        "--rec_loss", "l2")
    ckpt = load_checkpoint(tmp_path / "run" / "autoencoder.pt")
    assert (ckpt["ae_config"]["z_channels"] == 3
            and tuple(ckpt["ae_config"]["channel_mult"]) == (1, 2, 2))
    assert ckpt["loss_config"]["rec_loss"] == "l2"


def test_resume_refuses_a_truncated_checkpoint(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "autoencoder.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        run(tmp_path, "--resume")


def test_identity_first_stage_checkpoint_trains_a_pixel_space_ldm(tmp_path):
    """train_ae.py --regularizer identity writes a checkpoint at once (nothing to train; pixels kept
    in [-1, 1], scale factor 1) that train_ldm.py uses like any first stage: diffusion on
    3 x 32 x 32 pixels."""
    import train_ldm
    from tinyldm.checkpoint import load_checkpoint

    r = train_ae.main(["--smoke", "--regularizer", "identity", "--z_channels", "3",
                       "--channel_mult", "1", "--out", str(tmp_path / "ae")])
    ckpt = load_checkpoint(tmp_path / "ae" / "autoencoder.pt", kind="autoencoder")
    assert (ckpt["autoencoder"]["state_dict"]["scale_factor"] == 1.0
            and r["latent"]["global_std"] > 0)
    train_ldm.main(["--smoke", "--ae", str(tmp_path / "ae" / "autoencoder.pt"),
                    "--out", str(tmp_path / "ldm"), "--channel_mult", "1,2,2,2", "--device", "cpu"])
    ldm = load_checkpoint(tmp_path / "ldm" / "ldm.pt", kind="ldm")
    assert ldm["unet_config"]["latent_size"] == 32 and ldm["unet_config"]["in_channels"] == 3


@pytest.mark.parametrize("flags, message", [(["--data", "."], "--dataset folder"),
                                            (["--hflip", "true"], "--hflip"),
                                            (["--dataset", "folder"], "--data PATH")])
def test_data_flags_the_dataset_would_ignore_are_refused(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        train_ae.main(["--preset", "shapes", "--smoke", "--out", str(tmp_path), *flags])
    assert not (tmp_path / "autoencoder.pt").exists()


def test_data_alone_picks_the_folder_preset(tmp_path, capsys):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(24):
        Image.new("RGB", (20, 24), (10 * i, 50, 200 - 5 * i)).save(photos / f"{i:02d}.png")
    metrics = train_ae.main(["--data", str(photos), "--smoke", "--out", str(tmp_path / "ae")])
    assert ("using the folder preset" in capsys.readouterr().out
            and metrics["psnr"] == metrics["psnr"])
    ckpt = load_checkpoint(tmp_path / "ae" / "autoencoder.pt", kind="autoencoder")
    assert ckpt["train_config"]["dataset"] == "folder"


# ----------------------------------------------------------------------------------------------
# the paper's settings


@pytest.mark.parametrize("preset",
                         ["celeba64", "celeba128_f8", "lsun64_vq", "folder64", "folder128",
                          "folder256"])
def test_photo_presets_follow_the_released_first_stage_configs(preset):
    """CompVis vq-f4: disc_start 0, disc_weight 0.75 (the presets inherited 50001 and 0.5 from
    kl-f4); every CompVis decoder runs num_res_blocks + 1 ResBlocks per level (the presets had 2);
    lr 4.5e-6 x batch."""
    from tinyldm.blocks import ResBlock, Upsample

    p = train_ae.PRESETS[preset]
    ae_config, loss = build_config(AutoencoderConfig, p), build_config(AELossConfig, p)
    if ae_config.regularizer == "vq":
        assert ((loss.disc_start, loss.disc_weight, loss.codebook_weight, ae_config.n_codes)
                == (0, 0.75, 1.0, 8192))
    else:
        assert (loss.disc_start, loss.disc_weight, loss.kl_weight) == (50_001, 0.5, 1e-6)
    assert ((loss.rec_loss, loss.perceptual_weight, loss.disc_layers, loss.disc_channels)
            == ("l1", 1.0, 3, 64))
    assert ae_config.base_channels == 128 and ae_config.num_res_blocks == 2
    assert p["lr"] == pytest.approx(4.5e-6 * p["batch_size"])
    # the structure, at a quarter of the width
    small = Autoencoder(replace(ae_config, base_channels=32))
    per_level = [0]
    for block in small.decoder.up:  # ResBlocks of one level, then an Upsample
        if isinstance(block, Upsample):
            per_level.append(0)
        per_level[-1] += isinstance(block, ResBlock)
    assert per_level == [3] * len(ae_config.channel_mult)


def test_the_autoencoder_trains_in_full_precision_unless_asked():
    """bf16 autocast cost 2.5 dB of held-out PSNR in a pair of otherwise equal GPU runs: it is
    opt-in (--amp true)."""
    assert train_ae.TrainAEConfig().amp is False
    assert not any(p.get("amp") for p in train_ae.PRESETS.values())


def test_photo_preset_smoke_runs_include_lpips_and_the_discriminator(tmp_path, lfw_faces, capsys):
    """--smoke keeps a photo preset's loss: LPIPS (the lpips package, random backbone, offline) and
    the PatchGAN."""
    pytest.importorskip("lpips")
    run(tmp_path, "--preset", "celeba64_vq", "--smoke", "--dataset", "folder",
        "--data", str(lfw_faces))
    assert "LPIPS (vgg, random backbone" in capsys.readouterr().out
    records = [json.loads(line)
               for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss_ae" in r]
    assert all(r["perceptual"] > 0 for r in steps)
    # the discriminator is on by the last steps
    assert "loss_disc" in steps[-1] and "g_adv" in steps[-1]
