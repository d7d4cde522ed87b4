"""``cdi benchmark``: single-image membership inference attacks beside the CDI audit."""

from __future__ import annotations

from pathlib import Path

import typer

from cdi.cli.common import _user_errors
from cdi.cli.options import BATCH_SIZE_HELP, LoaderOptions, format_option, reference_option, with_loader_options
from cdi.utils.progress import quiet_library_progress


@with_loader_options
def benchmark_command(
    out: str = typer.Option(..., "--out", help="Folder for benchmark.json, benchmark.html and the feature store."),
    setup: str = typer.Option(None, "--setup", help="A named setup from examples/setups (toy-defective, toy-realistic, copymark-*, sd15-laion-mi)."),
    members: str = typer.Option(None, "--members", help="Folder of member images (with --nonmembers and --model)."),
    nonmembers: str = typer.Option(None, "--nonmembers", help="Folder of non-member images."),
    model: str = typer.Option(None, "--model", help="Model alias, hub id or local pipeline folder."),
    methods: str = typer.Option(None, "--methods", help="Comma-separated attacks (default: all; with --quick a cheap subset)."),
    calibration_fraction: float = typer.Option(0.5, "--calibration-fraction", help="Share of each class used for calibration."),
    quick: bool = typer.Option(False, "--quick", help="Small sizes: 60 images of each class, cheap methods, fewer PFAMI/GSA calls."),
    seed: int = typer.Option(0, "--seed", help="Seed of the subset, split, noise, folds and bootstrap."),
    batch_size: str = typer.Option("auto", "--batch-size", help=BATCH_SIZE_HELP),
    store: str = typer.Option(None, "--store", help="Feature store (default: <out>/features.sqlite)."),
    mix: str = typer.Option(None, "--mix", help="Mixing experiment: shifted shares of non-members, e.g. 0,0.25,0.5,0.75,1."),
    permutations: int = typer.Option(1000, "--permutations", help="Permutations of the audit's permutation test."),
    folds: int = typer.Option(5, "--folds", help="Folds of cross-fitting for trained methods and of the audit."),
    alpha: float = typer.Option(0.01, "--alpha", help="Significance level of the audit run beside the attacks."),
    fmt: str = format_option(),
    loader: LoaderOptions = None,
    reference_model: str = reference_option(),
) -> None:
    """Benchmark single-image membership inference attacks (CopyMark protocol) beside the CDI audit."""
    with _user_errors():
        from cdi.benchmark import BenchmarkConfig, format_table, run_benchmark

        config = BenchmarkConfig(
            out=out, setup=setup, members=members, nonmembers=nonmembers, model=model, methods=methods,
            calibration_fraction=calibration_fraction, quick=quick, seed=seed, batch_size=batch_size,
            store=store, mix=mix, permutations=permutations, folds=folds, alpha=alpha, **loader.as_config(),
            reference_model=reference_model,
        )
        quiet_library_progress()
        result = run_benchmark(config, progress=True)  # progress on stderr
        if fmt == "json":
            from cdi.benchmark import BENCHMARK_FILE

            print((Path(out) / BENCHMARK_FILE).read_text(encoding="utf-8"))
            return
        typer.echo(format_table(result))
        typer.echo(f"wrote {out}/benchmark.json and {out}/benchmark.html")


def register(app: typer.Typer) -> None:
    """Add ``cdi benchmark`` to ``app``."""
    app.command("benchmark")(benchmark_command)
