"""The side-by-side benchmark (tinyldm.tools.compare) end to end in its smoke settings: three
models trained for one budget on one folder, each measured against a held-out folder on two feature
sets."""

import json

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # three trainings and two feature networks, about a minute


def class_folder(root, per_class, seed):
    """Ten classes of 32 px images, each a bright square at its own place on black."""
    rng = np.random.default_rng(seed)
    for c in range(10):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 30, (32, 32), dtype=np.uint8)
            y, x = 4 + 2 * (c // 5) * 5, 4 + 5 * (c % 5)
            image[y:y + 8, x:x + 8] = 200
            Image.fromarray(image).save(root / f"c{c}" / f"{i:03d}.png")
    return root


def test_three_models_share_one_budget_and_one_reference(tmp_path):
    pytest.importorskip("denoising_diffusion_pytorch")
    from tinyldm.tools.compare import main

    data, reference = class_folder(tmp_path / "train", 20, 0), class_folder(tmp_path / "ref", 3, 1)
    result = main(["--data", str(data), "--reference", str(reference), "--out",
                   str(tmp_path / "out"), "--smoke"])
    rows, budget = result["rows"], result["budget_seconds"]
    assert list(rows) == ["latent", "pixel", "peer"] and budget > 0
    for name in ("pixel", "peer"):  # each trains until the budget is spent, then stops
        assert rows[name]["train_seconds"] >= budget and rows[name]["steps"] >= 1
    for row in [*rows.values(), result["floor"]]:
        scores = row["fd"] if "fd" in row and isinstance(row["fd"], dict) else row
        assert set(scores) == {"classifier", "contrastive"}
        for s in scores.values():
            assert 0 <= s["interval"][0] <= s["fd"] <= s["interval"][1]
    assert result["reference_images"] == 30 and result["n"] == 8
    figure = Image.open(result["figure"])
    assert figure.size[0] > 3 * figure.size[1] * 0.9  # three panels side by side
    table = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert len(table) == 6 and table[-1].startswith("| real vs real")
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["n"] == 8
