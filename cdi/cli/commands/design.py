"""``cdi design``: pre-register a randomised design."""

from __future__ import annotations

import typer

from cdi.cli.common import EXIT_CODES_HELP, MAX_PIXELS_HELP, _user_errors, console
from cdi.cli.options import FEATURES_HELP, choice, format_option
from cdi.utils.errors import CDIError
from cdi.utils.terminal import console_text


def design_command(
    works: str = typer.Option(None, "--works", help="Folder of the works not yet public (searched recursively)."),
    out: str = typer.Option(None, "--out", help="Where to write design.json."),
    publish_fraction: float = typer.Option(0.5, "--publish-fraction", help="Share of the works to publish (strictly between 0 and 1)."),
    beacon: str = typer.Option(None, "--beacon", help="A public random value published after the list hash was dated (hex; e.g. a drand round's randomness)."),
    beacon_name: str = typer.Option(None, "--beacon-name", help="Which beacon and round --beacon is, e.g. 'drand quicknet round 12345678'."),
    features: str = typer.Option(None, "--features", help="Planned analysis: " + FEATURES_HELP),
    alpha: float = typer.Option(0.01, "--alpha", help="Planned analysis: significance level of the verdict."),
    protocol: str = choice("pooled", "--protocol", ("pooled", "sequential", "crossfit"), "Planned analysis: the audit's test protocol."),
    verdict: str = choice("parametric", "--verdict", ("parametric", "permutation"), "Planned analysis: the verdict's p-value."),
    seed: int = typer.Option(0, "--seed", help="Planned analysis: the audit's seed (noise draws, folds, permutations)."),
    list_only: bool = typer.Option(False, "--list-only", help="Only print the works' list hash (step 1 with a beacon: date it, then take the first beacon round after that date)."),
    check: str = typer.Option(None, "--check", help="Re-derive the split of this design.json from its list and randomness (with --works: re-hash the works too); exit 1 if it does not check out."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
    max_pixels: int = typer.Option(None, "--max-pixels", help=MAX_PIXELS_HELP),
    fmt: str = format_option(),
) -> None:
    """Pre-register a randomised design: assign each work at random to publish or withhold, checkably.

    Fixes the list of works (SHA-256 of each, one hash of the list), derives the split from it and a public
    random value (--beacon) or the OS's randomness, and writes the two lists, the planned analysis and one
    commitment hash to design.json. Later `cdi audit --design design.json` checks the audit against it.
    """
    import json

    from cdi.audit import design as designs

    with _user_errors():
        if check is not None:
            if out is not None or beacon is not None or list_only:
                raise CDIError("--check re-derives an existing design: give it alone (with --works to re-hash them)")
            report = designs.check_design_file(check, works, max_pixels=max_pixels)
        elif list_only:
            if works is None:
                raise CDIError("--list-only needs --works FOLDER")
            listed = designs.list_only(works, max_pixels=max_pixels)
            if fmt == "json":
                print(json.dumps(listed, indent=2))
            else:
                console.print(
                    f"{listed['count']} works in {console_text(listed['folder'])}\nlist hash: {listed['list_sha256']}\n"
                    "Date this hash now (a public post, an email to yourself, a notary, or `ots stamp` of a file "
                    "holding it); then take the FIRST beacon round published after that date and run cdi design "
                    "with --beacon VALUE --beacon-name 'BEACON round N'. Change no work in between.",
                    highlight=False, soft_wrap=True)
            return
        else:
            if works is None or out is None:
                raise CDIError("cdi design needs --works FOLDER and --out design.json (or --check design.json)")
            designs.check_design_out(out, force=force)  # before the works are scanned
            analysis = designs.planned_analysis(features, alpha, protocol.lower(), verdict.lower(), seed)
            made = designs.make_design(works, publish_fraction=publish_fraction, beacon=beacon,
                                       beacon_name=beacon_name, analysis=analysis, max_pixels=max_pixels)
            designs.write_design(made, out, force=force)
    if check is not None:
        problems = report["problems"]
        if fmt == "json":
            print(json.dumps({"design": check, "commitment": report["design"].get("commitment"),
                              "ok": not problems, "problems": problems}, indent=2))
        elif problems:
            console.print("design does NOT check out:\n" + console_text("\n".join(f"  - {p}" for p in problems)),
                          highlight=False, soft_wrap=True)
        else:
            d = report["design"]
            console.print(f"design checks out: commitment {d['commitment']}; {d['assignment']['publish_count']} to "
                          f"publish, {d['assignment']['withhold_count']} to withhold, re-derived from list hash "
                          f"{d['works']['list_sha256']} and randomness from {console_text(d['randomness']['name'])}"
                          + (f"; the works in {console_text(works)} are exactly the listed ones" if works else ""),
                          highlight=False, soft_wrap=True)
        if problems:
            raise typer.Exit(code=1)
        return
    if fmt == "json":
        print(json.dumps(made, indent=2))
        return
    console.print(
        f"wrote {console_text(out)}: {made['assignment']['publish_count']} works to publish, "
        f"{made['assignment']['withhold_count']} to withhold (of {made['works']['count']}; list hash "
        f"{made['works']['list_sha256']})\nrandomness: {console_text(made['randomness']['statement'])}\n"
        + console_text("\n".join(designs.dating_advice(out, made["commitment"]))),
        highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``cdi design`` to ``app``."""
    app.command("design", epilog=EXIT_CODES_HELP)(design_command)
