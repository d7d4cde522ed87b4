"""The evidence report: one self-contained HTML file rendered from an ``AuditResult``.

The file explains itself to a reader who is not a statistician (the verdict
in plain words, the exact claim beside it, what the assumptions are) and lets
anyone check and reproduce it (every number, parameter, version, image hash
and the command). It needs nothing but itself: CSS is inline, plots are inline
SVG, optional thumbnails are data URIs, and a Content-Security-Policy forbids
every network load. The one inline script (table sorting, opening the manifest
for printing) is allowed by its SHA-256 in that policy, so no other script
could run even if one slipped into the page; the report is complete with
scripts disabled.

Rendering is a pure function of the result: the same ``result.json`` gives a
byte-identical file with the same cdi version. User-supplied strings (paths,
captions, model ids, parameters, the command) only ever reach the page
through Jinja's autoescaping, never through plots.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup, escape

from cdi import __version__
from cdi.utils.errors import CDIError
from cdi.utils.io import atomic_write_text
from cdi.audit.folder import finish_swap
from cdi.audit.result import REPORT_FILE, RESULT_FILE, AuditResult
from cdi.reports import plots, text

TEMPLATES = Path(__file__).parent / "templates"
TEMPLATE = "report.html.j2"
SCRIPT = "report.js"
COLLECTIONS = ("published", "unpublished")
THUMBNAIL_SIZE = 64  # pixels, longer side
_IMAGE_TYPES = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg"}

VERDICT_LABEL = {
    "used": "Evidence of use found",
    "not_detected": "No evidence of use found",
    "inconclusive": "Inconclusive",
}


class ReportWarning(UserWarning):
    """Something the report had to leave out (for example a thumbnail whose file changed)."""


def render_report(
    result: AuditResult, *, thumbnails: dict[str, list[tuple[str, bytes]]] | None = None,
    result_sha256: str | None = None,
) -> str:
    """Render the evidence report of an audit as one self-contained HTML document.

    Parameters
    ----------
    result : AuditResult
        The audit's result, as written to ``result.json``.
    thumbnails : dict, optional
        ``{"published": [(path, image_bytes), ...], "unpublished": [...]}``:
        small PNG or JPEG images embedded as data URIs, labelled by their
        path. Build them with :func:`load_thumbnails`.
    result_sha256 : str, optional
        SHA-256 of the ``result.json`` bytes the report is rendered from,
        shown in the report (and in a ``cdi-result-sha256`` meta tag) so
        that ``cdi verify`` can tell whether report and result belong
        together. Default: the hash of ``result.to_bytes()``, what
        ``AuditResult.save`` writes.

    Returns
    -------
    str
        The HTML. The same arguments always give the same string.
    """
    published = _scores(result, "published")
    unpublished = _scores(result, "unpublished")
    figures = {}
    if published.size and unpublished.size:
        figures["scores"] = Markup(plots.score_distribution_svg(published, unpublished))
        figures["roc"] = Markup(plots.roc_svg(published, unpublished))
    effects = (result.feature_effects or {}).get("features") or []
    if effects:
        figures["effects"] = Markup(plots.feature_effects_svg(
            [text.column_label(e["column"]) for e in effects], [e["d"] for e in effects],
            [e["low"] for e in effects], [e["high"] for e in effects],
            [e["direction"] != 0 for e in effects]))
    curve = result.sample_size_curve
    if curve is not None and curve.sizes:
        figures["pcurve"] = Markup(plots.pvalue_curve_svg(
            curve.sizes, curve.median_p, curve.share_significant, alpha=curve.alpha,
            target_share=curve.target_share, n_needed=curve.n_needed,
        ))
    script = (TEMPLATES / SCRIPT).read_text(encoding="utf-8")
    script_hash = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    template = _environment().get_template(TEMPLATE)
    return template.render(
        r=result,
        verdict_label=VERDICT_LABEL[result.verdict],
        verdict_test=_verdict_test(result),
        protocol_name=_protocol_name(result),
        permutation_floor=_permutation_floor(result),
        in_test={c: sum(s.collection == c and s.in_test for s in result.scores) for c in COLLECTIONS},
        figures=figures,
        numbers=number_rows(result),
        blocks=_block_rows(result),
        parts=verdict_parts(result),
        prior_families=_prior_families(result),
        effects=_effect_rows(result),
        families=_family_weights(result) if _learned_scorer(result) else [],
        measured=_measured_families(result),
        shift_fallback=_shift_fallback(result),
        shift_encoder_words=_shift_encoder_words(result),
        settings=text.settings_rows(result.parameters, protocol=_protocol_name(result)),
        timings=text.timing_rows(result.timings),
        software=_software(result.environment),
        seed_words=text.plain_field_names(str(result.protocol.get("seed_dependence") or "")),
        glossary=text.glossary(_protocol_name(result)),
        terms=text.glossary_terms,
        verdict_test_term=_verdict_test(result).capitalize(),
        numbers_terms=text.glossary_terms(*NUMBER_TERMS.get(_protocol_name(result), NUMBER_TERMS[""])),
        protocol_words=PROTOCOL_WORDS.get(_protocol_name(result), "test"),
        score_words=_score_words(result),
        manifest_note=_manifest_note(result),
        caption_chars=CAPTION_CHARS,
        thumbnails=_thumbnail_uris(thumbnails or {}),
        script=Markup(script),
        script_hash=script_hash,
        renderer_version=__version__,
        result_file=RESULT_FILE,
        result_sha256=result_sha256 or hashlib.sha256(result.to_bytes()).hexdigest(),
    )


def write_report(
    folder: str | Path,
    result: AuditResult | None = None,
    *,
    thumbnails_n: int = 0,
    published_dir: str | Path | None = None,
    unpublished_dir: str | Path | None = None,
) -> Path:
    """Write ``report.html`` into an audit folder, atomically.

    Parameters
    ----------
    folder : path
        The audit folder (or its ``result.json``).
    result : AuditResult, optional
        The result to render; read from ``folder/result.json`` when omitted.
    thumbnails_n : int
        Embed up to this many thumbnails per collection; needs the image
        folders. Images whose file no longer matches the SHA-256 recorded in
        the result are left out with a :class:`ReportWarning`.
    published_dir, unpublished_dir : path, optional
        The collection folders the audit read (image paths in the result are
        relative to them).

    Returns
    -------
    Path
        The report's path.
    """
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    result_sha256 = None
    if result is None:
        finish_swap(folder)
        data = (folder / RESULT_FILE).read_bytes() if (folder / RESULT_FILE).is_file() else b""
        result = AuditResult.load(folder)
        result_sha256 = hashlib.sha256(data).hexdigest()
    if thumbnails_n < 0:
        raise CDIError(f"the number of thumbnails must be 0 or more, got {thumbnails_n}")
    thumbnails = None
    if thumbnails_n > 0:
        thumbnails = load_thumbnails(
            result, thumbnails_n, {"published": published_dir, "unpublished": unpublished_dir}
        )
    html = render_report(result, thumbnails=thumbnails, result_sha256=result_sha256)
    path = folder / REPORT_FILE
    atomic_write_text(path, html)
    return path


def load_thumbnails(
    result: AuditResult,
    n: int,
    folders: Mapping[str, str | Path | None],
    *,
    size: int = THUMBNAIL_SIZE,
) -> dict[str, list[tuple[str, bytes]]]:
    """Small JPEG thumbnails of the first ``n`` images of each collection, in manifest order.

    Each file is read once and its SHA-256 compared with the one recorded in
    the result; files that are missing, changed or unreadable are skipped
    (one :class:`ReportWarning` per collection names them) and the next image
    takes their place.

    Parameters
    ----------
    result : AuditResult
    n : int
        Thumbnails per collection.
    folders : mapping
        ``{"published": folder, "unpublished": folder}``; a collection whose
        folder is None gets no thumbnails. At least one folder is needed.
    size : int
        Longer side of a thumbnail in pixels.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not any(folders.get(c) is not None for c in COLLECTIONS):
        raise CDIError(
            "thumbnails need the image folders: pass --published and/or --unpublished "
            "(the folders the audit read)"
        )
    thumbnails: dict[str, list[tuple[str, bytes]]] = {}
    for collection in COLLECTIONS:
        if folders.get(collection) is None:
            continue
        root = Path(folders[collection])
        if not root.is_dir():
            raise CDIError(f"the {collection} image folder {root} does not exist or is not a folder")
        chosen: list[tuple[str, bytes]] = []
        skipped: list[str] = []
        for image in result.scores:
            if len(chosen) >= n:
                break
            if image.collection != collection:
                continue
            try:
                data = (root / image.path).read_bytes()
            except OSError:
                skipped.append(f"{image.path} (missing)")
                continue
            if hashlib.sha256(data).hexdigest() != image.sha256:
                skipped.append(f"{image.path} (SHA-256 differs from the audited file)")
                continue
            try:
                with Image.open(io.BytesIO(data)) as img:
                    img.draft("RGB", (2 * size, 2 * size))
                    img = ImageOps.exif_transpose(img)
                    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                        img = img.convert("RGBA")
                        background = Image.new("RGBA", img.size, "white")
                        img = Image.alpha_composite(background, img)
                    img = img.convert("RGB")
                    img.thumbnail((size, size), Image.Resampling.LANCZOS)
                    out = io.BytesIO()
                    img.save(out, format="JPEG", quality=85)
            except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
                skipped.append(f"{image.path} (cannot be decoded: {exc})")
                continue
            chosen.append((image.path, out.getvalue()))
        if skipped:
            shown = "; ".join(skipped[:5]) + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "")
            warnings.warn(
                f"{len(skipped)} {collection} image(s) left out of the thumbnails: {shown}",
                ReportWarning,
                stacklevel=2,
            )
        thumbnails[collection] = chosen
    return thumbnails


