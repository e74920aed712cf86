"""tinyldm/data/example_folders.py: the scikit-image folders in their three layouts, and
Fashion-MNIST exported as a class folder from its IDX files (crafted ones always; the Debian
package's where it is installed), with every damaged or missing file refused naming it."""

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tinyldm.cli import UsageError
from tinyldm.data.images import DataConfig, folder_dataset

# --- example folders of real photographs -------------------------------------------------------


def test_example_folders_hold_real_photographs_in_the_three_layouts(tmp_path):
    """faces: 100 LFW faces, no captions; textures: one sub-folder per photograph; captioned:
    metadata.jsonl. What the folder loader reads from each is what --cond auto would choose from."""
    pytest.importorskip("skimage")
    from tinyldm.data.example_folders import (
        TEXTURES,
        captioned_folder,
        faces_folder,
        textures_folder,
    )

    faces = folder_dataset(DataConfig(source="folder", root=str(faces_folder(tmp_path / "f")),
                                      image_size=25), "all")
    assert len(faces) == 100 and not any(faces.captions) and min(faces.class_ids) < 0
    textures = folder_dataset(DataConfig(source="folder",
                                         root=str(textures_folder(tmp_path / "t", n_per_class=5)),
                                         image_size=32), "all")
    assert sorted(textures.class_names) == sorted(TEXTURES) and len(textures) == 30
    crops = torch.stack([textures[i]["image"] for i in range(len(textures))])
    per_class = torch.tensor(textures.class_ids)
    stars, retina = crops[per_class == textures.class_names.index("stars")], crops[
        per_class == textures.class_names.index("retina")]
    # a dark sky; a red retina (photographs, not noise)
    assert stars.mean() < -0.5 < retina[:, 0].mean()
    again = textures_folder(tmp_path / "t2", n_per_class=5)
    assert ((again / "brick" / "brick_003.png").read_bytes()
            == (tmp_path / "t" / "brick" / "brick_003.png").read_bytes())
    captioned = folder_dataset(DataConfig(source="folder",
                                          root=str(captioned_folder(tmp_path / "c", n_per_class=5)),
                                          image_size=32), "all")
    assert len(captioned) == 30 and all(captioned.captions)
    assert {c.split(",")[-1].strip() for c in captioned.captions} == {"bright", "dark"}


# --- Fashion-MNIST as a class folder -----------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of bytes, gzip-compressed, written by hand from its format (for the tests)."""
    import gzip

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def crafted_fashion(folder: Path, per_label: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(10), per_label)
    images = rng.integers(0, 256, (len(labels), 28, 28))
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return images, labels


def test_fashion_export_pads_each_image_into_its_class_folder(tmp_path):
    """From the four IDX files of any folder (--source): the first N of each label, 28 px in the
    middle of 32 px of black, in the sub-folder of its class name; the folder loader reads 10
    classes."""
    from tinyldm.data.example_folders import FASHION_CLASSES, fashion_folder

    images, labels = crafted_fashion(tmp_path)
    out = fashion_folder(tmp_path / "out", per_class=2, source=tmp_path)
    for i, label in enumerate(labels):
        saved = np.asarray(Image.open(out / FASHION_CLASSES[label] /
                                      f"{FASHION_CLASSES[label]}_{i:05d}.png"))
        assert saved.shape == (32, 32) and saved[2:30, 2:30].tolist() == images[i].tolist()
        assert saved.sum() == images[i].sum()  # the 2-px border is black
    data = folder_dataset(DataConfig(source="folder", root=str(out), image_size=32), "all")
    assert sorted(data.class_names) == sorted(FASHION_CLASSES) and len(data) == 20
    with pytest.raises(UsageError, match="--per_class 3: the test split has 2 images of"):
        fashion_folder(tmp_path / "more", per_class=3, split="test", source=tmp_path)


def test_fashion_export_refuses_missing_damaged_and_foreign_files_naming_them(tmp_path,
                                                                            monkeypatch, capsys):
    from tinyldm.data import example_folders
    from tinyldm.data.example_folders import fashion_folder

    monkeypatch.setattr(example_folders, "FASHION_DIR", tmp_path / "not-installed")
    with pytest.raises(UsageError, match="sudo apt-get install dataset-fashion-mnist"):
        fashion_folder(tmp_path / "out")
    with pytest.raises(SystemExit) as stop:  # the command line: one `error:` line, status 2
        example_folders.run(example_folders.main, ["fashion", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: Fashion-MNIST is")
    crafted_fashion(tmp_path)
    target = tmp_path / "train-images-idx3-ubyte.gz"
    good = target.read_bytes()
    for damage, message in [
        (lambda: target.unlink(), "is missing"),
        (lambda: target.write_bytes(b"not gzip at all"), "not a readable gzip file"),
        (lambda: target.write_bytes(good[: len(good) // 2]), "not a readable gzip file"),
        (lambda: write_idx(target, np.zeros((3, 28, 28))), "do not belong together"),
    ]:
        target.write_bytes(good)
        damage()
        with pytest.raises(UsageError, match=message):
            fashion_folder(tmp_path / "out", per_class=1, source=tmp_path)
    import gzip

    raw = gzip.decompress(good)
    target.write_bytes(gzip.compress(raw[:-100]))  # a header that promises more than the body
    with pytest.raises(UsageError,
                       match=r"15,580 bytes .* says 15,680 \(20 x 28 x 28\): the file is trunc"):
        fashion_folder(tmp_path / "out", per_class=1, source=tmp_path)
    target.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + raw[4:]))  # float data: not ours
    with pytest.raises(UsageError, match="not an IDX file of bytes"):
        fashion_folder(tmp_path / "out", per_class=1, source=tmp_path)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_export_of_the_installed_data_set(tmp_path):
    """The Debian package's files: 6,000 training and 1,000 test images per class (the data set's
    published sizes), and the exported images are clothing on black (dark borders, brighter
    middle)."""
    from tinyldm.data.example_folders import FASHION_DIR, fashion_folder, read_idx

    for prefix, n in (("train", 6000), ("t10k", 1000)):
        labels = read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        assert np.bincount(labels).tolist() == [n] * 10
    out = fashion_folder(tmp_path, per_class=5, split="test")
    pixels = np.stack([np.asarray(Image.open(f)) for f in sorted(out.rglob("*.png"))])
    assert pixels.shape == (50, 32, 32)
    assert pixels[:, :2].max() == 0 and pixels[:, :, 10:22].mean() > 4 * pixels[:, :, 2:5].mean()
