"""The HTML evidence report: content, escaping, determinism, size, thumbnails, `cdi report`."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from collections import Counter
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from cdi.cli.main import app
from cdi.stats.feature_effects import feature_effects
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
    """A realistic audit result of the crossfit protocol built from seeded random scores, every section filled.

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
    columns = [c for cs in EXAMPLE_FAMILIES.values() for c in cs]
    features_p = rng.normal(0.1, 1.0, (n_published, len(columns)))
    features_u = rng.normal(0.0, 1.0, (n_unpublished, len(columns)))
    effects = feature_effects(features_p, features_u, columns, None,
                              {c: f for f, cs in EXAMPLE_FAMILIES.items() for c in cs})
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
            "name": "crossfit",
            "description": "Out-of-fold scores from 5-fold cross-fitted logistic regression; the p-value "
                           "comes from 999 permutations of the labels that repeat the cross-fitting.",
            "folds": 5,
            "permutations": 999,
            "verdict_test": "permutation",
            "verdict_choice": "permutation",
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
        feature_effects=effects,
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
    assert "we reject the hypothesis that the published images were not used" in html
    assert f"p = {format_p(example.p_value)}" in html
    for value in [example.p_value_ttest, example.p_value_permutation]:
        assert str(format_p(value)) in html
    for text in [f"{example.statistic:.2f}", f"{example.df:.0f}", f"{example.effect_size:.2f}",
                 f"{example.auc:.3f}", "permutation test"]:
        assert text in html
    assert html.count("<svg") == 5  # scores, p-value curve, ROC on linear and on log-log axes, feature effects
    assert f"From {example.sample_size_curve.n_needed} images per collection on" in html
    assert example.protocol["description"] in html
    assert example.model["fingerprint"] in html and example.model["revision"] in html
    assert "CVPR 2025" in html and "NeurIPS 2024" in html and "WACV 2024" in html
    assert "<code id=\"command\">" + example.command + "</code>" in html
    for family in EXAMPLE_FAMILIES:
        assert f"({family})" in html and family_name(family) in html
    # every image: path, hash and score
    assert all(f'title="{s.sha256}">{s.sha256[:16]}</td>' in html for s in example.scores)
    assert html.count('<td class="sha" data-label="SHA-256"') == len(example.scores)


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
    assert html.count('<td class="sha" data-label="SHA-256"') == 2000
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
                     p_value_ttest=0.0, feature_effects=None)
    html = render_report(result)
    assert "No sample-size curve was computed" in html
    assert "No shift guard was run" in html
    assert "This result records no per-measurement differences" in html
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


# ------------------------------------------------------------ real results of every protocol
TABLE = Path(__file__).parents[1] / "data" / "toy_sd_light_features.csv"
#: (protocol, verdict mode, P drawn from the members?) of the real results the tests below render.
AUDITS = {
    "pooled": ("pooled", "parametric", True),
    "pooled-permutation": ("pooled", "permutation", True),
    "pooled-null": ("pooled", "parametric", False),
    "sequential": ("sequential", "parametric", True),
    "crossfit": ("crossfit", "permutation", True),
}


def table_audit(protocol: str, verdict: str, members: bool, *, n: int = 150, resamples: int = 0,
                permutations: int = 199) -> AuditResult:
    """The result an audit of the stored light-toy features gives: P = ``n`` members (or other non-members), U = ``n`` non-members.

    The same ``analyse_tables`` and ``build_result`` as ``cdi audit``, without the model and the shift guard.
    """
    from cdi.audit.analysis import analyse_tables, build_result
    from cdi.audit.config import AuditConfig
    from cdi.engine.table import FeatureTable
    from cdi.features.registry import directions_of, resolve_features

    table = FeatureTable.from_csv(TABLE)
    families = resolve_features("cdi+clid+sima")
    nonmembers = [i for i, p in enumerate(table.paths) if p.startswith("nonmembers/")]
    published = table.subset([i for i, p in enumerate(table.paths) if p.startswith("members/")][:n] if members
                             else nonmembers[n:2 * n])
    unpublished = table.subset(nonmembers[:n])
    config = AuditConfig(published="P", unpublished="U", model="toy", out="out", protocol=protocol,
                         verdict=verdict, permutations=permutations, sample_size_resamples=resamples)
    directions = directions_of(families)
    analysis = analyse_tables(published, unpublished, directions=directions, config=config)
    return build_result(analysis, published, unpublished, families=families, feature_spec="cdi+clid+sima",
                        directions=directions, model={"model_id": "toy"}, config=config, timings={})


