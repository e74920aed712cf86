"""The evaluation command: protocol, reproducibility, the real-vs-real floor, the feature
extractors' contracts (the classifier learns its labels; the contrastive encoder's NT-Xent loss is
Eq. 1 of SimCLR and its features put an image next to its own flip; Inception without its package or
weights says what to do, and with a file of random weights in pytorch-fid's format runs end to end),
`--features auto`, and checkpoints of folders of real photos whose held-out split is smaller than
--n."""

import json
import math
import sys

import pytest
import torch

import train_ldm
from tinyldm.data.images import DataConfig, make_dataset
from tinyldm.data.shapes import ShapesConfig
from tinyldm.evaluation.features import (
    ContrastiveEncoder,
    FeatureClassifier,
    InceptionFeatures,
    augment,
    extract,
    load_classifier,
    load_feature_net,
    nt_xent,
    save_classifier,
    save_feature_net,
    train_classifier,
    train_contrastive,
)
from tinyldm.tools import evaluate

pytestmark = pytest.mark.slow  # trains a model and its feature networks, then samples and measures


@pytest.fixture(scope="module")
def smoke_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    train_ldm.main(["--smoke", "--out", str(out), "--device", "cpu"])
    return out / "ldm.pt"


def run(ckpt, tmp_path, *flags):
    return evaluate.main(["--ckpt", str(ckpt), "--n", "8", "--steps", "2",
                          "--classifier_steps", "5", "--device", "cpu",
                          "--json", str(tmp_path / "m.json"), *flags])


def save_faces(folder, n=40, layout="plain"):
    """The first n of scikit-image's LFW faces (real 25 x 25 grey photos) as PNGs: in one folder
    ("plain"), in two class sub-folders ("classes"), or with a caption beside each ("captions")."""
    from PIL import Image
    from skimage.data import lfw_subset

    for i, face in enumerate(lfw_subset()[:n]):
        sub = folder / ("even" if i % 2 == 0 else "odd") if layout == "classes" else folder
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray((face * 255).round().astype("uint8")).save(sub / f"face_{i:03d}.png")
        if layout == "captions":
            (sub / f"face_{i:03d}.txt").write_text(f"a face, number {i}")
    return folder


def finite(block):
    values = [x for v in block.values() for x in (v if isinstance(v, list) else [v])]
    return all(math.isfinite(x) for x in values)


def test_evaluate_writes_protocol_metrics_and_floor(smoke_ckpt, tmp_path, capsys):
    r = run(smoke_ckpt, tmp_path)
    assert r["protocol"]["n"] == 8 and r["protocol"]["steps"] == 2 and r["protocol"]["seed"] == 0
    assert r["protocol"]["fd_name"] == "FD (tinyldm classifier)"  # never called FID
    assert r["protocol"]["feature_kind"] == "classifier" and r["protocol"]["feature_dim"] == 128
    for block in (r["metrics"], r["real_vs_train_floor"]):
        assert block["fd"] >= 0 and 0 <= block["precision"] <= 1 and 0 <= block["recall"] <= 1
    assert "all" in r["task_score"]  # a text-conditioned shapes model: the evaluator's score too
    assert json.loads((tmp_path / "m.json").read_text())["metrics"] == r["metrics"]
    assert (smoke_ckpt.parent / "feature_classifier.pt").exists()  # trained once, reused next time
    out = capsys.readouterr().out
    # shapes are labelled
    assert "features: classifier (auto: every training image has a class label)" in out
    lo, hi = r["metrics"]["fd_interval"]
    assert (f"FD (tinyldm classifier): {r['metrics']['fd']:.3f} (95% interval {lo:.3f} to "
            f"{hi:.3f}); real-vs-real floor at N=8: {r['real_vs_train_floor']['fd']:.3f} [N=8 "
            "generated vs the first 8 held-out images of shapes at 32 px; ddim 2 steps, eta 0, "
            "guidance 3, seed 0; features: tinyldm classifier") in out
    again = run(smoke_ckpt, tmp_path)  # same flags, same images, same numbers
    assert again["metrics"] == r["metrics"]
    other = run(smoke_ckpt, tmp_path, "--seed", "1")
    assert other["metrics"]["fd"] != r["metrics"]["fd"]


