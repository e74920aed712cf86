"""The second detector (a learned classifier for colour and shape, a foreground centroid for
position): it reads ground-truth shapes images as the hand-built evaluator does, and it is built
from different parts."""

import pytest
import torch

from tinyldm.data.shapes import POSITIONS, ShapesConfig, ShapesDataset
from tinyldm.evaluation.features import train_classifier
from tinyldm.evaluation.second_detector import compare, foreground_position, judge

pytestmark = pytest.mark.slow  # trains the second detector's classifier first


def test_the_foreground_centroid_names_every_grid_cell():
    images = torch.full((9, 3, 30, 30), 0.8)
    for k in range(9):
        r, c = divmod(k, 3)
        images[k, :, 10 * r + 3:10 * r + 7,
               10 * c + 3:10 * c + 7] = torch.tensor([-1.0, 0.5, -0.5])[:, None, None]
    assert foreground_position(images) == list(POSITIONS)


@pytest.fixture(scope="module")
def classifier_and_images():
    # what evaluate.py trains it on (~12 s)
    cfg = ShapesConfig(image_size=32, n_train=10_000, n_eval=300)
    model, info = train_classifier(ShapesDataset(cfg, "train"), ShapesDataset(cfg, "eval"), 18,
                                   steps=600)
    assert info["accuracy"] > 0.9
    held_out = ShapesDataset(cfg, "eval")
    items = [held_out[i] for i in range(200)]
    return model, torch.stack([it["image"] for it in items]), [it["caption"] for it in items]


def test_both_judges_read_ground_truth_images_alike(classifier_and_images):
    model, images, prompts = classifier_and_images
    r = compare(images, prompts, model)
    assert (r["evaluator"]["all"] > 0.97 and r["second_detector"]["all"] > 0.9
            and r["agreement"] > 0.9)
    assert r["second_detector"]["position"] == 1.0 and r["n"] == 200


def test_wrong_prompts_are_judged_wrong(classifier_and_images):
    model, images, prompts = classifier_and_images
    swapped = [p.replace("circle", "TMP").replace("square", "circle").replace("TMP", "square")
               for p in prompts]
    moved = [p.replace("left", "TMP").replace("right", "left").replace("TMP", "right")
             for p in prompts]
    v_shape, v_moved = judge(images, swapped, model), judge(images, moved, model)
    triangles = torch.tensor(["triangle" in p for p in prompts])
    # circles called squares and squares circles: wrong
    assert v_shape.shape[~triangles].float().mean() < 0.1
    sides = torch.tensor([("left" in p or "right" in p) for p in prompts])
    assert not v_moved.position[sides].any() and v_moved.position[~sides].all()
    with pytest.raises(ValueError, match="one-object"):
        judge(images[:1], ["a red circle in the top left and a blue square in the center"], model)


def test_the_command_trains_its_classifier_beside_the_checkpoint(tmp_path, capsys):
    """`python -m tinyldm.evaluation.second_detector` on a smoke checkpoint: the classifier is
    trained into the checkpoint's folder, and both judges report on held-out images and samples."""
    import train_ldm
    from tinyldm.evaluation.second_detector import main

    train_ldm.main(["--smoke", "--out", str(tmp_path), "--device", "cpu", "--eval_images", "0"])
    main(["--ckpt", str(tmp_path / "ldm.pt"), "--n", "8", "--steps", "2"])
    assert (tmp_path / "feature_classifier.pt").exists()
    out = capsys.readouterr().out
    assert "held-out images (ground truth), N = 8" in out and "samples (ddim, 2 steps" in out
