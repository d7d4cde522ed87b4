"""``cdi audit``: were the published images used to train the model?"""

from __future__ import annotations

import typer

from cdi.cli.common import (CAPTIONS_HELP, EXIT_CODES_HELP, MAX_PIXELS_HELP, RAY_HELP, RAY_THREADS_HELP,
                            RAY_WORKERS_HELP, SKIP_BAD_HELP, _print_result, _user_errors)
from cdi.cli.options import (BATCH_SIZE_HELP, FEATURES_HELP, LoaderOptions, choice, format_option,
                             reference_option, with_loader_options)
from cdi.utils.errors import CDIError
from cdi.utils.progress import quiet_library_progress


@with_loader_options
def audit_command(
    published: str = typer.Option(None, "--published", help="Folder of the published images (suspected training data)."),
    unpublished: str = typer.Option(None, "--unpublished", help="Folder of comparable images that were never published."),
    model: str = typer.Option(None, "--model", help="Model alias (`cdi models`), Hugging Face hub id, or local pipeline folder."),
    published_features: str = typer.Option(None, "--published-features", help="Audit from this `cdi extract` CSV of the published images instead of a model (with --unpublished-features; --published/--unpublished then only feed the shift guard)."),
    unpublished_features: str = typer.Option(None, "--unpublished-features", help="The `cdi extract` CSV of the unpublished images (same model and features)."),
    out: str = typer.Option(None, "--out", help="Folder for result.json, features.csv and report.html (required)."),
    features: str = typer.Option(None, "--features", help=FEATURES_HELP),
    alpha: float = typer.Option(0.01, "--alpha", help="Significance level of the verdict."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random draw (noise, folds, permutations)."),
    folds: int = typer.Option(5, "--folds", help="Blocks of the cross-fitted scoring protocol."),
    permutations: int = typer.Option(None, "--permutations", help="Permutations of the exact permutation test (0: off; default 99,999 with the pooled protocol, resolving p down to 1e-5, and 1,000 with the others)."),
    scorer: str = choice("logistic", "--scorer", ("logistic", "xgboost"), "Scoring model: logistic (default) or xgboost (needs the xgboost package; sequential and crossfit protocols)."),
    protocol: str = choice("pooled", "--protocol", ("pooled", "sequential", "crossfit"), "pooled (the verdict's default: no split, no seed), sequential or crossfit."),
    verdict: str = choice("parametric", "--verdict", ("parametric", "permutation"), "parametric (the protocol's p-value) or permutation (the exact permutation p-value is the verdict)."),
    sample_size_resamples: int = typer.Option(50, "--sample-size-resamples", help="Resamples per size for the images-needed curve (0: off)."),
    noise_draws: int = typer.Option(None, "--noise-draws", help="Noise draws of the noise-drawing features; the verdict averages its statistic over them, which makes the p-value depend less on --seed (default 2 with a model, 1 from feature tables; each draw beyond the first costs one more extraction of those families)."),
    seed_check: int = typer.Option(0, "--seed-check", help="Re-extract the noise-drawing features with this many other seeds (--seed + 1, + 2, ...) and record the verdict p-value at each: the spread a re-run with another seed would give. Costs one more extraction of those families per seed and draw (0: off)."),
    ignore_shift: bool = typer.Option(False, "--ignore-shift", help="Give a verdict even if the shift guard finds that P and U differ without the model."),
    no_harmonise: bool = typer.Option(False, "--no-harmonise", help="Do not re-encode the two collections alike when their JPEG quality, format or size differ (the report then says what this risks)."),
    shift_alpha: float = typer.Option(0.05, "--shift-alpha", help="Significance level of the shift guard (higher = more cautious)."),
    shift_encoder: str = choice("auto", "--shift-encoder", ("auto", "clip", "builtin"), "auto (CLIP if cached locally, else built-in), clip or builtin."),
    batch_size: str = typer.Option("auto", "--batch-size", help=BATCH_SIZE_HELP),
    store: str = typer.Option(None, "--store", help="Feature store (folder or .sqlite file) to reuse and resume extraction."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=SKIP_BAD_HELP),
    workers: int = typer.Option(None, "--workers", help="Image decoding worker processes."),
    ray: str = typer.Option(None, "--ray", help=RAY_HELP),
    ray_workers: int = typer.Option(None, "--ray-workers", help=RAY_WORKERS_HELP),
    ray_threads: int = typer.Option(1, "--ray-threads", help=RAY_THREADS_HELP),
    max_pixels: int = typer.Option(None, "--max-pixels", help=MAX_PIXELS_HELP),
    captions: str = typer.Option(None, "--captions", help=CAPTIONS_HELP),
    force: bool = typer.Option(False, "--force", help="Replace an earlier audit in --out."),
    fmt: str = format_option(),
    loader: LoaderOptions = None,
    reference_model: str = reference_option(),
    design: str = typer.Option(None, "--design", help="design.json of `cdi design`: stop unless P and U are its two lists (by SHA-256) and the options its planned analysis."),
    allow_deviations: bool = typer.Option(False, "--allow-deviations", help="With --design: audit even if images are missing from or added to the design's lists, and list them in the result."),
    ledger: str = typer.Option(None, "--ledger", help="Audit ledger file this audit is appended to (default: cdi-ledger.jsonl beside --store, else in the parent folder of --out)."),
) -> None:
    """Audit: were the published images used to train the model? Writes result.json, features.csv and report.html."""
    with _user_errors():
        from cdi.audit.config import AuditConfig
        from cdi.audit.run import run_audit

        check_audit_sources(published, unpublished, model, published_features, unpublished_features, out)

        config = AuditConfig(
            published=published, unpublished=unpublished, model=model, out=out, features=features, alpha=alpha,
            seed=seed, folds=folds, permutations=permutations, scorer=scorer, protocol=protocol.lower(),
            verdict=verdict.lower(),
            sample_size_resamples=sample_size_resamples, seed_check=seed_check, noise_draws=noise_draws, ignore_shift=ignore_shift, shift_alpha=shift_alpha,
            shift_encoder=shift_encoder, batch_size=batch_size, store=store, skip_bad=skip_bad, workers=workers,
            no_harmonise=no_harmonise, force=force, published_features=published_features, unpublished_features=unpublished_features,
            ray=ray, ray_workers=ray_workers, ray_threads=ray_threads, captions=captions,
            **({} if max_pixels is None else {"max_pixels": max_pixels}), **loader.as_config(),
            reference_model=reference_model, design=design, allow_deviations=allow_deviations, ledger=ledger,
        )
        quiet_library_progress()  # cdi reports its own progress; no weight-loading bars of the libraries
        result = run_audit(config, progress=True)  # progress goes to stderr: stdout holds only the JSON
        _print_result(result, fmt, out)


def check_audit_sources(published, unpublished, model, published_features, unpublished_features, out) -> None:
    """Name every option an audit lacks at once (``CDIError``), not only the first."""
    if published_features is not None or unpublished_features is not None:
        wanted = {"--published-features": published_features, "--unpublished-features": unpublished_features}
    else:
        wanted = {"--published": published, "--unpublished": unpublished, "--model": model}
    missing = [flag for flag, value in {**wanted, "--out": out}.items() if value is None]
    if missing:
        raise CDIError(
            f"missing {', '.join(missing)}. An audit needs the folder of the published images (--published), one "
            "of comparable unpublished images (--unpublished), the model (--model) and a folder for its files "
            "(--out), e.g. `cdi audit --published P --unpublished U --model MODEL --out OUT`; or, instead of "
            "images and model, the `cdi extract` tables of both (--published-features, --unpublished-features). "
            "`cdi demo` runs a complete example.")


def register(app: typer.Typer) -> None:
    """Add ``cdi audit`` to ``app``."""
    app.command("audit", epilog=EXIT_CODES_HELP)(audit_command)