def test_the_sampler_sweep_measures_each_sampler_at_each_step_count(smoke_ckpt, tmp_path, capsys):
    """One table of quality against network evaluations, on the same held-out items and features:
    its DDIM row is what a plain evaluation with those flags measures; PLMS costs one evaluation
    more."""
    rows = run(smoke_ckpt, tmp_path, "--sweep_steps", "2", "3",
               "--sweep_samplers", "ddim", "plms", "dpmpp")
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in rows] == [
        ("ddim", 2, 2), ("ddim", 3, 3), ("plms", 2, 3), ("plms", 3, 4),
        ("dpmpp", 2, 2), ("dpmpp", 3, 3)]
    assert all(0 <= r["task_score"] <= 1 and r["fd"] >= 0 for r in rows)
    plain = run(smoke_ckpt, tmp_path, "--steps", "3")
    assert rows[1]["fd"] == pytest.approx(plain["metrics"]["fd"])
    assert rows[1]["task_score"] == plain["task_score"]["all"]
    assert rows[4]["fd"] != rows[0]["fd"]  # another sampler, other images
    assert "real-vs-real floor of the FD at N=8" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="steps"):
        run(smoke_ckpt, tmp_path, "--sweep_steps", "0")


def test_classifier_learns_the_shapes_classes_and_round_trips(tmp_path):
    data = DataConfig(source="shapes", image_size=32, hflip=False)
    shapes = ShapesConfig(image_size=32, n_train=2000, n_eval=200)
    train_set, eval_set = (make_dataset(data, "train", shapes=shapes),
                           make_dataset(data, "eval", shapes=shapes))
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


def test_nt_xent_is_simclr_eq_1():
    """Closed form: N pairs whose two views have cosine c, every other view orthogonal to the
    anchor. Each of the 2N anchors sees its positive at c and 2N - 2 negatives at 0, so
        l = -log(exp(c / tau) / (exp(c / tau) + (2N - 2) exp(0))) = log(1 + (2N - 2) exp(-c / tau)).
    Then random vectors against Eq. (1) written out term by term."""
    N, tau, theta = 3, 0.5, 0.7
    e = torch.eye(2 * N)
    z1 = e[:N]  # image k's first view: e_k
    # its second view: at angle theta, orthogonal to the rest
    z2 = math.cos(theta) * e[:N] + math.sin(theta) * e[N:]
    expected = math.log(1 + (2 * N - 2) * math.exp(-math.cos(theta) / tau))
    assert nt_xent(z1, z2, tau).item() == pytest.approx(expected, rel=1e-6)
    # cosine: scale-free
    assert nt_xent(3 * z1, 0.5 * z2, tau).item() == pytest.approx(expected, rel=1e-6)
    two_identical_pairs = nt_xent(e[:2], e[:2], 0.25).item()  # c = 1, N = 2
    assert two_identical_pairs == pytest.approx(math.log(1 + 2 * math.exp(-4)), rel=1e-5)

    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1).tolist()
    sim = lambda a, b: sum(x * y for x, y in zip(a, b, strict=True))  # noqa: E731
    terms = []
    for i in range(8):
        j = (i + 4) % 8  # the other view of the same image
        denominator = sum(math.exp(sim(z[i], z[k]) / tau) for k in range(8) if k != i)
        terms.append(-math.log(math.exp(sim(z[i], z[j]) / tau) / denominator))
    assert nt_xent(z1, z2, tau).item() == pytest.approx(sum(terms) / 8, rel=1e-5)


