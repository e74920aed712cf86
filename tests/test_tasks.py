"""The concat conditions of the image-to-image tasks (tinyldm/tasks.py): closed forms and
invariants."""

import math

import pytest
import torch

from tinyldm.data.image_conditions import (
    composite,
    downsample,
    inpaint_condition,
    mask_to_latent,
    masked_image,
    masked_psnr,
    random_mask,
    semantic_condition,
    superres_condition,
    upsample_bicubic,
)
from tinyldm.data.shapes import CLASS_NAMES, ShapesConfig, ShapesDataset
from tinyldm.evaluation.metrics import psnr

# --- semantic synthesis ------------------------------------------------------------------------


def test_semantic_condition_is_the_exact_class_fraction_of_each_block():
    seg = torch.tensor([[[0, 0, 1, 1],
                         [0, 2, 1, 1],
                         [3, 3, 0, 2],
                         [3, 3, 2, 2]]])  # (1, 4, 4), 2x2 blocks -> 2x2 latent
    c = semantic_condition(seg, num_classes=3, size=(2, 2))
    expected = torch.tensor([[[3, 0], [0, 1]],   # background
                             [[0, 4], [0, 0]],   # id 1
                             [[1, 0], [0, 3]],   # id 2
                             [[0, 0], [4, 0]]],  # id 3
                            dtype=torch.float32) / 4
    assert torch.equal(c[0], expected)


def test_semantic_condition_on_shapes_conserves_class_areas():
    """Channels sum to 1 per latent pixel, and fraction x block area summed over the latent = pixel
    counts."""
    cfg = ShapesConfig(image_size=32, max_shapes=4, n_train=4)
    seg = torch.stack([ShapesDataset(cfg)[i]["seg"] for i in range(4)])  # (4, 32, 32)
    K = len(CLASS_NAMES)
    c = semantic_condition(seg, K, 8)  # f = 4
    assert c.shape == (4, K + 1, 8, 8)
    torch.testing.assert_close(c.sum(1), torch.ones(4, 8, 8))
    # (4, K + 1)
    counts = torch.stack([torch.bincount(s.flatten(), minlength=K + 1) for s in seg]).float()
    torch.testing.assert_close(c.sum(dim=(2, 3)) * 16, counts)
    assert (counts[:, 1:].sum(1) > 0).all()  # the maps do contain objects


@pytest.mark.parametrize("seg, num_classes, size", [
    (torch.tensor([[[0, 4]]]).expand(1, 2, 2), 3, 1),  # id above num_classes
    (torch.tensor([[[-1, 0]]]).expand(1, 2, 2), 3, 1),  # negative id
    (torch.zeros(1, 2, 2), 3, 1),  # float map
    (torch.zeros(2, 2, dtype=torch.long), 3, 1),  # no batch dimension
    (torch.zeros(1, 6, 6, dtype=torch.long), 3, 4),  # 4 does not divide 6
])
def test_semantic_condition_rejects_bad_inputs(seg, num_classes, size):
    with pytest.raises(ValueError):
        semantic_condition(seg, num_classes, size)


# --- super-resolution ---------------------------------------------------------------------------


def _grid(H):
    # pixel centres
    yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(H) + 0.5, indexing="ij")
    return yy, xx


def test_downsample_keeps_constants_and_upsampling_too():
    x = torch.full((2, 3, 32, 32), 0.3)
    x_lr = downsample(x, 4)
    assert x_lr.shape == (2, 3, 8, 8)
    torch.testing.assert_close(x_lr, torch.full_like(x_lr, 0.3))
    torch.testing.assert_close(upsample_bicubic(x_lr, 32), x)


def test_downsample_is_antialiased_and_clamped():
    _, xx = _grid(32)
    # Stripes with a period of 4 px alias to a constant under plain 4x bicubic sampling (|value|
    # 0.875 there); the antialiased kernel averages each period away.
    stripes = (0.9 * torch.cos(2 * math.pi * xx / 4)).expand(1, 3, 32, 32)
    assert downsample(stripes).abs().max() < 0.1
    # A sharp step overshoots with bicubic's negative lobes (1.06 here); the LR image stays in
    # [-1, 1].
    step = torch.where(xx < 19, -1.0, 1.0).expand(1, 3, 32, 32)
    assert downsample(step).abs().max() <= 1.0


def test_bicubic_baseline_recovers_smooth_images_but_not_detail():
    yy, xx = _grid(64)
    smooth = (0.6 * torch.sin(2 * math.pi * yy / 64)
              * torch.cos(2 * math.pi * xx / 64)).expand(2, 3, 64, 64)
    assert (psnr(upsample_bicubic(downsample(smooth), 64), smooth) > 35).all()  # ~45 dB
    noise = torch.rand(2, 3, 64, 64) * 2 - 1
    p = psnr(upsample_bicubic(downsample(noise), 64), noise)
    assert torch.isfinite(p).all() and (p < 20).all()  # ~11 dB: the detail is gone


