"""The command-line messages of issue 22's cross-examination (its "What was found", item 8), one test each.

Each test runs the command (or the function that words the message) the way the reviewer did and checks
the message they would now read.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cdi.cli.main import app
from test_cli_inputs import folders  # noqa: F401 - the fixture: 3 + 2 small images
from test_data import save_image  # the image builders of the unit tests

runner = CliRunner()


def flat(text: str) -> str:
    """Console output as one line: rich's boxes and line wrapping removed."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.fixture
def two_folders(folders):
    """A folder of 3 small images and one of 2 (``test_cli_inputs.folders``)."""
    return folders[0], folders[1]


def test_inspect_takes_the_folder_as_an_argument(two_folders):
    published, _ = two_folders
    shown = runner.invoke(app, ["inspect", str(published), "--format", "json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["published"]["images"] == 3
    alone = runner.invoke(app, ["inspect"])
    assert alone.exit_code == 2 and "cdi inspect FOLDER" in flat(alone.output)
    twice = runner.invoke(app, ["inspect", str(published), "--published", str(published)])
    assert twice.exit_code == 2 and "give the folder once" in flat(twice.output)


def test_shift_accepts_the_audit_names_and_names_its_own(two_folders):
    published, _ = two_folders
    shown = runner.invoke(app, ["shift", "--published", str(published)])
    assert shown.exit_code == 2
    assert "No such option" not in shown.output and "'--b' / '--unpublished'" in flat(shown.output)
    text = runner.invoke(app, ["shift", "--help"], terminal_width=200).stdout
    assert "--a" in text and "--published" in text and "--unpublished" in text


@pytest.mark.parametrize("command", [[], ["demo"], ["audit"], ["inspect"], ["verify"], ["toy", "build"]])
def test_help_shows_no_type_on_plain_flags(command):
    text = runner.invoke(app, command + ["--help"], terminal_width=200).stdout
    assert "--help" in text and "<bool>" not in text


def test_a_value_after_a_flag_says_how_flags_are_written():
    shown = runner.invoke(app, ["demo", "--null", "true"])
    assert shown.exit_code == 2
    assert "--null is a switch and takes no value" in flat(shown.output) and "alone" in flat(shown.output)
    other = runner.invoke(app, ["demo", "--out", "x", "stray"])  # a stray word that is no boolean: click's message
    assert other.exit_code == 2 and "switch" not in other.output


def test_audit_without_options_lists_everything_missing():
    shown = runner.invoke(app, ["audit"])
    assert shown.exit_code == 2
    assert "missing --published, --unpublished, --model, --out" in flat(shown.output)
    tables = runner.invoke(app, ["audit", "--published-features", "p.csv"])
    assert "missing --unpublished-features, --out" in flat(tables.output)


def test_robustness_line_when_no_size_reaches_the_share():
    from cdi.cli.common import robustness_line
    from cdi.audit.result import SampleSizeCurve

    curve = SampleSizeCurve(sizes=[30, 60, 150], median_p=[0.5, 0.3, 0.1], share_significant=[0.0, 0.1, 0.4],
                            n_needed=None, target_share=0.9, resamples=50, alpha=0.01)
    line = robustness_line(curve)
    assert "no size tried" in line and "up to 150 published images" in line and "from no size" not in line
    curve.n_needed = 60
    assert robustness_line(curve).endswith("90% of subsets significant from 60 published images on")


def test_unusable_files_message_names_no_python_argument(two_folders):
    published, _ = two_folders
    (published / "cut.png").write_bytes((published / "p0.png").read_bytes()[:40])
    shown = runner.invoke(app, ["inspect", str(published)])
    assert shown.exit_code == 2 and "--skip-bad" in shown.output
    assert "skip_bad" not in shown.output and "max_pixels" not in shown.output


def test_a_tampered_table_is_not_answered_with_advice_to_delete_its_record(tmp_path):
    from cdi.utils.errors import CDIError
    from cdi.engine.table import FeatureTable

    table = FeatureTable(["a.png"], ["0" * 64], [None], ["x"], np.array([[1.0]]), {})
    path = table.to_csv(tmp_path / "features.csv")
    path.write_text(path.read_text().replace("1.0", "2.0"))
    with pytest.raises(CDIError) as caught:
        FeatureTable.from_csv(path)
    message = str(caught.value)
    assert "modified after it was written" in message and "re-run the extraction" in message
    assert "delete" not in message


def test_shift_warns_once_about_clip(two_folders, monkeypatch, caplog):
    import cdi.data.shift_guard

    def not_cached(*args, **kwargs):
        raise OSError("not in the cache")

    monkeypatch.setattr(cdi.data.shift_guard, "load_clip", not_cached)
    published, unpublished = two_folders
    with caplog.at_level(logging.WARNING, logger="cdi"):
        shown = runner.invoke(app, ["shift", "--a", str(published), "--b", str(unpublished), "--format", "json"])
    assert shown.exit_code == 0, shown.output
    warnings = [r for r in caplog.records if "not in the local cache" in r.getMessage()]
    assert len(warnings) == 1


def test_singular_covariance_note_says_why_and_what_to_do():
    from cdi.attacks.shift import singular_covariance_note

    rng = np.random.default_rng(0)
    few = singular_covariance_note(rng.normal(size=(5, 20)), rng.normal(size=(5, 20)), 1e-3)
    assert "10 images for 20 dimensions" in few and "at least 22 images" in few
    flat = rng.normal(size=(300, 4)) @ rng.normal(size=(4, 12))  # 12 dimensions spanning 4
    collinear = singular_covariance_note(flat[:150], flat[150:], 1e-3)
    assert "more images (300) than dimensions (12)" in collinear and "span only 4 of their 12" in collinear
    assert "More images do not change this" in collinear and "use more images than dimensions" not in collinear


def test_ray_help_and_error_name_the_extra(monkeypatch):
    text = flat(runner.invoke(app, ["audit", "--help"]).stdout)
    assert 'pip install "cdi[ray]"' in text
    from cdi.engine.distributed import import_ray
    from cdi.utils.errors import CDIError

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(CDIError, match=r"cdi\[ray\]"):
        import_ray()


def test_every_left_out_file_is_named_first_few_with_the_count(tmp_path, capsys):
    from types import SimpleNamespace

    from cdi.cli.common import LEFT_OUT_NAMED, _print_left_out
    from cdi.data.collection import ImageCollection

    folder = tmp_path / "P"
    for i in range(2):
        save_image(folder / f"p{i}.png", seed=i)
    (folder / "z_copy.png").write_bytes((folder / "p0.png").read_bytes())
    (folder / "note.dat").write_text("not an image")
    log = ImageCollection.from_folder(folder, name="published").file_log()
    _print_left_out(SimpleNamespace(inputs={"published": {"files": log}}))
    err = flat(capsys.readouterr().err)
    assert "published: 2 file(s) left out" in err and "result.json" in err
    assert "z_copy.png (same file as p0.png)" in err and "note.dat (not an image" in err
    for i in range(LEFT_OUT_NAMED + 2):
        (folder / f"note{i}.dat").write_text("not an image")
    log = ImageCollection.from_folder(folder, name="published").file_log()
    _print_left_out(SimpleNamespace(inputs={"published": {"files": log}}))
    err = flat(capsys.readouterr().err)
    assert f"published: {LEFT_OUT_NAMED + 4} file(s) left out" in err and "and 4 more" in err


def test_heic_is_read_with_the_plugin(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    from PIL import Image

    from cdi.data.collection import ImageCollection

    pillow_heif.register_heif_opener()
    folder = tmp_path / "phone"
    folder.mkdir()
    Image.new("RGB", (32, 24), (200, 30, 40)).save(folder / "IMG_0001.HEIC", format="HEIF", quality=90)
    save_image(folder / "b.png", seed=1)
    collection = ImageCollection.from_folder(folder)
    assert [r.path for r in collection.records] == ["IMG_0001.HEIC", "b.png"]
    assert (collection.records[0].width, collection.records[0].height) == (32, 24)


def test_avif_is_read_by_pillow(tmp_path):
    from PIL import Image, features

    from cdi.data.collection import ImageCollection

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF codec")
    folder = tmp_path / "phone"
    folder.mkdir()
    Image.new("RGB", (32, 24), (20, 130, 40)).save(folder / "a.avif", quality=90)
    assert [r.path for r in ImageCollection.from_folder(folder).records] == ["a.avif"]


def test_heic_without_the_plugin_is_refused_saying_how_to_read_it(tmp_path, monkeypatch):
    import cdi.data.image_files

    folder = tmp_path / "phone"
    save_image(folder / "a.png", seed=0)
    (folder / "IMG_0002.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    without = cdi.data.image_files.image_extensions() - {".heic", ".heif", ".hif"}
    monkeypatch.setattr(cdi.data.image_files, "image_extensions", lambda: without)
    shown = runner.invoke(app, ["inspect", str(folder)])
    assert shown.exit_code == 2
    text = flat(shown.output)
    assert "IMG_0002.heic" in text and 'pip install "cdi[heif]"' in text and "Corrupt" not in text
    skipped = runner.invoke(app, ["inspect", str(folder), "--skip-bad", "--format", "json"])
    assert skipped.exit_code == 0, skipped.output
    reason = json.loads(skipped.stdout)["published"]["skipped_files"][0]["reason"]
    assert "HEIC photo" in reason and "cdi[heif]" in reason
