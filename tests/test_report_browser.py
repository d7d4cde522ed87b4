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

from reports import render_report
from reports.html import VERDICT_LABEL, format_p

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
    run = subprocess.run(command, capture_output=True, text=True, timeout=180)
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
