"""Image collections (cdi.data.collection and the modules it uses): scanning, captions, preprocessing, loading.

Every image is built here with Pillow, tiny (16x12 px). The bad-input paths
through the command line are in test_cli_inputs.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from cdi.data.collection import DEFAULT_MAX_PIXELS, ImageCollection, ImageRecord, load_audit_collections
from cdi.data.duplicates import check_disjoint
from cdi.data.image_loader import CollectionDataset, image_batches
from cdi.data.preprocess import Preprocess, preprocess_image
from cdi.utils.errors import CDIError


def save_image(path: Path, seed: int = 0, size: tuple[int, int] = (16, 12), mode: str = "RGB", **save) -> Path:
    """A random-noise image (different for every seed) saved at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, **save)
    return path


def png_with_header_size(path: Path, width: int, height: int) -> Path:
    """A small valid PNG whose IHDR claims ``width`` x ``height`` (a decompression-bomb header)."""
    save_image(path)
    data = bytearray(path.read_bytes())
    ihdr = bytearray(data[16:29])  # the 13 bytes after length and b"IHDR"
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    path.write_bytes(bytes(data))
    return path


def tensor_of(image: Image.Image, pre: Preprocess) -> torch.Tensor:
    return preprocess_image(image, pre)


# --------------------------------------------------------------------------- scanning


def test_recursive_scan_sorted_posix_paths_and_hashes(tmp_path):
    names = ["b.png", "a.png", "a-b.png", "a/b.png", "a/c/d.jpg", "B.png", "z/y/x.webp"]
    for seed, name in enumerate(names):
        save_image(tmp_path / name, seed=seed)
    collection = ImageCollection.from_folder(tmp_path)
    paths = [r.path for r in collection.records]
    assert paths == sorted(names)  # plain string order of the relative POSIX paths
    assert paths[:3] == ["B.png", "a-b.png", "a.png"]
    for record in collection.records:
        data = (tmp_path / record.path).read_bytes()
        assert record.sha256 == hashlib.sha256(data).hexdigest()
        assert (record.width, record.height, record.mode) == (16, 12, "RGB")
        assert record.caption is None
    assert collection.hashes == [r.sha256 for r in collection.records]
    assert len(collection) == len(names)
    assert collection.root == tmp_path.resolve()


def test_formats_and_modes_are_recorded(tmp_path):
    cases = {"a.png": ("RGBA", {}), "b.gif": ("P", {}), "c.bmp": ("L", {}), "d.tiff": ("CMYK", {}),
             "e.jpg": ("RGB", {"quality": 90}), "f.webp": ("RGB", {"lossless": True}), "g.png": ("LA", {}),
             "h.png": ("1", {})}
    for seed, (name, (mode, save)) in enumerate(cases.items()):
        save_image(tmp_path / name, seed=seed, mode=mode, **save)
    arr = (np.arange(12 * 16).reshape(12, 16) * 300).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "i16.png")
    modes = {r.path: r.mode for r in ImageCollection.from_folder(tmp_path).records}
    assert modes == {"a.png": "RGBA", "b.gif": "P", "c.bmp": "L", "d.tiff": "CMYK", "e.jpg": "RGB",
                     "f.webp": "RGB", "g.png": "LA", "h.png": "1", "i16.png": "I;16"}


def test_non_image_files_are_ignored_and_counted(tmp_path):
    save_image(tmp_path / "a.png")
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "blob.dat").write_bytes(np.random.default_rng(0).bytes(500))
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    (tmp_path / ".git").mkdir()
    save_image(tmp_path / ".git" / "hidden.png", seed=1)
    (tmp_path / "a.txt").write_text("caption\n")  # used as a sidecar: not ignored
    (tmp_path / "orphan.txt").write_text("no image of this name")
    save_image(tmp_path / "noext", seed=2, format="PNG")  # an image without an extension still counts
    collection = ImageCollection.from_folder(tmp_path)
    assert [r.path for r in collection.records] == ["a.png", "noext"]
    assert collection.ignored == [".DS_Store", ".git/", "blob.dat", "notes.md", "orphan.txt"]
    assert collection.skipped == [] and collection.duplicates == []


