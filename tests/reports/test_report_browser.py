"""The evidence report in a real browser (headless Chromium).

One Chromium run opens a rendered report, dumps its DOM after scripts ran,
saves a screenshot and records a net log. The tests then check that the DOM
holds the verdict and the p-value, that only the report's own script ran
(no console message: no CSP violation, no error; an injected caption did
not execute), and that the page made no network request. A second run on a
deliberately leaky page shows that the network check can fail.

Skipped where no Chromium is installed (Debian: ``apt-get install chromium``;
``.ci/run`` installs it). Set ``CDI_SCREENSHOT_DIR`` to keep the screenshot.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from test_report import make_example_result

from cdi.reports import render_report
from cdi.reports.html import VERDICT_LABEL, format_p

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium browser found (install Debian's `chromium` package)"
)

INJECTED = "<script>document.title='pwned'</script>"
WINDOW = (1280, 4000)


def open_in_chromium(page: Path, workdir: Path, *extra: str) -> dict:
    """Open ``page`` in headless Chromium; return its DOM, its console lines and its network requests.

    Network requests are the ``URL_REQUEST_START_JOB`` events of the net log
    that the page initiated; requests Chromium makes for itself (update
    checks and the like) carry the initiator "not an origin" and are left
    out. Host names resolve to nothing, so no request can leave the machine
    even if one is made.
    """
    netlog = workdir / "netlog.json"
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        f"--user-data-dir={workdir / 'profile'}", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-default-apps",
        "--host-resolver-rules=MAP * ~NOTFOUND", f"--log-net-log={netlog}",
        "--enable-logging=stderr", "--log-level=0", "--virtual-time-budget=5000",
        *extra, "--dump-dom", page.as_uri(),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout, f"Chromium failed ({run.returncode}):\n{run.stderr[-3000:]}"
    log = json.loads(netlog.read_text())
    names = {number: name for name, number in log["constants"]["logEventTypes"].items()}
    requests = [
        event["params"] for event in log["events"]
        if names.get(event["type"]) == "URL_REQUEST_START_JOB" and "url" in event.get("params", {})
        and event["params"].get("initiator") != "not an origin"
    ]
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    return {"dom": run.stdout, "console": console, "requests": requests}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A rendered example report opened in Chromium, with its screenshot."""
    workdir = tmp_path_factory.mktemp("browser")
    result = make_example_result(300, 300, seed=1)
    result.scores[0] = replace(result.scores[0], caption=INJECTED)
    page = workdir / "report.html"
    page.write_text(render_report(result), encoding="utf-8")
    screenshot = workdir / "report.png"
    opened = open_in_chromium(page, workdir, f"--screenshot={screenshot}",
                              f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars")
    if os.environ.get("CDI_SCREENSHOT_DIR"):
        keep = Path(os.environ["CDI_SCREENSHOT_DIR"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, keep / "report.png")
    return {"result": result, "screenshot": screenshot, **opened}


def _text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment)).strip()


def test_browser_shows_the_verdict_and_the_p_value(report):
    result, dom = report["result"], report["dom"]
    label = re.search(r'<span class="label" id="verdict-label">(.*?)</span>', dom)
    assert label and _text(label.group(1)) == VERDICT_LABEL[result.verdict]
    shown = re.search(r'<span class="pvalue" id="verdict-p">(.*?)</span>', dom)
    assert shown and _text(shown.group(1)) == "p = " + _text(str(format_p(result.p_value)))
    assert result.verdict_text in html.unescape(dom)


def test_only_the_report_script_runs(report):
    dom = report["dom"]
    assert 'data-sortable="ready"' in dom  # the inline script ran under the CSP
    assert report["console"] == []  # no CSP violation, no script error
    assert "<title>cdi audit report" in dom and "pwned</title>" not in dom
    assert html.escape(INJECTED, quote=False) in dom  # the caption is shown as text


def test_report_makes_no_network_request(report):
    assert report["requests"] == []


