"""The benchmark report: ``benchmark.html`` from the content of ``benchmark.json``.

Same style sheet as the audit report; every figure with its bootstrap
interval; methods named and explained; and a warning wherever a figure
cannot be resolved at the sample size (a TPR at FPR <= 0.1% measured on
fewer than 1000 non-members is the TPR at zero false positives).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader
from markupsafe import Markup

from cdi.reports import text

TEMPLATES = Path(__file__).parent / "templates"

#: Table column -> key of ``MethodResult.intervals``.
_INTERVALS = {
    "cal_tpr_1": "calibration.tpr_at_1fpr", "cal_tpr_01": "calibration.tpr_at_01fpr", "cal_auc": "calibration.auc",
    "test_tpr_1": "test.tpr_1", "test_fpr_1": "test.fpr_1", "test_tpr_01": "test.tpr_01", "test_fpr_01": "test.fpr_01",
}


def _interval(pair: Any) -> str:
    if not isinstance(pair, (list, tuple)) or len(pair) != 2 or None in pair:
        return ""
    return f"[{100 * pair[0]:.1f}, {100 * pair[1]:.1f}]"


def resolution_warnings(split: dict[str, Any]) -> list[str]:
    """Warnings for the FPR bounds that the calibration and test splits cannot resolve."""
    warnings = []
    for name in ("calibration", "test"):
        n = len(split.get(f"{name}_nonmembers") or [])
        for fpr in (0.01, 0.001):
            message = text.tpr_resolution(n, fpr)
            if message:
                warnings.append(f"{name} split, TPR at {100 * fpr:g}% FPR: {message}")
    return warnings


def render_benchmark(result: dict[str, Any], rows: list[dict[str, Any]], roc_svg: str, mix_svg: str,
                     pct) -> str:
    """The HTML of ``benchmark.html`` (``rows``: ``cdi.benchmark.table_rows``; plots as inline SVG)."""
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, trim_blocks=True, lstrip_blocks=True)
    for row in rows:
        method = result["methods"][row["method"]]
        row["label"] = text.method_name(row["method"])
        row["about"] = text.method_about(row["method"])
        row["ci"] = {key: _interval(method.get("intervals", {}).get(name)) for key, name in _INTERVALS.items()}
    raw = {k: result.get(k) for k in ("config", "setup", "data", "model", "families", "environment")}
    if isinstance(raw.get("data"), dict):
        raw["data"] = {k: v for k, v in raw["data"].items() if not k.endswith("_hashes")}
    return env.get_template("benchmark.html.j2").render(
        **result,
        rows=rows,
        warnings=resolution_warnings(result["split"]),
        roc_svg=Markup(roc_svg),
        mix_svg=Markup(mix_svg),
        pct=pct,
        run_time=text.duration(result.get("total_seconds")),
        raw=text.raw_json(raw),
    )
