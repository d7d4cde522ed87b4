"""The HTML evidence report: content, escaping, determinism, size, thumbnails, `cdi report`."""

from __future__ import annotations

import base64
import hashlib
import io
import re
from collections import Counter
from dataclasses import replace
from html.parser import HTMLParser

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from cdi.cli.main import app
from cdi.audit.result import (
    REPORT_FILE,
    RESULT_FILE,
    AuditResult,
    FeatureWeight,
    ImageScore,
    SampleSizeCurve,
    ShiftGuard,
)
from cdi.reports import ReportWarning, render_report, write_report
from cdi.reports.text import family_name
from cdi.reports.html import format_p, load_thumbnails

# Feature columns of the CDI set (26) plus CLiD (5), grouped by family.
EXAMPLE_FAMILIES = {
    "denoising_loss": ["denoising_loss"],
    "secmi": ["secmi_stat"],
    "pia": ["pia"],
    "pian": ["pian"],
    "multiple_loss": [f"multiple_loss_t{t}" for t in range(0, 1000, 100)],
    "noise_optimization": ["noise_opt_loss", "noise_opt_delta_norm"],
    "gradient_masking": [f"gradient_masking_t{t}" for t in range(0, 1000, 100)],
    "clid": ["clid_loss", "clid_d1", "clid_d2", "clid_d3", "clid_d4"],
}


def make_example_result(n_published: int, n_unpublished: int, seed: int, *, shift: float = 0.35) -> AuditResult:
    """A realistic audit result built from seeded random scores, with every section filled.

    Published scores are drawn from N(shift, 1), unpublished from N(0, 1). The
    test statistics, the permutation p-value (999 permutations), Hedges' g, the
    AUC and the sample-size curve are computed from those scores, so the
    numbers in the report agree with each other as in a real audit.
    """
    rng = np.random.default_rng(seed)
    published = rng.normal(shift, 1.0, n_published)
    unpublished = rng.normal(0.0, 1.0, n_unpublished)
    alpha = 0.01
    welch = stats.ttest_ind(published, unpublished, equal_var=False, alternative="greater")
    pooled = np.concatenate([published, unpublished])
    permuted = rng.permuted(np.tile(pooled, (999, 1)), axis=1)
    null = permuted[:, :n_published].mean(1) - permuted[:, n_published:].mean(1)
    observed = published.mean() - unpublished.mean()
    p_permutation = float((1 + np.sum(null >= observed)) / 1000)
    sd = np.sqrt(((n_published - 1) * published.var(ddof=1) + (n_unpublished - 1) * unpublished.var(ddof=1))
                 / (n_published + n_unpublished - 2))
    hedges = observed / sd * (1 - 3 / (4 * (n_published + n_unpublished) - 9))
    auc = stats.mannwhitneyu(published, unpublished).statistic / (n_published * n_unpublished)

    top = min(n_published, n_unpublished)
    sizes = sorted({int(s) for s in np.geomspace(min(10, top), top, 8)})
    median_p, share = [], []
    for size in sizes:
        p_sub = [stats.ttest_ind(rng.choice(published, size, replace=False),
                                 rng.choice(unpublished, size, replace=False),
                                 equal_var=False, alternative="greater").pvalue for _ in range(40)]
        median_p.append(float(np.median(p_sub)))
        share.append(float(np.mean(np.array(p_sub) < alpha)))
    n_needed = next((s for s, f in zip(sizes, share) if f >= 0.8), None)

    captions = ["a watercolour of a harbour at dawn", "portrait of a woman in a red coat", None,
                "still life with lemons and a blue jug"]
    scores = [
        ImageScore(path=f"{'series-a' if i % 3 else 'series-b'}/img_{i:04d}.jpg",
                   sha256=hashlib.sha256(f"{collection}-{i}".encode()).hexdigest(),
                   collection=collection, caption=captions[i % len(captions)],
                   score=float(value), in_test=True)
        for collection, values in [("published", published), ("unpublished", unpublished)]
        for i, value in enumerate(values)
    ]
    weights = [
        FeatureWeight(column=column, family=family, weight=float(rng.normal(0, 0.5 if family != "clid" else 1.0)))
        for family, columns in EXAMPLE_FAMILIES.items() for column in columns
    ]
    return AuditResult(
        verdict="used" if p_permutation < alpha else "not_detected",
        p_value=p_permutation,
        p_value_ttest=float(welch.pvalue),
        p_value_permutation=p_permutation,
        alpha=alpha,
        n_published=n_published,
        n_unpublished=n_unpublished,
        statistic=float(welch.statistic),
        df=float(welch.df),
        effect_size=float(hedges),
        auc=float(auc),
        protocol={
            "name": "cross-fitted logistic regression, permutation test",
            "description": "Out-of-fold scores from 5-fold cross-fitted logistic regression; the p-value "
                           "comes from 999 permutations of the labels that repeat the cross-fitting.",
            "folds": 5,
            "permutations": 999,
        },
        scores=scores,
        feature_weights=weights,
        sample_size_curve=SampleSizeCurve(sizes=sizes, median_p=median_p, share_significant=share,
                                          n_needed=n_needed, target_share=0.8, resamples=40, alpha=alpha),
        shift_guard=ShiftGuard(encoder="clip-vit-l-14", p_value=0.41, auc=0.52, detected=False,
                               ignored=False, alpha=0.01),
        model={"model_id": "stable-diffusion-v1-5/stable-diffusion-v1-5",
               "revision": "451f4fe16113bff5a5d2269ed5ad43b0592e9a14",
               "fingerprint": "sha256:" + hashlib.sha256(b"weights").hexdigest(),
               "family": "sd1", "dtype": "float16", "device": "cuda:0"},
        features={"set": "cdi+clid",
                  "families": {f: {"columns": c} for f, c in EXAMPLE_FAMILIES.items()},
                  "directions": {"denoising_loss": -1, "secmi_stat": -1}},
        parameters={"alpha": alpha, "batch_size": 16, "resolution": 512, "timesteps": [100, 200],
                    "ignore_shift": False, "captions": "metadata.jsonl"},
        seed=seed,
        command="cdi audit --model sd15 --published ./published --unpublished ./unpublished --out ./audit",
        environment={"cdi": "0.1.0", "python": "3.11.7", "platform": "Linux-6.1-x86_64",
                     "packages": {"torch": "2.13.0", "diffusers": "0.42.1"}},
        timings={"start": "2025-06-01T12:00:00+00:00", "features_s": 3456.7, "total_s": 3501.2},
    )