# ------------------------------------------------------------------ helpers
def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["p"] = format_p
    env.filters["fixed"] = format_fixed
    env.filters["scalar"] = format_scalar
    env.filters["percent"] = lambda x: "n/a" if not _is_number(x) else f"{100 * x:.0f}%"
    env.tests["number"] = _is_number
    return env


def format_p(p: float | None, log10: float | None = None) -> Markup:
    """A p-value for people: 0.0123, 3.2 × 10⁻⁵ (as HTML), or n/a.

    A p-value that underflowed to 0 is written from its base-10 logarithm
    when the result carries one, else as an upper bound.
    """
    if not _is_number(p):
        return Markup("n/a")
    if p == 0:
        if not _is_number(log10):
            return Markup("&lt; 10<sup>&minus;300</sup>")
        exponent = math.floor(log10)
        mantissa = 10 ** (log10 - exponent)
        if round(mantissa, 2) >= 10:
            mantissa, exponent = 1.0, exponent + 1
        return Markup(f"{mantissa:.2f} &times; 10<sup>&minus;{-exponent}</sup>")
    if p >= 0.001:
        return Markup(escape(f"{p:.3g}"))
    mantissa, exponent = f"{p:.2e}".split("e")
    return Markup(f"{escape(mantissa)} &times; 10<sup>&minus;{int(exponent[1:])}</sup>")


