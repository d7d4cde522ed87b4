"""Deterministic inline-SVG plots for the evidence report.

Each function takes numbers only and returns one ``<svg>`` element as a
string, ready to be placed inside the HTML. No user-supplied text (file
names, captions, model ids) ever reaches a plot, so the SVG cannot carry
markup from the user; every label is written here.

Determinism: the same numbers give byte-identical SVG. Matplotlib is used
through :class:`matplotlib.figure.Figure` only (no pyplot, no display), text
is drawn as paths with the bundled DejaVu Sans (the file looks the same on
every machine and needs no font), ``svg.hashsalt`` fixes the ids matplotlib
derives, the date is left out of the metadata, and every id is prefixed
with the plot's name so that several plots can share one HTML document.
"""

from __future__ import annotations

import functools
import io
import re

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator
from sklearn.metrics import roc_curve

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies
# and in greyscale print.
PUBLISHED_COLOR = "#D55E00"
UNPUBLISHED_COLOR = "#0072B2"
ALPHA_COLOR = "#B2182B"
REFERENCE_COLOR = "#666666"

# Smallest p-value drawn on log axes; a p-value of exactly 0 (underflow) is drawn here.
P_FLOOR = 1e-300

_STYLE = {
    "svg.fonttype": "path",
    "font.family": "DejaVu Sans",
    "font.size": 11.0,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#dddddd",
    "grid.linewidth": 0.6,
    "legend.frameon": False,
    "path.simplify": True,
}


def _styled(function):
    """Run a plotting function inside the report's matplotlib style.

    rc parameters are read when figures and artists are created, so the whole
    function, not only the saving, runs inside the context.
    """

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(_STYLE):
            return function(*args, **kwargs)

    return wrapper


@_styled
def score_distribution_svg(published: np.ndarray, unpublished: np.ndarray) -> str:
    """Overlaid histograms (as densities) of the per-image scores that entered the test.

    Parameters
    ----------
    published, unpublished : array of float
        Verdict scores of the published (P) and unpublished (U) images;
        non-finite values are dropped.

    Returns
    -------
    str
        An ``<svg>`` element. Dashed lines mark each collection's mean.
    """
    published = _finite(published)
    unpublished = _finite(unpublished)
    both = np.concatenate([published, unpublished])
    n_bins = int(np.clip(np.sqrt(both.size), 10, 40))
    edges = np.histogram_bin_edges(both, bins=n_bins)
    fig = Figure(figsize=(5.4, 3.4))
    ax = fig.add_subplot()
    for values, color, label in [
        (unpublished, UNPUBLISHED_COLOR, f"unpublished U (n = {unpublished.size})"),
        (published, PUBLISHED_COLOR, f"published P (n = {published.size})"),
    ]:
        if values.size == 0:
            continue
        ax.hist(values, bins=edges, density=True, histtype="stepfilled", color=color, alpha=0.25)
        ax.hist(values, bins=edges, density=True, histtype="step", color=color, linewidth=1.4,
                label=label)
        ax.axvline(values.mean(), color=color, linestyle="--", linewidth=1.2)
    ax.set_xlabel("per-image score (dashed lines: means)")
    ax.set_ylabel("density")
    ax.legend(loc="upper left", fontsize=10)
    return _to_svg(fig, "scores")


