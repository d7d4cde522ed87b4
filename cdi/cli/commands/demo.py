"""``cdi demo``: build (or load) the toy world and audit it."""

from __future__ import annotations

import typer

from cdi.cli.common import _print_result, _user_errors
from cdi.cli.options import choice, format_option
from cdi.utils.progress import quiet_library_progress


def demo_command(
    out: str = typer.Option("demo-out", "--out", help="Folder for the demo's data and audit files."),
    null: bool = typer.Option(False, "--null", help="Draw the published images from non-members: the audit must not detect use."),
    web: bool = typer.Option(False, "--web", help="Publish web copies: the published images are JPEG copies (quality 85), the unpublished ones the original PNGs."),
    no_harmonise: bool = typer.Option(False, "--no-harmonise", help="Audit without harmonising the two collections' encodings (see `cdi audit --help`)."),
    member_fraction: float = typer.Option(1.0, "--member-fraction", help="Share of the published images drawn from the members (partial use)."),
    n: int = typer.Option(None, "--n", help="Images per collection (default: 150)."),
    kind: str = choice("sd", "--kind", ("sd", "ddpm", "flow"), "Toy model: sd (text-to-image latent model), ddpm (class-conditional pixel model) or flow (SD3-style flow-matching transformer)."),
    strength: str = choice("overtrained", "--strength", ("light", "overtrained"), "Toy training strength: light or overtrained."),
    seed: int = typer.Option(0, "--seed", help="Seed of the draw and of the audit."),
    permutations: int = typer.Option(None, "--permutations", help="Permutations of the permutation test (default: 99,999 with the pooled protocol, 1,000 with the others)."),
    store: str = typer.Option(None, "--store", help="Feature store to reuse between demo runs."),
    fmt: str = format_option(),
    scenario: str = choice("pretrained", "--scenario", ("pretrained", "lora"), "pretrained (a model trained on P) or lora (a LoRA on a base model, audited without and with the base as reference)."),
    noise_draws: int = typer.Option(None, "--noise-draws", help="Noise draws of the audit (see `cdi audit --help`; default 2)."),
    design: bool = typer.Option(False, "--design", help="The flow of a pre-registered randomised design: `cdi design` splits 2n toy non-members into publish/withhold (OUT/design.json), then `cdi audit --design` (the model saw neither half: expect not_detected)."),
) -> None:
    """Build (or load) the embedded toy world and audit it."""
    with _user_errors():
        from cdi.toy.demo import DEFAULT_DEMO_SIZE, run_demo

        quiet_library_progress()
        draws = {} if noise_draws is None else {"noise_draws": noise_draws}
        if scenario == "lora":
            from pathlib import Path

            results = run_demo(out, null=null, n=n or DEFAULT_DEMO_SIZE, seed=seed, permutations=permutations,
                               progress=True, scenario="lora", web=web, **draws)
            for result, folder in zip(results, ("lora", "lora-vs-base")):
                _print_result(result, fmt, str(Path(out) / folder))
            return
        result = run_demo(out, null=null, member_fraction=member_fraction, n=n or DEFAULT_DEMO_SIZE, kind=kind,
                          strength=strength, seed=seed, permutations=permutations, store=store,
                          progress=True, scenario=scenario, design=design, web=web,
                          no_harmonise=no_harmonise, **draws)  # progress on stderr
        _print_result(result, fmt, out)


def register(app: typer.Typer) -> None:
    """Add ``cdi demo`` to ``app``."""
    app.command("demo")(demo_command)