def test_network_check_catches_a_leaky_page(tmp_path):
    page = tmp_path / "leak.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>leak</title></head>'
                    '<body><img src="http://cdi-report-test.invalid/pixel.png"></body></html>')
    urls = [r["url"] for r in open_in_chromium(page, tmp_path)["requests"]]
    assert urls == ["http://cdi-report-test.invalid/pixel.png"]


def test_screenshot_is_saved(report):
    from PIL import Image

    assert report["result"].verdict == "used"
    with Image.open(report["screenshot"]) as image:
        assert image.size == WINDOW
        top = image.convert("RGB").crop((0, 0, WINDOW[0], 800))
        badge = sum(count for count, color in top.getcolors(WINDOW[0] * 800) if color == (0xA1, 0x26, 0x0D))
        assert badge > 50_000  # the red "used" verdict badge is drawn near the top


# ------------------------------------------------------------------ phone width
PHONE = 390
#: Measures the laid-out page after every <details> is opened: page width, the cells whose text
#: breaks inside a word (more text lines than words), and the smallest rendered plot text.
MEASURE = """
<script>
document.querySelectorAll("details").forEach(function (d) { d.open = true; });
var out = {viewport: window.innerWidth, page: document.documentElement.scrollWidth, broken: [], plotScale: []};
document.querySelectorAll("td, th, dt, dd").forEach(function (cell) {
  if (cell.closest(".hash")) { return; }  /* fingerprints break anywhere on purpose */
  var words = 0, tops = {};
  var walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    var node = walker.currentNode;
    words += node.textContent.trim().split(/\\s+/).filter(Boolean).length;
    var range = document.createRange();
    range.selectNodeContents(node);
    Array.prototype.forEach.call(range.getClientRects(), function (r) {
      if (r.width > 0) { tops[Math.round(r.top)] = true; }
    });
  }
  var lines = Object.keys(tops).length;
  if (words > 0 && lines > words) { out.broken.push(cell.textContent.trim().slice(0, 60) + " [" + lines + " lines]"); }
});
document.querySelectorAll("figure svg").forEach(function (svg) {
  var intrinsic = parseFloat(svg.getAttribute("width"));  /* in pt */
  out.plotScale.push(svg.getBoundingClientRect().width / (intrinsic * 4 / 3));
});
out.wide = [];
document.querySelectorAll("body *").forEach(function (el) {
  if (el.closest(".scroll") || el.closest("svg")) { return; }
  if (el.getBoundingClientRect().right > window.innerWidth + 1) {
    out.wide.push(el.tagName.toLowerCase() + "." + el.className + " " + Math.round(el.getBoundingClientRect().right));
  }
});
out.manifestHidden = [];
document.querySelectorAll("table.manifest td").forEach(function (cell) {
  var box = cell.getBoundingClientRect();
  if (box.width === 0 || box.height === 0 || box.right > window.innerWidth + 1 || box.left < 0) {
    out.manifestHidden.push(cell.getAttribute("data-label") + " " + Math.round(box.left) + "-" + Math.round(box.right));
  }
});
out.manifestCells = document.querySelectorAll("table.manifest td").length;
var pre = document.createElement("pre");
pre.id = "measured";
pre.textContent = JSON.stringify(out);
document.body.appendChild(pre);
</script>
"""


def verdict_results() -> dict:
    """One example result per verdict; the inconclusive one fell back to the built-in descriptors."""
    from cdi.audit.result import ShiftGuard

    used = make_example_result(300, 300, seed=1)
    not_detected = make_example_result(60, 60, seed=1, shift=0.0)
    guard = ShiftGuard(encoder="builtin", p_value=3e-9, auc=0.81, detected=True, ignored=False, alpha=0.05,
                       note="built-in colour/contrast/texture/layout descriptors (CLIP ViT-L/14 weights are not "
                            "in the local Hugging Face cache), classifier two-sample test")
    inconclusive = replace(used, verdict="inconclusive", shift_guard=guard,
                           parameters={**used.parameters, "shift_encoder": "auto"})
    return {"used": used, "not_detected": not_detected, "inconclusive": inconclusive}


