"""The health lines a run prints when something is wrong, each triggered here: a first stage
under its preset's gate (or unfinished), scaled latents whose std is far from 1, fewer images than
a batch, and a young EMA (the grid then also shows the raw weights). A loss that is NaN or
diverges, and a non-finite loss under bf16, are in test_trainer.py."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import train_ae
import train_ldm
from tinyldm.autoencoder import Autoencoder, AutoencoderConfig
from tinyldm.checkpoint import load_checkpoint
from tinyldm.training.health import first_stage_health, latent_health
from tinyldm.training.loop import EMA

FAST = ["--smoke", "--device", "cpu", "--eval_images", "0"]


def test_the_first_stage_gate_names_the_score_and_the_gate():
    shapes, photos = SimpleNamespace(ae_preset="shapes"), SimpleNamespace(ae_preset="celeba64_vq")
    ae = {"autoencoder": {"config": {"regularizer": "kl"}}, "step": 800,
          "train_config": {"steps": 800}}
    low = first_stage_health({**ae, "metrics": {"psnr": 12.5}}, "ae.pt", shapes)
    assert len(low) == 1 and "at 12.5 dB, under the 30 dB" in low[0]
    assert first_stage_health({**ae, "metrics": {"psnr": 35.0}}, "ae.pt", shapes) == []
    unfinished = first_stage_health({**ae, "step": 100, "metrics": None}, "ae.pt", shapes)
    assert "no held-out score (it stopped at step 100 of 800)" in unfinished[0]
    photo = first_stage_health({**ae, "metrics": {"psnr": 20.0}}, "a", photos)  # the photos' gate
    assert "under the 22 dB" in photo[0]
    identity = {**ae, "autoencoder": {"config": {"regularizer": "identity"}}, "metrics": None}
    assert first_stage_health(identity, "a", shapes) == []  # pixel space has nothing to gate


@pytest.mark.parametrize("std, says", [(1.0, False), (0.6, False), (1.9, False), (0.3, True),
                                       (5.0, True), (0.0, True)])
def test_scaled_latents_far_from_unit_std_are_named(std, says):
    ae = Autoencoder(AutoencoderConfig(base_channels=8, channel_mult=(1,), norm_groups=4))
    lines = latent_health(std, ae)
    assert bool(lines) == says and (not says or f"std is {std:.3f}, not about 1" in lines[0])


def test_a_young_ema_is_what_the_criterion_says():
    from tinyldm.evaluation.ldm_score import young

    ema = EMA(torch.nn.Linear(1, 1), decay=0.99)  # remembers ~100 steps
    ema.num_updates = 99
    assert young(ema)
    ema.num_updates = 100
    assert not young(ema)


@pytest.fixture(scope="module")
def smoke_ae(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae")
    train_ae.main(["--smoke", "--device", "cpu", "--out", str(out)])
    return out / "autoencoder.pt"


@pytest.mark.slow
def test_a_run_says_what_is_wrong_at_the_moment_it_is_true(smoke_ae, tmp_path, capsys):
    """A 6-step LDM on an untrained first stage (a smoke autoencoder: ~10 dB), on 5 images with a
    batch of 8, whose EMA (decay 0.999) is young at both grids: one health line each, and grids of
    two rows (EMA, raw). With --ema_decay 0.5 the EMA is grown at step 4: one row."""
    folder = tmp_path / "five"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (40, 40), (40 * i, 200 - 30 * i, 90)).save(folder / f"im{i}.png")
    out = tmp_path / "run"
    train_ldm.main([*FAST, "--data", str(folder), "--ae", str(smoke_ae), "--out", str(out),
                    "--sample_every", "4"])
    printed = capsys.readouterr().out
    health = [line for line in printed.splitlines() if line.startswith("health: ")]
    psnr = load_checkpoint(smoke_ae)["metrics"]["psnr"]
    assert any(f"reconstructs held-out images at {psnr:.1f} dB, under the 18 dB" in h
               for h in health), health
    assert any("training images, fewer than a batch of 8" in h for h in health), health
    assert sum("the EMA (decay 0.999) has averaged 4 of the ~1000 steps" in h
               for h in health) == 1, health  # said once, at the first young grid
    for step in (4, 6):
        assert Image.open(out / f"samples_{step:07d}.png").height > 2 * 32  # two rows
    grown = tmp_path / "grown"
    train_ldm.main([*FAST, "--data", str(folder), "--ae", str(smoke_ae), "--out", str(grown),
                    "--sample_every", "4", "--ema_decay", "0.5"])
    assert "the EMA" not in capsys.readouterr().out
    assert Image.open(grown / "samples_0000004.png").height < 2 * 32  # one row


@pytest.mark.slow
def test_a_scale_factor_that_does_not_fit_the_latents_is_named(smoke_ae, tmp_path, capsys):
    """The autoencoder's scale factor multiplied by 10 (as a wrong hand-set value would): the line
    names the std the UNet would see."""
    ckpt = torch.load(smoke_ae, weights_only=True)
    for key in ("autoencoder", "ema_autoencoder"):
        if ckpt.get(key):
            ckpt[key]["state_dict"]["scale_factor"] = ckpt[key]["state_dict"]["scale_factor"] * 10
    bad = tmp_path / "scaled.pt"
    torch.save(ckpt, bad)
    train_ldm.main([*FAST, "--ae", str(bad), "--out", str(tmp_path / "run")])
    printed = capsys.readouterr().out
    std = float(printed.split("scaled std ")[1].split(";")[0])
    assert std > 2 and f"health: the scaled latents' std is {std:.3f}, not about 1" in printed
