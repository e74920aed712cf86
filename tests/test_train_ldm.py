"""train_ldm.py and sample.py end to end, in their smoke settings (CPU, seconds)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sample
import train_ldm
from tinyldm.checkpoint import CheckpointError, load_checkpoint
from tinyldm.data.tasks import (
    TaskSpec,
    data_configs,
    generate_from_items,
    heldout_items,
    task_concat,
)

pytestmark = pytest.mark.slow  # train_ldm.py end to end, in its smoke settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ae_path(tmp_path_factory):
    """One smoke autoencoder shared by the tests (train_ldm.py trains it when --ae is missing)."""
    out = tmp_path_factory.mktemp("ldm") / "run"
    train_ldm.main(["--smoke", "--out", str(out), "--device", "cpu"])
    return out / "ae" / "autoencoder.pt"


def run(out, ae_path, *flags):
    return train_ldm.main(["--smoke", "--out", str(out), "--ae", str(ae_path), "--device", "cpu",
                           *flags])


def test_smoke_run_writes_checkpoint_grid_log_and_score(tmp_path, ae_path):
    result = run(tmp_path, ae_path)
    assert (tmp_path / "ldm.pt").exists() and (tmp_path / "samples_0000006.png").exists()
    assert (tmp_path / "loss.png").exists()  # the loss curve beside the grids
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    points = [r for r in records if "quality" in r]  # the quality curve's, every 3 steps
    records = [r for r in records if "loss" in r]
    assert [r["step"] for r in records] == [2, 4, 6] and all(r["loss"] > 0 for r in records)
    assert [p["step"] for p in points] == [3, 6]
    assert 0.0 <= result["prompt_faithfulness"] <= 1.0 and result["images"] == 4
    ckpt = torch.load(tmp_path / "ldm.pt", weights_only=True)  # plain tensors and values only
    assert ckpt["kind"] == "ldm" and ckpt["step"] == 6 and "autoencoder" in ckpt


@pytest.mark.parametrize("disabled", [True, False])
def test_progress_bar_follows_tqdm_disable(tmp_path, ae_path, disabled):
    """TQDM_DISABLE=1 (what the notebooks set, to keep bars out of their saved outputs) silences the
    bar. tqdm reads the variable when it is imported, hence a fresh process."""
    env = ({k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
           | ({"TQDM_DISABLE": "1"} if disabled else {}))
    proc = subprocess.run([sys.executable, "train_ldm.py", "--smoke",
                           "--out", str(tmp_path / "run"), "--ae", str(ae_path), "--device", "cpu",
                           "--eval_images", "0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done in" in proc.stdout and ("train_ldm:" in proc.stderr) != disabled


def test_resume_continues_exactly(tmp_path, ae_path):
    run(tmp_path / "straight", ae_path, "--steps", "6")
    run(tmp_path / "split", ae_path, "--steps", "3")
    run(tmp_path / "split", ae_path, "--steps", "6", "--resume")
    a = load_checkpoint(tmp_path / "straight" / "ldm.pt", kind="ldm")
    b = load_checkpoint(tmp_path / "split" / "ldm.pt", kind="ldm")
    assert b["step"] == 6
    for k, v in a["denoiser"].items():
        assert torch.allclose(v, b["denoiser"][k], atol=1e-6), k
    for k, v in a["ema"].items():
        assert torch.allclose(v, b["ema"][k], atol=1e-6), k
    log = [json.loads(line)["step"]
           for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()
           if '"loss"' in line]
    # the 3-step run logged its last step; nothing is duplicated after resuming
    assert log == [2, 3, 4, 6]


def test_the_model_does_not_depend_on_how_the_autoencoder_was_found(tmp_path):
    """Same flags and seed, same model: whether the run trained its autoencoder, was given it, or
    found its latents already cached (stage one draws random numbers in the first two cases
    only)."""
    train_ldm.main(["--smoke", "--out", str(tmp_path / "own"), "--device", "cpu", "--steps", "4"])
    ae = str(tmp_path / "own" / "ae" / "autoencoder.pt")
    for name in ("given", "given"):  # the second run finds the latent cache of the first
        train_ldm.main(["--smoke", "--out", str(tmp_path / name), "--ae", ae, "--device", "cpu",
                        "--steps", "4"])
        a = load_checkpoint(tmp_path / "own" / "ldm.pt", kind="ldm")["denoiser"]
        b = load_checkpoint(tmp_path / name / "ldm.pt", kind="ldm")["denoiser"]
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, ae_path, monkeypatch):
    run(tmp_path, ae_path, "--steps", "3")
    before = (tmp_path / "ldm.pt").read_bytes()
    real_loss, calls = train_ldm.ldm_loss, []

    def diverging_loss(*args, **kwargs):  # fine once, then NaN, as a blown-up run would be
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss if len(calls) < 2 else loss * float("nan")

    monkeypatch.setattr(train_ldm, "ldm_loss", diverging_loss)
    # the window of the bad step
    with pytest.raises(SystemExit, match="loss is nan.* in steps 5-6"):
        run(tmp_path, ae_path, "--steps", "6", "--resume")
    assert (tmp_path / "ldm.pt").read_bytes() == before


def test_truncated_checkpoint_is_refused(tmp_path, ae_path):
    run(tmp_path, ae_path, "--steps", "3")
    data = (tmp_path / "ldm.pt").read_bytes()
    (tmp_path / "ldm.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        sample.main(["--ckpt", str(tmp_path / "ldm.pt"), "--device", "cpu"])
    with pytest.raises(CheckpointError, match="truncated"):
        run(tmp_path, ae_path, "--resume")


def test_sample_script_sizes_seeds_and_classes(tmp_path, ae_path):
    run(tmp_path, ae_path)
    ckpt = str(tmp_path / "ldm.pt")
    args = ["--ckpt", ckpt, "--prompt", "a red circle in the top left", "--n", "2", "--steps", "3",
            "--device", "cpu"]
    r1 = sample.main([*args, "--out", str(tmp_path / "a.png"), "--singles"])
    sample.main([*args, "--out", str(tmp_path / "b.png"), "--singles"])
    assert r1["images"] == 2 and 0.0 <= r1["prompt_faithfulness"] <= 1.0
    # same seed, same image
    assert (tmp_path / "a_000.png").read_bytes() == (tmp_path / "b_000.png").read_bytes()
    sample.main([*args, "--out", str(tmp_path / "c.png"), "--singles", "--seed", "1"])
    assert (tmp_path / "a_000.png").read_bytes() != (tmp_path / "c_000.png").read_bytes()
    from PIL import Image
    assert Image.open(tmp_path / "a_000.png").size == (32, 32)  # the training size by default
    sample.main([*args, "--out", str(tmp_path / "big.png"), "--singles", "--height", "64",
                 "--width", "48"])
    assert Image.open(tmp_path / "big_000.png").size == (48, 64)
    with pytest.raises(SystemExit, match="text-conditioned"):
        sample.main(["--ckpt", ckpt, "--class", "red circle", "--device", "cpu"])

    run(tmp_path / "cls", ae_path, "--cond", "class")
    r = sample.main(["--ckpt", str(tmp_path / "cls" / "ldm.pt"), "--class", "red circle",
                     "--n", "2", "--steps", "2", "--device", "cpu",
                     "--out", str(tmp_path / "cls.png")])
    assert r["images"] == 2
    with pytest.raises(SystemExit, match="unknown class"):
        sample.main(["--ckpt", str(tmp_path / "cls" / "ldm.pt"), "--class", "pink hexagon",
                     "--device", "cpu"])


def test_smoke_works_for_the_photo_presets(tmp_path, ae_path):
    """--smoke shrinks celeba64 / lsun64 too (64 px, 16 x 16 latents) to a UNet whose levels
    exist."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(12):  # a folder of 12 small noise "photos"
        pixels = torch.randint(0, 256, (20, 24, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"img_{i:02d}.png")
    for preset in ("celeba64", "lsun64"):
        out = tmp_path / preset
        result = train_ldm.main(["--preset", preset, "--smoke", "--dataset", "folder",
                                 "--data", str(tmp_path), "--ae", str(ae_path), "--out", str(out),
                                 "--device", "cpu"])
        # unconditional: no shapes score
        assert result["steps"] == 6 and "prompt_faithfulness" not in result
        ckpt = load_checkpoint(out / "ldm.pt", kind="ldm")
        assert ckpt["cond_config"]["kind"] == "none" and ckpt["unet_config"]["latent_size"] == 8


@pytest.mark.parametrize("flags, concat_channels, kind, scores", [
    (["--cond", "layout", "--max_shapes", "3"], 0, "layout",
     ("all", "color", "shape", "position", "box_iou")),
    (["--cond", "none", "--task", "semantic", "--max_shapes", "3"], 19, "none", ("all", "box_iou")),
    (["--cond", "none", "--task", "superres"], 3, "none",
     ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim")),
    (["--cond", "class"], 0, "class", ("class_accuracy", "color", "shape")),
])
def test_paper_tasks_train_sample_and_score(tmp_path, ae_path, flags, concat_channels, kind,
                                            scores):
    result = run(tmp_path, ae_path, *flags)
    ckpt = load_checkpoint(tmp_path / "ldm.pt", kind="ldm")
    assert (ckpt["unet_config"]["concat_channels"] == concat_channels
            and ckpt["cond_config"]["kind"] == kind)
    assert (tmp_path / "samples_0000006.png").exists() and result["images"] == 4
    for k in scores:
        assert k in result and result[k] is not None and result[k] == result[k]  # present, not NaN
    # the baseline is a real bicubic upsampling of a 4x smaller input: far from noise
    if "bicubic_psnr" in result:
        assert result["bicubic_psnr"] > 20


def test_task_inputs_in_the_cache_are_the_tasks_definitions(tmp_path, ae_path):
    """The cached low-res inputs are the bicubic /4 images of the training set, and the semantic
    inputs are fractions of each latent pixel covered by each class (they sum to 1)."""
    from tinyldm.data.image_conditions import downsample
    from tinyldm.data.shapes import ShapesConfig, ShapesDataset

    run(tmp_path / "sr", ae_path, "--cond", "none", "--task", "superres")
    cache = torch.load(tmp_path / "sr" / "latents.pt", weights_only=True)
    data = ShapesDataset(ShapesConfig(image_size=32, n_train=64), "train")
    images = torch.stack([data[i]["image"] for i in range(3)])
    assert torch.allclose(cache["conditions"]["lowres"][:3], downsample(images, 4), atol=1e-6)

    run(tmp_path / "sem", ae_path, "--cond", "none", "--task", "semantic", "--max_shapes", "3")
    cache = torch.load(tmp_path / "sem" / "latents.pt", weights_only=True)
    concat = task_concat(TaskSpec(task="semantic", cond="none"), cache["conditions"], (8, 8))
    assert concat.shape == (64, 19, 8, 8) and torch.allclose(concat.sum(1), torch.ones(64, 8, 8))
    # every image has objects in its map
    assert (cache["conditions"]["seg"].amax(dim=(1, 2)) > 0).all()


@pytest.mark.parametrize("flags", [["--cond", "layout", "--task", "semantic", "--max_shapes", "3"],
                                   ["--cond", "none", "--task", "inpaint"]])
def test_resume_continues_exactly_with_a_task(tmp_path, ae_path, flags):
    run(tmp_path / "straight", ae_path, *flags, "--steps", "6")
    run(tmp_path / "split", ae_path, *flags, "--steps", "3")
    run(tmp_path / "split", ae_path, *flags, "--steps", "6", "--resume")
    a = load_checkpoint(tmp_path / "straight" / "ldm.pt", kind="ldm")
    b = load_checkpoint(tmp_path / "split" / "ldm.pt", kind="ldm")
    assert all(torch.equal(a["denoiser"][k], b["denoiser"][k]) for k in a["denoiser"])


def test_tasks_refuse_what_they_cannot_do(tmp_path, ae_path):
    with pytest.raises(SystemExit, match="--task colorize: must be one of"):
        run(tmp_path, ae_path, "--task", "colorize")
    with pytest.raises(SystemExit, match="only the shapes dataset"):
        run(tmp_path, ae_path, "--cond", "layout", "--dataset", "folder", "--data", str(tmp_path))


@pytest.mark.parametrize("flags", [["--cond", "layout", "--max_shapes", "3"],
                                   ["--cond", "none", "--task", "superres"]])
def test_sample_script_generates_from_held_out_inputs(tmp_path, ae_path, flags):
    run(tmp_path, ae_path, *flags)
    ckpt = str(tmp_path / "ldm.pt")
    with pytest.raises(SystemExit, match="--from_eval"):
        sample.main(["--ckpt", ckpt, "--device", "cpu"])
    r = sample.main(["--ckpt", ckpt, "--from_eval", "3", "--steps", "2", "--device", "cpu",
                     "--out", str(tmp_path / "g.png")])
    assert r["images"] == 3 and ("box_iou" in r or "bicubic_psnr" in r)
    from PIL import Image
    rows = 2 if "layout" in flags else 3  # inputs, samples (, originals)
    assert Image.open(tmp_path / "g.png").size == (3 * 34 + 2, rows * 34 + 2)


def test_label_image_paints_the_palette():
    from tinyldm.evaluation.viz import label_image

    labels = torch.tensor([[[0, 1], [2, 1]]])
    palette = torch.tensor([[255, 255, 255], [255, 0, 0], [0, 0, 0]])
    img = label_image(labels, palette)
    assert img.shape == (1, 3, 2, 2)
    assert (img[0, :, 0, 1].tolist() == [1.0, -1.0, -1.0]
            and img[0, :, 1, 0].tolist() == [-1.0, -1.0, -1.0])
    with pytest.raises(ValueError, match="label ids"):
        label_image(labels + 1, palette)


def test_inpainting_keeps_every_known_pixel(tmp_path, ae_path):
    """After decoding, the known pixels are pasted back: exactly the original's, whatever the model
    made of them; the hole is the model's. The model's input is the masked image's latent plus the
    mask (c + 1)."""
    from tinyldm.checkpoint import load_ldm

    run(tmp_path, ae_path, "--cond", "none", "--task", "inpaint", "--max_shapes", "3")
    ckpt = load_checkpoint(tmp_path / "ldm.pt", kind="ldm")
    denoiser, schedule, ae, cfg = load_ldm(ckpt)
    assert ckpt["unet_config"]["concat_channels"] == ae.config.z_channels + 1
    spec = TaskSpec.from_config(ckpt["train_config"])
    items = heldout_items(spec, *data_configs(ckpt["train_config"]), 4)
    known = (items["mask"] == 0).expand_as(items["image"])
    assert 0.1 <= items["mask"].mean() <= 0.6 and known.any()
    images = generate_from_items(denoiser, schedule, ae, spec, items, (8, 8), torch.device("cpu"),
                                 steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(images[known], items["image"][known])
    # the hole is generated, not copied
    assert not torch.equal(images[~known], items["image"][~known])


def test_sample_beyond_the_training_size_from_mosaics(tmp_path, ae_path):
    """Semantic / SR / inpainting models sample a 2x2 mosaic of held-out inputs at twice the
    training size; the result is cut back into tiles and each tile scored against its own input."""
    run(tmp_path, ae_path, "--cond", "none", "--task", "inpaint", "--max_shapes", "3")
    r = sample.main(["--ckpt", str(tmp_path / "ldm.pt"), "--from_eval", "2", "--height", "64",
                     "--width", "64", "--steps", "2", "--device", "cpu",
                     "--out", str(tmp_path / "big.png")])
    assert r["images"] == 8 and "hole_psnr" in r and "box_iou" in r
    from PIL import Image
    # 2 mosaics; inputs, samples, originals
    assert Image.open(tmp_path / "big.png").size == (2 * 66 + 2, 3 * 66 + 2)
    with pytest.raises(SystemExit, match="square multiple"):
        sample.main(["--ckpt", str(tmp_path / "ldm.pt"), "--from_eval", "2", "--height", "48",
                     "--width", "48", "--device", "cpu"])
    run(tmp_path / "layout", ae_path, "--cond", "layout", "--max_shapes", "3")
    with pytest.raises(SystemExit, match="without a cross-attended condition"):
        sample.main(["--ckpt", str(tmp_path / "layout" / "ldm.pt"), "--from_eval", "2",
                     "--height", "64", "--width", "64", "--device", "cpu"])


def test_inpainting_on_a_folder_of_photos(tmp_path, ae_path):
    """--dataset folder --task inpaint: trains on the user's images, scores the hole against a grey
    fill (there are no objects to check), and sample.py --from_eval --data shows the held-out masked
    photos with every known pixel kept."""
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(120):  # smooth colour fields ("photos"); ~5% of them fall in the held-out split
        field = torch.nn.functional.interpolate(torch.rand(1, 3, 3, 3, generator=g), size=(40, 48),
                                                mode="bicubic")
        Image.fromarray((field[0].clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()).save(
            photos / f"p{i:03d}.png")
    result = run(tmp_path / "run", ae_path, "--dataset", "folder", "--data", str(photos),
                 "--cond", "none", "--task", "inpaint")
    assert 1 <= result["images"] <= 4 and "all" not in result  # as many as the held-out split has
    assert result["hole_psnr"] == result["hole_psnr"] and 0.1 <= result["mask_coverage"] <= 0.6
    assert result["grey_fill_hole_psnr"] > 0
    r = sample.main(["--ckpt", str(tmp_path / "run" / "ldm.pt"), "--from_eval", "2",
                     "--data", str(photos), "--steps", "2", "--device", "cpu",
                     "--out", str(tmp_path / "grid.png")])
    assert r["images"] == 2 and "hole_psnr" in r and (tmp_path / "grid.png").exists()


def test_time_budget_stops_checkpoints_and_resumes(tmp_path, ae_path):
    """--max_minutes: the loop stops once its training time is spent, with a checkpoint at that
    step; --resume then carries on towards --steps (the stored budget applies to each run again; 0
    lifts it)."""
    result = run(tmp_path, ae_path, "--max_minutes", "1e-6", "--steps", "50")
    assert result["steps"] == 1 and load_checkpoint(tmp_path / "ldm.pt", kind="ldm")["step"] == 1
    assert (tmp_path / "samples_0000001.png").exists()
    result = run(tmp_path, ae_path, "--steps", "4", "--resume", "--max_minutes", "0")
    assert result["steps"] == 4 and load_checkpoint(tmp_path / "ldm.pt", kind="ldm")["step"] == 4


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="the CUDA path of the scripts needs a GPU")
def test_smoke_run_on_a_gpu_trains_samples_and_resumes(tmp_path):
    """Both scripts on CUDA (bf16 autocast, channels_last, fused AdamW, device generators), a
    compiled run, and a resume that lands close to the straight run (GPU kernels are not bitwise
    repeatable)."""
    gpu = ["--smoke", "--device", "cuda"]
    # trains its autoencoder first
    train_ldm.main([*gpu, "--out", str(tmp_path / "straight"), "--steps", "6",
                    # compiled here only: it changes no arithmetic beyond rounding
                    "--compile", "true"])
    ae = str(tmp_path / "straight" / "ae" / "autoencoder.pt")
    train_ldm.main([*gpu, "--out", str(tmp_path / "split"), "--ae", ae, "--steps", "3"])
    train_ldm.main([*gpu, "--out", str(tmp_path / "split"), "--ae", ae, "--steps", "6", "--resume"])
    a = load_checkpoint(tmp_path / "straight" / "ldm.pt", kind="ldm")
    b = load_checkpoint(tmp_path / "split" / "ldm.pt", kind="ldm")
    assert a["step"] == b["step"] == 6 and list((tmp_path / "straight").glob("samples_*.png"))
    for k, v in a["denoiser"].items():
        assert torch.isfinite(v).all() and torch.allclose(v, b["denoiser"][k], atol=1e-3), k


def _noise_photos(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = torch.randint(0, 256, (20, 24, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img_{i:02d}.png")
    return folder


@pytest.mark.parametrize("flags, message", [
    # shapes would be trained, the folder ignored
    (["--preset", "shapes", "--data", "FOLDER"], "--dataset folder"),
    (["--hflip", "true"], "--hflip"),  # mirrored shapes whose captions still say left / right
    (["--dataset", "folder"], "--data PATH"),
    (["--eval_steps", "600"], "trailing"),  # 'uniform' spacing would start at t = 599
])
def test_data_and_sampling_flags_that_would_be_ignored_or_wrong_are_refused(tmp_path, ae_path,
                                                                            flags, message):
    flags = [str(_noise_photos(tmp_path / "photos", 4)) if f == "FOLDER" else f for f in flags]
    with pytest.raises(SystemExit, match=message):
        run(tmp_path / "run", ae_path, *flags)
    assert not (tmp_path / "run" / "ldm.pt").exists()  # refused before anything was trained


def test_sample_refuses_steps_that_uniform_spacing_cannot_place(tmp_path, ae_path):
    run(tmp_path / "run", ae_path)
    with pytest.raises(SystemExit, match="trailing"):
        sample.main(["--ckpt", str(tmp_path / "run" / "ldm.pt"), "--prompt", "a red circle",
                     "--steps", "600", "--device", "cpu", "--out", str(tmp_path / "grid.png")])


def test_without_ae_the_autoencoder_learns_the_same_folder(tmp_path):
    """--dataset folder without --ae: the first stage is trained on that folder, not on the preset's
    shapes."""
    photos = _noise_photos(tmp_path / "photos", 24)
    train_ldm.main(["--preset", "celeba64", "--smoke", "--dataset", "folder", "--data", str(photos),
                    "--out", str(tmp_path / "run"), "--device", "cpu"])
    ae = load_checkpoint(tmp_path / "run" / "ae" / "autoencoder.pt", kind="autoencoder")
    assert ae["train_config"]["dataset"] == "folder" and ae["train_config"]["image_size"] == 32


def test_long_captions_size_the_text_encoder_and_grids_use_held_out_captions(tmp_path, ae_path,
                                                                             capsys):
    """Captions longer than --max_tokens (16) used to stop training; CelebA's attribute captions
    reach 22 tokens.
    The text encoder is now sized from the data, and a folder's sample grids show its own held-out
    captions, not the shapes prompts."""
    photos = _noise_photos(tmp_path / "photos", 40)
    words = ("a photo of a smiling person with wavy brown hair and heavy makeup wearing lipstick "
             "earrings and a hat")
    lines = [json.dumps({"file_name": f"img_{i:02d}.png", "text": f"{words} number {i}"})
             for i in range(40)]
    (photos / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    longest = len(words.split()) + 2 + 2  # + "number i", <bos>, <eos>
    assert longest > 16
    run(tmp_path / "run", ae_path, "--preset", "celeba64", "--dataset", "folder",
        "--data", str(photos), "--cond", "text")
    out = capsys.readouterr().out
    assert f"captions have up to {longest} tokens" in out and "sample prompts never seen" not in out
    ckpt = load_checkpoint(tmp_path / "run" / "ldm.pt", kind="ldm")
    assert ckpt["cond_config"]["max_len"] == longest
    from PIL import Image

    from tinyldm.data.images import DataConfig, make_dataset

    held_out = len(make_dataset(DataConfig(source="folder", root=str(photos), image_size=32),
                                "eval"))
    grid = Image.open(tmp_path / "run" / "samples_0000006.png")
    # one column per held-out caption
    assert 1 <= held_out < 8 and (grid.width - 2) // 34 == held_out
    r = sample.main(["--ckpt", str(tmp_path / "run" / "ldm.pt"), "--prompt", f"{words} number 3",
                     "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "grid.png")])
    assert r["images"] == 8


@pytest.mark.parametrize("layout, cond",
                         [("captions", "text"), ("classes", "class"), ("plain", "none")])
def test_data_alone_picks_the_folder_preset_and_the_condition_the_folder_holds(tmp_path, capsys,
                                                                               layout, cond):
    """`python train_ldm.py --data DIR`: the folder preset, --cond auto from what DIR holds, an
    autoencoder trained on DIR; the first lines say what was found and chosen."""
    root = tmp_path / "photos"
    if layout == "classes":
        _noise_photos(root / "cats", 12), _noise_photos(root / "dogs", 12)
    else:
        _noise_photos(root, 24)
    if layout == "captions":
        for i in range(24):
            (root / f"img_{i:02d}.txt").write_text(f"a noisy picture number {i}")
    result = train_ldm.main(["--data", str(root), "--smoke", "--out", str(tmp_path / "run"),
                             "--device", "cpu"])
    out = capsys.readouterr().out
    assert "without --preset: using the folder preset" in out and f"-> --cond {cond}" in out
    assert result["steps"] == 6
    ckpt = load_checkpoint(tmp_path / "run" / "ldm.pt", kind="ldm")
    assert ckpt["cond_config"]["kind"] == cond and ckpt["train_config"]["dataset"] == "folder"
    ae = load_checkpoint(tmp_path / "run" / "ae" / "autoencoder.pt", kind="autoencoder")
    assert ae["train_config"]["dataset"] == "folder"


# ----------------------------------------------------------------------------------------------
# the paper's settings


def _final_alpha_bar(beta_start: float, beta_end: float, T: int = 1000) -> float:
    """prod_t (1 - beta_t) with sqrt(beta) linear in t (CompVis' "linear" schedule), in float64
    numpy."""
    import numpy as np

    betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    return float(np.prod(1 - betas))


@pytest.mark.parametrize("preset",
                         ["celeba64", "celeba128", "lsun64", "folder64", "folder128", "folder256"])
def test_photo_presets_follow_the_released_configs(preset):
    """The photo presets used Stable Diffusion's beta range (0.00085-0.012, alpha_bar_T 4.7e-3),
    transformer blocks with scale-shift norm, EMA 0.999 and the posterior mean. CompVis' CelebA-HQ /
    FFHQ / LSUN configs use 0.0015-0.0195 (churches 0.0155), plain attention with an added embedding
    (churches: scale-shift), LitEma's 0.9999 and a posterior sample of z each step."""
    from tinyldm.ldm import DiffusionConfig
    from tinyldm.training.flags import build_config

    p = train_ldm.PRESETS[preset]
    diffusion = build_config(DiffusionConfig, p)
    end = 0.0155 if preset == "folder256" else 0.0195
    assert ((diffusion.schedule, diffusion.T, diffusion.beta_start, diffusion.beta_end)
            == ("scaled_linear", 1000, 0.0015, end))
    alpha_bar_T = diffusion.make_schedule().alpha_bar_value(999)
    assert alpha_bar_T == pytest.approx(_final_alpha_bar(0.0015, end), rel=1e-4)
    # 1.4e-4 (0.0195), 6.7e-4 (0.0155); SD: 4.7e-3
    assert alpha_bar_T < 1e-3 < _final_alpha_bar(0.00085, 0.012)
    assert p["attention_block"] == "plain" and p["scale_shift_norm"] == (preset == "folder256")
    assert p["ema_decay"] == 0.9999 and p["posterior"] == "sample" and p["eval_images"] > 0
    latent = p["image_size"] // (8 if preset == "folder256" else 4)
    factors = (1, 2, 4, 8) if preset == "folder256" else (2, 4, 8)  # CompVis' attention_resolutions
    assert p["attn_resolutions"] == tuple(latent // f for f in factors)
    if preset != "folder256":
        assert (p["lr"] == pytest.approx(2e-6 * p["batch_size"])
                and p["channel_mult"] == (1, 2, 3, 4))


def test_a_conditional_photo_model_gets_cross_attention(tmp_path, capsys, lfw_faces):
    """Plain attention cannot read a condition: with --cond class the photo presets switch to
    transformer blocks (and say so); asking for plain attention and a condition together is
    refused."""
    import shutil

    for i, face in enumerate(sorted(lfw_faces.iterdir())[:24]):
        (tmp_path / "photos" / ("a" if i % 2 else "b")).mkdir(parents=True, exist_ok=True)
        shutil.copy(face, tmp_path / "photos" / ("a" if i % 2 else "b") / face.name)
    flags = ["--preset", "folder64", "--smoke", "--data", str(tmp_path / "photos"),
             "--device", "cpu"]
    train_ldm.main([*flags, "--out", str(tmp_path / "run")])
    assert "transformer blocks with cross-attention" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "run" / "ldm.pt", kind="ldm")
    assert (ckpt["cond_config"]["kind"] == "class"
            and ckpt["unet_config"]["attention_block"] == "transformer")
    with pytest.raises(SystemExit, match="plain has no cross-attention"):
        train_ldm.main([*flags, "--out", str(tmp_path / "run2"), "--attention_block", "plain"])


def test_posterior_samples_are_fresh_each_step_and_the_same_on_resume():
    """--posterior sample: z0 = mu + sigma * n with n a function of (seed, step): the same draw when
    a step is repeated (exact resume), another at the next step; with sigma = None the batch is the
    means."""
    from tinyldm.data.latent_batches import LatentTrainingSet
    from tinyldm.data.order import Stream, batch_indices, seed_stream

    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(10, 4, 8, 8, generator=g), torch.rand(10, 4, 8, 8, generator=g) + 0.5
    config = train_ldm.TrainLDMConfig(cond="none", batch_size=6, posterior="sample")
    data = LatentTrainingSet(config, 0, 1, None, {}, mean, std, None, None, None, None, None, [])
    means_only = LatentTrainingSet(config, 0, 1, None, {}, mean, None, None, None, None, None,
                                   None, [])

    def step_generator(step):  # what train_step hands the batch: the step's own stream
        return torch.Generator().manual_seed(seed_stream(0, step, Stream.NOISE))

    idx = batch_indices(5, n=10, batch_size=6, seed=0)
    (a, _, _), (again, _, _) = data.batch(5, step_generator(5)), data.batch(5, step_generator(5))
    later = data.batch(6, step_generator(6))[0]
    assert (torch.equal(a, again)
            and torch.equal(means_only.batch(5, step_generator(5))[0], mean[idx]))
    noise = (a - mean[idx]) / std[idx]
    expected = torch.randn(6, 4, 8, 8,
                           generator=torch.Generator().manual_seed(seed_stream(0, 5,
                                                                               Stream.POSTERIOR)))
    # exactly the step's posterior noise
    assert torch.allclose(noise, expected, atol=1e-5)
    # N(0, 1): 1536 draws
    assert abs(float(noise.mean())) < 0.1 and abs(float(noise.std()) - 1) < 0.1
    assert not torch.allclose(later, mean[batch_indices(6, n=10, batch_size=6, seed=0)])
    g = step_generator(5)
    torch.rand(6, 1, 1, 1, generator=g)  # the flips, drawn first
    torch.randint(0, 1000, (6,), generator=g)  # t
    # not the diffusion noise eps
    assert not torch.allclose(noise, torch.randn(6, 4, 8, 8, generator=g))


def test_resume_is_exact_with_posterior_samples_on_real_faces(tmp_path, lfw_faces, capsys):
    """The folder preset trains on posterior samples of its KL autoencoder; --resume still continues
    exactly."""
    common = ["--data", str(lfw_faces), "--smoke", "--device", "cpu", "--eval_images", "0"]
    train_ldm.main([*common, "--out", str(tmp_path / "straight"), "--steps", "6"])
    assert "trains on a fresh posterior sample each step" in capsys.readouterr().out
    ae = str(tmp_path / "straight" / "ae" / "autoencoder.pt")
    train_ldm.main([*common, "--ae", ae, "--out", str(tmp_path / "split"), "--steps", "3"])
    train_ldm.main([*common, "--ae", ae, "--out", str(tmp_path / "split"), "--steps", "6",
                    "--resume"])
    a = load_checkpoint(tmp_path / "straight" / "ldm.pt", kind="ldm")
    b = load_checkpoint(tmp_path / "split" / "ldm.pt", kind="ldm")
    for k, v in a["denoiser"].items():
        assert torch.allclose(v, b["denoiser"][k], atol=1e-6), k
    cache = torch.load(tmp_path / "split" / "latents.pt", weights_only=True)
    # the posterior mean and std
    assert cache["latents"].shape[1] == 2 * a["unet_config"]["in_channels"]


def test_a_folder_run_ends_with_its_feature_distance_and_floor(tmp_path, lfw_faces, capsys):
    """Photo models used to end unmeasured (eval_images 0). A folder run now ends with the
    label-free feature distance to its held-out images, printed next to the real-vs-real floor, in
    eval.json too."""
    result = train_ldm.main(["--data", str(lfw_faces), "--smoke", "--out", str(tmp_path / "run"),
                             "--device", "cpu"])
    out = capsys.readouterr().out
    assert "features: contrastive" in out and "real-vs-real floor" in out
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["fd_name"] == "FD (tinyldm contrastive features)" == result["fd_name"]
    assert saved["fd"] > 0 and saved["fd_floor"] >= 0 and saved["images"] == 4
    assert ((tmp_path / "run" / "feature_contrastive.pt").exists()
            and (tmp_path / "run" / "metrics.json").exists())