def test_unreadable_files_with_image_extensions_are_skipped_with_reasons(tmp_path):
    save_image(tmp_path / "good.png")
    png = save_image(tmp_path / "png.png", seed=1).read_bytes()
    (tmp_path / "trunc.png").write_bytes(png[: len(png) // 2])
    save_image(tmp_path / "big.jpg", seed=2, size=(64, 48), quality=95)
    jpeg = (tmp_path / "big.jpg").read_bytes()
    (tmp_path / "big.jpg").write_bytes(jpeg[: int(len(jpeg) * 0.6)])
    (tmp_path / "text.jpg").write_text("this is not a jpeg")
    (tmp_path / "png.png").unlink()
    with pytest.raises(CDIError) as err:
        ImageCollection.from_folder(tmp_path, name="published")
    message = str(err.value)
    for name in ["trunc.png", "big.jpg", "text.jpg"]:
        assert name in message
    assert "good.png" not in message and "--skip-bad" in message
    collection = ImageCollection.from_folder(tmp_path, skip_bad=True)
    assert [r.path for r in collection.records] == ["good.png"]
    reasons = {s.path: s.reason for s in collection.skipped}
    assert sorted(reasons) == ["big.jpg", "text.jpg", "trunc.png"]
    assert "truncated" in reasons["trunc.png"].lower()
    assert "cannot identify" in reasons["text.jpg"]
    assert collection.manifest()["skipped"] == [{"path": p, "reason": reasons[p]} for p in sorted(reasons)]


def test_pixel_limit_is_checked_from_the_header_and_pillow_stays_quiet(tmp_path):
    png_with_header_size(tmp_path / "bomb.png", 10_000, 10_000)  # 1e8 px: Pillow alone would warn
    png_with_header_size(tmp_path / "huge.png", 20_000, 20_000)  # 4e8 px: Pillow alone would raise
    save_image(tmp_path / "ok.png")
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        collection = ImageCollection.from_folder(tmp_path, skip_bad=True)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == saved  # globals restored
    reasons = {s.path: s.reason for s in collection.skipped}
    assert reasons["bomb.png"] == f"10000x10000 = 100,000,000 pixels, over the limit of {DEFAULT_MAX_PIXELS:,}"
    assert reasons["huge.png"] == f"400,000,000 pixels, over the limit of {DEFAULT_MAX_PIXELS:,}"
    assert [r.path for r in collection.records] == ["ok.png"]
    # the limit is on width * height, inclusive
    small = tmp_path / "small"
    save_image(small / "a.png")
    assert len(ImageCollection.from_folder(small, max_pixels=192)) == 1
    with pytest.raises(CDIError, match="16x12 = 192 pixels, over the limit of 191"):
        ImageCollection.from_folder(small, max_pixels=191)
    with pytest.raises(CDIError, match="max_pixels must be a positive"):
        ImageCollection.from_folder(small, max_pixels=0)


def test_pillow_limits_apply_even_if_other_code_allows_truncated_images(tmp_path, monkeypatch):
    png = save_image(tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(png[: len(png) // 2])
    save_image(tmp_path / "b.png", seed=1)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    collection = ImageCollection.from_folder(tmp_path, skip_bad=True)
    assert [s.path for s in collection.skipped] == ["a.png"]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_duplicates_keep_the_first_sorted_path_and_warn(tmp_path, caplog):
    save_image(tmp_path / "b.png", seed=1)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "copy.png").write_bytes((tmp_path / "b.png").read_bytes())
    (tmp_path / "a.png").write_bytes((tmp_path / "b.png").read_bytes())
    save_image(tmp_path / "c.png", seed=2)
    with caplog.at_level(logging.WARNING, logger="cdi"):
        collection = ImageCollection.from_folder(tmp_path, name="published")
    assert [r.path for r in collection.records] == ["a.png", "c.png"]
    assert collection.duplicates == [("b.png", "a.png"), ("sub/copy.png", "a.png")]
    assert len(set(collection.hashes)) == 2
    [record] = [r for r in caplog.records if r.name == "cdi"]
    assert "2 duplicate" in record.getMessage() and "b.png" in record.getMessage()
    assert collection.manifest()["duplicates"] == [{"dropped": "b.png", "kept": "a.png", "same": "file"},
                                                   {"dropped": "sub/copy.png", "kept": "a.png", "same": "file"}]


# --------------------------------------------------------------------------- captions


def test_captions_from_metadata_jsonl_in_root_and_subfolders(tmp_path):
    for seed, name in enumerate(["a.png", "b.png", "sub/c.png", "sub/d.png", "other/e.png", "f.png"]):
        save_image(tmp_path / name, seed=seed)
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "root text"}) + "\n\n"
        + json.dumps({"file_name": "b.png", "caption": "root caption"}) + "\n"
        + json.dumps({"file_name": "other/e.png", "text": "named from the root", "caption": "not this"}) + "\n"
    )
    (tmp_path / "sub" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "c.png", "caption": "relative to sub"}) + "\n"
        + json.dumps({"file_name": "d.png", "label": 3}) + "\n"
    )
    (tmp_path / "sub" / "d.txt").write_text("  sidecar for d \n")
    collection = ImageCollection.from_folder(tmp_path)
    assert dict(zip([r.path for r in collection.records], collection.captions)) == {
        "a.png": "root text",
        "b.png": "root caption",
        "f.png": None,
        "other/e.png": "named from the root",
        "sub/c.png": "relative to sub",
        "sub/d.png": "sidecar for d",  # metadata without a caption falls back to the sidecar
    }
    assert collection.ignored == []  # both metadata files and the used sidecar are caption files


