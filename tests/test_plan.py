"""--plan: what a run will do, from real steps, with nothing written to --out; and the data settings
that train_ldm.py passes to the autoencoder it trains."""

import json

import pytest
import torch
from PIL import Image

import train_ae
import train_ldm
from tinyldm.checkpoint import load_checkpoint
from tinyldm.data.images import DataConfig, make_dataset
from tinyldm.tools.plan import Stage, grids_and_checkpoints, seconds_per_call
from tinyldm.training.health import memorising


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """40 small images of smooth colour gradients: a folder as a user has one."""
    root = tmp_path_factory.mktemp("photos")
    g = torch.Generator().manual_seed(0)
    for i in range(40):
        corners = torch.rand(3, 2, 2, generator=g)
        img = torch.nn.functional.interpolate(corners[None], size=(48, 48), mode="bilinear")[0]
        Image.fromarray((img.permute(1, 2, 0) * 255).byte().numpy()).save(root / f"p{i:02d}.png")
    return root


@pytest.mark.parametrize("steps, start, every, want", [
    (1400, 0, 500, 3),  # 500, 1000 and the last
    (1400, 600, 500, 2),  # 1000 and the last
    (1000, 0, 500, 2),  # 500, and 1000 is the last
    (6, 0, 3, 2),
    (5, 0, 100, 1),  # only the last
])
def test_grids_and_checkpoints_are_counted_as_the_trainer_draws_them(steps, start, every, want):
    grids, ckpts, seconds = grids_and_checkpoints(steps, start, every, every, 2.0, 0.5)
    assert grids == ckpts == want and seconds == pytest.approx(2.5 * want)


def test_a_stage_counts_its_epochs_and_the_timer_excludes_the_warm_up():
    assert Stage("x", 1.0, steps=100, batch=32, images=800).epochs == pytest.approx(4.0)
    assert Stage("x", 1.0).epochs is None
    calls = []
    seconds_per_call(calls.append, torch.device("cpu"), first=7, warmup=3, timed=5)
    assert calls == list(range(7, 15))  # 3 warm-up calls, then 5 timed, from step 7
    assert memorising(10, 100, 32)[0].startswith("warning: 10 training images, fewer than a batch")
    assert "memorised" in memorising(200, 10_000, 32)[-1] and memorising(50_000, 100, 32) == []


@pytest.mark.slow
def test_train_ldm_plan_times_each_stage_and_writes_nothing(photos, tmp_path, capsys):
    out, plan_json = tmp_path / "run", tmp_path / "plan.json"
    plan = train_ldm.main(["--smoke", "--data", str(photos), "--out", str(out), "--device", "cpu",
                           "--plan", str(plan_json)])
    assert not out.exists()  # nothing written to --out
    assert json.loads(plan_json.read_text()) == json.loads(json.dumps(plan))
    names = [s["name"] for s in plan["stages"]]
    assert names[0].startswith("autoencoder (kl, f=4)") and names[2] == "latent cache"
    assert names[3].startswith("LDM") and names[4].startswith("evaluation")
    ae, _, cache, ldm, _ = plan["stages"]
    # the smoke settings, on this folder's training split (the first --n_train images of it)
    assert (ae["steps"], ae["batch"], ldm["steps"], ldm["batch"]) == (6, 4, 6, 8)
    split = len(make_dataset(DataConfig(source="folder", root=str(photos), image_size=32),
                             "train"))
    assert 30 < split < 40 and ae["images"] == ldm["images"] == cache["images"] == split
    assert ldm["epochs"] == pytest.approx(6 * 8 / split)
    for stage in (ae, cache, ldm):
        assert stage["seconds"] > 0 and stage["disk"] > 0
    assert ldm["memory"] > 0 and plan["total_seconds"] == pytest.approx(
        sum(s["seconds"] for s in plan["stages"]))
    printed = capsys.readouterr().out
    assert "ms a step" in printed and "finishes at about" in printed
    # the quality curve's points (steps 3 and 6), on the few held-out images there are
    held_out = len(make_dataset(DataConfig(source="folder", root=str(photos), image_size=32),
                                "eval"))
    assert f"2 quality point(s) of {min(4, held_out)} samples" in ldm["how"]


@pytest.mark.slow
def test_train_ae_plan_writes_nothing_to_its_out(photos, tmp_path):
    out = tmp_path / "ae"
    plan = train_ae.main(["--smoke", "--data", str(photos), "--out", str(out), "--device", "cpu",
                          "--plan"])
    assert not out.exists()
    assert plan["stages"][0]["steps"] == 6 and plan["ae_config"]["regularizer"] == "kl"


