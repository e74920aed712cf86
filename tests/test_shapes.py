"""tinyldm/shapes.py: the data are what their captions and layouts say, and the evaluator's claims
hold: >= 99% on ground truth (also after mild blur and noise), chance or below on noise and on wrong
prompts."""

import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tinyldm.data.shapes import (
    CLASS_NAMES,
    COLORS,
    POSITIONS,
    SHAPES,
    TEMPLATES,
    VOCABULARY,
    ShapesConfig,
    ShapesDataset,
    ShapeSpec,
    all_prompts,
    caption,
    class_id,
    detect_shapes,
    parse_prompt,
    render,
    score_images,
    specs_from_layout,
)
from tinyldm.tools.bench_data import blur  # the same Gaussian blur the benchmark applies

CHANCE = {"color": 1 / len(COLORS), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS)}


def batch(n: int, size: int, **kw) -> tuple[torch.Tensor, list[str], list[dict]]:
    ds = ShapesDataset(ShapesConfig(image_size=size, n_train=n, **kw))
    items = [ds[i] for i in range(n)]
    return torch.stack([it["image"] for it in items]), [it["caption"] for it in items], items


# --- the data ----------------------------------------------------------------------------------


def test_deterministic_per_seed_and_index_and_splits_disjoint():
    cfg = ShapesConfig(image_size=32, n_train=100, n_eval=100)
    a, b = render(cfg, 7), render(cfg, 7)
    assert (np.array_equal(a.image, b.image) and a.caption == b.caption
            and np.array_equal(a.seg, b.seg))
    other_seed = render(ShapesConfig(image_size=32, n_train=100, seed=1), 7)
    assert not np.array_equal(a.image, other_seed.image)
    train = {render(cfg, i, "train").image.tobytes() for i in range(100)}
    held_out = {render(cfg, i, "eval").image.tobytes() for i in range(100)}
    assert len(train) == 100 and len(held_out) == 100 and not train & held_out
    assert len(ShapesDataset(cfg, "train")) == 100 and len(ShapesDataset(cfg, "eval")) == 100


def test_items_collate_and_agree_with_their_layout_and_segmentation():
    cfg = ShapesConfig(image_size=64, min_shapes=1, max_shapes=3, n_train=40, background="texture")
    loader = DataLoader(ShapesDataset(cfg), batch_size=8)
    b = next(iter(loader))
    assert b["image"].shape == (8, 3, 64, 64) and b["image"].dtype == torch.float32
    assert -1 <= b["image"].min() and b["image"].max() <= 1
    assert b["boxes"].shape == (8, 3, 4) and b["box_classes"].shape == (8, 3)
    assert b["seg"].shape == (8, 64, 64) and b["seg"].dtype == torch.long
    assert len(b["caption"]) == 8 and b["class_id"].tolist() == b["box_classes"][:, 0].tolist()
    for i in range(8):
        specs = parse_prompt(b["caption"][i])
        assert specs == specs_from_layout(b["box_classes"][i], b["boxes"][i])  # caption == layout
        inside_boxes = torch.zeros(64, 64, dtype=torch.bool)
        for k, spec in enumerate(specs):
            x0, y0, x1, y1 = (b["boxes"][i, k] * 64).tolist()
            window = torch.zeros(64, 64, dtype=torch.bool)
            window[max(int(y0) - 1, 0): int(y1) + 2, max(int(x0) - 1, 0): int(x1) + 2] = True
            inside_boxes |= window
            mask = (b["seg"][i] == 1 + b["box_classes"][i, k]) & window  # this object's pixels
            ys, xs = mask.nonzero(as_tuple=True)
            assert len(ys) > 0.4 * (x1 - x0) * (y1 - y0)  # a triangle fills half its box
            # the object's pixels have its colour
            rgb = (b["image"][i][:, mask].mean(dim=1) + 1) * 127.5
            assert (rgb - torch.tensor(COLORS[spec.color], dtype=torch.float32)).abs().max() < 40
            row, col = int(3 * ys.float().mean() / 64), int(3 * xs.float().mean() / 64)
            assert spec.position == POSITIONS[3 * row + col]
        assert (b["box_classes"][i, len(specs):] == -1).all()
        assert (b["seg"][i][~inside_boxes] == 0).all()  # nothing outside the boxes


def test_captions_use_every_phrasing_only_vocabulary_words_and_parse_back():
    seen = set()
    for i in range(300):
        sample = render(ShapesConfig(image_size=16, max_shapes=2, n_train=300), i)
        assert parse_prompt(sample.caption) == sample.specs
        assert set(re.findall(r"[a-z]+|[:;,]", sample.caption)) <= set(VOCABULARY)
        seen |= {t for t in range(len(TEMPLATES)) if caption(sample.specs, t) == sample.caption}
    assert seen == set(range(len(TEMPLATES)))
    assert caption([ShapeSpec("orange", "circle", "center")]) == "an orange circle in the center"
    assert len(set(all_prompts())) == len(COLORS) * len(SHAPES) * len(POSITIONS) == 162
    assert CLASS_NAMES[class_id("blue", "triangle")] == "blue triangle" and len(CLASS_NAMES) == 18