def phone_frame(page: Path, width: int, height: int) -> Path:
    """An outer page that shows ``page`` in a ``width`` px frame (headless Chromium's window is at least 500 px)
    and copies the frame's measures, if any, into its own DOM."""
    outer = page.with_name(page.stem + "-frame.html")
    outer.write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"><style>body{margin:0}iframe{border:0;display:block}'
        f'</style></head><body><iframe id="f" src="{page.name}" width="{width}" height="{height}"></iframe>'
        '<script>document.getElementById("f").addEventListener("load", function () {'
        ' var m = this.contentDocument.getElementById("measured");'
        ' var pre = document.createElement("pre"); pre.id = "measured";'
        ' pre.textContent = m ? m.textContent : "null"; document.body.appendChild(pre); });</script>'
        "</body></html>", encoding="utf-8")
    return outer


def measure_at(html_text: str, workdir: Path, width: int, screenshot: Path | None = None) -> dict:
    """Open a report in a ``width`` px frame with the measuring script (CSP removed for it); return the measures."""
    page = workdir / "measure.html"
    html_text = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", html_text)
    page.write_text(html_text.replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    outer = phone_frame(page, width, 6000)
    dom = open_in_chromium(outer, workdir, "--window-size=600,6000", "--hide-scrollbars",
                           "--allow-file-access-from-files")["dom"]
    found = re.search(r'<pre id="measured">(.*?)</pre>', dom, re.S)
    assert found and found.group(1) != "null", "the measuring script did not run"
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.parametrize("verdict", ["used", "not_detected", "inconclusive"])
def test_report_reads_on_a_phone(verdict, tmp_path):
    """At 390 px: the page is no wider than the screen, no cell breaks a word, plot text stays legible."""
    result = verdict_results()[verdict]
    measured = measure_at(render_report(result), tmp_path, PHONE)
    assert measured["viewport"] == PHONE
    assert measured["page"] <= PHONE, f"page is {measured['page']} px wide at a {PHONE} px viewport: {measured['wide'][:8]}"
    assert measured["broken"] == [], f"cells that break words: {measured['broken'][:5]}"
    # the manifest reflows: every one of its cells (7 per image) is on screen, none hidden
    assert measured["manifestCells"] == 7 * len(result.scores)
    assert measured["manifestHidden"] == [], measured["manifestHidden"][:5]
    # Plots are drawn with 11 pt text; at this scale it is at least ~9.5 px on screen.
    assert measured["plotScale"] and min(measured["plotScale"]) * 11 * 4 / 3 >= 9.5, measured["plotScale"]


def test_phone_check_catches_one_character_columns(tmp_path):
    squeezed = ('<!DOCTYPE html><html><head><meta name="viewport" content="width=device-width">'
                '<style>td{word-break:break-all}</style></head><body><table><tr>' + "<td>x</td>" * 30 +
                "<td>evidence</td></tr></table></body></html>")
    measured = measure_at(squeezed, tmp_path, PHONE)
    assert any(text.startswith("evidence") for text in measured["broken"])


def screenshot(html_text: str, workdir: Path, target: Path, width: int, height: int) -> Path:
    """A PNG of the page at ``width`` px (narrow widths through a frame, then cropped)."""
    from PIL import Image

    page = workdir / f"{target.stem}.html"
    page.write_text(html_text, encoding="utf-8")
    if width >= 500:
        open_in_chromium(page, workdir, f"--window-size={width},{height}", "--hide-scrollbars",
                         f"--screenshot={target}")
        return target
    outer = phone_frame(page, width, height)
    open_in_chromium(outer, workdir, f"--window-size=600,{height}", "--hide-scrollbars",
                     "--allow-file-access-from-files", f"--screenshot={target}")
    with Image.open(target) as image:
        image.crop((0, 0, width, height)).save(target)
    return target


def save_screenshots(folder: Path, workdir: Path) -> list[Path]:
    """Screenshots of the three verdicts at 1280 and 390 px (used to write /work/notes/screens)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [screenshot(render_report(result), workdir, folder / f"audit-{verdict}-{width}.png", width,
                       5200 if width > 1000 else 9000)
            for verdict, result in verdict_results().items() for width in (1280, PHONE)]


@pytest.mark.skipif(not os.environ.get("CDI_SCREENSHOT_DIR"), reason="set CDI_SCREENSHOT_DIR to save screenshots")
def test_save_verdict_screenshots(tmp_path):
    saved = save_screenshots(Path(os.environ["CDI_SCREENSHOT_DIR"]), tmp_path)
    assert all(path.stat().st_size > 10_000 for path in saved)


# ------------------------------------------------------------------ print
A4_PAGES = 12  # most pages a printed 150 + 150 audit may take (issue 22)
PDF_PAGE = re.compile(rb"/Type\s*/Page(?![a-zA-Z])")


@pytest.fixture(scope="module")
def printed(tmp_path_factory):
    """A 150 + 150 pooled audit of the stored toy features (with captions and a sample-size curve), printed to A4."""
    from test_report import table_audit

    workdir = tmp_path_factory.mktemp("print")
    result = table_audit("pooled", "parametric", True, resamples=10)
    for i, score in enumerate(result.scores):  # captions as long as real ones, one per line if not truncated
        result.scores[i] = replace(score, caption=f"a handwritten digit, scanned at low resolution, number {i}, "
                                                   "with a long description that goes on")
    page = workdir / "report.html"
    page.write_text(render_report(result), encoding="utf-8")
    pdf = workdir / "report.pdf"
    open_in_chromium(page, workdir, "--no-pdf-header-footer", f"--print-to-pdf={pdf}")
    if os.environ.get("CDI_SCREENSHOT_DIR"):
        shutil.copyfile(pdf, Path(os.environ["CDI_SCREENSHOT_DIR"]) / "report.pdf")
    pages = []
    if shutil.which("pdftotext"):
        text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True,
                              check=True).stdout
        pages = text.split("\f")
    return {"result": result, "pdf": pdf.read_bytes(), "pages": [p for p in pages if p.strip()]}


def test_printed_report_fits_twelve_a4_pages(printed):
    count = len(PDF_PAGE.findall(printed["pdf"]))
    assert 4 <= count <= A4_PAGES, f"{count} pages"
    if printed["pages"]:
        assert len(printed["pages"]) == count


def test_printed_report_has_no_raw_json_and_defines_terms_where_used(printed):
    pages = printed["pages"]
    if not pages:
        pytest.skip("pdftotext (poppler-utils) is not installed")
    text = "\n".join(pages)
    assert '": ' not in text and '{"' not in text  # no raw JSON
    assert "result.json" in text and "SHA-256" in text
    # every image is listed; its caption is cut, not wrapped over lines
    assert all(s.sha256[:16] in text for s in printed["result"].scores)
    assert "goes on" not in text
    # Glossary terms are explained beside the section that uses them: the first page using a term holds its
    # explanation, or the next page does (a section's words are listed where the section ends).
    for term, definition in [("Stouffer", "Stouffer's method:"), ("Rao's F", "Rao's F-test:"),
                             ("normal scores", "Normal scores:"), ("pooled test", "Pooled test:"),
                             ("p-value", "p-value:"), ("SHA-256", "SHA-256 fingerprint:"),
                             ("95% interval", "95% interval:"), ("standardised difference", "Standardised difference:")]:
        used = [i for i, page in enumerate(pages) if term.lower() in page.lower()]
        defined = [i for i, page in enumerate(pages) if definition in page]
        assert used and defined and 0 <= defined[0] - used[0] <= 1, (term, used, defined)
