"""``cdi demo``: audit the embedded toy world end to end.

The toy world (``cdi.toy.world``) has a model trained on the member half of
scikit-learn's digits. The demo draws

* P ("published"): ``n`` images from the members, or with ``null=True``
  from the non-members (the model never saw them: the audit must not
  detect use); with ``member_fraction < 1`` only that share of P comes from
  the members and the rest from non-members (partial use);
* U ("unpublished"): ``n`` other non-members, disjoint from P,

copies them with their captions into ``OUT/data/published`` and
``OUT/data/unpublished``, and runs an ordinary audit on those folders.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cdi.utils.errors import CDIError

DEFAULT_DEMO_SIZE = 150


@dataclass
class DemoDraw:
    """Which toy images went into P and U."""

    published_members: list[str]
    published_nonmembers: list[str]
    unpublished: list[str]


def _captions(folder: Path) -> dict[str, str | None]:
    """File name -> caption of a toy-world folder, read by ``cdi.data.collection`` as an audit would read it."""
    from cdi.data.collection import ImageCollection

    return {r.path: r.caption for r in ImageCollection.from_folder(folder).records}


def draw_demo_sets(members: list[str], nonmembers: list[str], *, n: int, null: bool,
                   member_fraction: float, seed: int) -> DemoDraw:
    """Seeded draw of P and U file names from the toy world's two halves."""
    if not 0.0 <= member_fraction <= 1.0:
        raise CDIError(f"--member-fraction must be between 0 and 1 (got {member_fraction})")
    if n < 1:
        raise CDIError(f"--n must be positive (got {n})")
    rng = np.random.default_rng(seed)
    members = sorted(members)
    nonmembers = list(rng.permutation(sorted(nonmembers)))
    n_members = 0 if null else int(round(member_fraction * n))
    n_nonmember_p = n - n_members
    if n_members > len(members) or n_nonmember_p + n > len(nonmembers):
        raise CDIError(
            f"the toy world has {len(members)} members and {len(nonmembers)} non-members: too few for "
            f"n={n} per collection with this draw; choose a smaller --n"
        )
    published_members = sorted(rng.choice(members, size=n_members, replace=False).tolist())
    published_nonmembers = sorted(nonmembers[:n_nonmember_p])
    unpublished = sorted(nonmembers[n_nonmember_p:n_nonmember_p + n])
    return DemoDraw(published_members, published_nonmembers, unpublished)


def write_demo_folders(world, draw: DemoDraw, data_dir: Path, captions: dict | None = None) -> tuple[Path, Path]:
    """Copy the drawn images and their captions into ``published/`` and ``unpublished/``.

    ``captions``: ``{"members": {file: caption}, "nonmembers": {...}}`` when the
    caller has read them already; else read here.
    """
    if captions is None:
        captions = {"members": _captions(world.members_dir), "nonmembers": _captions(world.nonmembers_dir)}
    sources = {"members": world.members_dir, "nonmembers": world.nonmembers_dir}
    plan = {
        "published": [("members", f) for f in draw.published_members]
        + [("nonmembers", f) for f in draw.published_nonmembers],
        "unpublished": [("nonmembers", f) for f in draw.unpublished],
    }
    if data_dir.exists():
        shutil.rmtree(data_dir)
    folders = []
    for name, files in plan.items():
        folder = data_dir / name
        folder.mkdir(parents=True)
        lines = []
        for half, file_name in sorted(files, key=lambda item: item[1]):
            shutil.copyfile(sources[half] / file_name, folder / file_name)
            lines.append(json.dumps({"file_name": file_name, "text": captions[half][file_name]}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        folders.append(folder)
    return folders[0], folders[1]


def run_demo(out: str | Path = "demo-out", *, null: bool = False, member_fraction: float = 1.0,
             n: int = DEFAULT_DEMO_SIZE, kind: str = "sd", strength: str = "overtrained", seed: int = 0,
             permutations: int | None = None, progress: bool = True, scenario: str = "pretrained", **audit_options):
    """Build or load the toy world, draw P and U, and audit them; returns the ``AuditResult``.

    ``scenario="lora"``: the fine-tune toy world instead (``cdi.toy.lora.run_lora_demo``), audited without
    and with the base as reference; returns both results.
    """
    import torch

    from cdi.audit.run import AuditConfig, run_audit
    from cdi.toy.world import build_world

    if audit_options.get("device", "auto") in ("auto", "cpu") and not torch.cuda.is_available():
        # The toy networks are tiny: a second intra-op thread buys nothing and, on a busy
        # machine, costs a lot (150 + 150 images: 43 s with one thread, 5 min 24 s with
        # two, same machine and load).
        torch.set_num_threads(1)
    if scenario == "lora":
        from cdi.toy.lora import run_lora_demo

        return run_lora_demo(out, n=n, null=null, seed=seed, permutations=permutations, progress=progress,
                             **audit_options)
    if scenario != "pretrained":
        raise CDIError(f"unknown --scenario {scenario!r}; choose pretrained or lora")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CDIError(f"--out {out} exists and is not a folder")
    world = build_world(kind=kind, strength=strength, seed=0, progress=progress)
    captions = {"members": _captions(world.members_dir), "nonmembers": _captions(world.nonmembers_dir)}
    draw = draw_demo_sets(sorted(captions["members"]), sorted(captions["nonmembers"]), n=n, null=null,
                          member_fraction=member_fraction, seed=seed)
    published, unpublished = write_demo_folders(world, draw, out / "data", captions)
    config = AuditConfig(
        published=str(published), unpublished=str(unpublished), model=str(world.model_dir), out=str(out),
        seed=seed, permutations=permutations, force=True,
        extra={"demo": {"kind": kind, "strength": strength, "null": null, "member_fraction": member_fraction,
                        "n": n, "published_members": len(draw.published_members),
                        "published_nonmembers": len(draw.published_nonmembers)}},
        **audit_options,
    )
    return run_audit(config, progress=progress)
