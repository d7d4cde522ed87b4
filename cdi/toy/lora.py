"""The fine-tune toy world: a base toy SD, an "artist", and a LoRA trained on the artist's images.

The situation an individual artist meets: a LoRA shared online imitates
their style; was it trained on their images? Built on the light toy SD
(``cdi.toy.world``, trained on the member half of plain white-on-black digits):

* **The artist.** Every base *non-member* digit redrawn in the artist's
  amber ink (``colourise``: the grey stroke times ``ARTIST_INK``), captioned
  ``"amber ink digit seven"``. A seeded permutation of the 899 base
  non-members gives ``artist_published/`` (200 images: the ones the LoRA was
  trained on), ``artist_unpublished/`` (200 images the artist kept) and
  ``artist_unused/`` (499 more of the same style that no model saw).
* **The LoRA.** A rank-``LORA_RANK`` LoRA (peft, through diffusers'
  ``add_adapter``) on the base UNet's attention, feed-forward, projection
  and resnet convolution layers, trained on ``artist_published/`` with the
  base's recipe (uniform t, eps MSE, 10% caption dropout, constant AdamW
  learning rate). Two strengths from one seeded run: ``light`` is the
  state after ``LORA_EPOCHS["light"]`` epochs, ``strong`` after
  ``LORA_EPOCHS["strong"]`` (the first k epochs of a longer run are exactly
  a k-epoch run). Saved with ``StableDiffusionPipeline.save_lora_weights``
  (diffusers' own format, ``pytorch_lora_weights.safetensors``), so the
  audit loads it exactly as a downloaded LoRA: ``--model base --lora FILE``.
* **Plain copies.** ``members/`` and ``nonmembers/`` of the base world (the
  base's training data and the rest, plain style), for the null case "P was
  in the base model's training data but not in the LoRA's".

The shipped LoRA weights (``cdi/toy/weights/sd-lora-<strength>/``) come from

    python -m cdi.toy.lora train-shipped

(one CPU thread, seeded; see ``training.json`` for its duration).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cdi import __version__
from cdi.utils.errors import CDIError
from cdi.utils.io import sha256_file
from cdi.toy.shipped import WEIGHTS_ROOT
from cdi.toy.world import build_world, default_world_dir
from cdi.toy.data import DIGIT_WORDS, atomic_dir, load_digit_images, split_members, write_json
from cdi.toy.training import TrainConfig, fit_denoiser, seeded_init, text_embeddings, to_pixels, training_threads

BASE_STRENGTH = "light"
LORA_STRENGTHS = ("light", "strong")
#: Amber ink: the digit's grey level times these RGB gains (background stays black).
ARTIST_INK = (1.0, 0.6, 0.15)
ARTIST_SIZES = {"artist_published": 200, "artist_unpublished": 200}
LORA_RANK = 8
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2")
LORA_CONFIG = TrainConfig(epochs=60, lr=3e-3, batch_size=32)
LORA_EPOCHS = {"light": 20, "strong": 60}
LORA_FILE = "pytorch_lora_weights.safetensors"
LAYOUT_VERSION = 1


def artist_caption(label: int) -> str:
    """The caption of an artist's image, e.g. ``"amber ink digit seven"`` (fits the toy's 32-character tokenizer)."""
    return f"amber ink digit {DIGIT_WORDS[int(label)]}"


def colourise(images: np.ndarray) -> np.ndarray:
    """White-on-black digits redrawn in the artist's amber ink: each channel times ``ARTIST_INK``."""
    grey = images.astype(np.float32)[..., :1]
    return np.clip(np.round(grey * np.asarray(ARTIST_INK, np.float32)), 0, 255).astype(np.uint8)


