"""``cdi toy``: the embedded toy world (``cdi toy build``)."""

from __future__ import annotations

import typer

from cdi.cli.common import _Typer, _user_errors, console
from cdi.utils.terminal import console_text

toy_app = _Typer(
    name="toy",
    help="The embedded toy world: digit images and a small suspect model trained by cdi itself.",
    no_args_is_help=True,
)


@toy_app.command("build")
def toy_build_command(
    kind: str = typer.Option("sd", "--kind", help="sd (tiny text-to-image latent model), ddpm (tiny class-conditional pixel DDPM), flow (tiny SD3-style flow-matching transformer) or sd-lora (a LoRA on the light sd, trained on an artist's images)."),
    strength: str = typer.Option("overtrained", "--strength", help="light (weak per-image membership) or overtrained (clear per-image membership)."),
    out: str = typer.Option(None, "--out", help="World folder (default: $CDI_CACHE/toy/KIND-STRENGTH-seedSEED or ~/.cache/cdi/toy/...)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the member split and of training (shipped weights: seed 0 only)."),
    retrain: bool = typer.Option(False, "--retrain", help="Train the model from scratch on this machine instead of using the shipped weights (minutes)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if OUT already holds a matching world."),
    quiet: bool = typer.Option(False, "--quiet", help="Print only the result, no progress."),
) -> None:
    """Write the toy world: members/, nonmembers/, nonmembers_shifted/, model/ and world.json."""

    from cdi.toy.world import build_world

    with _user_errors():
        if kind == "sd-lora":
            from cdi.toy.lora import build_lora_world

            lora_world = build_lora_world(out, force=force, progress=not quiet)
            console.print(f"toy world sd-lora: {console_text(str(lora_world.root))}\n  base        "
                          f"{console_text(str(lora_world.base_dir))}\n" + "".join(
                              f"  lora {s:<6} {console_text(str(p))}\n" for s, p in lora_world.lora_files.items()) + "".join(
                              f"  {k:<18} {console_text(str(p))}\n" for k, p in lora_world.folders.items()),
                          highlight=False, soft_wrap=True)
            return
        world = build_world(kind, strength, out, seed=seed, retrain=retrain, force=force, progress=not quiet)
        info = world.info
        console.print(
            f"toy world {info['kind']}-{info['strength']} (seed {info['seed']}, {info['source']} weights): "
            f"{console_text(str(world.root))}\n"
            f"  model       {console_text(str(world.model_dir))}\n"
            f"  members     {console_text(str(world.members_dir))} ({info['split']['members']} images)\n"
            f"  nonmembers  {console_text(str(world.nonmembers_dir))} ({info['split']['nonmembers']} images)\n"
            f"  shifted     {console_text(str(world.shifted_dir))}",
            highlight=False, soft_wrap=True,
        )
        if "matches_shipped_weights" in info:
            console.print(f"  retrained weights identical to the shipped ones: {info['matches_shipped_weights']}",
                          highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``cdi toy`` to ``app``."""
    app.add_typer(toy_app, name="toy")
