"""The evaluation command: protocol, reproducibility, the real-vs-train floor, and the feature extractors'
contracts (the classifier learns its labels; Inception without its package or weights says what to do)."""

import json
import sys

import pytest
import torch

import train_ldm
from tinyldm.data.images import DataConfig, make_dataset
from tinyldm.data.shapes import ShapesConfig
from tinyldm.evaluation.features import (
    FeatureClassifier,
    InceptionFeatures,
    load_classifier,
    save_classifier,
    train_classifier,
)
from tinyldm.tools import evaluate


@pytest.fixture(scope="module")
def smoke_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    train_ldm.main(["--smoke", "--out", str(out), "--device", "cpu"])
    return out / "ldm.pt"


def run(ckpt, tmp_path, *flags):
    return evaluate.main(["--ckpt", str(ckpt), "--n", "8", "--steps", "2", "--classifier_steps", "5",
                          "--device", "cpu", "--json", str(tmp_path / "m.json"), *flags])


def test_evaluate_writes_protocol_metrics_and_floor(smoke_ckpt, tmp_path):
    r = run(smoke_ckpt, tmp_path)
    assert r["protocol"]["n"] == 8 and r["protocol"]["steps"] == 2 and r["protocol"]["seed"] == 0
    assert r["protocol"]["fd_name"] == "FD (tinyldm classifier)"  # never called FID
    for block in (r["metrics"], r["real_vs_train_floor"]):
        assert block["fd"] >= 0 and 0 <= block["precision"] <= 1 and 0 <= block["recall"] <= 1
    assert "all" in r["task_score"]  # a text-conditioned shapes model: the evaluator's score too
    assert json.loads((tmp_path / "m.json").read_text())["metrics"] == r["metrics"]
    assert (smoke_ckpt.parent / "feature_classifier.pt").exists()  # trained once, reused next time
    again = run(smoke_ckpt, tmp_path)  # same flags, same images, same numbers
    assert again["metrics"] == r["metrics"]
    other = run(smoke_ckpt, tmp_path, "--seed", "1")
    assert other["metrics"]["fd"] != r["metrics"]["fd"]


def test_classifier_learns_the_shapes_classes_and_round_trips(tmp_path):
    data = DataConfig(source="shapes", image_size=32, hflip=False)
    shapes = ShapesConfig(image_size=32, n_train=2000, n_eval=200)
    train_set, eval_set = make_dataset(data, "train", shapes=shapes), make_dataset(data, "eval", shapes=shapes)
    model, meta = train_classifier(train_set, eval_set, 18, steps=150, batch_size=32)
    assert meta["accuracy"] > 0.5  # chance is 1/18
    path = save_classifier(tmp_path / "c.pt", model, meta)
    loaded, meta2 = load_classifier(path)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded.features(x), model.features(x))
    assert meta2 == meta and loaded.features(x).shape == (3, 128)


def test_classifier_needs_labels():
    class Unlabelled(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"image": torch.zeros(3, 32, 32), "class_id": -1}

    with pytest.raises(ValueError, match="needs class labels"):
        train_classifier(Unlabelled(), Unlabelled(), 2, steps=1)
    assert isinstance(FeatureClassifier(3), torch.nn.Module)


def test_inception_without_its_package_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", None)
    with pytest.raises(SystemExit, match="pytorch-fid"):
        InceptionFeatures()


def test_inception_weights_path_must_exist(monkeypatch, tmp_path):
    pytest.importorskip("pytorch_fid")
    with pytest.raises(SystemExit, match="do not exist"):
        InceptionFeatures(tmp_path / "missing.pth")