def artist_split(nonmembers: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded split of the base non-members into the artist's published, unpublished and unused images."""
    order = np.random.default_rng([int(seed), 13]).permutation(np.sort(nonmembers))
    cut = np.cumsum([0, *ARTIST_SIZES.values()])
    parts = {name: np.sort(order[cut[i]:cut[i + 1]]) for i, name in enumerate(ARTIST_SIZES)}
    parts["artist_unused"] = np.sort(order[cut[-1]:])
    return parts


def lora_weights_dir(strength: str) -> Path:
    """Where the shipped LoRA of a strength lives (``cdi/toy/weights/sd-lora-<strength>``)."""
    return WEIGHTS_ROOT / f"sd-lora-{strength}"


# ------------------------------------------------------------------ training
def add_toy_lora(unet, seed: int = 0) -> None:
    """Give the toy UNet a fresh (seeded) peft LoRA adapter on ``LORA_TARGETS``; the base weights freeze."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    with seeded_init(seed, "init-lora"):
        unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                    target_modules=list(LORA_TARGETS)))


def save_toy_lora(unet, folder: Path, info: dict) -> dict[str, str]:
    """Write the UNet's LoRA as diffusers writes a trained LoRA, plus ``training.json``; returns SHA-256s."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # peft's own key names (``<module>.lora_A.weight``), not convert_state_dict_to_diffusers: that renames the
    # attention projections only (``to_q.lora.down``) and diffusers 0.42.1 then drops those layers on loading a
    # file that mixes both spellings (it warns; cdi.models.finetune refuses such a file).
    layers = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    (folder / LORA_FILE).chmod(0o644)
    hashes = {LORA_FILE: sha256_file(folder / LORA_FILE)}
    write_json(folder / "training.json", {**info, "sha256": hashes})
    return hashes


def train_shipped(folder: str | Path | None = None, progress: bool = True) -> dict[str, dict[str, str]]:
    """Train the toy LoRA for seed 0 and write both strengths (to ``cdi/toy/weights`` or under ``folder``)."""
    from cdi.models import load_model

    report = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    world = build_world("sd", BASE_STRENGTH, progress=progress)
    base = load_model(str(world.model_dir), device="cpu")
    images, labels = load_digit_images()
    _, nonmembers = split_members(labels, 0)
    published = artist_split(nonmembers, 0)["artist_published"]
    pixels = to_pixels(colourise(images[published]))
    with training_threads():
        with torch.no_grad():
            latents = base.encode(pixels)
        table = text_embeddings(base.text_encoder, base.tokenizer, [artist_caption(c) for c in range(10)] + [""])
        label_t = torch.as_tensor(labels[published], dtype=torch.long)
        unet = base.unet
        unet.requires_grad_(False)
        add_toy_lora(unet, 0)

        def cond_of(idx, drop):
            cls = torch.where(drop, torch.full_like(label_t[idx], 10), label_t[idx])
            return {"encoder_hidden_states": table[cls]}

        out = {}
        start = time.time()

        def on_epoch(epoch: int, net) -> None:
            for strength, epochs in LORA_EPOCHS.items():
                if epoch == epochs:
                    target = (Path(folder) / f"sd-lora-{strength}") if folder else lora_weights_dir(strength)
                    info = {"strength": strength, "epochs": epochs, "seed": 0, "base": f"sd-{BASE_STRENGTH}",
                            "rank": LORA_RANK, "targets": list(LORA_TARGETS), "config": LORA_CONFIG.to_dict(),
                            "ink": list(ARTIST_INK), "train_images": int(len(published)),
                            "train_seconds": round(time.time() - start, 1), "torch": torch.__version__,
                            "cdi": __version__}
                    out[strength] = save_toy_lora(net, target, info)

        fit_denoiser(unet, base.scheduler, latents, cond_of, LORA_CONFIG, 0, report, on_epoch,
                      stage="lora-denoiser")
    return out


# --------------------------------------------------------------------- world
@dataclass
class LoraWorld:
    """A built fine-tune toy world: the base pipeline, the LoRA files and the image folders."""

    root: Path
    base_dir: Path
    lora_files: dict[str, Path]
    folders: dict[str, Path]
    info: dict


def build_lora_world(out: str | Path | None = None, *, force: bool = False, progress: bool = True) -> LoraWorld:
    """Build (or reuse) the fine-tune toy world from the base toy world and the shipped LoRA weights.

    Layout of ``out`` (default ``<cdi cache>/toy/sd-lora-seed0``): ``base/`` (the light toy SD pipeline),
    ``lora-light/`` and ``lora-strong/`` (each a ``pytorch_lora_weights.safetensors``), the artist's
    ``artist_published/``, ``artist_unpublished/``, ``artist_unused/`` and the base's plain ``members/``
    and ``nonmembers/``; ``world.json`` records the split and the weights' SHA-256.
    """
    report = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    shipped = {}
    for strength in LORA_STRENGTHS:
        meta = lora_weights_dir(strength) / "training.json"
        if not meta.is_file():
            raise CDIError(f"no shipped toy LoRA in {meta.parent}; run `python -m cdi.toy.lora train-shipped`")
        shipped[strength] = json.loads(meta.read_text())["sha256"][LORA_FILE]
        if sha256_file(meta.parent / LORA_FILE) != shipped[strength]:
            raise CDIError(f"shipped toy LoRA {meta.parent / LORA_FILE} is missing or corrupt (SHA-256 mismatch); "
                           "reinstall cdi or run `python -m cdi.toy.lora train-shipped`")
    out = Path(out) if out is not None else default_world_dir("sd", "lora", 0)
    key = {"layout_version": LAYOUT_VERSION, "cdi_version": __version__, "kind": "sd-lora", "seed": 0,
           "base": f"sd-{BASE_STRENGTH}", "lora_sha256": shipped, "ink": list(ARTIST_INK),
           "artist_sizes": ARTIST_SIZES}
    folders = {name: out / name for name in (*ARTIST_SIZES, "artist_unused", "members", "nonmembers")}
    files = {s: out / f"lora-{s}" / LORA_FILE for s in LORA_STRENGTHS}
    if (out / "world.json").is_file():
        existing = json.loads((out / "world.json").read_text())
        if not force and all(existing.get(k) == v for k, v in key.items()):
            report(f"toy world {out} is up to date")
            return LoraWorld(out, out / "base", files, folders, existing)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CDIError(f"{out} exists and is not a toy world; choose another --out or remove it")

    base_world = build_world("sd", BASE_STRENGTH, progress=progress)
    report(f"building the sd-lora toy world in {out}")
    with atomic_dir(out) as tmp:
        shutil.copytree(base_world.model_dir, tmp / "base")
        for name in ("members", "nonmembers"):
            shutil.copytree(getattr(base_world, f"{name}_dir"), tmp / name)
        parts = write_artist_folders(tmp)
        for strength in LORA_STRENGTHS:
            (tmp / f"lora-{strength}").mkdir()
            shutil.copy2(lora_weights_dir(strength) / LORA_FILE, tmp / f"lora-{strength}" / LORA_FILE)
            shutil.copy2(lora_weights_dir(strength) / "training.json", tmp / f"lora-{strength}" / "training.json")
        info = {**key, "split": {name: len(ix) for name, ix in parts.items()},
                "caption_template": "amber ink digit <word>",
                "questions": {"artist_published": "trained on by the LoRA",
                              "artist_unpublished": "kept by the artist (never trained on)",
                              "artist_unused": "never trained on", "members": "base training data (plain style)",
                              "nonmembers": "never trained on (plain style)"}}
        write_json(tmp / "world.json", info)
    report(f"toy world ready: {out}")
    return LoraWorld(out, out / "base", files, folders, info)


def write_artist_folders(root: Path) -> dict[str, np.ndarray]:
    """Write ``artist_published/``, ``artist_unpublished/`` and ``artist_unused/`` under ``root``
    (amber-ink digits named ``digit_<index>.png`` with their captions); returns the digit indices of each."""
    from PIL import Image

    images, labels = load_digit_images()
    _, nonmembers = split_members(labels, 0)
    parts = artist_split(nonmembers, 0)
    ink = colourise(images)
    for name, indices in parts.items():
        folder = Path(root) / name
        folder.mkdir(parents=True)
        lines = []
        for i in indices:
            file_name = f"digit_{int(i):04d}.png"
            Image.fromarray(ink[i]).save(folder / file_name)
            lines.append(json.dumps({"file_name": file_name, "text": artist_caption(labels[i])}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return parts


# ---------------------------------------------------------------------- demo
def draw_lora_demo(world: LoraWorld, *, n: int, null: bool, seed: int) -> tuple[list[str], list[str], str]:
    """Seeded draw of P and U file names: P from the LoRA's training images (``null``: from ``artist_unused``),
    U from the artist's unpublished images. Returns (P names, U names, P's folder name)."""
    source = "artist_unused" if null else "artist_published"
    pool_p = sorted(p.name for p in world.folders[source].glob("*.png"))
    pool_u = sorted(p.name for p in world.folders["artist_unpublished"].glob("*.png"))
    if not 1 <= n <= min(len(pool_p), len(pool_u)):
        raise CDIError(f"--n must be between 1 and {min(len(pool_p), len(pool_u))} for the lora scenario (got {n})")
    rng = np.random.default_rng([int(seed), 13])
    return (sorted(rng.choice(pool_p, n, replace=False).tolist()),
            sorted(rng.choice(pool_u, n, replace=False).tolist()), source)


def _copy_subset(src: Path, names: list[str], dst: Path) -> Path:
    """Copy ``names`` of an image folder with their ``metadata.jsonl`` lines into ``dst`` (replaced)."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    wanted = set(names)
    lines = [line for line in (src / "metadata.jsonl").read_text().splitlines()
             if json.loads(line)["file_name"] in wanted]
    for name in names:
        shutil.copyfile(src / name, dst / name)
    (dst / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return dst


def run_lora_demo(out: str | Path = "demo-out", *, n: int = 150, null: bool = False, strength: str = "strong",
                  seed: int = 0, permutations: int | None = None, progress: bool = True, **audit_options) -> list:
    """Audit the toy LoRA twice on the same P and U: without and with the base model as reference.

    P: ``n`` of the images the LoRA was trained on (``null``: never trained on); U: ``n`` of the artist's
    unpublished images. Writes ``OUT/data``, ``OUT/lora`` (plain audit of base + LoRA) and
    ``OUT/lora-vs-base`` (``--reference-model base``), sharing one feature store ``OUT/features.sqlite``.
    Returns both ``AuditResult``s, plain first.
    """
    from cdi.audit.config import AuditConfig
    from cdi.audit.run import run_audit

    if strength not in LORA_STRENGTHS:
        raise CDIError(f"unknown LoRA strength {strength!r}; choose one of {', '.join(LORA_STRENGTHS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CDIError(f"--out {out} exists and is not a folder")
    world = build_lora_world(progress=progress)
    names_p, names_u, source = draw_lora_demo(world, n=n, null=null, seed=seed)
    published = _copy_subset(world.folders[source], names_p, out / "data" / "published")
    unpublished = _copy_subset(world.folders["artist_unpublished"], names_u, out / "data" / "unpublished")
    results = []
    for folder, reference in (("lora", None), ("lora-vs-base", str(world.base_dir))):
        config = AuditConfig(
            published=str(published), unpublished=str(unpublished), model=str(world.base_dir),
            out=str(out / folder), seed=seed, permutations=permutations, force=True,
            lora=[str(world.lora_files[strength])], reference_model=reference,
            store=str(out / "features.sqlite"),
            extra={"demo": {"scenario": "lora", "strength": strength, "null": null, "n": n, "published_from": source}},
            **audit_options)
        results.append(run_audit(config, progress=progress))
    return results


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cdi.toy.lora", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ship = sub.add_parser("train-shipped", help="train the toy LoRA (seed 0) into cdi/toy/weights/sd-lora-*")
    ship.add_argument("--out", default=None, help="write under this folder instead (to check reproducibility)")
    args = parser.parse_args(argv)
    for strength, hashes in train_shipped(args.out).items():
        print(strength, json.dumps(hashes))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