def format_fixed(x: float | None, digits: int = 3) -> str:
    """A number with ``digits`` decimals, or n/a for a missing or non-finite value."""
    return f"{x:.{digits}f}" if _is_number(x) else "n/a"


def format_scalar(value: Any) -> str:
    """A parameter value written exactly: floats round-trip, booleans and None as JSON spells them."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _scores(result: AuditResult, collection: str) -> np.ndarray:
    """The scores of one collection that entered the verdict's test."""
    values = [s.score for s in result.scores if s.collection == collection and s.in_test]
    return np.array([v for v in values if _is_number(v)], dtype=float)


#: Captions longer than this are cut in the manifest (the full caption is in result.json).
CAPTION_CHARS = 48

#: The protocol that ran, in words.
PROTOCOL_WORDS = {"pooled": "pooled test", "sequential": "sequential test", "crossfit": "cross-fitted test"}

#: Glossary terms the numbers table uses, per protocol ("" for an unknown protocol).
NUMBER_TERMS = {
    "pooled": ("Normal scores", "Known member directions", "Student's t-test", "Rao's F-test", "Stouffer's method",
               "Degrees of freedom", "Permutation test", "Effect size", "AUC"),
    "sequential": ("Normal scores", "Known member directions", "Stouffer's method", "Degrees of freedom",
                   "Permutation test", "Effect size", "AUC"),
    "crossfit": ("Degrees of freedom", "Permutation test", "Effect size", "AUC"),
    "": ("Permutation test", "Effect size", "AUC"),
}