def test_parse_prompt_reads_free_phrasings_and_rejects_ambiguity():
    assert parse_prompt("Upper left: a blue disc") == [ShapeSpec("blue", "circle", "top left")]
    assert parse_prompt("a green triangle at the bottom") == [ShapeSpec("green", "triangle",
                                                                        "bottom center")]
    assert parse_prompt("a square on the right") == [ShapeSpec(None, "square", "middle right")]
    assert parse_prompt("red circle") == [ShapeSpec("red", "circle", None)]
    assert parse_prompt("a red circle in the centre and a yellow square, lower right") == [
        ShapeSpec("red", "circle", "center"), ShapeSpec("yellow", "square", "bottom right")]
    with pytest.raises(ValueError, match="no shape"):
        parse_prompt("a photo of a cat")
    with pytest.raises(ValueError, match="several shapes"):
        parse_prompt("a red circle, a blue square")


def test_config_and_index_errors():
    with pytest.raises(ValueError, match="max_shapes"):
        ShapesConfig(max_shapes=10)
    with pytest.raises(ValueError, match="background"):
        ShapesConfig(background="stripes")
    with pytest.raises(ValueError, match="image_size"):
        ShapesConfig(image_size=8)
    with pytest.raises(IndexError):
        render(ShapesConfig(n_train=5), 5)
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(ShapesConfig(), "test")


# --- the evaluator -----------------------------------------------------------------------------


@pytest.mark.parametrize("size, n, background",
                         [(32, 300, "plain"), (64, 200, "texture"), (128, 60, "plain")])
def test_ground_truth_scores_at_least_99_percent(size, n, background):
    images, captions, _ = batch(n, size, background=background)
    score = score_images(images, captions)
    assert min(score.color, score.shape, score.position, score.all) >= 0.99, score.summary()


@pytest.mark.parametrize("size, sigma, noise", [(32, 0.5, 0.05), (64, 0.8, 0.1)])
def test_mild_blur_and_noise_keep_ground_truth_above_98_percent(size, sigma, noise):
    images, captions, _ = batch(300, size)
    g = torch.Generator().manual_seed(0)
    perturbed = (blur(images, sigma) + noise * torch.randn(images.shape, generator=g)).clamp(-1, 1)
    score = score_images(perturbed, captions)
    assert score.all >= 0.98, score.summary()


def test_noise_scores_at_most_chance():
    _, captions, _ = batch(400, 32)
    g = torch.Generator().manual_seed(1)
    uniform = torch.rand(400, 3, 32, 32, generator=g) * 2 - 1
    gaussian = (0.5 * torch.randn(400, 3, 32, 32, generator=g)).clamp(-1, 1)
    for noise in (uniform, gaussian):
        score = score_images(noise, captions)
        for a in CHANCE:
            assert getattr(score, a) <= CHANCE[a] + 0.05, (a, score.summary())
        assert score.all <= 0.02


def test_wrong_prompts_score_near_chance_and_each_attribute_is_scored_alone():
    images, captions, items = batch(600, 32)
    # each image against its neighbour's prompt
    score = score_images(images, captions[1:] + captions[:1])
    for a in CHANCE:
        assert abs(getattr(score, a) - CHANCE[a]) < 0.06, (a, score.summary())
    assert score.all < 0.03
    # Change one attribute of the truth: exactly that attribute drops to 0.
    truth = [parse_prompt(c)[0] for c in captions[:60]]
    swaps = {"color": dict(zip(COLORS, list(COLORS)[1:] + list(COLORS)[:1], strict=True)),
             "shape": dict(zip(SHAPES, SHAPES[1:] + SHAPES[:1], strict=True)),
             "position": dict(zip(POSITIONS, POSITIONS[1:] + POSITIONS[:1], strict=True))}
    for a, swap in swaps.items():
        wrong = [[ShapeSpec(**{**s.__dict__, a: swap[getattr(s, a)]})] for s in truth]
        score = score_images(images[:60], wrong)
        assert getattr(score, a) == 0 and score.all == 0
        assert all(getattr(score, b) == 1 for b in CHANCE if b != a), score.summary()


def test_per_prompt_results_unspecified_attributes_and_missing_objects():
    images, captions, _ = batch(20, 64)
    score = score_images(torch.cat([images, images]), captions + captions)
    assert set(score.by_prompt) == set(captions) and len(score.per_image) == 40
    assert all(v["all"] == 1 for v in score.by_prompt.values())
    only_shape = [[ShapeSpec(None, s.shape, None) for s in parse_prompt(c)] for c in captions]
    score = score_images(images, only_shape)
    assert score.shape == 1 and score.all == 1 and np.isnan(score.color)
    blank = torch.full_like(images, 0.8)  # an empty canvas: nothing found, everything wrong
    assert score_images(blank, captions).all == 0 and detect_shapes(blank[:1]) == [[]]


def test_layouts_are_scored_with_box_iou_and_several_objects():
    _, _, items = batch(100, 64, min_shapes=2, max_shapes=4)
    images = torch.stack([it["image"] for it in items])
    specs = [specs_from_layout(it["box_classes"], it["boxes"]) for it in items]
    boxes = [it["boxes"][it["box_classes"] >= 0] for it in items]
    score = score_images(images, specs, boxes=boxes)
    assert score.all >= 0.99 and score.iou > 0.85, score.summary()
    shifted = [b + torch.tensor([0.05, 0.05, 0.05, 0.05]) for b in boxes]
    assert score_images(images, specs, boxes=shifted).iou < score.iou - 0.2
    one_more = [s + [ShapeSpec("red", "circle", p)]
                for s, p in zip(specs, POSITIONS * 12, strict=False)]
    assert score_images(images, one_more).all == 0  # an object that is not drawn is an error


def test_evaluator_input_errors():
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        detect_shapes(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        detect_shapes(torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match="prompts"):
        score_images(torch.zeros(2, 3, 32, 32), ["a red circle"])