def test_superres_condition_is_the_lr_image_at_the_latent_size():
    # (2, 3, 8, 8): f = 4 latent size of 32 px
    x_lr = downsample(torch.rand(2, 3, 32, 32) * 2 - 1, 4)
    assert superres_condition(x_lr, (8, 8)) is x_lr  # tau = identity
    bigger = superres_condition(x_lr, 16)
    assert bigger.shape == (2, 3, 16, 16)
    torch.testing.assert_close(bigger, upsample_bicubic(x_lr, 16))
    const = torch.full((1, 3, 16, 16), -0.5)
    torch.testing.assert_close(superres_condition(const, 8), torch.full((1, 3, 8, 8), -0.5))


def test_superres_rejects_bad_inputs():
    with pytest.raises(ValueError):
        downsample(torch.zeros(1, 3, 30, 30), 4)  # not divisible
    with pytest.raises(ValueError):
        downsample(torch.zeros(3, 32, 32), 4)  # no batch dimension
    with pytest.raises(ValueError):
        downsample(torch.zeros(1, 3, 32, 32), 0)
    with pytest.raises(ValueError):
        upsample_bicubic(torch.zeros(1, 3, 8, 8), (0, 8))


# --- inpainting: masks --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mixed", "strokes", "box"])
def test_masks_are_binary_with_coverage_in_range(kind):
    g = torch.Generator().manual_seed(0)
    m = random_mask(150, 32, 32, kind=kind, generator=g)
    assert m.shape == (150, 1, 32, 32) and m.dtype == torch.float32
    assert ((m == 0) | (m == 1)).all()
    coverage = m.mean(dim=(1, 2, 3))
    assert (coverage >= 0.1).all() and (coverage <= 0.6).all()
    assert coverage.std() > 0.03  # sizes vary, not one fixed mask
    narrow = random_mask(30, 32, 32, kind=kind, min_coverage=0.4, max_coverage=0.5,
                         generator=g).mean(dim=(1, 2, 3))
    assert (narrow >= 0.4).all() and (narrow <= 0.5).all()


def test_masks_are_deterministic_given_the_generator():
    a = random_mask(8, 32, 32, generator=torch.Generator().manual_seed(3))
    b = random_mask(8, 32, 32, generator=torch.Generator().manual_seed(3))
    c = random_mask(8, 32, 32, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # images of one batch differ too


def test_box_masks_are_one_filled_rectangle():
    m = random_mask(50, 32, 48, kind="box", generator=torch.Generator().manual_seed(0))[:, 0].bool()
    for mi in m:
        rows, cols = mi.any(1).nonzero()[:, 0], mi.any(0).nonzero()[:, 0]
        y0, y1, x0, x1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        box = torch.zeros_like(mi)
        box[y0:y1, x0:x1] = True
        assert torch.equal(mi, box)


def test_stroke_masks_are_not_rectangles():
    m = random_mask(20, 32, 32, kind="strokes",
                    generator=torch.Generator().manual_seed(0))[:, 0].bool()
    fill = [mi.sum() / (mi.any(1).sum() * mi.any(0).sum()) for mi in m]  # area / bounding-box area
    assert min(fill) < 0.9


def test_random_mask_rejects_bad_arguments():
    for kwargs in (dict(kind="circle"), dict(min_coverage=0.5, max_coverage=0.5),
                   dict(max_coverage=1.5)):
        with pytest.raises(ValueError):
            random_mask(2, 32, 32, **kwargs)
    with pytest.raises(ValueError):
        random_mask(0, 32, 32)


# --- inpainting: conditions, paste, metric ------------------------------------------------------


def test_masked_image_sets_the_hole_to_grey():
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    m = random_mask(4, 32, 32, generator=torch.Generator().manual_seed(0))
    xm = masked_image(x, m)
    hole = m.bool().expand_as(x)
    assert (xm[hole] == 0).all() and torch.equal(xm[~hole], x[~hole])


def test_inpaint_condition_marks_every_latent_pixel_touching_the_hole():
    z = torch.randn(2, 4, 8, 8)
    m = torch.zeros(2, 1, 32, 32)
    m[0, 0, 5, 6] = 1  # one pixel, in latent block (1, 1) for f = 4
    m[1, 0, 20:30, 3] = 1  # a 1 px wide line in blocks (5..7, 0)
    c = inpaint_condition(z, m)
    assert c.shape == (2, 5, 8, 8)
    assert torch.equal(c[:, :4], z)  # the latent passes through unchanged
    expected = torch.zeros(2, 8, 8)
    expected[0, 1, 1] = 1
    expected[1, 5:8, 0] = 1
    assert torch.equal(c[:, 4], expected)
    torch.testing.assert_close(inpaint_condition(z, m, mode="area")[0, 4, 1, 1],
                               torch.tensor(1 / 16))


def test_latent_mask_covers_the_pixel_mask():
    """max-pooling: upsampled back (nearest), the latent mask contains every missing pixel; area:
    the mean agrees."""
    m = random_mask(16, 32, 32, generator=torch.Generator().manual_seed(0))
    up = torch.nn.functional.interpolate(mask_to_latent(m, 8), scale_factor=4, mode="nearest")
    assert (up >= m).all()
    torch.testing.assert_close(mask_to_latent(m, 8, mode="area").mean(dim=(1, 2, 3)),
                               m.mean(dim=(1, 2, 3)))


def test_inpaint_condition_rejects_bad_inputs():
    z = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError):
        inpaint_condition(z, torch.zeros(2, 1, 30, 30))  # 8 does not divide 30
    with pytest.raises(ValueError):
        inpaint_condition(z, torch.zeros(3, 1, 32, 32))  # batch mismatch
    with pytest.raises(ValueError):
        inpaint_condition(z, torch.zeros(2, 3, 32, 32))  # not one channel
    with pytest.raises(ValueError):
        inpaint_condition(z, torch.zeros(2, 1, 32, 32), mode="nearest")