#: Test names of ``protocol["verdict_test"]`` for people (each is in the glossary).
TEST_NAMES = {"pooled t+F": "pooled test", "t-test": "sequential test", "permutation": "permutation test"}


def _protocol_name(result: AuditResult) -> str:
    """``pooled``, ``sequential`` or ``crossfit``; an unknown or missing name is returned as it is."""
    return str(result.protocol.get("name") or "")


def _learned_scorer(result: AuditResult) -> bool:
    """Whether a scoring model was fitted (sequential and crossfit protocols; never under pooled)."""
    return _protocol_name(result) != "pooled"


def _verdict_test(result: AuditResult) -> str:
    """Name of the test whose p-value is the verdict's (``protocol["verdict_test"]`` when given)."""
    named = result.protocol.get("verdict_test")
    if isinstance(named, str) and named:
        if named == "t-test" and _protocol_name(result) != "sequential":
            return "t-test"
        return TEST_NAMES.get(named, named)
    if result.p_value_permutation is not None and result.p_value == result.p_value_permutation:
        return "permutation test"
    if result.p_value == result.p_value_ttest:
        return "t-test"
    return "the protocol's test (see section 6)"


def _permutation_floor(result: AuditResult) -> int | None:
    """The number of permutations B when the permutation p-value is at its floor 1/(B+1)."""
    permutations = result.protocol.get("permutations")
    p = result.p_value_permutation
    if not isinstance(permutations, int) or permutations <= 0 or not _is_number(p):
        return None
    return permutations if p <= (1 + 1e-9) / (permutations + 1) else None


def _p_markup(p: float | None, log_p: float | None = None) -> Markup:
    """A p-value given by its natural logarithm (precise below 1e-308), or by itself."""
    if _is_number(log_p):
        return format_p(math.exp(log_p), log_p / math.log(10.0))
    return format_p(p)


def _row(label: str, value: Any, meaning: str, field: str, kind: str) -> dict[str, Any]:
    """One row of "The numbers": ``field`` is the result.json path of the value, ``kind`` how it is written."""
    return {"label": label, "value": value, "meaning": meaning, "field": field, "kind": kind}


