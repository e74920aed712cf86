"""tinyldm/data.py on generated fixture trees: every image mode decodes to the right RGB, captions
and classes are found, bad files are skipped and counted (also from DataLoader workers), CelebA and
LSUN layouts load, errors name the path, and the latent cache is rebuilt exactly when its key
changes."""

import io
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tinyldm.data.images import (
    CELEBA_CROP,
    DataConfig,
    celeba_caption,
    celeba_dataset,
    folder_dataset,
    load_image,
    lsun_dataset,
    make_dataset,
    make_image_datasets,
)
from tinyldm.data.latents import LatentDataset, latent_cache
from tinyldm.data.shapes import ShapesConfig
from tinyldm.files import file_digest

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def jpeg_bytes(size=(64, 48), color=BLUE) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_png16_rgb(path: Path, rgb16: np.ndarray) -> None:
    """A 48-bit RGB PNG (PIL cannot write one), chunk by chunk."""
    h, w, _ = rgb16.shape
    # filter 0 per row
    rows = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Every mode and format, a caption source of each kind, and three unreadable files."""
    root = tmp_path / "images"
    (root / "nested" / "deeper").mkdir(parents=True)
    Image.new("RGB", (40, 30), RED).save(root / "red.png")
    (root / "blue.jpg").write_bytes(jpeg_bytes())
    Image.new("RGB", (20, 20), GREEN).save(root / "green.webp", lossless=True)
    Image.new("RGB", (20, 20), RED).save(root / "nested" / "red.BMP")
    Image.new("L", (20, 20), 0).save(root / "nested" / "grey.png")
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # fully transparent: white after compositing
    rgba.save(root / "nested" / "rgba.png")
    Image.new("RGB", (20, 20), GREEN).convert("P").save(root / "nested" / "palette.png")
    # red
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(root / "nested" / "deeper" / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 65535, np.uint16)).save(
        root / "nested" / "deeper" / "grey16.png")
    write_png16_rgb(root / "nested" / "deeper" / "rgb16.png",
                    np.tile(np.array([65535, 0, 0]), (20, 20, 1)))
    (root / "truncated.jpg").write_bytes(jpeg_bytes()[:200])
    (root / "empty.png").write_bytes(b"")
    (root / "not_an_image.png").write_bytes(b"hello")
    (root / ".hidden.jpg").write_bytes(b"junk")  # ignored, like macOS "._x.jpg" files
    (root / "notes.md").write_text("not an image")
    (root / "metadata.jsonl").write_text(
        json.dumps({"file_name": "red.png", "text": "a red card"}) + "\n\n"
        + json.dumps({"file_name": "blue.jpg", "text": " blue "}) + "\n")
    nested_meta = {"file_name": "deeper/cmyk.jpg", "text": "cmyk"}  # relative to its own folder
    (root / "nested" / "metadata.jsonl").write_text(json.dumps(nested_meta))
    (root / "nested" / "red.txt").write_text("a small red square\n")
    (root / "red.txt").write_text("metadata.jsonl wins over this")
    return root


def by_name(ds) -> dict[str, dict]:
    with pytest.warns(UserWarning, match="unreadable"):
        items = [ds[i] for i in range(len(ds))]
    return {Path(p).name: it for p, it in zip(ds.items, items, strict=True)}


def test_every_mode_and_format_becomes_rgb_in_range(folder):
    with pytest.warns(UserWarning, match="no caption"):
        ds = folder_dataset(DataConfig(source="folder", root=str(folder), image_size=8), "all")
    assert len(ds) == 13 and not any(".hidden" in p or "notes" in p for p in ds.items)
    items = by_name(ds)
    white = (255, 255, 255)
    expect = {"red.png": RED, "blue.jpg": BLUE, "green.webp": GREEN, "red.BMP": RED,
              "grey.png": (0, 0, 0), "rgba.png": white, "palette.png": GREEN, "cmyk.jpg": RED,
              "grey16.png": white, "rgb16.png": RED}
    for name, rgb in expect.items():
        image = items[name]["image"]
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32
        want = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 127.5 - 1
        assert (image - want).abs().max() < 0.1, name


def test_sixteen_bit_grey_keeps_its_levels(tmp_path):
    # 32896 = 128 * 257
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(tmp_path / "mid.png")
    assert np.array(load_image(tmp_path / "mid.png", 8))[0, 0].tolist() == [128, 128, 128]


def test_bad_files_are_skipped_warned_and_counted(folder):
    with pytest.warns(UserWarning):
        ds = folder_dataset(DataConfig(source="folder", root=str(folder), image_size=8), "all")
    items = by_name(ds)
    bad = {"truncated.jpg", "empty.png", "not_an_image.png"}
    assert {Path(p).name for p in ds.bad_files()} == bad
    assert "3 unreadable" in ds.summary() and "truncated.jpg" in ds.summary()
    for name in bad:  # another image stands in, with its own caption
        assert items[name]["image"].shape == (3, 8, 8)
        assert items[name]["caption"] in {it["caption"] for n, it in items.items() if n not in bad}


def test_dataloader_workers_substitute_and_report_bad_files(folder):
    with pytest.warns(UserWarning):
        ds = folder_dataset(DataConfig(source="folder", root=str(folder), image_size=8), "all")
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=True)
    for _ in range(2):  # two epochs, no crash
        seen = sum(len(b["image"]) for b in loader)
        assert seen == len(ds)
    assert {Path(p).name for p in ds.bad_files()} == {"truncated.jpg", "empty.png",
                                                      "not_an_image.png"}


def test_nothing_readable_is_an_error_naming_the_folder(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"junk")
    ds = folder_dataset(DataConfig(source="folder", root=str(tmp_path), image_size=8), "all")
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match=str(tmp_path)):
        ds[0]


def test_captions_from_metadata_jsonl_and_sidecar_txt(folder):
    with pytest.warns(UserWarning, match="9 of 13 images have no caption"):
        ds = folder_dataset(DataConfig(source="folder", root=str(folder), image_size=8), "all")
    captions = {Path(p).name: c for p, c in zip(ds.items, ds.captions, strict=True)}
    assert captions["red.png"] == "a red card"  # metadata.jsonl before the .txt beside it
    assert captions["blue.jpg"] == "blue"
    assert captions["cmyk.jpg"] == "cmyk"  # file_name relative to the nested metadata.jsonl
    assert captions["red.BMP"] == "a small red square"
    assert captions["green.webp"] == ""
    (folder / "metadata.jsonl").write_text('{"file_name": "red.png"}\n')
    with pytest.raises(SystemExit, match=r"metadata.jsonl, line 1: field .text. must be a string"):
        folder_dataset(DataConfig(source="folder", root=str(folder), image_size=8), "all")


def test_class_sub_folders(tmp_path):
    for cls, color in (("cats", RED), ("dogs", GREEN), ("zebras", BLUE)):
        (tmp_path / cls / "more").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 12), color).save(tmp_path / cls / f"{i}.png")
        Image.new("RGB", (12, 12), color).save(tmp_path / cls / "more" / "x.png")
    cfg = DataConfig(source="folder", root=str(tmp_path), image_size=8)
    ds = folder_dataset(cfg, "all")
    assert ds.class_names == ["cats", "dogs", "zebras"] and len(ds) == 12
    for i in range(len(ds)):
        item = ds[i]
        want = (RED, GREEN, BLUE)[item["class_id"]]
        assert (item["image"][:, 0, 0] - torch.tensor(want) / 127.5 + 1).abs().max() < 0.01
    assert folder_dataset(DataConfig(source="folder", root=str(tmp_path), image_size=8,
                                     class_folders=False), "all").class_ids == [-1] * 12
    Image.new("RGB", (12, 12)).save(tmp_path / "loose.png")
    # not ImageFolder-shaped any more: no labels
    assert folder_dataset(cfg, "all").class_names == []
    with pytest.raises(ValueError, match="loose.png"):
        folder_dataset(DataConfig(source="folder", root=str(tmp_path), class_folders=True), "all")


def test_empty_or_missing_folder_errors_name_the_path(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError,
                       match=r"no images \(.jpg .jpeg .png .webp .bmp\) in .*empty"):
        folder_dataset(DataConfig(source="folder", root=str(tmp_path / "empty")))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        folder_dataset(DataConfig(source="folder", root=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="needs root"):
        DataConfig(source="folder")
    with pytest.raises(ValueError, match="source"):
        DataConfig(source="imagenet")


def test_center_crop_resize_and_random_flip(tmp_path):
    # wide: black margins, then a red | blue square in the middle
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 20:40] = RED
    image[:, 40:60] = BLUE
    Image.fromarray(image).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", 16)
    assert x.size == (16, 16)
    x = np.array(x).astype(int)
    # no black margin left
    assert (np.abs(x[:, :6] - RED).max(), np.abs(x[:, 10:] - BLUE).max()) == (0, 0)
    ds = folder_dataset(DataConfig(source="folder", root=str(tmp_path), image_size=16, hflip=True),
                        "all")
    lefts = {round(ds[0]["image"][0, 0, 0].item()) for _ in range(40)}
    assert lefts == {-1, 1}  # red (R = 1) on the left, or flipped: blue (R = -1)


def test_jpeg_draft_decoding_matches_a_full_decode(tmp_path):
    rng = np.random.default_rng(0)
    # 256 x 256
    smooth = np.kron(rng.integers(0, 255, (8, 8, 3)), np.ones((32, 32, 1))).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "big.jpg", quality=95)
    fast = np.array(load_image(tmp_path / "big.jpg", 32), dtype=float)
    full = Image.open(tmp_path / "big.jpg").convert("RGB").resize((32, 32),
                                                                  Image.Resampling.BICUBIC)
    full = np.array(full, dtype=float)
    assert np.abs(fast - full).mean() < 2  # out of 255


def test_splits_are_disjoint_stable_and_subset_by_max_images(tmp_path):
    for i in range(60):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i:03d}.png")
    cfg = DataConfig(source="folder", root=str(tmp_path), image_size=8, eval_fraction=0.2)
    train, held_out = folder_dataset(cfg, "train").items, folder_dataset(cfg, "eval").items
    assert (not set(train) & set(held_out) and len(train) + len(held_out) == 60
            and 4 <= len(held_out) <= 20)
    assert folder_dataset(cfg, "train").items == train
    Image.new("RGB", (8, 8)).save(tmp_path / "new.png")  # adding a file moves no other file across
    assert set(held_out) <= set(folder_dataset(cfg, "eval").items)
    small = DataConfig(source="folder", root=str(tmp_path), image_size=8, eval_fraction=0.2,
                       max_images=5)
    assert folder_dataset(small, "train").items == train[:5]
    t, e = make_image_datasets("folder", str(tmp_path), image_size=8, n_eval=3, eval_fraction=0.2)
    assert len(e) == 3 and set(e.items) <= set(held_out) | {str(tmp_path / "new.png")}
    assert not set(t.items) & set(e.items)
    with pytest.raises(ValueError, match="split is empty"):
        folder_dataset(DataConfig(source="folder", root=str(tmp_path), eval_fraction=0.0), "eval")


def test_a_small_folder_the_hash_rule_holds_nothing_out_of_still_gets_an_eval_split(tmp_path):
    """A folder of a few dozen images can have no file in the 5% that the hash rule holds out (a
    folder of 28 did); it used to stop with "the 'eval' split is empty". The files with the lowest
    hashes are held out."""
    from tinyldm.data.images import _in_eval

    cfg = DataConfig(source="folder", root=str(tmp_path), image_size=8)
    names = [f"img_{i:03d}.png" for i in range(200) if not _in_eval(f"img_{i:03d}.png", cfg)][:20]
    for i, name in enumerate(names):
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(tmp_path / name)
    with pytest.warns(UserWarning, match="holding out the 1 with the lowest hash"):
        held_out = folder_dataset(cfg, "eval").items
    with pytest.warns(UserWarning, match="19 to train on"):
        train = folder_dataset(cfg, "train").items
    assert len(held_out) == 1 and len(train) == 19 and not set(train) & set(held_out)
    with pytest.warns(UserWarning):
        assert folder_dataset(cfg, "eval").items == held_out  # the same file every time


def test_make_dataset_shapes():
    ds = make_dataset(DataConfig(image_size=32, max_images=10))
    assert len(ds) == 10 and ds[0]["image"].shape == (3, 32, 32)
    held_out = make_dataset(DataConfig(image_size=32), "eval",
                            shapes=ShapesConfig(image_size=32, n_eval=7))
    assert len(held_out) == 7
    with pytest.raises(ValueError, match="left and right"):
        make_dataset(DataConfig(hflip=True))


# --- CelebA ------------------------------------------------------------------------------------

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
    "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
    "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie "
    "Young").split()


def attrs(*on: str) -> dict[str, bool]:
    return {a: a in on for a in CELEBA_ATTRIBUTES}


@pytest.fixture
def celeba(tmp_path: Path) -> Path:
    """Six 178 x 218 'faces': red inside the face box, blue outside. Partition 0 0 0 1 1 2."""
    (tmp_path / "img_align_celeba").mkdir()
    face = np.full((218, 178, 3), BLUE, np.uint8)
    x0, y0, x1, y1 = (round(f * s) for f, s in zip(CELEBA_CROP, (178, 218, 178, 218), strict=True))
    face[y0:y1, x0:x1] = RED
    rows, parts = [], []
    for i in range(1, 7):
        name = f"{i:06d}.jpg"
        Image.fromarray(face).save(tmp_path / "img_align_celeba" / name, quality=95)
        odd = {"Smiling", "Wavy_Hair", "Blond_Hair", "Eyeglasses"}
        on = {"No_Beard", "Young"} | (odd if i % 2 else {"Male"})
        rows.append(name + "  " + " ".join("1" if a in on else "-1" for a in CELEBA_ATTRIBUTES))
        parts.append(f"{name} {(0, 0, 0, 1, 1, 2)[i - 1]}")
    header = "6\n" + " ".join(CELEBA_ATTRIBUTES) + "\n"
    (tmp_path / "list_attr_celeba.txt").write_text(header + "\n".join(rows))
    (tmp_path / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    return tmp_path


def test_celeba_splits_crop_classes_and_captions(celeba):
    cfg = DataConfig(source="celeba", root=str(celeba), image_size=32, celeba_attribute="Smiling")
    train, held_out, test = (celeba_dataset(cfg, s) for s in ("train", "eval", "test"))
    assert (len(train), len(held_out), len(test), len(celeba_dataset(cfg, "all"))) == (3, 2, 1, 6)
    assert train.class_names == ["not Smiling", "Smiling"] and train.class_ids == [1, 0, 1]
    assert train.captions[0] == "a smiling young woman with wavy blond hair and eyeglasses"
    assert train.captions[1] == "a young man"
    image = train[0]["image"]  # the face box only: red, no blue border
    assert image.shape == (3, 32, 32)
    assert (image[:, 1:-1, 1:-1] - torch.tensor([1.0, -1, -1]).view(3, 1, 1)).abs().max() < 0.1
    assert make_dataset(replace_root(cfg, celeba, max_images=2)).items == train.items[:2]


def replace_root(cfg: DataConfig, root: Path, **kw) -> DataConfig:
    return DataConfig(**{**cfg.__dict__, "root": str(root), **kw})


def test_celeba_caption_from_attributes():
    assert celeba_caption(attrs("No_Beard")) == "a woman"
    man = attrs("Male", "Mustache", "Eyeglasses", "Wearing_Hat", "Black_Hair", "Straight_Hair")
    assert celeba_caption(man) == ("a man with straight black hair, eyeglasses, a hat, a beard "
                                   "and a mustache")
    bald = attrs("No_Beard", "Young", "Bald", "Blond_Hair", "Blurry")
    assert celeba_caption(bald) == "a blurry photo of a young bald woman"
    open_mouth = attrs("No_Beard", "Attractive", "Mouth_Slightly_Open")
    assert celeba_caption(open_mouth) == "a woman with an open mouth"


def test_celeba_missing_files_and_bad_attribute_are_clear_errors(celeba):
    cfg = DataConfig(source="celeba", root=str(celeba), image_size=16)
    with pytest.raises(ValueError, match="no attribute 'Smile'.*Smiling"):
        celeba_dataset(replace_root(cfg, celeba, celeba_attribute="Smile"))
    (celeba / "img_align_celeba" / "000002.jpg").unlink()
    with pytest.warns(UserWarning, match="1 images of the train split are missing"):
        assert len(celeba_dataset(cfg)) == 2
    (celeba / "list_attr_celeba.txt").unlink()
    with pytest.raises(FileNotFoundError,
                       match="list_attr_celeba.txt not found; expected the 40 binary"):
        celeba_dataset(cfg)


# --- LSUN --------------------------------------------------------------------------------------


def test_lsun_lmdb_export(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    env = lmdb.open(str(tmp_path / "bedroom_train_lmdb"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(8):
            txn.put(f"{i:040x}".encode(), jpeg_bytes((48, 40), (30 * i, 0, 0)))
        txn.put(b"f" * 40, b"not a jpeg")  # sorts last
    env.close()
    cfg = DataConfig(source="lsun", root=str(tmp_path / "bedroom_train_lmdb"), image_size=16)
    ds = lsun_dataset(cfg, "all")
    assert len(ds) == 9 and len(lsun_dataset(replace_root(cfg, tmp_path / "bedroom_train_lmdb",
                                                          max_images=3), "all")) == 3
    loader = DataLoader(ds, batch_size=3, num_workers=2)  # each worker opens its own environment
    reds = torch.cat([b["image"][:, 0, 8, 8] for b in loader])
    assert len(reds) == 9 and ds.bad_files() == ["f" * 40]  # found by a worker, seen here
    assert ((reds[:8] + 1) * 127.5 - torch.arange(8) * 30).abs().max() < 4 and reds[8] == reds[0]
    with pytest.warns(UserWarning, match="unreadable image f{40}"):
        lsun_dataset(cfg, "all")[8]  # in this process too


def test_lsun_without_lmdb_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "data.mdb").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "lmdb", None)  # makes `import lmdb` fail
    with pytest.raises(ImportError, match=r"pip install tinyldm\[lsun\].*pip install lmdb"):
        lsun_dataset(DataConfig(source="lsun", root=str(tmp_path)))


def test_lsun_extracted_folder_ignores_sub_folders_as_classes(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        Image.new("RGB", (10, 10)).save(tmp_path / d / "x.webp")
    ds = lsun_dataset(DataConfig(source="lsun", root=str(tmp_path), image_size=8), "all")
    assert len(ds) == 2 and ds.class_names == []


def test_real_faces_from_scikit_image(tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    # (100, 25, 25) floats in [0, 1]; the last 100 are not faces
    faces = skimage_data.lfw_subset()[:100]
    for i, face in enumerate(faces):
        Image.fromarray(np.round(face * 255).astype(np.uint8)).save(tmp_path / f"face_{i:03d}.png")
    ds = folder_dataset(DataConfig(source="folder", root=str(tmp_path), image_size=25), "all")
    batch = next(iter(DataLoader(ds, batch_size=100)))
    assert batch["image"].shape == (100, 3, 25, 25) and ds.bad_files() == []
    # same size: pixels unchanged
    want = torch.from_numpy(np.round(faces * 255)).float() / 127.5 - 1
    assert torch.allclose(batch["image"][:, 0], want, atol=1e-6)
    assert torch.equal(batch["image"][:, 0], batch["image"][:, 2])  # grey stays grey


# --- the latent cache --------------------------------------------------------------------------


class CountingEncoder:
    """A stand-in autoencoder: 4 x 4 average pooling, counting the images it sees."""

    def __init__(self, offset: float = 0.0):
        self.calls, self.offset = 0, offset

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += len(x)
        return torch.nn.functional.avg_pool2d(x, 4) + self.offset


def test_latent_cache_is_built_once_reused_and_rebuilt_when_its_key_changes(tmp_path):
    ds = make_dataset(DataConfig(image_size=16, max_images=10))
    path, encoder = tmp_path / "cache" / "latents.pt", CountingEncoder()
    key = {"autoencoder": "abc", "data": {"image_size": 16}}
    first = latent_cache(ds, encoder, path=path, key=key, batch_size=4, verbose=False)
    # no temp file
    assert encoder.calls == 10 and len(first) == 10 and list(path.parent.iterdir()) == [path]
    item = first[3]
    assert (torch.equal(item["z"], encoder(ds[3]["image"][None])[0])
            and item["caption"] == ds[3]["caption"])
    assert item["class_id"] == ds[3]["class_id"]

    # from disk
    again = latent_cache(ds, CountingEncoder(offset=5.0), path=path, key=key, verbose=False)
    assert torch.equal(again.latents, first.latents)

    stale = CountingEncoder(offset=1.0)
    with pytest.warns(UserWarning, match="stale.*autoencoder"):
        rebuilt = latent_cache(ds, stale, path=path, key={**key, "autoencoder": "def"},
                               verbose=False)
    assert stale.calls == 10 and torch.allclose(rebuilt.latents, first.latents + 1)
    plain = torch.load(path, weights_only=True)  # plain tensors and values only
    assert set(plain) >= {"format", "key", "latents", "conditions"}
    assert isinstance(plain["conditions"]["caption"][0], str)

    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        latent_cache(ds, encoder, path=path, key=key, verbose=False)


def test_latent_cache_stores_both_flips_and_serves_either(tmp_path):
    ds = make_dataset(DataConfig(image_size=16, max_images=6))
    cache = latent_cache(ds, CountingEncoder(), path=tmp_path / "z.pt", key={"k": 1}, flip=True,
                         verbose=False)
    x = ds[2]["image"][None]
    assert torch.equal(cache.flipped[2], CountingEncoder()(x.flip(-1))[0])
    assert {torch.equal(cache[2]["z"], cache.latents[2]) for _ in range(30)} == {True, False}
    with pytest.warns(UserWarning, match="stale.*flip"):
        plain = latent_cache(ds, CountingEncoder(), path=tmp_path / "z.pt", key={"k": 1},
                             verbose=False)
    assert plain.flipped is None
    with pytest.raises(ValueError, match="flip"):
        LatentDataset(torch.load(tmp_path / "z.pt", weights_only=True), flip=True)


def test_latent_cache_refuses_flipping_datasets_and_odd_keys(tmp_path, folder):
    with pytest.warns(UserWarning):
        flipping = folder_dataset(DataConfig(source="folder", root=str(folder), hflip=True), "all")
    with pytest.raises(ValueError, match="without random flips"):
        latent_cache(flipping, CountingEncoder(), path=tmp_path / "a.pt", key={}, verbose=False)
    ds = make_dataset(DataConfig(image_size=16, max_images=2))
    with pytest.raises(TypeError, match="plain values"):
        latent_cache(ds, CountingEncoder(), path=tmp_path / "a.pt", key={"when": object()},
                     verbose=False)
    (tmp_path / "ckpt.pt").write_bytes(b"weights")
    assert len(file_digest(tmp_path / "ckpt.pt")) == 64
