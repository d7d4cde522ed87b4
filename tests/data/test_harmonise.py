"""Harmonising web copies and originals (``cdi.data.harmonise``): probing, quality estimation, the plan,
the harmonised preprocessing, the encoding guard and what an audit records."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdi.utils.errors import CDIError
from cdi.data.harmonise import (
    estimate_quality,
    plan_harmonisation,
    probe_bytes,
    reencode_jpeg,
    standard_tables,
)
from cdi.data.preprocess import Preprocess, preprocess_image


def smooth_image(seed: int, size: tuple[int, int] = (32, 32)) -> Image.Image:
    """A smooth random RGB image (JPEG treats noise and smooth content differently; smooth is the usual case)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


# -- quality estimation ---------------------------------------------------------------

@pytest.mark.parametrize("quality", [5, 35, 50, 75, 85, 95, 100])
def test_quality_of_a_libjpeg_file_is_recovered_exactly(quality):
    probe = probe_bytes(encoded(smooth_image(0), "JPEG", quality=quality))
    assert (probe.format, probe.lossy, probe.quality, probe.standard_tables) == ("JPEG", True, quality, True)
    assert probe.subsampling == "4:2:0"  # Pillow's default


def test_subsampling_greyscale_and_foreign_tables():
    image = smooth_image(1)
    assert probe_bytes(encoded(image, "JPEG", quality=90, subsampling="4:4:4")).subsampling == "4:4:4"
    assert probe_bytes(encoded(image, "JPEG", quality=90, subsampling="4:2:2")).subsampling == "4:2:2"
    grey = probe_bytes(encoded(image.convert("L"), "JPEG", quality=70))
    assert (grey.quality, grey.subsampling) == (70, None)
    # Pillow's Photoshop-like "web_high" preset: not libjpeg's tables, estimated to the nearest standard quality
    foreign = probe_bytes(encoded(image, "JPEG", quality="web_high"))
    assert not foreign.standard_tables and 75 <= foreign.quality <= 95
    png = probe_bytes(encoded(image))
    assert (png.lossy, png.quality, png.subsampling, png.width, png.height) == (False, 100, None, 32, 32)


def test_standard_tables_follow_libjpeg_scaling():
    luma50, chroma50 = standard_tables(50)
    assert luma50[:4].tolist() == [16, 11, 10, 16] and chroma50[0] == 17  # Annex K tables at quality 50
    assert standard_tables(100)[0].max() == 1 and standard_tables(1)[0].max() == 255  # clipped (baseline)
    tables = {0: standard_tables(60)[0].tolist(), 1: standard_tables(60)[1].tolist()}
    assert estimate_quality(tables) == (60, True)
    tables[0][0] += 1  # one entry off: the nearest quality, not exact
    assert estimate_quality(tables) == (60, False)
    with pytest.raises(CDIError):
        estimate_quality({})


# -- the plan -------------------------------------------------------------------------

def probes(n: int, fmt: str = "PNG", size: tuple[int, int] = (32, 32), seed: int = 0, **options):
    return [probe_bytes(encoded(smooth_image(seed + i, size), fmt, **options)) for i in range(n)]


def test_web_copies_against_originals_are_reencoded_at_the_lower_quality():
    plan = plan_harmonisation(probes(5, "JPEG", quality=85), probes(5), 32)
    assert (plan.enabled, plan.jpeg_quality, plan.jpeg_subsampling, plan.working_size) == (True, 85, "4:2:0", None)
    assert plan.changes_input and "encodings differ" in plan.reasons[0]
    record = plan.to_dict()
    assert record["collections"]["published"]["formats"] == {"JPEG": 5}
    assert record["collections"]["unpublished"]["quality"] is None
    assert record["applied"] and record["jpeg_quality"] == 85
    json.dumps(record)  # JSON-able
    two_qualities = plan_harmonisation(probes(5, "JPEG", quality=95), probes(5, "JPEG", quality=80,
                                                                             subsampling="4:4:4"), 32)
    assert (two_qualities.jpeg_quality, two_qualities.jpeg_subsampling) == (80, "4:2:0")


def test_same_encodings_are_left_alone_and_smaller_web_copies_set_a_working_size():
    same = plan_harmonisation(probes(4), probes(4, seed=9), 32)
    assert not same.wanted and not same.changes_input and "nothing to harmonise" in same.reasons[0]
    assert same.apply(Preprocess(32)) == Preprocess(32)
    same_jpeg = plan_harmonisation(probes(4, "JPEG", quality=85), probes(4, "JPEG", seed=9, quality=85), 32)
    assert not same_jpeg.wanted
    smaller = plan_harmonisation(probes(4, "JPEG", size=(24, 30), quality=85), probes(4), 32)
    assert smaller.working_size == 24 and smaller.jpeg_quality == 85
    # both larger than the model's side: preprocessing brings both down to it, no working size
    assert plan_harmonisation(probes(4, size=(48, 48)), probes(4, size=(64, 64)), 32).working_size is None