def number_rows(result: AuditResult) -> list[dict[str, Any]]:
    """The rows of "The numbers" for the protocol that ran, each labelled for what it is.

    Every value comes from one ``result.json`` field (``field``, a dotted
    path) written as ``kind`` says: ``p`` (a p-value, with ``log10`` the
    field of its base-10 logarithm), ``lnp`` (a p-value stored as its natural
    logarithm), ``fixed2``/``fixed3``/``int`` (a number) or ``scalar``.
    Tests render each protocol and check every row against the result.
    """
    protocol = _protocol_name(result)
    proto = result.protocol
    rows = []
    verdict_test = _verdict_test(result)
    rows.append(_row("verdict p-value", format_p(result.p_value, proto.get("verdict_log10_p")),
                     "probability of a difference this large if the published images were not used, from the "
                     f"{verdict_test}; the verdict compares it with α", "p_value", "p"))
    rows.append(_row("significance level α", format_scalar(result.alpha),
                     "the largest probability of a false accusation accepted before the audit was run",
                     "alpha", "scalar"))
    pooled = proto.get("pooled") if isinstance(proto.get("pooled"), Mapping) else None
    draws = int(pooled.get("noise_draws") or 1) if protocol == "pooled" and pooled is not None else 1
    if protocol == "pooled" and pooled is not None:
        df = pooled.get("rest_df") or [None, None]
        weighted = bool(pooled.get("reliability_weighted"))
        over = f" The value is the mean over the {draws} noise draws of each draw's value." if draws > 1 else ""
        if pooled.get("prior_t") is not None:
            weighting = (", weighted by the square of its reliability across the noise draws" if weighted else "")
            rows.append(_row("part 1: Student's t (known member directions)", format_fixed(pooled["prior_t"], 2),
                             f"one-sided two-sample t-test with {format_fixed(result.df, 0)} degrees of freedom: do "
                             "the published images score higher on the prior score (the mean of the normal-scored "
                             "measurements, each turned so that higher means more like a training image"
                             f"{weighting})?{over}",
                             "protocol.pooled.prior_t", "fixed2"))
            rows.append(_row("part 1: p-value", _p_markup(None, pooled.get("prior_log_p")),
                             "one-sided p-value of that t-test" + (
                                 " (of the draws' mean normal score, divided by its null standard deviation)"
                                 if draws > 1 else ""), "protocol.pooled.prior_log_p", "lnp"))
        if pooled.get("rest_F") is not None:
            rest_words = (f"the {pooled.get('reliable_directions')} directions in which the images, not the noise "
                          "draw, carry at least half of the variance" if weighted else
                          "leading principal components of the normal-scored measurements")
            rows.append(_row("part 2: Rao's F (other directions)", format_fixed(pooled["rest_F"], 2),
                             f"F-test with {df[0]} and {df[1]} degrees of freedom: do the collections differ in "
                             f"directions other than the known ones ({rest_words}) beyond what part 1 shows?{over}",
                             "protocol.pooled.rest_F", "fixed2"))
            rows.append(_row("part 2: p-value", _p_markup(None, pooled.get("rest_log_p")),
                             "upper-tail p-value of that F-test" + (
                                 " (of the draws' mean normal score, divided by its null standard deviation)"
                                 if draws > 1 else ""), "protocol.pooled.rest_log_p", "lnp"))
        both = pooled.get("prior_t") is not None and pooled.get("rest_F") is not None
        per_draw = ("the parts' p-values turned into normal scores z = Φ⁻¹(1 − p) and added with fixed weights, "
                    "Z = (2 z₁ + z₂) / √5" if both else "the part's p-value turned into a normal score "
                    "Z = Φ⁻¹(1 − p)")
        if draws > 1:
            per_draw = (f"in each of the {draws} noise draws, {per_draw}; the draws' mean divided by its null "
                        f"standard deviation ({format_fixed(pooled.get('null_sd'), 3)}, from "
                        f"{int(pooled.get('null_permutations') or 0):,} fixed relabellings)")
        rows.append(_row("combined Z (weighted Stouffer)" if both else "Z of the test's one part",
                         format_fixed(result.statistic, 2),
                         per_draw + "; standard normal if the published images were not used",
                         "statistic", "fixed2"))
        rows.append(_row("pooled test p-value (parametric)", format_p(result.p_value_ttest, proto.get("ttest_log10_p")),
                         "1 − Φ(Z): the probability of a combined Z this large if the published images "
                         "were not used", "p_value_ttest", "p"))
    elif protocol == "sequential":
        rows.append(_row("combined Z (Stouffer over blocks)", format_fixed(result.statistic, 2),
                         "the blocks' one-sided Welch t-tests (table below) turned into normal scores and added with "
                         "weights fixed by the block sizes", "statistic", "fixed2"))
        rows.append(_row("sequential test p-value (parametric)", format_p(result.p_value_ttest,
                                                                         proto.get("ttest_log10_p")),
                         "1 − Φ(Z)", "p_value_ttest", "p"))
    elif protocol == "crossfit":
        rows.append(_row("Welch t of the out-of-fold scores", format_fixed(result.statistic, 2),
                         "difference of the mean out-of-fold scores divided by its standard error",
                         "statistic", "fixed2"))
        rows.append(_row("degrees of freedom", format_fixed(result.df, 0),
                         "Welch-Satterthwaite degrees of freedom of that t-test", "df", "fixed0"))
        rows.append(_row("Welch t-test p-value (not the verdict's)", format_p(result.p_value_ttest,
                                                                            proto.get("ttest_log10_p")),
                         "one-sided; it rejects too often when the published images were not used (the "
                         "out-of-fold scores are not independent), so the verdict uses the permutation test",
                         "p_value_ttest", "p"))
    else:  # a result of an unknown protocol: its figures under their field names only
        rows.append(_row("test statistic", format_fixed(result.statistic, 2), "the protocol's test statistic "
                         "(field statistic of result.json)", "statistic", "fixed2"))
        rows.append(_row("parametric p-value", format_p(result.p_value_ttest, proto.get("ttest_log10_p")),
                         "the protocol's parametric p-value (field p_value_ttest of result.json)",
                         "p_value_ttest", "p"))
    rows.append(_permutation_row(result))
    score = _score_words(result)
    per_image = f"; each image's score is the mean over its {draws} noise draws" if draws > 1 else ""
    rows.append(_row("effect size (Hedges' g)", format_fixed(result.effect_size, 2),
                     f"difference of the mean {score} of the two collections in units of their spread "
                     f"(0.2 small, 0.5 medium, 0.8 large){per_image}", "effect_size", "fixed2"))
    rows.append(_row("AUC", format_fixed(result.auc, 3),
                     f"chance that a random published image has a higher {score[:-1]} than a random unpublished "
                     f"one (0.5 = no difference){per_image}", "auc", "fixed3"))
    for collection, n in (("published", result.n_published), ("unpublished", result.n_unpublished)):
        tested = sum(s.collection == collection and s.in_test for s in result.scores)
        rows.append(_row(f"{collection} images", str(n),
                         "all of them entered the test" if tested == n else f"{tested} of them entered the test",
                         f"n_{collection}", "int"))
    return rows