@pytest.fixture(scope="module")
def audits() -> dict[str, AuditResult]:
    results = {name: table_audit(*spec) for name, spec in AUDITS.items()}
    guard = ShiftGuard(encoder="builtin", p_value=3e-9, auc=0.81, detected=True, ignored=False, alpha=0.05)
    results["pooled-inconclusive"] = replace(results["pooled"], verdict="inconclusive", shift_guard=guard,
                                             parameters={**results["pooled"].parameters, "shift_encoder": "auto"})
    return results


@pytest.fixture(scope="module")
def audit_html(audits) -> dict[str, str]:
    return {name: render_report(result) for name, result in audits.items()}


def _visible_text(html: str) -> str:
    parsed = _parse(re.sub(r"<style>.*?</style>", "", html, flags=re.S))
    return re.sub(r"\s+", " ", "".join(parsed.text))


def _field(data: dict, path: str):
    for key in path.split("."):
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


def _expected(data: dict, field: str, kind: str) -> str:
    """A result.json value written as the report writes a figure of that kind."""
    value = _field(data, field)
    if kind == "p":
        log10 = {"p_value": "verdict_log10_p", "p_value_ttest": "ttest_log10_p"}.get(field)
        return _plain(str(format_p(value, data["protocol"].get(log10) if log10 else None)))
    if kind == "lnp":
        return _plain(str(format_p(float(np.exp(value)), value / np.log(10))))
    if kind.startswith("fixed"):
        return f"{value:.{kind[5:]}f}"
    return str(value)


def _plain(fragment: str) -> str:
    import html as html_module

    return html_module.unescape(re.sub(r"<[^>]+>", "", fragment)).strip()


@pytest.mark.parametrize("name", [*AUDITS, "pooled-inconclusive"])
def test_every_labelled_figure_is_the_result_json_value(name, audits, audit_html):
    """Each row of "The numbers" names its result.json field; the value shown is that field's value."""
    result, html = audits[name], audit_html[name]
    data = json.loads(result.to_json())
    rows = re.findall(r'<tr data-field="([^"]+)" data-kind="([^"]+)"><td>(.*?)</td><td class="value">(.*?)</td>'
                      r"<td>(.*?)</td></tr>", html)
    fields = {field for field, *_ in rows}
    assert len(rows) == len(fields) >= 8
    for field, kind, label, value, meaning in rows:
        shown = _plain(re.sub(r'<span class="muted" id="permutation-interval">.*?</span>', "", value))
        assert shown == _expected(data, field, kind), (name, label, field)
    protocol = result.protocol["name"]
    labels = {field: _plain(label) for field, _, label, *_ in rows}
    if protocol == "pooled":
        assert {"protocol.pooled.prior_t", "protocol.pooled.prior_log_p", "protocol.pooled.rest_F",
                "protocol.pooled.rest_log_p", "statistic", "p_value_ttest"} <= fields
        assert labels["statistic"] == "combined Z (weighted Stouffer)"
        assert labels["p_value_ttest"] == "pooled test p-value (parametric)"
        assert "df" not in fields  # part 1's df is named in its row, not as a test of its own
        assert not any("Welch" in text or "t-test p-value" in text for text in labels.values())
    elif protocol == "sequential":
        assert labels["statistic"] == "combined Z (Stouffer over blocks)"
        blocks = re.findall(r'data-field="protocol\.blocks\.(\d+)\.statistic">([^<]+)<', html)
        assert [f"{b['statistic']:.2f}" for b in data["protocol"]["blocks"]] == [v for _, v in blocks] != []
    else:
        assert labels["statistic"] == "Welch t of the out-of-fold scores" and labels["df"] == "degrees of freedom"
    # the permutation row never claims a bound that its own interval contradicts
    assert "the true p-value is at most" not in html
    verdict_row = next(meaning for field, _, _, _, meaning in rows if field == "p_value")
    assert ("permutation test" if result.protocol["verdict_test"] == "permutation" else
            {"pooled": "pooled test", "sequential": "sequential test"}[protocol]) in verdict_row


def test_result_json_says_what_each_figure_is(audits):
    for name, result in audits.items():
        figures = result.protocol["figures"]
        assert set(figures) == {"p_value", "p_value_ttest", "p_value_permutation", "statistic", "df",
                                "effect_size", "auc"}
        assert ("permutation" in figures["p_value"]) == (result.protocol["verdict_test"] == "permutation")
    assert audits["pooled"].protocol["figures"]["statistic"].startswith("combined Z of the pooled test")
    assert "not a t-test" in audits["pooled"].protocol["figures"]["p_value_ttest"]
    assert audits["crossfit"].protocol["figures"]["statistic"].startswith("Welch t")


