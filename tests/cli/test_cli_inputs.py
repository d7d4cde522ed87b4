"""Bad image folders through the command line (``cdi inspect``).

Each bad input must end with exit status 2, one clear message on stderr (no
traceback) that names the problem and the files, and no --out file written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cdi.cli.main import app
from test_data import png_with_header_size, save_image  # the image builders of the unit tests

runner = CliRunner()


def inspect(*args: str | Path):
    return runner.invoke(app, ["inspect", *map(str, args)])


def assert_refused(result, out: Path, *fragments: str) -> str:
    """Exit 2, an 'error:' line holding every fragment, no traceback, no manifest."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "error:" in result.stderr and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    assert not out.exists()
    return result.stderr


@pytest.fixture
def folders(tmp_path):
    """A valid published folder (3 images) and unpublished folder (2 images)."""
    for i in range(3):
        save_image(tmp_path / "P" / f"p{i}.png", seed=i)
    for i in range(2):
        save_image(tmp_path / "U" / f"u{i}.png", seed=100 + i)
    return tmp_path / "P", tmp_path / "U", tmp_path / "manifest.json"


def test_valid_folders_write_the_manifest(folders):
    p, u, out = folders
    (p / "metadata.jsonl").write_text(json.dumps({"file_name": "p1.png", "text": "a cat"}) + "\n")
    result = inspect("--published", p, "--unpublished", u, "--out", out)
    assert result.exit_code == 0, result.output
    assert "share no image" in result.stdout and "manifest written" in result.stdout
    manifest = json.loads(out.read_text())
    published, unpublished = manifest["collections"]["published"], manifest["collections"]["unpublished"]
    assert [r["path"] for r in published["records"]] == ["p0.png", "p1.png", "p2.png"]
    assert [r["caption"] for r in published["records"]] == [None, "a cat", None]
    assert unpublished["count"] == 2 and unpublished["root"] == str(u.resolve())
    assert "cdi_version" in manifest
    assert list(out.parent.glob(".manifest.json.*")) == []  # no temporary file left behind


def test_published_alone_is_enough(folders):
    p, _, out = folders
    result = inspect("--published", p)
    assert result.exit_code == 0, result.output
    assert "published" in result.stdout and not out.exists()


def test_missing_folder(folders):
    p, _, out = folders
    assert_refused(inspect("--published", p.parent / "nope", "--out", out), out,
                   "published folder", "nope does not exist")


def test_folder_is_a_file(folders):
    p, u, out = folders
    assert_refused(inspect("--published", p, "--unpublished", u / "u0.png", "--out", out), out,
                   "unpublished folder", "is not a folder")


def test_empty_folder(folders):
    p, _, out = folders
    (p.parent / "empty").mkdir()
    assert_refused(inspect("--published", p, "--unpublished", p.parent / "empty", "--out", out), out,
                   "unpublished folder", "is empty")


def test_no_readable_image(folders):
    p, _, out = folders
    texts = p.parent / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("a caption without an image")
    (texts / "notes.md").write_text("hello")
    assert_refused(inspect("--published", texts, "--out", out), out,
                   "no readable image in the published folder", "none of its 2 file(s)")