def _permutation_row(result: AuditResult) -> dict[str, Any]:
    proto = result.protocol
    permutations = proto.get("permutations")
    if result.p_value_permutation is None:
        return _row("permutation test p-value", Markup("not run"), "no permutations were asked for",
                    "p_value_permutation", "p")
    where = {"pooled": "over all images", "sequential": "within blocks, repeating the block scoring",
             "crossfit": "within folds, repeating the cross-fitting"}.get(_protocol_name(result), "")
    meaning = (f"the same statistic recomputed after shuffling which images count as published, {permutations} "
               f"times {where}; (1 + shuffles reaching the observed value) / ({permutations} + 1); exact without "
               "assuming normal data")
    interval = proto.get("permutation_p_interval")
    if proto.get("permutation_at_floor"):
        meaning += (f". No shuffle reached the observed value, so the p-value reads “below 1/({permutations} + 1)”: "
                    "more shuffles would be needed to resolve it")
    value = format_p(result.p_value_permutation)
    if isinstance(interval, (list, tuple)) and len(interval) == 2 and all(_is_number(v) for v in interval):
        low, high = interval
        spread = (f"between {format_p(low)} and {format_p(high)}" if low > 0 else f"at most {format_p(high)}")
        value = Markup(f'{value}<br><span class="muted" id="permutation-interval">another seed: {spread} '
                       "(99%)</span>")
    return _row("permutation test p-value", value, meaning, "p_value_permutation", "p")