def test_no_harmonise_records_the_decision_and_changes_nothing():
    plan = plan_harmonisation(probes(5, "JPEG", quality=85), probes(5), 32, enabled=False)
    assert plan.wanted and not plan.changes_input and plan.jpeg_quality == 85
    assert plan.apply(Preprocess(32)) == Preprocess(32)
    assert "--no-harmonise" in plan.reasons[-1] and plan.to_dict()["applied"] is False


# -- the harmonised preprocessing -----------------------------------------------------

def pixels(data: bytes, pre: Preprocess) -> np.ndarray:
    return preprocess_image(Image.open(io.BytesIO(data)), pre).numpy()


def test_harmonised_preprocessing_reencodes_originals_and_leaves_matching_jpegs():
    image = smooth_image(3)
    pre = Preprocess(32, jpeg_quality=85, jpeg_subsampling="4:2:0")
    web = encoded(image, "JPEG", quality=85)
    assert np.array_equal(pixels(web, pre), pixels(web, Preprocess(32)))  # already that JPEG: one generation
    original = encoded(image)
    by_hand = encoded(reencode_jpeg(image, 85, "4:2:0"))
    assert np.array_equal(pixels(original, pre), pixels(by_hand, Preprocess(32)))
    assert np.array_equal(pixels(original, pre), pixels(web, pre))  # libjpeg is deterministic: same pixels
    other = encoded(image, "JPEG", quality=95)  # another quality: re-encoded like the original
    assert not np.array_equal(pixels(other, pre), pixels(other, Preprocess(32)))