@_styled
def pvalue_curve_svg(
    sizes: list[int],
    median_p: list[float],
    share_significant: list[float],
    *,
    alpha: float,
    target_share: float,
    n_needed: int | None,
) -> str:
    """The p-value against the number of images, with the "images needed" estimate.

    Top panel: median p-value of the verdict test over random subsets of each
    size, on log-log axes, with horizontal lines at 0.05 and at the chosen
    alpha. Bottom panel: the share of subsets with p < alpha, with the target
    share that defines ``n_needed``. A vertical line marks ``n_needed``.
    """
    sizes_arr = np.asarray(sizes, dtype=float)
    p = np.clip(np.asarray(median_p, dtype=float), P_FLOOR, 1.0)
    share = np.asarray(share_significant, dtype=float)
    fig = Figure(figsize=(5.4, 4.6))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
    top.plot(sizes_arr, p, marker="o", markersize=3.5, color="black", linewidth=1.4,
             label="median p-value of random subsets")
    if np.isclose(alpha, 0.05):
        top.axhline(0.05, color=ALPHA_COLOR, linestyle="--", linewidth=1.2, label="alpha = 0.05")
    else:
        top.axhline(0.05, color=REFERENCE_COLOR, linestyle=":", linewidth=1.2, label="0.05")
        top.axhline(alpha, color=ALPHA_COLOR, linestyle="--", linewidth=1.2,
                    label=f"chosen alpha = {alpha:g}")
    _log_log(top)
    finite_p = p[np.isfinite(p)]
    low = min(float(finite_p.min()) if finite_p.size else alpha, alpha) / 5
    top.set_ylim(max(low, P_FLOOR), 1.5)
    top.set_ylabel("p-value (log scale)")
    bottom.plot(sizes_arr, share, marker="o", markersize=3.5, color="black", linewidth=1.4)
    bottom.axhline(target_share, color=REFERENCE_COLOR, linestyle=":", linewidth=1.2)
    bottom.set_ylim(-0.03, 1.03)
    bottom.set_ylabel(f"share with p < {alpha:g}")
    bottom.set_xlabel("images per collection (log scale)")
    # Ticks at the sizes tested: the default log ticks label only powers of ten, often one or none here.
    bottom.xaxis.set_major_locator(FixedLocator(sizes_arr))
    bottom.xaxis.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:g}"))
    bottom.xaxis.set_minor_locator(NullLocator())
    if n_needed is not None:
        for ax in (top, bottom):
            ax.axvline(n_needed, color=PUBLISHED_COLOR, linewidth=1.4)
        top.plot([], [], color=PUBLISHED_COLOR, linewidth=1.4,
                 label=f"about {n_needed} images needed")
    top.legend(loc="lower left", fontsize=9.5)
    return _to_svg(fig, "pcurve")


@_styled
def roc_svg(published: np.ndarray, unpublished: np.ndarray) -> str:
    """ROC curve of the scores, published images as the positive class, as two ``<svg>`` panels.

    First: linear axes with the chance diagonal. Second: log-log axes, which
    show the low false-positive region where single-image decisions would
    have to work; a dashed line marks 1% false-positive rate. Two separate
    figures, so that a narrow screen can stack them at a legible size.
    """
    published = _finite(published)
    unpublished = _finite(unpublished)
    labels = np.concatenate([np.ones(published.size), np.zeros(unpublished.size)])
    fpr, tpr, _ = roc_curve(labels, np.concatenate([published, unpublished]))
    area = float(np.trapezoid(tpr, fpr))
    linear = Figure(figsize=(3.8, 3.9)).add_subplot()
    loglog = Figure(figsize=(3.8, 3.9)).add_subplot()
    for ax in (linear, loglog):
        ax.plot(fpr, tpr, color=PUBLISHED_COLOR, linewidth=1.6, label=f"scores, AUC {area:.3f}")
    linear.plot([0, 1], [0, 1], color=REFERENCE_COLOR, linestyle=":", linewidth=1.0, label="chance")
    linear.set_xlim(0, 1)
    linear.set_ylim(0, 1)
    linear.set_aspect("equal")
    linear.set_title("linear axes", fontsize=11)
    floor = 1.0 / max(unpublished.size, 1)
    loglog.plot([floor, 1], [floor, 1], color=REFERENCE_COLOR, linestyle=":", linewidth=1.0, label="chance")
    loglog.axvline(0.01, color=REFERENCE_COLOR, linestyle="--", linewidth=0.9, label="1% FPR")
    _log_log(loglog)
    loglog.set_xlim(floor / 1.5, 1.05)
    loglog.set_ylim(1.0 / max(published.size, 1) / 1.5, 1.05)
    loglog.set_aspect("equal")
    loglog.set_title("log-log axes (low FPR)", fontsize=11)
    for ax in (linear, loglog):
        ax.set_xlabel("false-positive rate (share of U)")
        ax.set_ylabel("true-positive rate (share of P)")
        ax.legend(loc="lower right", fontsize=9.5)
    return _to_svg(linear.figure, "roc-linear") + "\n" + _to_svg(loglog.figure, "roc-loglog")