def _score_words(result: AuditResult) -> str:
    """What a per-image score is under the protocol that ran (plural)."""
    protocol = _protocol_name(result)
    if protocol == "pooled":
        if result.protocol.get("prior_used", True):
            return "prior scores"
        return "discriminant scores (fitted to these images, descriptive only)"
    if protocol == "crossfit":
        return "out-of-fold scores"
    return "scores"


def _manifest_note(result: AuditResult) -> str:
    """What the manifest's score and "in test" columns mean under the protocol that ran."""
    tested = all(s.in_test for s in result.scores)
    if _protocol_name(result) == "pooled":
        if result.protocol.get("prior_used", True):
            what = ("The score is the image's prior score: the average of its normal-scored measurements, each "
                    "turned so that higher means more like a training image; no model was fitted.")
        else:
            what = ("No measurement has a known member direction, so the score is the discriminant the test found "
                    "on these images (descriptive only).")
        return what + (" Every image entered the test." if tested else "")
    if tested:
        return "The score is the image's score from the scoring model; every image entered the test."
    return ("The score is the image's score from the scoring model; images marked “no” under "
            "“in test” were used to fit the scoring model and did not enter the test.")


def _block_rows(result: AuditResult) -> list[dict[str, Any]]:
    """The sequential protocol's blocks (empty under the other protocols)."""
    blocks = result.protocol.get("blocks") if _protocol_name(result) == "sequential" else None
    return [dict(b) for b in blocks or [] if isinstance(b, Mapping)]


def verdict_parts(result: AuditResult) -> list[dict[str, Any]]:
    """The verdict statistic Z split into its parts, as the pooled test recorded them (``cdi.stats.pooled``).

    Part 1 (the known member directions) and part 2 (the other directions)
    each add ``weight * z / sqrt(sum of squared weights)`` to Z
    (``prior_contribution`` + ``rest_contribution`` = Z); ``*_share`` is
    that contribution over Z, shown only when both parts push Z up (with
    parts pulling against each other the shares of their sum exceed 100%
    and say nothing; the contributions still do). Empty under the other protocols and for
    results written before the decomposition was recorded.
    """
    pooled = result.protocol.get("pooled")
    if _protocol_name(result) != "pooled" or not isinstance(pooled, Mapping):
        return []
    parts = []
    for key, name in (("prior", "known member directions (part 1)"), ("rest", "other directions (part 2)")):
        contribution = pooled.get(f"{key}_contribution")
        if not _is_number(contribution):
            continue
        parts.append({"name": name, "key": key, "z": pooled.get(f"{key}_z"), "weight": pooled.get(f"{key}_weight"),
                      "contribution": contribution, "share": pooled.get(f"{key}_share")})
    largest = max((abs(p["contribution"]) for p in parts), default=0.0) or 1.0
    same_way = all(p["contribution"] >= 0 for p in parts) and sum(p["contribution"] for p in parts) > 0
    for part in parts:
        part["width"] = 100 * abs(part["contribution"]) / largest
        if not same_way:  # parts pulling against each other: a share of their small sum says nothing
            part["share"] = None
    return parts


def _prior_families(result: AuditResult) -> list[dict[str, Any]]:
    """Each family's contribution to part 1's t (``cdi.feature_effects``), with a bar width."""
    families = (result.feature_effects or {}).get("prior_families") or []
    rows = [{**f, "label": text.family_name(f["family"])} for f in families]
    largest = max((abs(f["contribution"]) for f in rows), default=0.0) or 1.0
    for row in rows:
        row["width"] = 100 * abs(row["contribution"]) / largest
    return rows


def _effect_rows(result: AuditResult) -> list[dict[str, Any]]:
    """The per-feature standardised differences of ``result.feature_effects``, labelled for people."""
    return [{**e, "label": text.column_label(e["column"]), "family_label": text.family_name(e["family"])}
            for e in (result.feature_effects or {}).get("features") or []]