# Foreign tables (one export setting that is not libjpeg's, as Photoshop's): flat-ish tables no libjpeg quality has.
FOREIGN = ([3 + i // 8 for i in range(64)], [5 + i // 4 for i in range(64)])


def test_one_set_of_foreign_tables_is_what_the_plan_reencodes_with():
    plan = plan_harmonisation(probes(5, "JPEG", qtables=FOREIGN, subsampling="4:4:4"), probes(5), 32)
    assert plan.jpeg_tables == tuple(tuple(t) for t in FOREIGN) and plan.jpeg_subsampling == "4:4:4"
    assert plan.jpeg_quality == probe_bytes(encoded(smooth_image(0), "JPEG", qtables=FOREIGN)).quality  # estimate
    assert "published collection's own quantisation tables (not libjpeg's)" in plan.reasons[0]
    record = plan.to_dict()
    assert record["jpeg_tables"] == [list(t) for t in FOREIGN] and record["jpeg_tables_of"] == "published"
    json.dumps(record)
    pre = plan.apply(Preprocess(32))
    assert pre.jpeg_tables == plan.jpeg_tables and pre.record()["jpeg_tables"] == plan.jpeg_tables  # in the store key
    assert pre.record() != Preprocess(32, jpeg_quality=plan.jpeg_quality, jpeg_subsampling="4:4:4").record()
    assert Preprocess(**json.loads(json.dumps(pre.record()))) == pre  # as a feature table's provenance gives it back
    # libjpeg's own tables, or two export settings: libjpeg's tables at the estimated quality, as before
    assert plan_harmonisation(probes(5, "JPEG", quality=85), probes(5), 32).jpeg_tables is None
    mixed = plan_harmonisation(probes(3, "JPEG", qtables=FOREIGN, subsampling="4:4:4")
                               + probes(2, "JPEG", seed=7, quality="web_high"), probes(5), 32)
    assert mixed.jpeg_tables is None and "at quality" in mixed.reasons[0] and mixed.to_dict()["jpeg_tables"] is None
    assert mixed.jpeg_subsampling == "4:4:4" and mixed.apply(Preprocess(32)).jpeg_tables is None
    with pytest.raises(CDIError):
        Preprocess(32, jpeg_tables=FOREIGN)  # tables without a quality and subsampling


def test_foreign_tables_reencode_originals_exactly_and_leave_the_copies_as_they_are():
    image = smooth_image(5)
    web = encoded(image, "JPEG", qtables=FOREIGN, subsampling="4:4:4")
    plan = plan_harmonisation([probe_bytes(web)], [probe_bytes(encoded(smooth_image(6)))], 32)
    pre = plan.apply(Preprocess(32))
    assert np.array_equal(pixels(web, pre), pixels(web, Preprocess(32)))  # already those tables: one generation
    original = encoded(image)
    by_hand = encoded(image, "JPEG", qtables=FOREIGN, subsampling="4:4:4")  # saved with those tables directly
    assert np.array_equal(pixels(original, pre), pixels(by_hand, Preprocess(32)))
    assert np.array_equal(pixels(original, pre), pixels(web, pre))  # one identical generation for both
    assert np.array_equal(np.asarray(reencode_jpeg(image, plan.jpeg_quality, "4:4:4", FOREIGN)),
                          np.asarray(Image.open(io.BytesIO(by_hand)).convert("RGB")))
    # the same tables at another subsampling, or libjpeg's tables at the estimated quality: re-encoded
    for other in (encoded(image, "JPEG", qtables=FOREIGN, subsampling="4:2:0"),
                  encoded(image, "JPEG", quality=plan.jpeg_quality, subsampling="4:4:4")):
        assert not np.array_equal(pixels(other, pre), pixels(other, Preprocess(32)))


def test_the_report_names_the_foreign_tables():
    from types import SimpleNamespace

    from cdi.reports.html import _environment

    plan = plan_harmonisation(probes(3, "JPEG", qtables=FOREIGN, subsampling="4:4:4"), probes(3), 32)
    record = {**plan.to_dict(), "encoding_guard": None, "risk": None}
    html = _environment().get_template("harmonisation.html.j2").render(r=SimpleNamespace(harmonisation=record))
    assert (f"JPEG with the published collection's own quantisation tables (not libjpeg's; estimated quality "
            f"{plan.jpeg_quality}) with 4:4:4") in html


def test_working_size_is_passed_through_before_the_model_resolution():
    image = smooth_image(4, (40, 40))
    pre = Preprocess(32, working_size=20)
    by_hand = image.resize((20, 20), Image.Resampling.BICUBIC).resize((32, 32), Image.Resampling.BICUBIC)
    assert np.array_equal(pixels(encoded(image), pre), pixels(encoded(by_hand), Preprocess(32)))


def test_preprocess_record_keeps_old_keys_and_harmonisation_changes_them():
    assert Preprocess(32).record() == {"resolution": 32, "channels": 3, "crop": "center", "resample": "bicubic"}
    harmonised = Preprocess(32, jpeg_quality=85, jpeg_subsampling="4:2:0")
    assert harmonised.harmonised and harmonised.record()["jpeg_quality"] == 85
    for bad in (dict(jpeg_quality=0, jpeg_subsampling="4:2:0"), dict(jpeg_quality=85),
                dict(jpeg_quality=85, jpeg_subsampling="4:1:1"), dict(working_size=0)):
        with pytest.raises(CDIError):
            Preprocess(32, **bad)


# -- the encoding guard ---------------------------------------------------------------

def test_encoding_descriptors_and_guard():
    from cdi.data.descriptors import ENCODING_COLUMNS, encoding_descriptors
    from cdi.data.shift_guard import encoding_guard

    web, originals = probes(20, "JPEG", quality=85), probes(20, seed=50)
    rows = encoding_descriptors(web[:1] + originals[:1])
    assert dict(zip(ENCODING_COLUMNS, rows[0])) == {"lossy": 1.0, "jpeg_quality": 85.0, "chroma_subsampling": 2.0,
                                                   "palette": 0.0, "log2_short_side": 5.0, "aspect_ratio": 1.0}
    assert rows[1].tolist() == [0.0, 100.0, 0.0, 0.0, 5.0, 1.0]
    unharmonised = encoding_guard(web, originals, alpha=0.05, harmonised=False)
    assert unharmonised.detected and unharmonised.blocks_verdict and "turned off" in unharmonised.note
    harmonised = encoding_guard(web, originals, alpha=0.05, harmonised=True)
    assert harmonised.detected and not harmonised.blocks_verdict
    assert harmonised.to_dict()["means"]["lossy"] == {"published": 1.0, "unpublished": 0.0}
    same = encoding_guard(originals[:10], originals[10:], alpha=0.05, harmonised=False)
    assert same.p_value == 1.0 and not same.detected


def test_an_unharmonised_encoding_difference_makes_the_verdict_inconclusive():
    from cdi.audit.analysis import decide_verdict, inconclusive_reason

    assert decide_verdict("used", None, ignore_shift=False, encoding_blocks=True) == "inconclusive"
    assert decide_verdict("used", None, ignore_shift=True, encoding_blocks=True) == "used"
    assert decide_verdict("not_detected", None, ignore_shift=False) == "not_detected"
    assert inconclusive_reason("inconclusive", None, ignore_shift=False, encoding_blocks=True) == "encoding"
    assert inconclusive_reason("inconclusive", None, ignore_shift=False) == "direction"


# -- an audit records it --------------------------------------------------------------

def web_folders(root: Path, n: int = 12) -> tuple[Path, Path]:
    published, unpublished = root / "published", root / "unpublished"
    for folder in (published, unpublished):
        folder.mkdir(parents=True)
    for i in range(n):
        (published / f"web_{i:02d}.jpg").write_bytes(encoded(smooth_image(i, (20, 20)), "JPEG", quality=85))
        (unpublished / f"orig_{i:02d}.png").write_bytes(encoded(smooth_image(100 + i, (20, 20))))
    return published, unpublished


def test_audit_records_harmonisation_and_no_harmonise_says_what_it_risks(tmp_path, tiny_adapters):
    import torch

    import cdi

    published, unpublished = web_folders(tmp_path)
    options = dict(features="denoising_loss", folds=2, permutations=0, sample_size_resamples=0,
                   shift_encoder="builtin", batch_size=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = cdi.api.audit(published, unpublished, tiny_adapters["sd"], **options)
        plain = cdi.api.audit(published, unpublished, tiny_adapters["sd"], no_harmonise=True, **options)
    finally:
        torch.set_num_threads(threads)
    record = result.harmonisation
    assert record["applied"] and record["jpeg_quality"] == 85 and record["risk"] is None
    assert record["preprocess"]["jpeg_quality"] == 85  # part of the store key (features.extract.model_key)
    assert record["collections"]["published"]["formats"] == {"JPEG": 12}
    assert record["encoding_guard"]["detected"] and not record["encoding_guard"]["blocks_verdict"]
    assert plain.harmonisation["applied"] is False and "encoding" in plain.harmonisation["risk"]
    assert "jpeg_quality" not in plain.harmonisation["preprocess"]
    assert plain.verdict == "inconclusive"  # an encoding difference nobody harmonised
    assert [s.score for s in result.scores] != [s.score for s in plain.scores]  # the model saw other pixels
    assert json.loads(result.to_json())["harmonisation"]["jpeg_subsampling"] == "4:2:0"
    from cdi.reports.html import render_report

    html, plain_html = render_report(result), render_report(plain)
    assert "re-encoded once as JPEG at quality 85 with 4:2:0" in html and "harmonisation-risk" not in html
    assert 'id="harmonisation-risk"' in plain_html and "not harmonised, section 5" in plain_html


# -- the web-copy null on stored features ------------------------------------------------
#
# tests/data/toy_sd_light_web_features.csv and tests/data/toy_sd_light_webhigh_features.csv hold the default
# features (cdi+clid+sima, seed 0) of the light toy world's non-members as an audit of web copies against
# originals computes them, made by
#
#     python benchmarks/web_copies.py extract --out tests/data/toy_sd_light_web_features.csv
#     python benchmarks/web_copies.py extract --quality web_high --out tests/data/toy_sd_light_webhigh_features.csv
#
# web: libjpeg quality-85 copies (left as they are), originals re-encoded once at quality 85, 4:2:0;
# webhigh: copies with Pillow's Photoshop-like "web_high" tables (4:4:4, estimated quality 85): the copies are
# left as they are and the originals are re-encoded once with the copies' own tables at 4:4:4 (regenerated in
# session 6, when the plan learnt to use a collection's own tables; before, both got one more generation at
# libjpeg quality 85 and the copies were compressed twice).

DATA = Path(__file__).parent


@pytest.fixture(scope="module")
def web_module():
    import sys

    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    import web_copies

    return web_copies


@pytest.mark.parametrize("table,n", [("web", 100), ("webhigh", 100), ("webhigh", 300)])
def test_harmonised_web_copies_of_nonmembers_are_not_used_more_often_than_alpha(web_module, table, n):
    """P = web copies of n non-members, U = n other non-members (harmonised): 100 pooled verdicts per case
    (300 in the benchmark) reject at most at the nominal rate (the count at or below the top of
    Binomial(100, alpha)'s central 99% interval). A rejection is necessary for `used`, so this bounds the
    `used` rate."""
    from scipy import stats

    from cdi.features.registry import directions_of, resolve_features

    pools = web_module.load_pools(DATA / f"toy_sd_light_{table}_features.csv")
    assert pools["web"].shape == pools["harmonised"].shape == (899, 35)
    directions = directions_of(resolve_features("cdi+clid+sima"))
    p, _ = web_module.null_draws(pools["web"], pools["harmonised"], n, 100, seed=1000 + n, directions=directions)
    for alpha in (0.05, 0.01):
        assert (p < alpha).sum() <= stats.binom.ppf(0.995, len(p), alpha), (alpha, (p < alpha).sum())
