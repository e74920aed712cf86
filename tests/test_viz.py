"""tinyldm/evaluation/viz.py: the loss curve a long run draws beside its sample grids."""

import json

import numpy as np
import pytest
from PIL import Image

from tinyldm.evaluation.viz import CURVE_BOX, save_curve, save_loss_curve


def _line_row(path, column: int) -> float:
    """Mean row of the curve's blue pixels in one column of the PNG."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    blue = (pixels[:, column, 2] > 150) & (pixels[:, column, 0] < 100)
    assert blue.any(), f"no curve in column {column}"
    return float(np.nonzero(blue)[0].mean())


@pytest.mark.parametrize("log_y", [True, False])
def test_curve_places_points_on_its_axis(tmp_path, log_y):
    """1, 0.1, 0.01 at steps 0, 50, 100: on a log axis the middle point is half-way down the plot;
    on a linear axis it sits 0.09 / 0.99 of the height above the bottom."""
    path = save_curve([0, 50, 100], [1.0, 0.1, 0.01], tmp_path / "c.png", title="loss", log_y=log_y)
    left, top, right, bottom = CURVE_BOX
    row = _line_row(path, (left + right) // 2)
    expected = (top + bottom) / 2 if log_y else bottom - (bottom - top) * 0.09 / 0.99
    assert abs(row - expected) <= 2.5, (row, expected)
    assert (abs(_line_row(path, left + 1) - top) <= 3
            and abs(_line_row(path, right - 1) - bottom) <= 3)


def test_loss_curve_from_a_training_log(tmp_path):
    log = tmp_path / "run" / "log.jsonl"
    log.parent.mkdir()
    log.write_text(json.dumps({"step": 50, "loss": 0.5}) + "\n"
                   + json.dumps({"step": 50, "grid_psnr": 20}) + "\n")
    assert save_loss_curve(log, tmp_path / "loss.png") is None  # one point is not a curve
    with log.open("a") as f:
        f.write(json.dumps({"step": 100, "loss": 0.25}) + "\n")
    assert save_loss_curve(log, tmp_path / "loss.png") == tmp_path / "loss.png"
    assert Image.open(tmp_path / "loss.png").size == (480, 240)
    with pytest.raises(ValueError, match="as many steps"):
        save_curve([1, 2], [0.5], tmp_path / "bad.png", title="x")
