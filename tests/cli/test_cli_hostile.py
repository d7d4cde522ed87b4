"""Hostile and odd input through the command line (issue 11, cases 5 and 6), and the record of every file.

Each refused input ends with exit status 2, a message naming the problem, no
traceback, nothing written and nothing of the user's changed; everything
that needs no model is refused before the model loads (the loader is
replaced by one that fails the test if it is reached). The end-to-end audit
on a tiny text-to-image model checks what is recorded in result.json and
what reaches the terminal.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cdi.cli.main import app
from cdi.utils.errors import CDIError
from cdi.engine.table import FeatureTable

runner = CliRunner()
N = 10  # images per collection: the minimum for --folds 2


def smooth_image(path: Path, seed: int, size: int = 32) -> Path:
    """A smooth random picture (a 4x4 random pattern, upscaled): unrelated seeds look unrelated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    small = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(path)
    return path


@pytest.fixture
def folders(tmp_path):
    """P and U with N smooth PNG images each and a caption for each image."""
    for name, offset in (("P", 0), ("U", 100)):
        lines = []
        for i in range(N):
            smooth_image(tmp_path / name / f"{name.lower()}{i}.png", seed=offset + i)
            lines.append(json.dumps({"file_name": f"{name.lower()}{i}.png", "text": f"picture {i}"}))
        (tmp_path / name / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "P", tmp_path / "U"


@pytest.fixture
def no_model(monkeypatch):
    """The model loader, replaced by one that stops the run with a recognisable error."""
    import cdi.models

    calls = []

    def fake_load(*args, **kwargs):
        calls.append(args)
        raise CDIError("MODEL LOADER REACHED")

    monkeypatch.setattr(cdi.models, "load_model", fake_load)
    return calls


def audit(p, u, model, out, *extra):
    return runner.invoke(app, ["audit", "--published", str(p), "--unpublished", str(u), "--model", str(model),
                               "--out", str(out), "--folds", "2", *map(str, extra)])


def assert_refused_early(result, out: Path, calls: list, *fragments: str) -> str:
    """Exit 2, every fragment in the message, no traceback, nothing written, the loader never called."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "MODEL LOADER REACHED" not in result.output, result.output
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    assert calls == []
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    return result.stderr


# ----------------------------------------------------------------- refused before the model loads


def test_non_utf8_file_name_is_refused_at_scan_time(folders, tmp_path, tiny_model_dirs, no_model):
    p, u = folders
    bad = os.fsencode(p) + b"/caf\xe9.png"
    shutil.copyfile(p / "p0.png", bad)
    message = assert_refused_early(audit(p, u, tiny_model_dirs["sd"], tmp_path / "out"), tmp_path / "out", no_model,
                                   "caf\\xe9.png", "not valid UTF-8", "--skip-bad")
    assert "rename" in message


def test_fifo_named_like_an_image_does_not_hang(folders, tmp_path, tiny_model_dirs, no_model):
    p, u = folders
    os.mkfifo(p / "x.png")
    signal.alarm(60)  # a scan that opens the FIFO would block forever
    try:
        result = audit(p, u, tiny_model_dirs["sd"], tmp_path / "out")
    finally:
        signal.alarm(0)
    assert_refused_early(result, tmp_path / "out", no_model, "x.png: not a regular file: a FIFO", "--skip-bad")


def test_caption_with_a_lone_surrogate(folders, tmp_path, tiny_model_dirs, no_model):
    p, u = folders
    with open(p / "metadata.jsonl", "a") as fh:
        fh.write('{"file_name": "extra.png", "text": "bad \\ud800 caption"}\n')
    smooth_image(p / "extra.png", seed=55)
    assert_refused_early(audit(p, u, tiny_model_dirs["sd"], tmp_path / "out"), tmp_path / "out", no_model,
                         "line 11 of metadata.jsonl", "lone surrogate")


def test_pixel_identical_copy_in_the_other_folder(folders, tmp_path, tiny_model_dirs, no_model):
    p, u = folders
    Image.open(p / "p3.png").save(u / "copy.webp", lossless=True)  # other bytes, same pixels
    assert_refused_early(audit(p, u, tiny_model_dirs["sd"], tmp_path / "out"), tmp_path / "out", no_model,
                         "published p3.png  =  unpublished copy.webp  (same pixels, different file)")


@pytest.mark.parametrize("extra, needle", [
    (["--seed", "-1"], "--seed must be a whole number between 0 and 2**63 - 1"),
    (["--seed", str(2**63)], "--seed must be"),
    (["--workers", "-2"], "--workers must be 0"),
    (["--max-pixels", "0"], "--max-pixels must be a positive"),
    (["--captions", "manual"], "--captions must be files, auto or auto:MODEL"),
])
def test_bad_options_before_the_model_loads(folders, tmp_path, tiny_model_dirs, no_model, extra, needle):
    p, u = folders
    assert_refused_early(audit(p, u, tiny_model_dirs["sd"], tmp_path / "out", *extra), tmp_path / "out", no_model,
                         needle)


def test_unwritable_out(folders, tmp_path, tiny_model_dirs, no_model):
    p, u = folders
    (tmp_path / "afile").write_text("mine")
    out = tmp_path / "afile" / "audit"
    result = audit(p, u, tiny_model_dirs["sd"], out)
    assert_refused_early(result, out, no_model, "is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "mine"


def test_unwritable_out_when_permissions_apply(folders, tmp_path, tiny_model_dirs, no_model, monkeypatch):
    """As root (CI containers) permission bits do not stop writing, so the refusal is simulated."""
    import tempfile

    p, u = folders

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert_refused_early(audit(p, u, tiny_model_dirs["sd"], tmp_path / "out"), tmp_path / "out", no_model,
                         "cannot write into", "Permission denied")


def test_users_own_files_in_out_are_not_overwritten(folders, tmp_path, tiny_model_dirs, no_model):
    p, u = folders
    out = tmp_path / "out"
    out.mkdir()
    (out / "features.csv").write_text("my,own,table\n")
    for extra in ([], ["--force"]):
        result = audit(p, u, tiny_model_dirs["sd"], out, *extra)
        assert result.exit_code == 2 and "holds features.csv but no result.json" in result.stderr, result.output
    assert no_model == [] and sorted(x.name for x in out.iterdir()) == ["features.csv"]
    assert (out / "features.csv").read_text() == "my,own,table\n"


def test_pixel_limit_names_max_pixels_and_max_pixels_works(folders, tmp_path, tiny_model_dirs, no_model):
    p, u = folders
    out = tmp_path / "out"
    assert_refused_early(audit(p, u, tiny_model_dirs["sd"], out, "--max-pixels", "1000"), out, no_model,
                         "over the limit of 1,000", "--max-pixels")
    result = audit(p, u, tiny_model_dirs["sd"], out, "--max-pixels", "1024")  # 32 x 32: accepted
    assert "MODEL LOADER REACHED" in result.stderr and len(no_model) == 1
    result = runner.invoke(app, ["extract", "--images", str(p), "--model", str(tiny_model_dirs["sd"]),
                                 "--out", str(tmp_path / "x.csv"), "--max-pixels", "1000"])
    assert result.exit_code == 2 and "--max-pixels" in result.stderr and len(no_model) == 1


def test_missing_captions_for_clid_are_found_before_the_model_loads(folders, tmp_path, tiny_model_dirs, no_model):
    p, u = folders
    lines = (u / "metadata.jsonl").read_text().splitlines()
    (u / "metadata.jsonl").write_text("\n".join(lines[:7]) + "\n")  # u7, u8, u9 lose their caption
    out = tmp_path / "out"
    message = assert_refused_early(audit(p, u, tiny_model_dirs["sd"], out), out, no_model,
                                   "clid", "3 of 20 image(s) have none", "unpublished: 3 of 10",
                                   "--captions auto")
    assert "u7.png" in message
    # --features cdi: a mix of captioned and uncaptioned images is refused too, not run half-unconditionally
    assert_refused_early(audit(p, u, tiny_model_dirs["sd"], out, "--features", "cdi"), out, no_model,
                         "3 of 20 image(s) without a caption", "--captions auto")
    # extract checks its one folder the same way
    result = runner.invoke(app, ["extract", "--images", str(u), "--model", str(tiny_model_dirs["sd"]),
                                 "--out", str(tmp_path / "u.csv")])
    assert result.exit_code == 2 and "--captions auto" in result.stderr and no_model == []


def test_model_index_errors_are_clear(folders, tmp_path, tiny_model_dirs, no_model, monkeypatch):
    import cdi.models
    from cdi.models.loading import load_model

    monkeypatch.setattr(cdi.models, "load_model", load_model)  # the real loader: these fail while loading
    p, u = folders
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["sd"], model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "_class_name": ["StableDiffusionPipeline"]}))
    result = audit(p, u, model, tmp_path / "out", "--features", "denoising_loss")
    assert result.exit_code == 2 and "_class_name must be the pipeline's class name" in result.stderr, result.output
    (model / "model_index.json").write_text(json.dumps(index))
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    (model / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text("{not json")
    result = audit(p, u, model, tmp_path / "out", "--features", "denoising_loss")
    assert result.exit_code == 2 and "weight index" in result.stderr and "cannot be read" in result.stderr, \
        result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists() and weights.exists()


# ----------------------------------------------------------------- the complete record, end to end


def test_every_file_is_recorded_and_hostile_text_survives(folders, tmp_path, tiny_model_dirs, caplog):
    """One audit on a tiny SD model with --skip-bad: every kind of file, hostile captions and names."""
    p, u = folders
    hostile = ["=HYPERLINK(\"http://x\")", "+1", "-1", "@SUM(A1)", "\tTAB", "a\u2028line\u2029sep",
               "form\x0cfeed", "cr\ronly", "'quoted", "plain"]
    (p / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"p{i}.png", "text": c}) + "\n"
                                              for i, c in enumerate(hostile)))
    escape_name = "zz_evil\x1b[2J\x1b]0;owned\x07.png"
    shutil.copyfile(p / "p1.png", p / escape_name)  # a duplicate whose name holds escape sequences
    Image.open(p / "p2.png").save(p / "p2_copy.bmp")  # same pixels, another format: a duplicate
    (p / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")  # a broken HEIC (or one no plug-in reads): skipped
    (p / "cut.png").write_bytes((p / "p0.png").read_bytes()[:40])  # truncated: skipped
    os.mkfifo(p / "pipe.png")  # skipped, never opened
    shutil.copyfile(p / "p3.png", os.fsencode(p) + b"/latin\xe9.png")  # skipped: name not UTF-8
    (p / ".DS_Store").write_bytes(b"junk")  # hidden: ignored
    outside = smooth_image(tmp_path / "elsewhere" / "real.png", seed=77)
    (p / "link.png").symlink_to(outside)  # a link: used, target recorded
    (p / "link.txt").write_text("a linked picture\n")  # its caption (sidecar)
    (p / "dirlink").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # not followed
    near = io.BytesIO()
    Image.open(u / "u0.png").save(near, "JPEG", quality=95)
    (u / "u0_again.jpg").write_bytes(near.getvalue())  # a near-copy within U: not a cross-folder case
    Image.open(p / "p5.png").save(u / "p5_like.jpg", quality=98, subsampling=0)  # a near-copy of a P image in U
    with open(u / "metadata.jsonl", "a") as fh:
        fh.write(json.dumps({"file_name": "u0_again.jpg", "text": "again"}) + "\n")
        fh.write(json.dumps({"file_name": "p5_like.jpg", "text": "like p5"}) + "\n")

    out = tmp_path / "out"
    result = runner.invoke(app, ["audit", "--published", str(p), "--unpublished", str(u),
                                 "--model", str(tiny_model_dirs["sd"]), "--out", str(out), "--folds", "2",
                                 "--features", "denoising_loss", "--permutations", "0",
                                 "--sample-size-resamples", "0", "--skip-bad", "--batch-size", "8",
                                 "--device", "cpu", "--shift-encoder", "builtin"])
    assert result.exit_code == 0, result.output
    # the duplicate's name reaches the terminal through the cdi logger: escapes shown, not run
    assert "\x1b" not in result.output + caplog.text and "zz_evil\\x1b[2J\\x1b]0;owned\\x07.png" in caplog.text

    saved = json.loads((out / "result.json").read_text())
    files = {f["path"]: f for f in saved["inputs"]["published"]["files"]}
    assert files["p0.png"]["status"] == "used"
    assert files[escape_name] == {"path": escape_name, "status": "duplicate", "of": "p1.png", "same": "file"}
    assert files["p2_copy.bmp"] == {"path": "p2_copy.bmp", "status": "duplicate", "of": "p2.png", "same": "pixels"}
    assert files["photo.heic"]["status"] == "skipped" and files[".DS_Store"]["status"] == "ignored"
    assert files["cut.png"]["status"] == "skipped" and "not a valid image" in files["cut.png"]["reason"]
    assert files["pipe.png"]["status"] == "skipped" and "FIFO" in files["pipe.png"]["reason"]
    assert files["latin\\xe9.png"]["status"] == "skipped" and "UTF-8" in files["latin\\xe9.png"]["reason"]
    assert files["link.png"]["status"] == "used" and files["link.png"]["link_target"] == str(outside.resolve())
    assert files["dirlink/"]["status"] == "ignored" and "not followed" in files["dirlink/"]["reason"]
    assert files["metadata.jsonl"]["status"] == files["link.txt"]["status"] == "caption_file"
    counts = saved["inputs"]["published"]["counts"]
    assert counts == {"used": N + 1, "skipped": 4, "duplicate": 2, "ignored": 2, "caption_file": 2, "links": 1}
    # every file left out is named on the console, the first few with the count
    assert "published: 8 file(s) left out" in " ".join(result.stderr.split())
    u_files = {f["path"]: f for f in saved["inputs"]["unpublished"]["files"]}
    assert u_files["u0_again.jpg"]["status"] == "used"
    assert [(d["published"], d["unpublished"]) for d in saved["inputs"]["near_duplicates"]] == \
        [("p5.png", "p5_like.jpg")]
    assert saved["captions"]["source"] == "files" and saved["captions"]["conditioning"] == "caption"

    # features.csv: hostile captions come back exactly, and no text cell starts a formula
    table = FeatureTable.from_csv(out / "features.csv")
    by_hash = dict(zip(table.hashes, table.captions))  # by hash: the rows' path column is issue 11 part A's
    sha = {row["path"]: row["sha256"] for row in saved["scores"] if row["collection"] == "published"}
    for i, caption in enumerate(hostile):
        assert by_hash[sha[f"p{i}.png"]] == caption
    import csv

    with open(out / "features.csv", newline="", encoding="utf-8") as fh:
        for row in csv.reader(fh):
            assert not row[0].startswith(("=", "+", "-", "@", "\t", "\r"))
            assert not row[2].startswith(("=", "+", "-", "@", "\t", "\r"))
    report = (out / "report.html").read_text()
    assert 'id="inputs"' in report and "p5_like.jpg" in report and "FIFO" in report


def test_all_captions_missing_runs_unconditionally_with_a_warning(tmp_path, tiny_model_dirs, caplog):
    p, u = tmp_path / "P", tmp_path / "U"
    for i in range(N):
        smooth_image(p / f"p{i}.png", seed=i)
        smooth_image(u / f"u{i}.png", seed=100 + i)
    out = tmp_path / "out"
    result = runner.invoke(app, ["audit", "--published", str(p), "--unpublished", str(u),
                                 "--model", str(tiny_model_dirs["sd"]), "--out", str(out), "--folds", "2",
                                 "--features", "denoising_loss", "--permutations", "0",
                                 "--sample-size-resamples", "0", "--batch-size", "8", "--device", "cpu",
                                 "--shift-encoder", "builtin"])
    assert result.exit_code == 0, result.output
    assert "no image has a caption" in caplog.text and "--captions auto" in caplog.text
    saved = json.loads((out / "result.json").read_text())
    assert saved["captions"]["conditioning"] == "unconditional"
    assert saved["captions"]["missing"] == {"published": N, "unpublished": N}


def test_inspect_shows_control_characters_as_escapes(folders, tmp_path):
    p, u = folders
    shutil.copyfile(p / "p1.png", p / "z\x1b[31mred\u202e.png")
    result = runner.invoke(app, ["inspect", "--published", str(p)])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\u202e" not in result.output
    assert "z\\x1b[31mred\\u202e.png" in result.output