@pytest.fixture(scope="module")
def example() -> AuditResult:
    return make_example_result(200, 180, seed=0)


@pytest.fixture(scope="module")
def example_html(example) -> str:
    return render_report(example)


class _Tags(HTMLParser):
    """Collects start tags with their attributes, script bodies and the text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self.text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data
        else:
            self.text.append(data)


def _parse(html: str) -> _Tags:
    parser = _Tags()
    parser.feed(html)
    parser.close()
    return parser


def test_report_holds_every_section_in_order(example, example_html):
    html = example_html
    order = [html.index(f'<section id="{name}">') for name in
             ["verdict", "numbers", "plots", "features", "shift", "method", "provenance", "manifest", "glossary"]]
    assert order == sorted(order)
    assert example.verdict == "used"
    assert "Evidence of use found" in html
    assert example.verdict_text in html
    assert "we reject the hypothesis that the model scores the published images no higher" in html
    assert f"p = {format_p(example.p_value)}" in html
    for value in [example.p_value_ttest, example.p_value_permutation]:
        assert str(format_p(value)) in html
    for text in [f"{example.statistic:.2f}", f"{example.df:.0f}", f"{example.effect_size:.2f}",
                 f"{example.auc:.3f}", "permutation test"]:
        assert text in html
    assert html.count("<svg") == 4  # scores, p-value curve, ROC on linear and on log-log axes
    assert f"About <strong>{example.sample_size_curve.n_needed} images per collection</strong>" in html
    assert example.protocol["description"] in html
    assert example.model["fingerprint"] in html and example.model["revision"] in html
    assert "CVPR 2025" in html and "NeurIPS 2024" in html and "WACV 2024" in html
    assert "<code id=\"command\">" + example.command + "</code>" in html
    for family in EXAMPLE_FAMILIES:
        assert f"({family})" in html and family_name(family) in html
    # every image: path, hash and score
    assert all(s.sha256 in html for s in example.scores)
    assert html.count('<td class="sha">') == len(example.scores)


def test_report_is_self_contained_with_unique_ids(example_html):
    tags = _parse(example_html).tags
    # nothing that loads: no src/href except data: URIs and in-page anchors
    for tag, attrs in tags:
        for name in ("src", "href", "xlink:href", "action", "poster", "srcset"):
            value = attrs.get(name)
            if value is not None:
                assert value.startswith(("#", "data:")), (tag, name, value)
        assert tag not in ("link", "iframe", "object", "embed", "base", "form")
    assert "@import" not in example_html and "url(http" not in example_html
    ids = Counter(attrs["id"] for _, attrs in tags if "id" in attrs)
    assert [i for i, count in ids.items() if count > 1] == []


def test_csp_forbids_network_and_allows_only_the_inline_script(example_html):
    parsed = _parse(example_html)
    (csp,) = [a["content"] for t, a in parsed.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["img-src"] == "data:"
    assert directives["style-src"] == "'unsafe-inline'"
    (script,) = parsed.scripts
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert directives["script-src"] == f"'sha256-{digest}'"
    # the policy comes before anything that could load or run
    assert example_html.index("Content-Security-Policy") < example_html.index("<style>")


def test_render_is_deterministic(example, example_html):
    again = make_example_result(200, 180, seed=0)
    assert render_report(again) == example_html


def test_user_supplied_strings_are_escaped(example):
    evil = "<script>alert(1)</script>"
    caption = '<img src=x onerror="alert(2)"> & "quoted" </td></tr></table>'
    scores = list(example.scores)
    scores[0] = replace(scores[0], path=f"{evil}.png", caption=caption)
    scores[1] = replace(scores[1], path="a/--><b>bold</b>.png")
    result = replace(
        example,
        scores=scores,
        model={**example.model, "model_id": "<b>evil-model</b>", "revision": "\"><script>alert(3)</script>"},
        parameters={**example.parameters, "note": evil, evil: "key"},
        command=f"cdi audit --published '{evil}' --out x",
        protocol={**example.protocol, "name": evil, "description": caption},
        feature_weights=[replace(example.feature_weights[0], column=evil, family="<i>fam</i>"),
                         *example.feature_weights[1:]],
        shift_guard=replace(example.shift_guard, encoder=evil, note=caption),
        environment={**example.environment, "platform": evil},
        timings={**example.timings, "start": evil},
    )
    html = render_report(result)
    parsed = _parse(html)
    assert len(parsed.scripts) == 1  # only the report's own script
    assert [t for t, _ in parsed.tags if t in ("img", "b", "i")] == []
    for tag, attrs in parsed.tags:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
    assert evil not in html and "<b>" not in html and "<img" not in html
    text = "".join(parsed.text)
    assert f"{evil}.png" in text  # shown as text
    assert caption in text
    assert "<b>evil-model</b>" in text


def test_report_for_1000_images_per_collection_is_under_2_mb():
    result = make_example_result(1000, 1000, seed=3)
    for i in range(0, len(result.scores), 2):  # realistic caption lengths
        result.scores[i].caption = "a long descriptive caption of a photograph " * 2
    html = render_report(result)
    assert html.count('<td class="sha">') == 2000
    assert len(html.encode("utf-8")) < 2_000_000


@pytest.mark.parametrize("shift_detected, ignored, verdict", [(True, False, "inconclusive"),
                                                              (True, True, "used")])
def test_shift_guard_findings_are_explained(example, shift_detected, ignored, verdict):
    guard = ShiftGuard(encoder="clip-vit-l-14", p_value=2e-6, auc=0.71, detected=shift_detected,
                       ignored=ignored, alpha=0.01, note="embeddings differ in brightness")
    html = render_report(replace(example, verdict=verdict, shift_guard=guard))
    assert "2.00 &times; 10<sup>&minus;6</sup>" in html and "0.710" in html
    if verdict == "inconclusive":
        assert "Inconclusive" in html and "What the shift guard found" in html
        assert 'id="verdict-why"' in html and "Why no verdict" in html
        assert 'id="verdict-p"' not in html  # no big p-value beside an inconclusive verdict
        assert 'id="shift-ignored"' not in html
    else:
        assert 'id="shift-ignored"' in html


def test_not_detected_says_what_it_does_and_does_not_mean():
    result = make_example_result(60, 60, seed=1, shift=0.0)
    assert result.verdict == "not_detected"
    html = render_report(result)
    assert "No evidence of use found" in html
    assert "we cannot reject the hypothesis" in html
    assert "It is not proof that the images were not used" in html


def test_missing_optional_parts_render(example):
    result = replace(example, sample_size_curve=None, shift_guard=None, feature_weights=[],
                     p_value_permutation=None, effect_size=None, df=None, p_value=0.0,
                     p_value_ttest=0.0)
    html = render_report(result)
    assert "No sample-size curve was computed" in html
    assert "No shift guard was run" in html
    assert "This protocol reports no feature weights" in html
    assert "not run" in html and "n/a" in html
    assert "p = &lt; 10<sup>&minus;300</sup>" in html
    assert html.count("<svg") == 3  # scores and the two ROC panels


def test_format_p():
    assert format_p(0.5) == "0.5"
    assert format_p(0.0123) == "0.0123"
    assert format_p(3.21e-5) == "3.21 &times; 10<sup>&minus;5</sup>"
    assert format_p(1e-59) == "1.00 &times; 10<sup>&minus;59</sup>"
    assert format_p(None) == "n/a" and format_p(float("nan")) == "n/a"


def test_cli_report_reproduces_the_report_byte_for_byte(example, tmp_path):
    example.save(tmp_path)
    first = write_report(tmp_path, example)
    original = first.read_bytes()
    first.unlink()
    run = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert run.exit_code == 0, run.output
    assert (tmp_path / REPORT_FILE).read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == [REPORT_FILE, RESULT_FILE]


def test_cli_report_without_result_fails_cleanly(tmp_path):
    run = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert run.exit_code == 2
    assert "no audit result" in run.output and "Traceback" not in run.output
    assert list(tmp_path.iterdir()) == []


def _image_bytes(color, fmt="PNG") -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(out, format=fmt)
    return out.getvalue()


@pytest.fixture
def collections(tmp_path):
    """Two small image folders and a result whose manifest matches them."""
    result = make_example_result(4, 3, seed=2)
    folders = {"published": tmp_path / "P", "unpublished": tmp_path / "U"}
    scores = []
    for i, image in enumerate(result.scores):
        data = _image_bytes((40 * i, 100, 200), "PNG" if i % 2 else "JPEG")
        path = folders[image.collection] / image.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        scores.append(replace(image, sha256=hashlib.sha256(data).hexdigest()))
    result = replace(result, scores=scores)
    out = tmp_path / "audit"
    result.save(out)
    return result, folders, out


def test_thumbnails_skip_changed_files(collections):
    result, folders, _ = collections
    changed = folders["published"] / result.scores[0].path
    changed.write_bytes(_image_bytes("red"))
    with pytest.warns(ReportWarning, match=re.escape(result.scores[0].path) + ".*SHA-256 differs"):
        thumbs = load_thumbnails(result, 2, folders)
    assert [p for p, _ in thumbs["published"]] == [result.scores[1].path, result.scores[2].path]
    assert len(thumbs["unpublished"]) == 2
    html = render_report(result, thumbnails=thumbs)
    assert html.count('src="data:image/jpeg;base64,') == 4


def test_cli_report_with_thumbnails(collections):
    result, folders, out = collections
    run = CliRunner().invoke(app, ["report", str(out), "--thumbnails", "3", "--published",
                                   str(folders["published"]), "--unpublished", str(folders["unpublished"])])
    assert run.exit_code == 0, run.output
    html = (out / REPORT_FILE).read_text()
    assert html.count('src="data:image/jpeg;base64,') == 6
    run = CliRunner().invoke(app, ["report", str(out), "--thumbnails", "3"])
    assert run.exit_code == 2 and "--published" in run.output