@pytest.mark.parametrize("name", ["pooled", "pooled-permutation", "pooled-null", "pooled-inconclusive"])
def test_pooled_report_describes_no_scoring_model_or_blocks(name, audits, audit_html):
    result = audits[name]
    for key in ("scorer", "folds", "penalty", "blocks"):
        assert key not in result.protocol  # result.json: no field of a step that did not run
    text = _visible_text(audit_html[name])
    for words in ("scoring model", "scorer", "logistic", "blocks?", "folds?", "Welch", "permutation_p_interval"):
        assert not re.search(rf"\b{words}\b", text), words
    assert "no model was fitted" in text and "Every image entered the test" in text


def test_learned_protocols_describe_their_scoring_model(audit_html):
    for name in ("sequential", "crossfit"):
        text = _visible_text(audit_html[name])
        assert "Weights of the scoring model" in text and "scoring model" in text
    assert "The blocks of the sequential test" in _visible_text(audit_html["sequential"])


def test_signal_chart_shows_what_carried_the_evidence(audits, audit_html):
    """Per-feature differences and the parts' shares differ between a used and a null audit, as they should."""
    used, null = audits["pooled"].feature_effects, audits["pooled-null"].feature_effects
    d_used = np.array([f["d"] for f in used["features"]])
    d_null = np.array([f["d"] for f in null["features"]])
    assert len(d_used) == 35 and not np.allclose(d_used, d_null)
    # members look member-like on most features; on the null half the intervals cover 0
    assert np.mean(d_used > 0) > 0.75 and np.mean(d_used) > np.mean(d_null) + 0.15
    assert np.mean([f["low"] < 0 < f["high"] for f in null["features"]]) > 0.75
    # the families' contributions add up to part 1's t
    for effects, result in ((used, audits["pooled"]), (null, audits["pooled-null"])):
        assert sum(f["contribution"] for f in effects["prior_families"]) == pytest.approx(effects["prior_t"])
        assert effects["prior_t"] == pytest.approx(result.protocol["pooled"]["prior_t"])
    shares = {name: re.findall(r'<tr data-part="(\w+)">.*?</tr>', audit_html[name], re.S) for name in audits}
    assert shares["pooled"] == ["prior", "rest"]
    used_rows = re.search(r'<table class="shares stack" id="verdict-parts">.*?</table>', audit_html["pooled"], re.S)
    null_rows = re.search(r'<table class="shares stack" id="verdict-parts">.*?</table>', audit_html["pooled-null"],
                          re.S)
    assert used_rows.group(0) != null_rows.group(0)
    assert _figure(audit_html["pooled"], "effects") != _figure(audit_html["pooled-null"], "effects")
    # the parts' contributions add up to the combined Z
    from cdi.reports.html import verdict_parts

    for name in ("pooled", "pooled-null"):
        parts = verdict_parts(audits[name])
        assert sum(p["contribution"] for p in parts) == pytest.approx(audits[name].statistic)


def _figure(html: str, name: str) -> str:
    return re.search(rf'<figure id="figure-{name}">.*?</figure>', html, re.S).group(0)


def test_headline_names_the_p_value_in_plain_words(audits, audit_html):
    html = audit_html["pooled"]
    claim = re.search(r'<div class="claim">.*?</div>', html, re.S).group(0)
    assert "Probability of a difference this large if the published images were not used" in claim
    assert "From the pooled test" in claim
    estimate = _plain(re.search(r'<p id="sample-size-estimate">.*?</p>', claim, re.S).group(0))
    needed = audits["pooled"].sample_size_estimate
    assert f"about {needed['published_needed']} published images and as many unpublished" in estimate
    # one images-needed figure: the others in the sentence are its interval and the audit's own settings
    numbers = set(re.findall(r"\d+", estimate)) - {"9", "10", "90", "0", "01", "95"}
    assert numbers == {str(needed["published_needed"]), str(needed["published_low"]), str(needed["published_high"])}
    terms = re.search(r'<aside class="terms">.*?</aside>', html[html.index('<section id="numbers">'):], re.S).group(0)
    for term in ("Pooled test", "Normal scores", "Student&#39;s t-test", "Rao&#39;s F-test", "Stouffer&#39;s method"):
        assert f"<dt>{term}</dt>" in html and (term == "Pooled test" or f"<dt>{term}</dt>" in terms)
    glossary = html[html.index('<section id="glossary">'):]
    assert "<dt>Pooled test</dt>" in glossary and "<dt>Sequential test</dt>" not in glossary


def test_inconclusive_fix_names_the_installed_download_command(audit_html):
    html = audit_html["pooled-inconclusive"]
    assert "<code>hf download openai/clip-vit-large-patch14</code>" in html
    assert "huggingface-cli" not in html
    assert 'id="verdict-p"' not in html


def test_no_raw_json_in_the_report(audit_html):
    text = _visible_text(audit_html["pooled"])
    assert '": ' not in text and "{" not in text
    assert re.search(r'SHA-256 <span class="hash" id="result-sha256">[0-9a-f]{64}</span>', audit_html["pooled"])