def test_composite_keeps_known_pixels_bitwise_and_fills_the_hole():
    known = torch.rand(4, 3, 32, 32) * 2 - 1
    known[0, 0, 0, :] = -0.0  # x * 1 + 0 * g would turn -0.0 into +0.0
    m = random_mask(4, 32, 32, generator=torch.Generator().manual_seed(1))
    m[0, 0, 0, :] = 0
    generated = torch.rand(4, 3, 32, 32) * 2 - 1
    hole = m.bool().expand_as(known)
    out = composite(generated, known, m)
    assert torch.equal(out[~hole], known[~hole]) and torch.signbit(out[0, 0, 0]).all()
    assert torch.equal(out[hole], generated[hole])
    # the formula, for finite images
    torch.testing.assert_close(out, m * generated + (1 - m) * known)
    generated[~hole] = float("nan")  # whatever the model did outside the hole is discarded
    assert torch.equal(composite(generated, known, m)[~hole], known[~hole])


def test_composite_and_masked_image_reject_bad_masks():
    x = torch.zeros(2, 3, 8, 8)
    for m in (torch.full((2, 1, 8, 8), 0.5), torch.zeros(2, 3, 8, 8), torch.zeros(1, 1, 8, 8)):
        with pytest.raises(ValueError):
            composite(x, x, m)
        with pytest.raises(ValueError):
            masked_image(x, m)


def test_masked_psnr_is_psnr_over_the_hole_pixels():
    x, y = torch.rand(3, 3, 16, 16) * 2 - 1, torch.rand(3, 3, 16, 16) * 2 - 1
    m = random_mask(3, 16, 16, generator=torch.Generator().manual_seed(0))
    got = masked_psnr(x, y, m)
    for i in range(3):
        hole = m[i, 0].bool()
        d = (x[i][:, hole] - y[i][:, hole]) / 2  # on the [0, 1] scale, peak 1
        torch.testing.assert_close(got[i], 10 * torch.log10(1 / d.pow(2).mean()))
    y2 = torch.where(m.bool(), y, -x)  # known pixels do not count
    torch.testing.assert_close(masked_psnr(x, y2, m), got)
    # the whole image: plain PSNR
    torch.testing.assert_close(masked_psnr(x, y, torch.ones_like(m)), psnr(x, y))
    with pytest.raises(ValueError):
        masked_psnr(x, y, torch.zeros_like(m))  # no hole


def test_tile_builds_mosaics_row_by_row_and_untile_inverts_it():
    from tinyldm.data.image_conditions import tile, untile

    x = torch.arange(8 * 3 * 2 * 2, dtype=torch.float32).reshape(8, 3, 2, 2)
    m = tile(x, 2)
    assert m.shape == (2, 3, 4, 4)
    assert torch.equal(m[0, :, :2, :2], x[0]) and torch.equal(m[0, :, :2, 2:], x[1])
    assert torch.equal(m[0, :, 2:, :2], x[2]) and torch.equal(m[1, :, 2:, 2:], x[7])
    assert torch.equal(untile(m, 2), x)
    seg = torch.randint(0, 5, (9, 4, 4))  # maps have no channel axis
    assert torch.equal(untile(tile(seg, 3), 3), seg) and tile(seg, 3).shape == (1, 12, 12)
    with pytest.raises(ValueError, match="multiple of k"):
        tile(x[:3], 2)
