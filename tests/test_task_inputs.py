"""The tasks' inputs and scores (tinyldm.data.tasks), checked against their definitions in tasks.py
and the shapes dataset's own ground truth, without training anything."""

import pytest
import torch

from tinyldm.autoencoder import Autoencoder, AutoencoderConfig
from tinyldm.data.image_conditions import composite, downsample, masked_image, upsample_bicubic
from tinyldm.data.images import DataConfig, make_dataset
from tinyldm.data.shapes import CLASS_NAMES, ShapesConfig
from tinyldm.data.tasks import (
    TaskInputs,
    TaskSpec,
    cache_keys,
    concat_channels,
    data_configs,
    heldout_items,
    item_conditions,
    scorable,
    score_items,
    task_concat,
)
from tinyldm.evaluation.metrics import psnr

SHAPES = {"dataset": "shapes", "image_size": 32, "n_train": 64, "max_shapes": 3}


def items_for(task: str, cond: str = "none", n: int = 6) -> tuple[TaskSpec, dict]:
    spec = TaskSpec(task=task, cond=cond)
    return spec, heldout_items(spec, *data_configs(SHAPES), n)


@pytest.fixture(scope="module")
def tiny_ae():
    cfg = AutoencoderConfig(base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1,
                            norm_groups=8, mid_attention=False)
    return Autoencoder(cfg).eval().requires_grad_(False)


def test_spec_refuses_unknown_tasks_and_reads_old_checkpoints():
    with pytest.raises(ValueError, match="task must be one of"):
        TaskSpec(task="colorize")
    with pytest.raises(ValueError, match="cond must be one of"):
        TaskSpec(cond="audio")
    with pytest.raises(ValueError, match="sr_factor"):
        TaskSpec(sr_factor=0)
    assert TaskSpec.from_config({"cond": "text"}) == TaskSpec(task="generate", cond="text",
                                                              sr_factor=4)
    assert not TaskSpec().has_concat and TaskSpec(task="inpaint").has_concat


def test_data_configs_are_the_runs_training_data():
    data, shapes = data_configs(SHAPES, None)
    assert (data.source, data.image_size, data.max_images, data.hflip) == ("shapes", 32, 64, False)
    assert (shapes.image_size, shapes.n_train, shapes.max_shapes) == (32, 64, 3)
    data, shapes = data_configs({"dataset": "folder", "image_size": 64, "n_train": 0}, "/photos")
    assert shapes is None and data.root == "/photos" and data.max_images is None


def test_heldout_items_are_the_eval_split_with_the_tasks_inputs():
    spec, items = items_for("superres")
    eval_set = make_dataset(DataConfig(source="shapes", image_size=32, hflip=False), "eval",
                            shapes=ShapesConfig(image_size=32, n_train=64, max_shapes=3))
    assert torch.equal(items["image"][2], eval_set[2]["image"])
    assert torch.equal(items["lowres"], downsample(items["image"], 4))
    assert items["lowres"].shape == (6, 3, 8, 8) and len(items["caption"]) == 6
    assert items["box_classes"].shape[1] == 3 and "mask" not in items

    _, a = items_for("inpaint")
    _, b = items_for("inpaint")
    assert torch.equal(a["mask"], b["mask"])  # the same held-out masks every time
    assert a["mask"].shape == (6, 1, 32, 32) and 0.1 <= a["mask"].mean() <= 0.6
    with pytest.raises(SystemExit, match="fewer than"):
        heldout_items(spec, *data_configs(SHAPES), 10_000)


@pytest.mark.parametrize("task", ["generate", "semantic", "superres", "inpaint"])
def test_concat_has_the_declared_channels(task, tiny_ae):
    spec, items = items_for(task)
    c = tiny_ae.config.z_channels
    concat = task_concat(spec, items, (8, 8), tiny_ae)
    if task == "generate":
        assert concat is None and concat_channels(spec, c) == 0
        return
    assert concat.shape == (6, concat_channels(spec, c), 8, 8)
    # class fractions of each latent pixel, background included: they sum to 1
    if task == "semantic":
        assert torch.allclose(concat.sum(1), torch.ones(6, 8, 8))
        assert concat_channels(spec, c) == len(CLASS_NAMES) + 1
    # the last channel is the mask at latent size: 1 wherever any pixel is masked
    if task == "inpaint":
        pooled = torch.nn.functional.max_pool2d(items["mask"], 4)
        assert torch.equal(concat[:, -1:], pooled)
        z = tiny_ae.encode(masked_image(items["image"], items["mask"])) * tiny_ae.scale_factor
        assert torch.allclose(concat[:, :c], z, atol=1e-5)