def test_metadata_caption_wins_over_sidecar_and_sidecar_needs_same_stem(tmp_path):
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.jpg", seed=1)
    (tmp_path / "a.txt").write_text("sidecar a")
    (tmp_path / "b.txt").write_text("sidecar b\n")
    (tmp_path / "b.jpg.txt").write_text("not a sidecar")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "from metadata"}) + "\n")
    collection = ImageCollection.from_folder(tmp_path)
    assert collection.captions == ["from metadata", "sidecar b"]
    assert collection.ignored == ["a.txt", "b.jpg.txt"]


@pytest.mark.parametrize(
    "lines, expected",
    [
        (['{"file_name": "a.png", "text": "x"', ], "line 1 of metadata.jsonl in the published folder"),
        (['{"text": "x"}'], 'no "file_name"'),
        (['{"file_name": "a.png", "text": 3}'], "must be a string"),
        (['{"file_name": "a.png"}', '{"file_name": "./a.png"}'], "already names"),
        (['{"file_name": "gone.png", "text": "x"}', '{"file_name": "../a.png"}'], "2 file(s) that do not exist"),
        (['{"file_name": "notes.md", "text": "x"}'], "1 file(s) that are not images"),
        (['{"file_name": "a.png"}', '{"file_name": "notes.md"}'], "notes.md  (line 2 of metadata.jsonl)"),
    ],
)
def test_bad_metadata_is_an_error(tmp_path, lines, expected):
    save_image(tmp_path / "a.png")
    (tmp_path / "notes.md").write_text("hello")
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(CDIError) as err:
        ImageCollection.from_folder(tmp_path, name="published")
    assert expected in str(err.value)
    assert "metadata.jsonl" in str(err.value)


# --------------------------------------------------------------------------- collections


def test_subset_manifest_and_disjointness(tmp_path):
    for seed in range(4):
        save_image(tmp_path / "p" / f"{seed}.png", seed=seed)
        save_image(tmp_path / "u" / f"{seed}.png", seed=10 + seed)
    p, u = load_audit_collections(tmp_path / "p", tmp_path / "u")
    assert (p.name, u.name) == ("published", "unpublished")
    sub = p.subset([3, 1])
    assert [r.path for r in sub.records] == ["3.png", "1.png"] and sub.root == p.root and sub.name == "published"
    with pytest.raises(IndexError):
        p.subset([4])
    with pytest.raises(ValueError):
        p.subset([1, 1])
    manifest = json.loads(json.dumps(p.manifest()))
    assert manifest["root"] == str(p.root) and manifest["count"] == 4
    assert manifest["records"][0] == {"path": "0.png", "sha256": p.records[0].sha256, "width": 16,
                                      "height": 12, "mode": "RGB", "caption": None,
                                      "pixel_sha256": p.records[0].pixel_sha256, "phash": p.records[0].phash}
    (tmp_path / "u" / "x.png").write_bytes((tmp_path / "p" / "2.png").read_bytes())
    u2 = ImageCollection.from_folder(tmp_path / "u", name="unpublished")
    with pytest.raises(CDIError, match=r"published 2.png  =  unpublished x.png"):
        check_disjoint(p, u2)


