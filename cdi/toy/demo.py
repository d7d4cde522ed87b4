"""``cdi demo``: audit the embedded toy world end to end.

The toy world (``cdi.toy.world``) has a model trained on the member half of
scikit-learn's digits. The demo draws

* P ("published"): ``n`` images from the members, or with ``null=True``
  from the non-members (the model never saw them: the audit must not
  detect use); with ``member_fraction < 1`` only that share of P comes from
  the members and the rest from non-members (partial use);
* U ("unpublished"): ``n`` other non-members, disjoint from P,

copies them with their captions into ``OUT/data/published`` and
``OUT/data/unpublished``, and runs an ordinary audit on those folders. With
``web=True`` the published images are web copies (``cdi.toy.data.web_copy``:
JPEG at quality 85) while the unpublished ones stay the original PNGs, as a
creator's website and hard disk would hold them; the audit harmonises the
two (``cdi.data.harmonise``) unless told not to (``no_harmonise=True``).
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


def write_demo_folders(world, draw: DemoDraw, data_dir: Path, captions: dict | None = None, *,
                       web: bool = False) -> tuple[Path, Path]:
    """Copy the drawn images and their captions into ``published/`` and ``unpublished/``.

    ``captions``: ``{"members": {file: caption}, "nonmembers": {...}}`` when the
    caller has read them already; else read here. ``web``: the published
    images are written as web copies (``cdi.toy.data.web_copy``, ``.jpg``).
    """
    from PIL import Image

    from cdi.toy.data import web_copy, web_copy_name

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
            if web and name == "published":
                with Image.open(sources[half] / file_name) as image:
                    (folder / web_copy_name(file_name)).write_bytes(web_copy(image))
                written = web_copy_name(file_name)
            else:
                shutil.copyfile(sources[half] / file_name, folder / file_name)
                written = file_name
            lines.append(json.dumps({"file_name": written, "text": captions[half][file_name]}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        folders.append(folder)
    return folders[0], folders[1]


def run_demo(out: str | Path = "demo-out", *, null: bool = False, member_fraction: float = 1.0,
             n: int = DEFAULT_DEMO_SIZE, kind: str = "sd", strength: str = "overtrained", seed: int = 0,
             permutations: int | None = None, progress: bool = True, scenario: str = "pretrained",
             design: bool = False, web: bool = False, **audit_options):
    """Build or load the toy world, draw P and U, and audit them; returns the ``AuditResult``.

    ``web=True``: P holds web copies (JPEG) of the drawn images, U the original PNGs (module docstring).

    ``scenario="lora"``: the fine-tune toy world instead (``cdi.toy.lora.run_lora_demo``), audited without
    and with the base as reference; returns both results. ``design=True``: the flow of a pre-registered
    randomised design instead (``run_design_demo``).
    """
    import torch

    from cdi.audit.config import AuditConfig

    from cdi.audit.run import run_audit
    from cdi.toy.world import build_world

    if audit_options.get("device", "auto") in ("auto", "cpu") and not torch.cuda.is_available():
        # The toy networks are tiny: a second intra-op thread buys nothing and, on a busy
        # machine, costs a lot (150 + 150 images: 43 s with one thread, 5 min 24 s with
        # two, same machine and load).
        torch.set_num_threads(1)
    if scenario == "lora":
        from cdi.toy.lora import run_lora_demo

        if web:
            raise CDIError("--web applies to the pretrained scenario only")
        return run_lora_demo(out, n=n, null=null, seed=seed, permutations=permutations, progress=progress,
                             **audit_options)
    if scenario != "pretrained":
        raise CDIError(f"unknown --scenario {scenario!r}; choose pretrained or lora")
    if design:
        if null or member_fraction != 1.0:
            raise CDIError("--design draws its works from the toy's non-members itself: drop --null and "
                           "--member-fraction")
        if web:
            raise CDIError("--web and --design are separate demos; run one at a time")
        return run_design_demo(out, n=n, kind=kind, strength=strength, seed=seed, permutations=permutations,
                               progress=progress, **audit_options)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CDIError(f"--out {out} exists and is not a folder")
    world = build_world(kind=kind, strength=strength, seed=0, progress=progress)
    captions = {"members": _captions(world.members_dir), "nonmembers": _captions(world.nonmembers_dir)}
    draw = draw_demo_sets(sorted(captions["members"]), sorted(captions["nonmembers"]), n=n, null=null,
                          member_fraction=member_fraction, seed=seed)
    published, unpublished = write_demo_folders(world, draw, out / "data", captions, web=web)
    config = AuditConfig(
        published=str(published), unpublished=str(unpublished), model=str(world.model_dir), out=str(out),
        seed=seed, permutations=permutations, force=True,
        extra={"demo": {"kind": kind, "strength": strength, "null": null, "member_fraction": member_fraction,
                        "n": n, "web": web, "published_members": len(draw.published_members),
                        "published_nonmembers": len(draw.published_nonmembers)}},
        **audit_options,
    )
    return run_audit(config, progress=progress)


#: Stands in for a public beacon in ``cdi demo --design`` (so the demo is reproducible); named as such.
DEMO_BEACON_NAME = "cdi demo: a fixed value derived from --seed, NOT a public beacon (illustration only)"


def run_design_demo(out: str | Path, *, n: int = DEFAULT_DEMO_SIZE, kind: str = "sd", strength: str = "overtrained",
                    seed: int = 0, permutations: int | None = None, progress: bool = True, **audit_options):
    """``cdi demo --design``: the whole flow of a pre-registered design (``cdi.audit.design``) on the toy world.

    What it can show, honestly: the toy model's weights are shipped, trained
    before any design drawn now, so no design can decide what the toy model
    was trained on. The demo therefore plays the case a design protects
    against a false accusation: ``2n`` of the toy's non-members (never
    trained on) stand in for a creator's unpublished works
    (``OUT/data/works``); ``cdi design`` splits them at random into publish
    and withhold (a fixed value derived from ``seed`` stands in for the
    public beacon, and the design says so) and fixes the analysis
    (``OUT/design.json``); the publish half is copied to
    ``OUT/data/published``, the withhold half to ``OUT/data/unpublished``;
    and the audit runs with ``--design``, which checks the folders and the
    options against the design before the model loads. The model saw
    neither half, so the verdict should be ``not_detected`` (a false alarm
    has probability at most alpha). Showing ``used`` under a design needs a
    model trained after the design on the publish half; the toy's own
    member/non-member split is itself a seeded random split made before its
    training, which is why ``cdi demo`` without ``--design`` compares
    exchangeable collections too.
    """
    from cdi.audit.config import AuditConfig
    from cdi.audit.run import run_audit
    from cdi.audit.design import build_design, planned_analysis, write_design
    from cdi.utils.io import sha256_bytes
    from cdi.toy.world import build_world

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CDIError(f"--out {out} exists and is not a folder")
    world = build_world(kind=kind, strength=strength, seed=0, progress=progress)
    captions = _captions(world.nonmembers_dir)
    if 2 * n > len(captions):
        raise CDIError(f"the toy world has {len(captions)} non-members: too few for --n {n} per collection with "
                       f"--design (it needs 2n works); choose a smaller --n")
    rng = np.random.default_rng(seed)
    works = sorted(rng.permutation(sorted(captions))[:2 * n].tolist())
    data = out / "data"
    if data.exists():
        shutil.rmtree(data)
    _copy_images(world.nonmembers_dir, works, data / "works", captions)
    analysis = planned_analysis(features=audit_options.get("features"), alpha=audit_options.get("alpha", 0.01),
                                protocol=audit_options.get("protocol", "pooled"),
                                verdict=audit_options.get("verdict", "parametric"), seed=seed)
    from cdi.data.collection import ImageCollection

    collection = ImageCollection.from_folder(data / "works", name="works")
    design = build_design(collection.root, [(r.path, r.sha256) for r in collection.records], publish_fraction=0.5,
                          beacon=sha256_bytes(f"cdi demo design, seed {seed}".encode()),
                          beacon_name=DEMO_BEACON_NAME, analysis=analysis,
                          stand_in="a fixed value derived from the demo's --seed stands in for a public beacon: the "
                                   "demo shows the flow of a design, not a draw anyone could check")
    design_file = write_design(design, out / "design.json", force=True)
    published = _copy_images(data / "works", [w["path"] for w in design["publish"]], data / "published", captions)
    unpublished = _copy_images(data / "works", [w["path"] for w in design["withhold"]], data / "unpublished",
                               captions)
    config = AuditConfig(
        published=str(published), unpublished=str(unpublished), model=str(world.model_dir), out=str(out),
        seed=seed, permutations=permutations, force=True, design=str(design_file),
        extra={"demo": {"kind": kind, "strength": strength, "design": True, "n": n,
                        "works": "non-members of the toy world (the model never trained on them)"}},
        **audit_options,
    )
    return run_audit(config, progress=progress)


def _copy_images(source: Path, files: list[str], folder: Path, captions: dict[str, str | None]) -> Path:
    """Copy ``files`` of ``source`` into a new ``folder`` with a ``metadata.jsonl`` of their captions."""
    folder.mkdir(parents=True)
    for name in sorted(files):
        shutil.copyfile(source / name, folder / name)
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": name, "text": captions[name]}) + "\n" for name in sorted(files)))
    return folder