def test_inpaint_concat_needs_the_autoencoder():
    spec, items = items_for("inpaint")
    with pytest.raises(ValueError, match="needs the autoencoder"):
        task_concat(spec, items, (8, 8))


def test_item_conditions_follow_the_cross_attended_kind():
    for cond in ("text", "class", "layout", "none"):
        spec, items = items_for("generate", cond, n=3)
        condition, concat = item_conditions(spec, items, (8, 8), torch.device("cpu"))
        assert concat is None
        if cond == "text":
            assert condition == items["caption"] and all(condition)
        elif cond == "class":
            assert torch.equal(condition, items["class_id"])
        elif cond == "layout":
            assert torch.equal(condition["boxes"], items["boxes"])
        else:
            assert condition is None


def test_the_training_wrapper_caches_what_the_task_needs():
    data = make_dataset(*data_configs(SHAPES)[:1], "train", shapes=data_configs(SHAPES)[1])
    assert TaskInputs.wrap(data, TaskSpec(task="semantic")) is data
    pixels = TaskInputs.wrap(data, TaskSpec(task="inpaint"))[0]["pixels"]
    assert (pixels.dtype == torch.uint8
            and (pixels.float() / 127.5 - 1 - data[0]["image"]).abs().max() <= 1 / 255)
    lowres = TaskInputs.wrap(data, TaskSpec(task="superres", sr_factor=2))[0]["lowres"]
    assert torch.equal(lowres, downsample(data[0]["image"][None], 2)[0])
    assert len(TaskInputs.wrap(data, TaskSpec(task="inpaint"))) == len(data) == 64
    assert cache_keys(TaskSpec(task="inpaint", cond="layout")) == ("caption", "class_id", "pixels",
                                                                   "box_classes", "boxes")


def test_scores_of_the_originals_and_of_the_baselines():
    """Scoring the held-out originals themselves: every object is found where the layout puts it,
    and the super-resolution score of the bicubic upsampling is exactly the bicubic baseline's."""
    spec, items = items_for("semantic", n=12)
    perfect = score_items(spec, items, items["image"])
    # IoU < 1: the evaluator boxes the drawn pixels, and a circle or triangle at 32 px fills less
    # than its box
    assert perfect["all"] == 1.0 and perfect["box_iou"] > 0.8
    # each image scored against another's map
    wrong = score_items(spec, items, items["image"].roll(1, dims=0))
    assert wrong["all"] < 0.5 and wrong["box_iou"] < perfect["box_iou"] - 0.3

    spec, items = items_for("superres")
    bicubic = upsample_bicubic(items["lowres"], 32)
    score = score_items(spec, items, bicubic)
    assert score["psnr"] == pytest.approx(score["bicubic_psnr"])
    assert score["ssim"] == pytest.approx(score["bicubic_ssim"])
    assert score["psnr"] == pytest.approx(psnr(bicubic, items["image"]).mean().item())

    spec, items = items_for("inpaint", n=12)
    grey = masked_image(items["image"], items["mask"])
    score = score_items(spec, items, grey)
    assert score["hole_psnr"] == pytest.approx(score["grey_fill_hole_psnr"])
    assert score["mask_coverage"] == pytest.approx(items["mask"].mean().item())
    noisy = composite(items["image"] + 0.1 * torch.randn_like(items["image"]), items["image"],
                      items["mask"])
    assert score_items(spec, items, noisy)["hole_psnr"] > score["hole_psnr"] + 5


def test_what_can_be_scored_where():
    assert (scorable(TaskSpec(task="superres"), "folder")
            and scorable(TaskSpec(task="inpaint"), "celeba"))
    assert not scorable(TaskSpec(task="generate", cond="class"), "folder")
    assert scorable(TaskSpec(task="semantic"), "shapes")
    spec, items = items_for("semantic", n=2)
    del items["box_classes"]
    with pytest.raises(ValueError, match="only the shapes dataset"):
        score_items(spec, items, items["image"])