def test_augment_is_seeded_crops_and_flips():
    """Views are seeded and stay in [-1, 1]. On a horizontal ramp, with the jitter and noise off,
    each view is still a ramp (the crop is an axis-aligned affine map) whose slope is the crop's
    width share s_x, between sqrt(0.5 * 3/4) (half the area at aspect 3/4) and 1, negative where the
    view is flipped."""
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    a = augment(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, augment(x, torch.Generator().manual_seed(1)))
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    assert not torch.allclose(a, augment(x, torch.Generator().manual_seed(2)))

    W = 16
    ramp = torch.linspace(-1, 1, W).expand(32, 3, 12, W)  # value -1 + 2 w / (W - 1) at column w
    views = augment(ramp, torch.Generator().manual_seed(0), jitter=0.0, noise_std=0.0)
    # the edge columns sample within half a pixel of the border: left out
    steps = views[..., 1:-1].diff(dim=-1)
    s_x = steps[:, 0, 0, 0] * (W - 1) / 2  # the slope relative to the original's
    torch.testing.assert_close(steps, s_x[:, None, None, None].expand_as(steps) * 2 / (W - 1),
                               atol=1e-5, rtol=0)
    assert (s_x.abs() >= math.sqrt(0.5 * 3 / 4) - 1e-5).all() and (s_x.abs() <= 1 + 1e-5).all()
    # real crops; about half of the views flipped
    assert (s_x.abs() < 0.9).any() and 8 < (s_x < 0).sum() < 24


def test_contrastive_features_put_an_image_next_to_its_own_flip(tmp_path):
    """After SimCLR training on 34 real faces (flips are among its augmentations), a face's flipped
    copy is nearer to it than any other face in most cases; at initialisation it almost never is.
    Training is seeded and the network round-trips through its checkpoint."""
    faces = save_faces(tmp_path / "faces")
    data = DataConfig(source="folder", root=str(faces), image_size=32)
    train_set, eval_set = make_dataset(data, "train"), make_dataset(data, "eval")
    x = torch.stack([train_set[i]["image"] for i in range(len(train_set))])

    def flip_is_nearest(model):
        h, h_flip = extract(model.features, x), extract(model.features, x.flip(-1))
        # the nearest other face
        others = torch.cdist(h, h).fill_diagonal_(float("inf")).min(1).values
        return ((h - h_flip).norm(dim=1) < others).float().mean().item()

    torch.manual_seed(0)
    assert flip_is_nearest(ContrastiveEncoder().eval()) < 0.3
    model, meta = train_contrastive(train_set, eval_set, steps=100, batch_size=32)
    assert flip_is_nearest(model) > 0.7
    assert (meta["train_images"] == len(train_set)
            and meta["view_retrieval"] > 1 / meta["eval_images"])
    path = save_feature_net(tmp_path / "c.pt", model, meta)
    loaded, meta2 = load_feature_net(path, ContrastiveEncoder)
    torch.testing.assert_close(loaded.features(x[:4]), model.features(x[:4]))
    # the representation before the head
    assert meta2 == meta and loaded.features(x[:4]).shape == (4, 128)
    a, _ = train_contrastive(train_set, eval_set, steps=3, batch_size=8, seed=1)
    b, _ = train_contrastive(train_set, eval_set, steps=3, batch_size=8, seed=1)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0)


def test_auto_features_follow_the_labels(tmp_path):
    shapes = make_dataset(DataConfig(source="shapes", image_size=32), "train",
                          shapes=ShapesConfig(image_size=32))
    assert evaluate.choose_features("auto", shapes)[0] == "classifier"
    for layout, kind in (("classes", "classifier"), ("plain", "contrastive"),
                         ("captions", "contrastive")):
        folder = save_faces(tmp_path / layout, n=24, layout=layout)
        train_set = make_dataset(DataConfig(source="folder", root=str(folder), image_size=32),
                                 "train")
        assert evaluate.choose_features("auto", train_set)[0] == kind, layout
    assert evaluate.choose_features("contrastive", shapes) == ("contrastive", "asked for")
    # the file given wins
    assert evaluate.choose_features("auto", shapes, contrastive="c.pt")[0] == "contrastive"


