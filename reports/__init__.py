"""Reports: pure functions from audit results to a self-contained HTML file.

Re-rendering a report needs no model: ``cdi report FOLDER`` reads
``result.json`` and writes ``report.html`` beside it.
"""

from cdi.reports.html import ReportWarning, load_thumbnails, render_report, write_report

__all__ = ["ReportWarning", "load_thumbnails", "render_report", "write_report"]