def test_corrupt_and_truncated_files_are_listed(folders):
    p, u, out = folders
    png = (p / "p0.png").read_bytes()
    (p / "cut.png").write_bytes(png[: len(png) // 2])
    save_image(u / "photo.jpg", seed=7, size=(64, 48), quality=95)
    jpeg = (u / "photo.jpg").read_bytes()
    (u / "photo.jpg").write_bytes(jpeg[: int(len(jpeg) * 0.6)])
    (u / "fake.png").write_text("not a png")
    message = assert_refused(inspect("--published", p, "--unpublished", u, "--out", out), out,
                             "cut.png", "image file is truncated", "--skip-bad")
    assert "published folder" in message
    # the published folder fails first; alone, the unpublished one lists both of its files
    message = assert_refused(inspect("--published", u, "--out", out), out, "2 file(s)", "photo.jpg", "fake.png",
                             "Pillow cannot identify")


def test_skip_bad_continues_and_records_what_was_skipped(folders):
    p, u, out = folders
    png = (p / "p0.png").read_bytes()
    (p / "cut.png").write_bytes(png[: len(png) // 2])
    (u / "fake.jpg").write_text("not a jpeg")
    result = inspect("--published", p, "--unpublished", u, "--skip-bad", "--out", out)
    assert result.exit_code == 0, result.output
    assert "skipped cut.png" in result.stdout
    collections = json.loads(out.read_text())["collections"]
    assert [s["path"] for s in collections["published"]["skipped"]] == ["cut.png"]
    assert "truncated" in collections["published"]["skipped"][0]["reason"]
    assert [s["path"] for s in collections["unpublished"]["skipped"]] == ["fake.jpg"]
    assert collections["published"]["count"] == 3


def test_images_over_the_pixel_limit(folders):
    p, _, out = folders
    assert_refused(inspect("--published", p, "--max-pixels", "100", "--out", out), out,
                   "3 file(s)", "p0.png", "over the limit of 100", "--max-pixels")
    result = inspect("--published", p, "--max-pixels", "192")
    assert result.exit_code == 0, result.output


def test_decompression_bomb_header_with_the_default_limit(folders):
    p, _, out = folders
    png_with_header_size(p / "bomb.png", 30_000, 30_000)  # 9e8 px: Pillow itself would raise
    png_with_header_size(p / "large.png", 10_000, 10_000)  # 1e8 px: Pillow itself would only warn
    message = assert_refused(inspect("--published", p, "--out", out), out,
                             "bomb.png: 900,000,000 pixels, over the limit of 64,000,000",
                             "large.png: 10000x10000 = 100,000,000 pixels", "decompression bombs")
    assert "DOS attack" not in message and "DecompressionBomb" not in message  # Pillow's own wording


def test_duplicates_within_a_folder_are_dropped_with_a_record(folders):
    p, u, out = folders
    (p / "again.png").write_bytes((p / "p2.png").read_bytes())
    result = inspect("--published", p, "--unpublished", u, "--out", out)
    assert result.exit_code == 0, result.output
    assert "duplicate p2.png left out (same file as again.png)" in result.stdout
    published = json.loads(out.read_text())["collections"]["published"]
    assert published["duplicates"] == [{"dropped": "p2.png", "kept": "again.png", "same": "file"}]
    assert [r["path"] for r in published["records"]] == ["again.png", "p0.png", "p1.png"]


def test_same_image_in_published_and_unpublished(folders):
    p, u, out = folders
    (u / "leak.png").write_bytes((p / "p1.png").read_bytes())
    (u / "sub").mkdir()
    (u / "sub" / "leak2.png").write_bytes((p / "p0.png").read_bytes())
    assert_refused(inspect("--published", p, "--unpublished", u, "--out", out), out,
                   "2 image(s) are in both", "published p0.png  =  unpublished sub/leak2.png",
                   "published p1.png  =  unpublished leak.png", "corrupts the test")


def test_nested_folders(folders):
    p, _, out = folders
    save_image(p / "held_out" / "x.png", seed=50)
    assert_refused(inspect("--published", p, "--unpublished", p / "held_out", "--out", out), out,
                   "is inside the published folder")


def test_captions_file_naming_missing_files(folders):
    p, _, out = folders
    (p / "sub").mkdir()
    (p / "sub" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "gone.png", "text": "x"}) + "\n"
        + json.dumps({"file_name": "../p0.png", "text": "fine: inside the root"}) + "\n"
        + json.dumps({"file_name": "also_gone.jpg", "caption": "y"}) + "\n"
    )
    assert_refused(inspect("--published", p, "--out", out), out,
                   "2 file(s) that do not exist", "sub/gone.png  (line 1 of sub/metadata.jsonl)",
                   "sub/also_gone.jpg  (line 3 of sub/metadata.jsonl)")


def test_captions_file_that_is_not_json(folders):
    p, _, out = folders
    (p / "metadata.jsonl").write_text('{"file_name": "p0.png", "text": "ok"}\nfile_name,text\n')
    assert_refused(inspect("--published", p, "--out", out), out, "line 2 of metadata.jsonl", "not valid JSON")


def test_bad_options(folders):
    p, _, out = folders
    assert_refused(inspect("--published", p, "--max-pixels", "0", "--out", out), out, "max_pixels must be")
    out.mkdir()
    result = inspect("--published", p, "--out", out)
    assert result.exit_code == 2 and "is a folder" in result.stderr