def _family_weights(result: AuditResult) -> list[dict[str, Any]]:
    """Feature weights grouped by family, families by decreasing sum of |weight|."""
    families: dict[str, list] = {}
    for w in result.feature_weights:
        families.setdefault(w.family, []).append(w)
    largest = max((abs(w.weight) for w in result.feature_weights if _is_number(w.weight)), default=0.0)
    grand_total = sum(abs(w.weight) for w in result.feature_weights if _is_number(w.weight))
    rows = []
    for family, weights in families.items():
        total = sum(abs(w.weight) for w in weights if _is_number(w.weight))
        rows.append({
            "family": family,
            "label": text.family_name(family),
            "about": text.family_about(family),
            "total": total,
            "share": total / grand_total if grand_total > 0 else None,
            "columns": [
                {
                    "column": w.column,
                    "weight": w.weight,
                    "width": 100 * abs(w.weight) / largest if largest > 0 and _is_number(w.weight) else 0,
                }
                for w in weights
            ],
        })
    largest_total = max((row["total"] for row in rows), default=0.0)
    for row in rows:
        row["width"] = 100 * row["total"] / largest_total if largest_total > 0 else 0
    rows.sort(key=lambda row: -row["total"])
    return rows


def _measured_families(result: AuditResult) -> list[tuple[str, int, str]]:
    """(name for people, values per image, what it measures) of every feature family of the run."""
    rows = []
    for family in result.features.get("families") or []:
        name = family.get("name", "") if isinstance(family, Mapping) else str(family)
        columns = family.get("columns") or [] if isinstance(family, Mapping) else []
        rows.append((text.family_name(name), len(columns), text.family_about(name)))
    return rows


def _shift_fallback(result: AuditResult) -> bool:
    """True when the shift guard was meant to use CLIP (``auto``) but fell back to the built-in descriptors."""
    guard = result.shift_guard
    return (guard is not None and guard.encoder == "builtin"
            and result.parameters.get("shift_encoder", "auto") == "auto")


def _shift_encoder_words(result: AuditResult) -> str:
    encoder = result.shift_guard.encoder if result.shift_guard is not None else ""
    return {
        "clip": "CLIP image embeddings (a general-purpose image model)",
        "builtin": "cdi's built-in colour, contrast, texture and layout descriptors",
    }.get(encoder, f"{encoder} image descriptors")


def _software(environment: Mapping[str, Any]) -> str:
    """``cdi 0.1.0, Python 3.11, torch 2.3.0, diffusers 0.30.0, ...`` from the environment record."""
    parts = [f"cdi {environment.get('cdi', '?')}"]
    python = str(environment.get("python", "")).split(" ")[0]
    if python:
        parts.append(f"Python {python}")
    packages = environment.get("packages") or {}
    for name in ("torch", "diffusers", "transformers", "numpy", "scikit-learn"):
        if packages.get(name):
            parts.append(f"{name} {packages[name]}")
    return ", ".join(parts)


def _thumbnail_uris(thumbnails: Mapping[str, list[tuple[str, bytes]]]) -> dict[str, list[tuple[str, str]]]:
    """Turn thumbnail bytes into data URIs, checking that each is a PNG or JPEG."""
    unknown = set(thumbnails) - set(COLLECTIONS)
    if unknown:
        raise CDIError(f"thumbnails are keyed by collection {COLLECTIONS}, got {sorted(unknown)}")
    uris: dict[str, list[tuple[str, str]]] = {}
    for collection in COLLECTIONS:
        for path, data in thumbnails.get(collection, []):
            mime = next((m for magic, m in _IMAGE_TYPES.items() if data.startswith(magic)), None)
            if mime is None:
                raise CDIError(f"the thumbnail of {path!r} is not a PNG or JPEG image")
            uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
            uris.setdefault(collection, []).append((path, uri))
    return uris