@_styled
def feature_effects_svg(labels: list[str], d: list[float], low: list[float], high: list[float],
                        known: list[bool]) -> str:
    """Forest plot of the per-feature standardised differences with their 95% intervals.

    One row per feature, top to bottom in the given order; a dot at ``d``, a
    line from ``low`` to ``high``. Features with a known member direction are
    oriented so that right means "published images look more like training
    images" (orange); features without one keep published minus unpublished
    (grey, hollow). ``labels`` are cdi's own column names (drawn as paths).
    """
    n = len(labels)
    y = np.arange(n)[::-1]
    fig = Figure(figsize=(5.4, 1.2 + 0.2 * n))
    ax = fig.add_subplot()
    d_arr, lo, hi = (np.asarray(v, dtype=float) for v in (d, low, high))
    known_arr = np.asarray(known, dtype=bool)
    ax.axvline(0.0, color=REFERENCE_COLOR, linewidth=1.0)
    for mask, color, face, label in [(known_arr, PUBLISHED_COLOR, PUBLISHED_COLOR, "known member direction"),
                                     (~known_arr, REFERENCE_COLOR, "white", "direction unknown (P minus U)")]:
        if not mask.any():
            continue
        ax.hlines(y[mask], lo[mask], hi[mask], color=color, linewidth=1.3)
        ax.plot(d_arr[mask], y[mask], "o", markersize=4, color=color, markerfacecolor=face, label=label,
                linestyle="none")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=10)
    ax.set_ylim(-0.7, n - 0.3)
    ax.grid(axis="y", visible=False)
    ax.set_xlabel("standardised difference with 95% interval\n(right: published images more like training images)",
                  fontsize=10)
    if (~known_arr).any():
        ax.legend(loc="lower right", fontsize=9.5)
    return _to_svg(fig, "effects")


_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


def _power_of_ten(value: float, _position: int | None = None) -> str:
    """Tick label for a log axis: 1, 10, 100, 1000 as numbers, smaller powers as 10⁻ⁿ."""
    exponent = int(round(np.log10(value))) if value > 0 else 0
    if value <= 0 or not np.isclose(value, 10.0**exponent):
        return ""
    return f"{10 ** exponent:d}" if 0 <= exponent <= 4 else "10" + str(exponent).translate(_SUPERSCRIPT)


def _log_log(ax) -> None:
    """Log scale on both axes, labelled with plain text at powers of ten.

    Matplotlib's default log labels are mathtext, which is slow to lay out.
    """
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(_power_of_ten))
        axis.set_minor_formatter(NullFormatter())


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return values[np.isfinite(values)]


_ID = re.compile(r'\sid="([^"]+)"')
_REFERENCE = re.compile(r'(id="|href="#|url\(#)([^")]+)')


def _to_svg(fig: Figure, name: str) -> str:
    """Render ``fig`` as an inline ``<svg>`` element whose ids all start with ``name``."""
    fig.set_layout_engine("constrained")
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": f"cdi-report-{name}"}):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML declaration and doctype
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    # matplotlib's global ``*{stroke-linejoin...}`` rule would apply to the whole HTML
    # document; the report's stylesheet sets the same rule scoped to its plots.
    svg = re.sub(r"<style[^>]*>.*?</style>\s*", "", svg, flags=re.S)
    svg = re.sub(r"<!--.*?-->", "", svg, flags=re.S)
    ids = set(_ID.findall(svg))
    svg = _REFERENCE.sub(
        lambda m: f"{m.group(1)}{name}-{m.group(2)}" if m.group(2) in ids else m.group(0), svg
    )
    return svg.strip()