def test_tiny_sets_keep_every_metric_defined():
    """N = 2 or 3: KID's subsets keep 2 features (one would divide by m (m - 1) = 0), precision /
    recall's k drops to N - 1, and nothing is NaN."""
    g = torch.Generator().manual_seed(0)
    for n, k in ((2, 1), (3, 2), (8, 3)):
        m = evaluate.distribution_metrics(torch.randn(n, 4, generator=g),
                                          torch.randn(n, 4, generator=g))
        assert m["kid_subset_size"] == max(2, n // 2) and m["k"] == k and finite(m)


@pytest.mark.parametrize("layout, cond, kind", [
    ("plain", "none", "contrastive"), ("captions", "text", "contrastive"),
    ("classes", "class", "classifier")])
def test_evaluate_a_folder_of_real_faces(smoke_ckpt, tmp_path, capsys, layout, cond, kind):
    """A checkpoint trained on a folder of 40 LFW faces (train_ldm.py --data, its condition from
    what the folder holds): --features auto picks the feature network the labels allow, trains it
    beside the checkpoint, and --n 64 uses the few held-out faces there are, saying so; the floor
    uses as many training faces. `measure_checkpoint`, what train_ldm.py can call, gives the same
    dict (the feature network is reused)."""
    faces = save_faces(tmp_path / "faces", layout=layout)
    ae = smoke_ckpt.parent / "ae" / "autoencoder.pt"
    train_ldm.main(["--data", str(faces), "--smoke", "--ae", str(ae), "--out",
                    str(tmp_path / "run"), "--device", "cpu", "--eval_images", "0"])
    held_out = len(make_dataset(DataConfig(source="folder", root=str(faces), image_size=32),
                                "eval"))
    assert 2 <= held_out < 64
    ckpt = tmp_path / "run" / "ldm.pt"
    r = evaluate.main(["--ckpt", str(ckpt), "--data", str(faces), "--n", "64", "--steps", "2",
                       "--device", "cpu", "--contrastive_steps", "20", "--classifier_steps", "5",
                       "--json", str(tmp_path / "m.json")])
    out = capsys.readouterr().out
    name = {"contrastive": "FD (tinyldm contrastive features)",
            "classifier": "FD (tinyldm classifier)"}[kind]
    assert (f"held-out split has only {held_out} images, fewer than the 64 asked for: "
            f"using all {held_out}") in out
    assert f"features: {kind} (auto: " in out and "training the" in out
    assert f"{name}: {r['metrics']['fd']:.3f} (95% interval " in out
    assert f"real-vs-real floor at N={held_out}: " in out
    p = r["protocol"]
    assert (p["cond"] == cond and p["n"] == held_out and p["n_requested"] == 64
            and p["fd_name"] == name)
    assert p["feature_kind"] == kind and p["feature_dim"] == 128 and "FID" not in json.dumps(p)
    assert finite(r["metrics"]) and finite(r["real_vs_train_floor"]) and "task_score" not in r
    assert (ckpt.parent / f"feature_{kind}.pt").exists()
    again = evaluate.measure_checkpoint(ckpt, str(faces), 64, 2, 3.0, "cpu")
    assert "training the" not in capsys.readouterr().out and again["metrics"] == r["metrics"]
    if kind == "contrastive":  # a classifier cannot learn labels that are not there
        with pytest.raises(SystemExit, match="needs class labels"):
            evaluate.measure_checkpoint(ckpt, str(faces), 64, 2, 3.0, "cpu", features="classifier")


def test_fid_path_runs_offline_with_random_inception_weights(smoke_ckpt, tmp_path, monkeypatch):
    """The FID path end to end, without the real weights: pytorch-fid's own network (its download
    patched out) with random He-initialised weights, saved in its weights-file format, loaded by the
    command through --inception_weights. Tests the path, not the number: FID-named, 2048-d, finite,
    a set against itself ~0."""
    torchvision = pytest.importorskip("torchvision")
    fid = pytest.importorskip("pytorch_fid.inception")
    # build fid_inception_v3's module tree, skipping only the download and load
    with monkeypatch.context() as m:
        m.setattr(fid, "load_state_dict_from_url", lambda *args, **kwargs: {})
        m.setattr(torchvision.models.Inception3, "load_state_dict",
                  lambda self, state_dict, **kwargs: None)
        net = fid.fid_inception_v3()
    # He init keeps the activations' scale through 40+ layers (the default decays)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    weights = tmp_path / "random_inception.pth"
    torch.save(net.state_dict(), weights)

    r = run(smoke_ckpt, tmp_path, "--features", "inception", "--inception_weights", str(weights))
    p = r["protocol"]
    assert p["fd_name"] == "FID" and p["feature_kind"] == "inception" and p["feature_dim"] == 2048
    assert finite(r["metrics"]) and finite(r["real_vs_train_floor"]) and r["metrics"]["fd"] > 0
    # the same network the command loaded (strictly, from that file)
    inception = InceptionFeatures(weights)
    images = torch.stack([make_dataset(DataConfig(source="shapes", image_size=32), "eval",
                                       shapes=ShapesConfig(image_size=32))[i]["image"]
                          for i in range(8)])
    features = extract(inception, images)
    # images give different features
    assert features.shape == (8, 2048) and features.std(0).mean() > 0
    itself = evaluate.distribution_metrics(features, features)
    assert (itself["fd"] < 1e-6 * r["real_vs_train_floor"]["fd"]
            and itself["precision"] == itself["recall"] == 1)


def test_inception_without_its_package_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", None)
    with pytest.raises(SystemExit, match="pytorch-fid"):
        InceptionFeatures()


def test_inception_weights_path_must_exist(monkeypatch, tmp_path):
    pytest.importorskip("pytorch_fid")
    with pytest.raises(SystemExit, match="do not exist"):
        InceptionFeatures(tmp_path / "missing.pth")


def test_the_floor_draws_training_images_of_the_held_out_classes(tmp_path, lfw_faces):
    """A folder's files are sorted by class, so "the first N training images" were all of one class,
    and the real-vs-real floor of a class-sorted folder came out 20x the model's own distance. The
    floor now draws, for each held-out image, a training image of its class (at random, seeded);
    without classes, at random."""
    import shutil

    from tinyldm.data.images import DataConfig, make_dataset
    from tinyldm.tools.evaluate import floor_indices

    for i, face in enumerate(sorted(lfw_faces.iterdir())[:60]):
        (tmp_path / "cls" / f"c{i // 20}").mkdir(parents=True, exist_ok=True)
        shutil.copy(face, tmp_path / "cls" / f"c{i // 20}" / face.name)
    train = make_dataset(DataConfig(source="folder", root=str(tmp_path / "cls"), image_size=25),
                         "train")
    held_out_classes = torch.tensor([2, 1, 0, 2, 1])
    idx, how = floor_indices(train, held_out_classes, seed=0)
    assert [train.class_ids[i] for i in idx] == held_out_classes.tolist() and len(set(idx)) == 5
    assert (idx == floor_indices(train, held_out_classes, seed=0)[0]
            != floor_indices(train, held_out_classes, seed=1)[0])
    plain = make_dataset(DataConfig(source="folder", root=str(lfw_faces), image_size=25), "train")
    idx, how = floor_indices(plain, torch.full((8,), -1), seed=0)
    assert len(set(idx)) == 8 and idx != list(range(8)) and "random" in how


def test_a_released_model_is_measured_on_the_same_scale_as_one_trained_here(tmp_path, capsys):
    """`--pretrained` on random weights, offline: a model of the photo presets' kind saved as
    train_ldm.py saves it, and the same weights exported to a diffusers folder (what the paper's
    releases are). Against the same faces folder, with the same feature network, N, sampler and
    seed, both give the same figures; every figure line carries the protocol, the FD its bootstrap
    interval."""
    from test_pretrained import _trained_here

    from tinyldm.checkpoint import save_checkpoint
    from tinyldm.pretrained.export import main as export

    faces = save_faces(tmp_path / "faces", n=60)
    ckpt = _trained_here("none", "eps")
    ckpt["train_config"] = {"dataset": "folder", "image_size": 32, "n_train": 0, "cond": "none",
                            "task": "generate"}
    save_checkpoint(tmp_path / "ldm.pt", ckpt, kind="ldm")
    export([str(tmp_path / "ldm.pt"), str(tmp_path / "released")])
    flags = ["--data", str(faces), "--n", "64", "--steps", "4", "--device", "cpu",
             "--contrastive_steps", "10", "--bootstrap", "20"]
    here = evaluate.main(["--ckpt", str(tmp_path / "ldm.pt"), *flags])
    capsys.readouterr()
    released = evaluate.main(["--pretrained", str(tmp_path / "released"), *flags,
                              "--contrastive", str(tmp_path / "feature_contrastive.pt"),
                              "--json", str(tmp_path / "m.json")])
    out = capsys.readouterr().out
    assert released["metrics"]["fd"] == pytest.approx(here["metrics"]["fd"], rel=1e-4)
    assert released["metrics"]["fd_interval"] == pytest.approx(here["metrics"]["fd_interval"],
                                                               rel=1e-4)
    lo, hi = released["metrics"]["fd_interval"]
    assert lo < hi and released["metrics"]["fd_bootstrap_resamples"] == 20
    n = released["protocol"]["n"]
    figures = [line for line in out.splitlines() if line.startswith(("FD", "KID"))]
    assert len(figures) == 2
    for line in figures:  # N, reference set, sampler and steps, features, bootstrap, model
        assert (f"[N={n} generated vs the first {n} held-out images of folder at 32 px; ddim 4 "
                "steps, eta 0, guidance 1, seed 0; features: tinyldm contrastive encoder") in line
        assert "95% bootstrap centred on the FD, 20 resamples; model: " in line
        assert "released" in line
    assert json.loads((tmp_path / "m.json").read_text())["protocol"]["bootstrap"] == 20
    with pytest.raises(SystemExit, match="needs --data"):
        evaluate.main(["--pretrained", str(tmp_path / "released"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="--bootstrap must be 0"):
        evaluate.main(["--pretrained", str(tmp_path / "released"), *flags[:-1], "1"])


def test_the_text_release_is_measured_on_held_out_captions(tmp_path, capsys):
    """The text-to-image release (its structure at a small width, random weights) draws one image
    per held-out caption, guided; a folder without captions is refused by name."""
    pytest.importorskip("transformers", reason="diffusers' LDMBert needs it")
    from test_pretrained_text2im import WORDS, _text2im_pipeline

    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    _text2im_pipeline(tmp_path, tmp_path / "t2i")
    captioned = save_faces(tmp_path / "captioned", n=40, layout="captions")
    r = evaluate.main(["--pretrained", str(tmp_path / "t2i"), "--data", str(captioned), "--n", "4",
                       "--steps", "2", "--guidance", "5", "--device", "cpu",
                       "--contrastive_steps", "5", "--bootstrap", "10"])
    assert r["protocol"]["cond"] == "text" and r["protocol"]["guidance"] == 5
    assert r["protocol"]["reference"].endswith("of folder at 64 px")  # the release's own size
    assert "guidance 5, seed 0" in capsys.readouterr().out
    plain = save_faces(tmp_path / "plain", n=40)
    with pytest.raises(SystemExit, match="have no captions"):
        evaluate.main(["--pretrained", str(tmp_path / "t2i"), "--data", str(plain), "--n", "4",
                       "--device", "cpu", "--contrastive_steps", "5"])