def test_folder_errors(tmp_path):
    with pytest.raises(CDIError, match="does not exist"):
        ImageCollection.from_folder(tmp_path / "nope", name="published")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(CDIError, match="is not a folder"):
        ImageCollection.from_folder(tmp_path / "file.png")
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    with pytest.raises(CDIError, match="is empty"):
        ImageCollection.from_folder(tmp_path / "empty")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    with pytest.raises(CDIError, match="no readable image"):
        ImageCollection.from_folder(tmp_path / "texts")
    save_image(tmp_path / "p" / "u" / "a.png")
    with pytest.raises(CDIError, match="inside the published folder"):
        load_audit_collections(tmp_path / "p", tmp_path / "p" / "u")
    with pytest.raises(CDIError, match="same folder"):
        load_audit_collections(tmp_path / "p", tmp_path / "p" / "u" / "..")


# --------------------------------------------------------------------------- preprocessing


def test_preprocess_sizes_and_value_range():
    rng = np.random.default_rng(0)
    for size in [(16, 12), (12, 16), (5, 7), (16, 16)]:
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        for res in [8, 12, 32]:
            for crop in ["center", "resize"]:
                out = tensor_of(image, Preprocess(res, 3, crop))
                assert out.shape == (3, res, res) and out.dtype == torch.float32
                assert out.min() >= -1.0 and out.max() <= 1.0
            assert tensor_of(image, Preprocess(res, 1)).shape == (1, res, res)
    black, white = Image.new("RGB", (16, 12), (0, 0, 0)), Image.new("RGB", (16, 12), (255, 255, 255))
    assert torch.equal(tensor_of(black, Preprocess(8)), torch.full((3, 8, 8), -1.0))
    assert torch.equal(tensor_of(white, Preprocess(8)), torch.full((3, 8, 8), 1.0))
    grey = tensor_of(Image.new("RGB", (16, 12), (51, 102, 204)), Preprocess(8))
    assert torch.allclose(grey[:, 0, 0], torch.tensor([51, 102, 204]) / 127.5 - 1.0)


def test_crop_modes():
    # 16x8: a red band in columns 0-1, green elsewhere. The centre crop (no resize
    # needed: the shorter side is already 8) keeps columns 4-11; the squash keeps all.
    pixels = np.zeros((8, 16, 3), dtype=np.uint8)
    pixels[:, :, 1] = 255
    pixels[:, :2] = (255, 0, 0)
    image = Image.fromarray(pixels)
    center = tensor_of(image, Preprocess(8, crop="center"))
    assert torch.equal(center, tensor_of(Image.fromarray(pixels[:, 4:12]), Preprocess(8)))
    squash = tensor_of(image, Preprocess(8, crop="resize"))
    assert squash[0, :, 0].min() > 0.5  # the red band survives in the first column
    assert center[0].max() == -1.0  # no red left after the centre crop
    # portrait: rows 4-11 of a 8x16 image
    tall = np.random.default_rng(1).integers(0, 256, (16, 8, 3), dtype=np.uint8)
    assert torch.equal(tensor_of(Image.fromarray(tall), Preprocess(8)),
                       tensor_of(Image.fromarray(tall[4:12]), Preprocess(8)))
    with pytest.raises(CDIError, match="crop must be"):
        Preprocess(8, crop="square")
    with pytest.raises(CDIError, match="3 channels"):
        Preprocess(8, channels=4)
    with pytest.raises(CDIError, match="resolution"):
        Preprocess(0)


def test_exif_orientation_is_applied(tmp_path):
    upright = save_image(tmp_path / "upright.png", seed=3, size=(12, 16))
    stored = Image.open(upright).transpose(Image.Transpose.ROTATE_90)  # 16x12 as a camera stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "rotated.png", exif=exif)
    collection = ImageCollection.from_folder(tmp_path)
    # shown upright, the two files are the same picture: the second is a pixel duplicate
    assert collection.duplicates == [("upright.png", "rotated.png")]
    assert collection.duplicate_kind == {"upright.png": "pixels"}
    [record] = collection.records
    assert (record.width, record.height) == (12, 16)
    assert record.pixel_sha256 == ImageCollection.from_folder(tmp_path, name="x").records[0].pixel_sha256
    pre = Preprocess(12, crop="resize")
    [(pixels, _)] = list(image_batches(collection, pre, batch_size=2, num_workers=0))
    assert torch.equal(pixels[0], tensor_of(Image.open(upright), pre))


