"""The quality curve a train_ldm.py run writes as it goes (log.jsonl, loss.png) and the reference
runs it is drawn against: each point is the evaluation command's own measurement at that N, a
reference is found only by a run with its settings, and loss.png shows it."""

import json

import numpy as np
import pytest
from PIL import Image

import train_ldm
from tinyldm.cli import UsageError
from tinyldm.evaluation import curves
from tinyldm.evaluation.viz import GREY
from tinyldm.tools import evaluate

pytestmark = pytest.mark.slow  # trains smoke runs


def records(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def grey_pixels(png) -> int:
    """Pixels of the reference's colour (a few come from the lettering's anti-aliasing)."""
    return int((np.asarray(Image.open(png).convert("RGB")) == GREY).all(axis=-1).sum())


@pytest.fixture(scope="module")
def faces_run(lfw_faces, tmp_path_factory):
    out = tmp_path_factory.mktemp("curve") / "run"
    train_ldm.main(["--smoke", "--data", str(lfw_faces), "--out", str(out), "--device", "cpu",
                    "--curve_every", "2", "--curve_images", "6"])
    return out


def test_each_point_of_the_curve_is_what_the_evaluation_command_measures(faces_run, lfw_faces,
                                                                         capsys):
    """Points at steps 2, 4 and 6, each with the minutes so far; on a folder of faces the quality is
    the FD in the contrastive features the final evaluation uses (trained at the first point, in the
    run's folder). The last point is what `python -m tinyldm.tools.evaluate` measures on the saved
    checkpoint at the same N, steps, guidance and seed."""
    points = [r for r in records(faces_run) if "quality" in r]
    assert [p["step"] for p in points] == [2, 4, 6]
    assert 0 < points[0]["minutes"] <= points[1]["minutes"] <= points[2]["minutes"]
    assert points[0]["quality_better"] == "lower"
    assert points[0]["quality_name"].startswith("FD (tinyldm contrastive features), ")
    assert (faces_run / "feature_contrastive.pt").exists()
    config = json.loads((faces_run / "eval.json").read_text())
    measured = evaluate.measure_checkpoint(faces_run / "ldm.pt", str(lfw_faces), n=6, steps=3,
                                           guidance=3.0, device="cpu", bootstrap=0)
    assert "training the" not in capsys.readouterr().out  # the run's feature network, reused
    assert measured["metrics"]["fd"] == pytest.approx(points[-1]["quality"], rel=1e-5)
    assert config["fd_name"] == "FD (tinyldm contrastive features)"
    assert points[-1]["quality"] != points[0]["quality"]  # the weights moved between points


def test_loss_png_shows_the_quality_and_a_matching_reference(faces_run, tmp_path, monkeypatch,
                                                             lfw_faces):
    """loss.png has a second panel for the quality curve. A reference made from the run (the
    command's JSON) is found by a run with the same settings and drawn in grey behind both curves;
    a run with other settings finds none and has no grey."""
    png = Image.open(faces_run / "loss.png")
    assert png.size == (480, 480) and grey_pixels(faces_run / "loss.png") < 50
    monkeypatch.setattr(curves, "REFERENCE_DIR", tmp_path / "refs")
    ref = curves.main([str(faces_run), "--name", "folder", "--command", "the smoke run",
                       "--machine", "here", "--out", str(tmp_path / "refs" / "folder.json")])
    assert [q[0] for q in ref["quality"]] == [2, 4, 6] and ref["loss"][0][0] == 2
    assert ref["settings"]["steps"] == 6 and ref["final"]["fd_name"].startswith("FD")
    again = tmp_path / "again"
    train_ldm.main(["--smoke", "--data", str(lfw_faces), "--out", str(again), "--device", "cpu",
                    "--curve_every", "2", "--curve_images", "6", "--seed", "1",
                    "--eval_images", "0"])
    assert grey_pixels(again / "loss.png") > 500  # both panels have the reference behind them
    other = tmp_path / "other"
    train_ldm.main(["--smoke", "--data", str(lfw_faces), "--out", str(other), "--device", "cpu",
                    "--curve_every", "2", "--curve_images", "6", "--steps", "8",
                    "--eval_images", "0"])
    assert grey_pixels(other / "loss.png") < 50
    train_ldm.main(["--smoke", "--data", str(lfw_faces), "--out", str(tmp_path / "none"),
                    "--device", "cpu", "--curve_every", "0", "--eval_images", "0"])
    with pytest.raises(UsageError, match="no quality points"):
        curves.main([str(tmp_path / "none"), "--name", "x", "--command", "c", "--machine", "m",
                     "--out", str(tmp_path / "x.json")])


def test_the_committed_references_are_complete_and_say_how_they_were_made():
    """Each committed reference names its command and machine and has its loss, its quality points
    (step, minutes, value) and its final evaluation; the CPU presets have one each."""
    found = {p.stem: json.loads(p.read_text()) for p in curves.REFERENCE_DIR.glob("*.json")}
    assert {"shapes", "folder"} <= set(found)
    for name, ref in found.items():
        assert ref["name"] == name and ref["command"].startswith("python train_ldm.py")
        assert ref["machine"] and len(ref["loss"]) >= 10 and len(ref["quality"]) >= 5
        steps = [q[0] for q in ref["quality"]]
        minutes = [q[1] for q in ref["quality"]]
        assert steps == sorted(steps) and minutes == sorted(minutes)
        assert steps[-1] == ref["settings"]["steps"] and ref["final"]


def test_a_folder_too_small_to_measure_trains_without_a_curve(lfw_faces, tmp_path, capsys):
    """A folder of a few faces that holds out one, fewer than the 2 images a distance needs: the
    run says so once, at the first point, and trains to the end without a curve."""
    from tinyldm.data.images import DataConfig, make_dataset

    small = tmp_path / "small"
    small.mkdir()
    for f in sorted(lfw_faces.iterdir()):  # files are kept while the folder holds out one
        (small / f.name).write_bytes(f.read_bytes())
        if len(list(small.iterdir())) > 2 and len(make_dataset(
                DataConfig(source="folder", root=str(small)), "eval")) > 1:
            (small / f.name).unlink()
        if len(list(small.iterdir())) == 8:
            break
    assert len(make_dataset(DataConfig(source="folder", root=str(small)), "eval")) == 1
    out = tmp_path / "run"
    r = train_ldm.main(["--smoke", "--data", str(small), "--out", str(out), "--device", "cpu",
                        "--curve_every", "2", "--eval_images", "0"])
    assert r["steps"] == 6 and not any("quality" in rec for rec in records(out))
    assert capsys.readouterr().out.count("no quality curve: the held-out split has") == 1


def test_a_resumed_run_continues_its_curve(lfw_faces, tmp_path):
    """Stopped after 4 steps and resumed to 6: the points of steps 2 and 4 stay, the point of step 6
    follows, and its minutes count on from the last point before the resume."""
    out = tmp_path / "run"
    flags = ["--smoke", "--data", str(lfw_faces), "--out", str(out), "--device", "cpu",
             "--curve_every", "2", "--eval_images", "0"]
    train_ldm.main([*flags, "--steps", "4"])
    before = [r for r in records(out) if "quality" in r]
    train_ldm.main([*flags, "--steps", "6", "--resume"])
    points = [r for r in records(out) if "quality" in r]
    assert [p["step"] for p in points] == [2, 4, 6] and points[:2] == before
    assert points[2]["minutes"] > points[1]["minutes"]