def test_the_plan_of_an_identity_first_stage_has_nothing_to_train(tmp_path):
    """f = 1 trains nothing: one stage of no steps and no time, its config written for
    train_ldm.py --plan, and no checkpoint anywhere."""
    out, plan_json = tmp_path / "ae", tmp_path / "plan.json"
    plan = train_ae.main(["--smoke", "--regularizer", "identity", "--z_channels", "3",
                          "--channel_mult", "1", "--out", str(out), "--device", "cpu",
                          "--plan", str(plan_json)])
    assert not out.exists() and plan["total_seconds"] == 0
    assert [(s["steps"], s["seconds"]) for s in plan["stages"]] == [(0, 0.0)]
    assert json.loads(plan_json.read_text())["ae_config"]["regularizer"] == "identity"


@pytest.mark.slow
def test_train_ldm_passes_the_data_settings_to_the_autoencoder_it_trains(photos, tmp_path):
    """--n_train (and the dataset, its path and --image_size) reach the first stage it trains:
    a 24-image subset trains its autoencoder on those 24 images, not on the whole folder."""
    out = tmp_path / "run"
    train_ldm.main(["--smoke", "--data", str(photos), "--n_train", "24", "--out", str(out),
                    "--device", "cpu", "--eval_images", "0"])
    ae = load_checkpoint(out / "ae" / "autoencoder.pt", kind="autoencoder")["train_config"]
    assert (ae["n_train"], ae["dataset"], ae["image_size"]) == (24, "folder", 32)
    assert ae["n_train"] == load_checkpoint(out / "ldm.pt")["train_config"]["n_train"]


def test_plan_and_resume_together_are_refused(tmp_path, capsys):
    from tinyldm.cli import run

    for main in (train_ae.main, train_ldm.main):
        with pytest.raises(SystemExit) as stop:
            run(main, ["--smoke", "--out", str(tmp_path), "--resume", "--plan"])
        assert stop.value.code == 2
        assert "error: --plan plans a new run: drop --resume" in capsys.readouterr().err


@pytest.mark.parametrize("images, explicit, want", [
    (5_000, False, 20_000),  # 80 epochs are 3,125 steps: the floor, a fifth of the steps
    (100_000, False, 62_500),  # 80 epochs
    (500_000, False, 100_000),  # at most the preset's steps
    (5_000, True, 100_000),  # --steps given: it wins
])
def test_a_subset_trains_for_the_presets_epochs_between_its_floor_and_its_steps(images, explicit,
                                                                               want, capsys):
    from tinyldm.training.trainer import TrainingConfig, fit_steps

    config = TrainingConfig(steps=100_000, batch_size=128, epochs=80, min_steps=20_000)
    assert fit_steps(config, images, explicit=explicit).steps == want
    if not explicit:
        assert f"steps: {want:,} (80 epochs over {images:,} images at batch 128" in (
            capsys.readouterr().out)
    assert fit_steps(TrainingConfig(steps=7), 10, explicit=False).steps == 7  # no epochs


def test_the_photo_presets_are_celebas_epochs_on_a_subset(photos, tmp_path, monkeypatch, capsys):
    """A preset in epochs (here the smoke settings with 2 epochs, as the photo presets have theirs)
    on a folder of 36 training images trains ceil(2 * 36 / 4) steps, and its discriminator joins at
    the same share of the shorter run; the plan shows the same steps. The photo presets' epochs are
    their steps over CelebA's 162,770 training images."""
    from tinyldm.training.presets import AE_PRESETS, CELEBA_TRAIN_IMAGES, LDM_PRESETS

    monkeypatch.setitem(train_ae.SMOKE, "epochs", 2.0)
    monkeypatch.setitem(train_ae.SMOKE, "steps", 40)
    monkeypatch.setitem(train_ae.SMOKE, "min_steps", 2)
    monkeypatch.setitem(train_ae.SMOKE, "disc_start", 20)
    split = len(make_dataset(DataConfig(source="folder", root=str(photos), image_size=16),
                             "train"))
    want = -(-2 * split // 4)
    plan = train_ae.main(["--smoke", "--data", str(photos), "--device", "cpu", "--plan"])
    assert plan["stages"][0]["steps"] == want
    train_ae.main(["--smoke", "--data", str(photos), "--device", "cpu", "--out",
                   str(tmp_path / "ae")])
    ckpt = load_checkpoint(tmp_path / "ae" / "autoencoder.pt", kind="autoencoder")
    assert ckpt["step"] == want and ckpt["loss_config"]["disc_start"] == round(20 * want / 40)
    assert f"the discriminator joins at step {round(20 * want / 40)}" in capsys.readouterr().out
    for name in ("celeba64", "folder128"):
        p = LDM_PRESETS[name]
        assert p["epochs"] == pytest.approx(p["steps"] * p["batch_size"] / CELEBA_TRAIN_IMAGES,
                                            abs=0.05) and p["min_steps"] == p["steps"] // 5
    assert AE_PRESETS["celeba64_vq"]["epochs"] == pytest.approx(19.7)