def test_modes_are_converted():
    rgb = np.random.default_rng(2).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    reference = tensor_of(Image.fromarray(rgb), Preprocess(8))
    rgba = Image.fromarray(np.dstack([rgb, np.full((12, 16), 7, np.uint8)]), "RGBA")
    assert torch.equal(tensor_of(rgba, Preprocess(8)), reference)  # alpha dropped, colours kept
    palette = Image.fromarray(rgb).quantize(16)
    palette.info["transparency"] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow palette-transparency warning
        from_palette = tensor_of(palette, Preprocess(8))
    assert torch.equal(from_palette, tensor_of(palette.convert("RGB"), Preprocess(8)))
    grey = Image.fromarray(rgb).convert("L")
    as_rgb = tensor_of(grey, Preprocess(8))
    assert torch.equal(as_rgb[0], as_rgb[1]) and torch.equal(as_rgb[1], as_rgb[2])
    assert torch.equal(tensor_of(grey, Preprocess(8, channels=1))[0], as_rgb[0])
    sixteen = np.zeros((12, 16), dtype=np.uint16)
    sixteen[:, 4:8], sixteen[:, 8:12], sixteen[:, 12:] = 128 * 257, 65535, 1000
    image16 = Image.fromarray(sixteen)
    assert image16.mode == "I;16"
    eight = np.zeros((12, 16), dtype=np.uint8)
    eight[:, 4:8], eight[:, 8:12], eight[:, 12:] = 128, 255, 4  # 1000 / 257 rounds to 4
    for channels in (1, 3):
        pre = Preprocess(12, channels=channels)
        assert torch.equal(tensor_of(image16, pre), tensor_of(Image.fromarray(eight), pre))
    as_int32 = Image.fromarray(sixteen.astype(np.int32))
    assert as_int32.mode == "I"
    assert torch.equal(tensor_of(as_int32, Preprocess(12)), tensor_of(Image.fromarray(eight), Preprocess(12)))


# --------------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def seven_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("seven")
    for i in range(7):
        save_image(root / f"{i}.png", seed=i, size=(16 + i, 12))
    return ImageCollection.from_folder(root)


def test_loader_order_and_workers_do_not_change_tensors(seven_images):
    pre = Preprocess(8)
    serial = list(image_batches(seven_images, pre, batch_size=3, num_workers=0))
    parallel = list(image_batches(seven_images, pre, batch_size=3, num_workers=2))
    assert [p for _, p in serial] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [p for _, p in parallel] == [p for _, p in serial]
    for (a, _), (b, _) in zip(serial, parallel):
        assert a.shape[1:] == (3, 8, 8) and torch.equal(a, b)
    dataset = CollectionDataset(seven_images, pre)
    assert torch.equal(dataset[4][0], serial[1][0][1]) and dataset[4][1] == 4
    picked = list(image_batches(seven_images, pre, batch_size=2, indices=[5, 0, 3], num_workers=0))
    assert [p for _, p in picked] == [[5, 0], [3]]
    assert torch.equal(picked[0][0][0], serial[1][0][2])
    assert list(image_batches(seven_images, pre, batch_size=2, indices=[], num_workers=0)) == []
    with pytest.raises(CDIError, match="batch_size"):
        image_batches(seven_images, pre, batch_size=0)
    with pytest.raises(CDIError, match="workers"):
        image_batches(seven_images, pre, batch_size=1, num_workers=-1)
    with pytest.raises(IndexError):
        CollectionDataset(seven_images, pre, [7])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_file_changed_after_scan_is_an_error(tmp_path, num_workers):
    for i in range(3):
        save_image(tmp_path / f"{i}.png", seed=i)
    collection = ImageCollection.from_folder(tmp_path, name="published")
    save_image(tmp_path / "1.png", seed=99)
    batches = image_batches(collection, Preprocess(8), batch_size=1, num_workers=num_workers)
    first, positions = next(batches)
    assert positions == [0]
    with pytest.raises(CDIError) as err:
        next(batches)
    message = str(err.value)
    assert "published image 1.png" in message and "changed since the folder was scanned" in message
    assert "Traceback" not in message
    (tmp_path / "1.png").unlink()
    with pytest.raises(CDIError, match="cannot read the published image 1.png"):
        list(image_batches(collection, Preprocess(8), batch_size=4, num_workers=0))


def test_record_is_frozen():
    record = ImageRecord("a.png", "0" * 64, 1, 1, "RGB", None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.path = "b.png"  # type: ignore[misc]
