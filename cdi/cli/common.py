"""What several ``cdi`` commands share: the app class and its error handling, the consoles, the help
texts of shared options and the console summary of an audit (``cdi audit`` and ``cdi demo``)."""

from __future__ import annotations

import contextlib
import sys
import tempfile
import traceback
from typing import Iterator

import typer
from rich.console import Console

from cdi import __version__
from cdi.cli.options import Command, Group
from cdi.utils.errors import CDIError
from cdi.utils.terminal import console_text

EXIT_CODES_HELP = (
    "Exit status: 0 success (whatever the verdict), 2 usage or input error, 1 internal error "
    "(the traceback is saved to a file named on stderr) or, for `cdi verify`, a failed check."
)


class _Typer(typer.Typer):
    """The app: an unexpected exception becomes one line on stderr and exit status 1.

    Its commands are ``cli_options.Command``s (no ``<bool>`` on flags, a hint for ``--flag true``).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("cls", Group)
        super().__init__(*args, **kwargs)

    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", Command)
        return super().command(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - the last resort of the command line
            sys.exit(_internal_error(exc))


def _internal_error(exc: BaseException) -> int:
    """Save the traceback to a temporary file, print where it went, return exit status 1."""
    with tempfile.NamedTemporaryFile("w", prefix="cdi-error-", suffix=".txt", delete=False,
                                     encoding="utf-8") as handle:
        handle.write(f"cdi {__version__}: {' '.join(sys.argv)}\n")
        handle.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    Console(stderr=True).print(
        f"[bold red]internal error:[/] {console_text(type(exc).__name__)}: {console_text(str(exc))}\n"
        f"This is a bug in cdi or its environment. The traceback is in {console_text(handle.name)}; please attach it "
        "and the output of `cdi env` to a bug report.",
        highlight=False, soft_wrap=True,
    )
    return 1


console = Console()
err_console = Console(stderr=True)

#: Help of the Ray options, shared by extract and audit.
RAY_HELP = ("Compute on Ray: local (start a Ray instance on this machine), auto (the cluster this machine is in) "
            "or HOST:PORT. One model replica per GPU (or per --ray-threads CPUs); this process writes the store. "
            "Needs the ray extra: pip install \"cdi\\[ray]\".")  # \\[: not a rich markup tag
RAY_WORKERS_HELP = "Ray workers (default: one per GPU of the cluster; without GPUs, its CPUs / --ray-threads)."
RAY_THREADS_HELP = "torch threads (and Ray CPUs) of each CPU worker."
MAX_PIXELS_HELP = "Largest accepted image in pixels (default 64,000,000); larger files are refused as possible decompression bombs."
CAPTIONS_HELP = ("files (default): captions from metadata.jsonl or NAME.txt; auto[:MODEL]: caption every image with an "
                 "image-to-text model (default florence2; blip, florence2-large, a hub id or a folder), cached by image hash.")
SKIP_BAD_HELP = ("Leave unusable files out (unreadable, oversized, FIFOs, non-UTF-8 names) instead of failing; "
                 "each is recorded with its reason.")

@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn a ``CDIError`` into one red line on stderr and exit status 2."""
    try:
        yield
    except CDIError as exc:
        err_console.print(f"[bold red]error:[/] {console_text(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None



#: Files named per collection in the "left out" lines before "... and N more".
LEFT_OUT_NAMED = 5


def left_out_lines(name: str, entries: list[dict]) -> list[str]:
    """Console lines naming the files of a folder's file log (``ImageCollection.file_log``) not used as images.

    Skipped, duplicate and ignored files: the count, then the first ``LEFT_OUT_NAMED`` with their
    reasons. Caption files are used (as captions), so they are not listed.
    """
    def why(entry: dict) -> str:
        if entry["status"] == "duplicate":
            return f"same {entry.get('same', 'file')} as {entry.get('of')}"
        return str(entry.get("reason") or entry["status"])

    left = [e for e in entries if e.get("status") in ("skipped", "duplicate", "ignored")]
    if not left:
        return []
    named = "; ".join(f"{e['path']} ({why(e)})" for e in left[:LEFT_OUT_NAMED])
    more = f"; and {len(left) - LEFT_OUT_NAMED} more" if len(left) > LEFT_OUT_NAMED else ""
    return [f"{name}: {len(left)} file(s) left out: {named}{more}"]


def _print_left_out(result) -> None:
    """Name on stderr every file the audit left out (from ``result.inputs``), whatever the format."""
    inputs = getattr(result, "inputs", None) or {}
    for name in ("published", "unpublished"):
        record = inputs.get(name) if isinstance(inputs, dict) else None
        if not isinstance(record, dict):
            continue
        for line in left_out_lines(name, record.get("files", [])):
            err_console.print(f"[yellow]note:[/] {console_text(line)} (every file and its reason: result.json, "
                              "inputs)", highlight=False, soft_wrap=True)


def _print_result(result, fmt: str, out: str) -> None:
    """The console summary of an audit (or its JSON with --format json); the files left out go to stderr."""
    _print_left_out(result)
    if fmt == "json":
        print(result.to_json())
        return
    from rich.panel import Panel

    colour = {"used": "red", "not_detected": "green", "inconclusive": "yellow"}[result.verdict]
    lines = [
        f"[bold {colour}]verdict: {result.verdict}[/]"
        + (" (used beyond the reference model)" if result.question == "used_beyond_reference" and
           result.verdict == "used" else ""),
        console_text(result.verdict_text),
    ] + ([f"why: {console_text(result.protocol.get('verdict_reason', ''))}"]
         if result.inconclusive_reason == "direction" else []) + [
        "",
        f"p-value (verdict, {result.p_value_kind}: {result.protocol.get('verdict_test', 'test')}): "
        f"{result.p_value:.3g}   alpha: {result.alpha}",
        f"t-test p: {result.p_value_ttest:.3g}   permutation p: "
        + ("not run" if result.p_value_permutation is None else f"{result.p_value_permutation:.3g}"),
        f"published: {result.n_published}   unpublished: {result.n_unpublished}   "
        f"effect size (Hedges' g): {result.effect_size:.3f}   AUC: {result.auc:.3f}",
    ]
    if result.verdict != "inconclusive":  # no verdict: no figures about detecting one
        lines += _verdict_lines(result)
    if result.shift_guard is not None:
        guard = result.shift_guard
        lines.append(f"shift guard ({console_text(guard.encoder)}): p = {guard.p_value:.3g}, "
                     f"{'DETECTED' if guard.detected else 'no shift detected'}" + (" (ignored)" if guard.ignored else ""))
    lines += _design_ledger_lines(result)
    lines.append(f"files: {console_text(out)}/result.json, features.csv, report.html")
    console.print(Panel("\n".join(lines), title="cdi audit", expand=False), highlight=False)


def robustness_line(curve) -> str:
    """The console line of the leave-images-out curve: from which size on the target share of subsets is significant."""
    share = f"{100 * curve.target_share:.0f}%"
    if curve.n_needed is not None:
        return (f"robustness to leaving images out: {share} of subsets significant from {curve.n_needed} "
                "published images on")
    largest = max(curve.sizes) if curve.sizes else 0
    return (f"robustness to leaving images out: at no size tried (up to {largest} published images) were "
            f"{share} of subsets significant")


def _verdict_lines(result) -> list[str]:
    """Console lines on the permutation floor, the leave-images-out curve and the forward sample-size estimate."""
    lines = []
    proto = result.protocol
    if proto.get("verdict_choice") == "permutation" and proto.get("permutation_at_floor"):
        lines.append(f"the permutation p-value is at its floor: no shuffle reached the observed statistic, so it is "
                     f"below 1/({proto.get('permutations')} + 1); parametric p (strength of the evidence): "
                     f"{result.p_value_ttest:.3g}")
    if result.sample_size_curve is not None:
        lines.append(robustness_line(result.sample_size_curve))
    est = result.sample_size_estimate
    if est is not None:
        if est.get("published_needed") is None:
            lines.append("images another audit would need for 90% power: no estimate (no positive effect observed)")
        else:
            high = est.get("published_high")
            lines.append(f"images another audit would need for 90% power (estimate): about {est['published_needed']} "
                         f"published, 95% interval {est['published_low']} to {'unbounded' if high is None else high}")
    return lines


def _design_ledger_lines(result) -> list[str]:
    """Console lines on the design the audit followed and on the ledger's audits of these collections."""
    lines = []
    if result.design is not None:
        followed = "followed exactly" if result.design["followed"] else "followed WITH DEVIATIONS (see the report)"
        lines.append(f"design {result.design['commitment'][:16]}...: {followed}; "
                     f"randomness: {console_text(result.design['randomness']['name'])}")
    if result.ledger is not None:
        same = len(result.ledger["same_collections"])
        lines.append(f"ledger {console_text(result.ledger['file'])}: {same} audit(s) of these collections"
                     + (f", {result.ledger['same_published_other_unpublished']} of these published images with "
                        "other unpublished ones" if result.ledger["same_published_other_unpublished"] else ""))
    return lines

