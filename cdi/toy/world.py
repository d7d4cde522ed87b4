"""The embedded toy world: a suspect model the project trains itself.

Everything in cdi runs end to end on a small CPU machine against this world:

* **Data.** scikit-learn's 1,797 handwritten digits (8x8, values 0..16),
  upsampled bicubically to 32x32 RGB PNGs, white digit on black, captioned
  ``"a handwritten digit seven"``. A stratified, seeded half/half split
  (scikit-learn's ``train_test_split``) gives ``members/`` (898 images, the
  training set) and ``nonmembers/`` (899 images, never trained on). Each folder
  is a Hugging Face imagefolder with a ``metadata.jsonl``; file names
  (``digit_<original index>.png``) do not reveal the split.
  ``nonmembers_shifted/`` holds the same non-members under a visible
  distribution shift (see ``cdi.toy.data.shift_image``), for the audit's shift guard and
  the benchmark's defective setup.
* **Models.** ``kind="sd"``: a tiny Stable-Diffusion-architecture latent
  text-to-image model (AutoencoderKL with 8x8x4 latents, frozen random
  CLIPTextModel over a character tokenizer, UNet2DConditionModel, DDPM
  scheduler with SD's scaled-linear betas), saved as a
  ``StableDiffusionPipeline`` folder. ``kind="ddpm"``: a tiny
  class-conditional pixel DDPM (UNet2DModel with 11 class embeddings: ten
  digits plus the null class 10), saved as a ``DDPMPipeline`` folder with a
  ``labels.json``. Both are RGB, 32x32, eps-prediction. ``kind="flow"``
  (``cdi.toy.flow``): a tiny SD3-architecture rectified-flow model (the toy
  SD's VAE and CLIP text encoder, a second CLIP and a tiny T5, an
  ``SD3Transformer2DModel``), saved as a ``StableDiffusion3Pipeline`` folder.
* **Strengths.** ``light``: per-image membership is weak while a test over
  hundreds of images detects it (the situation CDI is for). ``overtrained``:
  more epochs, a stronger per-image signal (see the table: on a 2-core CPU
  budget it stays far from perfect separation). ``TRAIN_CONFIGS`` holds the
  epochs, learning rates and batch sizes.

Membership signal of the shipped models (``python -m cdi.toy measure``:
cdi's Denoising Loss feature, t=100, 5 noises; AUC with members positive;
one-sided Welch p over all 898 + 899 images, and the median over 20 seeded
draws of 300 + 300)::

    model              epochs  AUC    TPR@1%FPR  Welch p (all)  median p (300+300)
    sd light              120  0.565  0.008      1.6e-06        2.3e-03
    sd overtrained        300  0.639  0.011      1.9e-25        4.9e-10
    ddpm light            160  0.549  0.014      4.1e-05        6.3e-03
    ddpm overtrained      400  0.662  0.022      7.8e-36        6.4e-14
    flow overtrained      500  0.585  0.018      7.5e-11        3.8e-05

Training times on one CPU thread (``train_seconds`` in each
``training.json``): ddpm light 12 min, ddpm overtrained 29 min, flow overtrained 37 min
(on a machine shared with other jobs; the flow model needs many epochs: its
member AUC was 0.527 after 60 epochs and about 0.55 after 125).

Training runs on the CPU in one thread, with every random draw taken from
generators seeded by ``seed`` and a constant learning rate, so it is
bit-for-bit reproducible on a given machine and software stack, and the first
k epochs of a longer run are exactly a k-epoch run. The world for seed 0 is
assembled in seconds from weights shipped under
``cdi/toy/weights/<kind>-<strength>/``, made by the project's own command (run
from the repository root; ``--out DIR`` writes elsewhere and says whether each
file is identical to the shipped one)::

    python -m cdi.toy train-shipped --kind sd --strength overtrained
    python -m cdi.toy train-shipped --kind sd --strength light
    python -m cdi.toy train-shipped --kind ddpm --strength overtrained
    python -m cdi.toy train-shipped --kind ddpm --strength light
    python -m cdi.toy train-shipped --kind flow --strength overtrained

``cdi toy build --retrain`` trains from scratch instead, and records in
``world.json`` whether the result is identical to the shipped weights.

The world is assembled here from ``cdi.toy.data`` (digits, split, folders,
the shifted copy) and ``cdi.toy.training`` (components and training loops);
this module holds the shipped configurations, the weights on disk, the
pipeline folders, ``build_world``, ``measure_membership`` and the
``python -m cdi.toy`` command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cdi import __version__
from cdi.utils.errors import CDIError
from cdi.toy.data import (
    IMAGE_SIZE,
    NULL_CLASS_ID,
    SHIFT_BLUR_RADIUS,
    SHIFT_GAIN,
    SHIFT_OFFSET,
    atomic_dir,
    caption,
    load_digit_images,
    split_members,
    write_image_folder,
    write_json,
    write_shifted_images,
)
from cdi.toy.training import (
    KINDS,
    TRAIN_THREADS,
    ProgressFn,
    ToyWeights,
    TrainConfig,
    ddpm_components,
    sd_components,
    silent,
    train_toy_model,
    training_threads,
)
from cdi.toy.flow import train_flow_model
from cdi.toy.shipped import load_weights, no_transformers_progress_bars, save_weights, weights_dir

STRENGTHS = ("light", "overtrained")
LAYOUT_VERSION = 1
_PIPELINES = {"sd": "StableDiffusionPipeline", "ddpm": "DDPMPipeline", "flow": "StableDiffusion3Pipeline"}

# --------------------------------------------------------------------- config
TRAIN_CONFIGS: dict[tuple[str, str], TrainConfig] = {
    ("sd", "light"): TrainConfig(epochs=120, lr=1e-3, batch_size=64, vae_epochs=10),
    ("sd", "overtrained"): TrainConfig(epochs=300, lr=1e-3, batch_size=64, vae_epochs=10),
    ("ddpm", "light"): TrainConfig(epochs=160, lr=1e-3, batch_size=32),
    ("ddpm", "overtrained"): TrainConfig(epochs=400, lr=1e-3, batch_size=32),
    # cdi.toy.flow: a tiny SD3 transformer, rectified-flow objective, the toy SD's VAE stage.
    ("flow", "overtrained"): TrainConfig(epochs=500, lr=1e-3, batch_size=16, vae_epochs=10),
}


def train_model(
    kind: str, images: np.ndarray, labels: np.ndarray, config: TrainConfig, seed: int = 0,
    progress: ProgressFn | None = None,
) -> ToyWeights:
    """Train a toy model of any kind on ``images`` (the members): ``sd`` and ``ddpm`` by
    ``cdi.toy.training.train_toy_model``, ``flow`` by ``cdi.toy.flow.train_flow_model`` (in the same
    ``TRAIN_THREADS`` threads)."""
    if kind == "flow":
        with training_threads():
            return train_flow_model(images, labels, config, seed, progress or silent)
    return train_toy_model(kind, images, labels, config, seed, progress)


def _check_kind_strength(kind: str, strength: str) -> None:
    if kind not in KINDS:
        raise CDIError(f"unknown toy model kind {kind!r}; choose one of {', '.join(KINDS)}")
    if strength not in STRENGTHS:
        raise CDIError(f"unknown toy strength {strength!r}; choose one of {', '.join(STRENGTHS)}")
    if (kind, strength) not in TRAIN_CONFIGS:
        offered = ", ".join(s for k, s in TRAIN_CONFIGS if k == kind)
        raise CDIError(f"the {kind} toy model comes in the strength(s) {offered} only, not {strength!r}")


# ------------------------------------------------------ pipelines
def save_pipeline(weights: ToyWeights, model_dir: Path) -> None:
    """Assemble a diffusers pipeline folder from trained weights.

    ``sd``: a ``StableDiffusionPipeline`` (no safety checker or feature
    extractor). ``ddpm``: a ``DDPMPipeline`` plus ``labels.json``
    (``id2label`` for the ten digits and ``null_class_id`` 10).
    """
    model_dir = Path(model_dir)
    if weights.kind == "flow":
        from cdi.toy.flow import save_flow_pipeline

        return save_flow_pipeline(weights, model_dir)
    if weights.kind == "sd":
        from diffusers import StableDiffusionPipeline

        tokenizer_dir = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=model_dir.parent))
        try:
            parts = sd_components(0, tokenizer_dir=tokenizer_dir)
        finally:
            shutil.rmtree(tokenizer_dir, ignore_errors=True)
        for name in ("vae", "text_encoder", "unet"):
            parts[name].load_state_dict(weights.state_dicts[name], strict=True)
        parts["vae"].register_to_config(scaling_factor=weights.scaling_factor)
        pipe = StableDiffusionPipeline(
            vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
            unet=parts["unet"], scheduler=parts["scheduler"], safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
        with no_transformers_progress_bars():
            pipe.save_pretrained(model_dir, safe_serialization=True)
        return
    from diffusers import DDPMPipeline

    parts = ddpm_components(0)
    parts["unet"].load_state_dict(weights.state_dicts["unet"], strict=True)
    DDPMPipeline(unet=parts["unet"], scheduler=parts["scheduler"]).save_pretrained(
        model_dir, safe_serialization=True)
    labels = {"id2label": {str(c): caption(c) for c in range(10)}, "null_class_id": NULL_CLASS_ID}
    write_json(model_dir / "labels.json", labels)


def _training_info(kind: str, strength: str, seed: int, config: TrainConfig) -> dict:
    """What a trained model's provenance records besides its weights."""
    import diffusers

    return {
        "kind": kind, "strength": strength, "seed": int(seed), "config": config.to_dict(),
        "image_size": IMAGE_SIZE, "train_threads": TRAIN_THREADS,
        "torch": torch.__version__, "diffusers": diffusers.__version__, "cdi": __version__,
    }


def train_shipped(kind: str, strength: str, progress: bool = True, folder: str | Path | None = None) -> dict[str, str]:
    """Train a toy model for seed 0 and write it to ``cdi/toy/weights`` (or ``folder``).

    This is the command that produced the shipped weights (see the module
    docstring); with ``folder`` it reproduces them elsewhere, for comparing
    the SHA-256 with the shipped ``training.json``. Returns the SHA-256 of
    each weight file.
    """
    _check_kind_strength(kind, strength)
    report = _printer(progress)
    images, labels = load_digit_images()
    members, _ = split_members(labels, 0)
    config = TRAIN_CONFIGS[(kind, strength)]
    start = time.time()
    weights = train_model(kind, images[members], labels[members], config, 0, report)
    info = _training_info(kind, strength, 0, config)
    info["train_seconds"] = round(time.time() - start, 1)
    return save_weights(weights, Path(folder) if folder is not None else weights_dir(kind, strength), info)


def _printer(progress: bool) -> ProgressFn:
    if not progress:
        return silent
    return lambda message: print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- world
@dataclass
class ToyWorld:
    """A built toy world (see the module docstring for the layout)."""

    root: Path
    model_dir: Path
    members_dir: Path
    nonmembers_dir: Path
    shifted_dir: Path
    info: dict

    @classmethod
    def at(cls, root: Path, info: dict) -> "ToyWorld":
        root = Path(root)
        return cls(root, root / "model", root / "members", root / "nonmembers",
                   root / "nonmembers_shifted", info)


def default_world_dir(kind: str, strength: str, seed: int) -> Path:
    """``$CDI_CACHE/toy/...`` if set, else ``$XDG_CACHE_HOME/cdi/toy/...`` or ``~/.cache/cdi/toy/...``."""
    if os.environ.get("CDI_CACHE"):
        base = Path(os.environ["CDI_CACHE"]).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "cdi"
    return base / "toy" / f"{kind}-{strength}-seed{int(seed)}"


def _world_key(kind: str, strength: str, seed: int, retrain: bool, shipped_sha: dict | None) -> dict:
    """The fields of ``world.json`` that decide whether an existing world is reusable."""
    return {
        "layout_version": LAYOUT_VERSION, "cdi_version": __version__, "kind": kind, "strength": strength,
        "seed": int(seed), "source": "retrained" if retrain else "shipped",
        "training": TRAIN_CONFIGS[(kind, strength)].to_dict(),
        "shipped_weights_sha256": shipped_sha,
    }


def build_world(
    kind: str = "sd",
    strength: str = "overtrained",
    out: str | Path | None = None,
    *,
    seed: int = 0,
    retrain: bool = False,
    force: bool = False,
    progress: bool = True,
) -> ToyWorld:
    """Build (or reuse) a toy world: images, split, shifted copy and the suspect model.

    Parameters
    ----------
    kind : {"sd", "ddpm"}
    strength : {"light", "overtrained"}
    out : path or None
        The world's folder; default ``default_world_dir(kind, strength, seed)``.
        If it holds a world with the same ``world.json`` key (kind, strength,
        seed, source, training config, shipped weights, cdi version) it is
        reused as is, unless ``force``. A folder that is not a toy world is
        never overwritten.
    seed : int
        Seeds the member split and training. Shipped weights exist for seed 0
        only; other seeds need ``retrain=True``.
    retrain : bool
        Train the model from scratch (minutes on a CPU) instead of using the
        shipped weights.
    force : bool
        Rebuild even if a matching world exists.
    progress : bool
        Print progress lines to stderr.

    Returns
    -------
    ToyWorld
        Its ``info`` is the content of ``world.json``.
    """
    _check_kind_strength(kind, strength)
    seed = int(seed)
    report = _printer(progress)
    shipped = weights_dir(kind, strength)
    shipped_meta = None
    if (shipped / "training.json").is_file():
        shipped_meta = json.loads((shipped / "training.json").read_text())
    if not retrain:
        if seed != 0:
            raise CDIError(f"shipped toy weights exist for seed 0 only; pass --retrain to train a "
                           f"{kind}-{strength} model for seed {seed} (several minutes on a CPU)")
        if shipped_meta is None:
            raise CDIError(f"no shipped weights for the {kind}-{strength} toy model in {shipped}; "
                           "pass --retrain to train it")
        if shipped_meta.get("config") != TRAIN_CONFIGS[(kind, strength)].to_dict():
            raise CDIError(f"the shipped {kind}-{strength} weights were trained with another config "
                           f"than this cdi version's; run `python -m cdi.toy train-shipped --kind {kind} "
                           f"--strength {strength}` or pass --retrain")
    out = Path(out) if out is not None else default_world_dir(kind, strength, seed)
    key = _world_key(kind, strength, seed, retrain, shipped_meta["sha256"] if shipped_meta else None)
    if retrain:
        key["shipped_weights_sha256"] = None
    world_json = out / "world.json"
    if out.exists():
        if world_json.is_file():
            existing = json.loads(world_json.read_text())
            if not force and all(existing.get(k) == v for k, v in key.items()):
                report(f"toy world {out} is up to date")
                return ToyWorld.at(out, existing)
        elif not out.is_dir() or any(out.iterdir()):
            raise CDIError(f"{out} exists and is not a toy world; choose another --out or remove it")

    report(f"building the {kind}-{strength} toy world (seed {seed}) in {out}")
    images, labels = load_digit_images()
    members, nonmembers = split_members(labels, seed)
    with atomic_dir(out) as tmp:
        write_image_folder(tmp / "members", members, images, labels)
        write_image_folder(tmp / "nonmembers", nonmembers, images, labels)
        write_shifted_images(tmp / "nonmembers", tmp / "nonmembers_shifted", fraction=1.0, seed=seed)
        config = TRAIN_CONFIGS[(kind, strength)]
        if retrain:
            start = time.time()
            weights = train_model(kind, images[members], labels[members], config, seed, report)
            train_info = _training_info(kind, strength, seed, config)
            train_info["train_seconds"] = round(time.time() - start, 1)
            sha = save_weights(weights, tmp / "weights", train_info)
            shutil.rmtree(tmp / "weights")
        else:
            weights, train_info = load_weights(shipped)
            sha = train_info["sha256"]
        save_pipeline(weights, tmp / "model")
        info = {
            **key,
            "split": {
                "members": int(len(members)), "nonmembers": int(len(nonmembers)),
                "members_per_class": np.bincount(labels[members], minlength=10).tolist(),
                "nonmembers_per_class": np.bincount(labels[nonmembers], minlength=10).tolist(),
                "method": "sklearn.model_selection.train_test_split(stratify=labels, test_size=0.5, "
                          "random_state=seed)",
            },
            "data": {"source": "sklearn.datasets.load_digits", "image_size": IMAGE_SIZE,
                     "channels": "RGB", "style": "white digit on black, bicubic upsampling",
                     "caption_template": "a handwritten digit <word>"},
            "shift": {"folder": "nonmembers_shifted", "blur_radius": SHIFT_BLUR_RADIUS,
                      "gain_rgb": list(SHIFT_GAIN), "offset_rgb": list(SHIFT_OFFSET)},
            "model": {"folder": "model", "pipeline": _PIPELINES[kind],
                      "conditioning": "class" if kind == "ddpm" else "text",
                      "null_class_id": NULL_CLASS_ID if kind == "ddpm" else None,
                      "scaling_factor": weights.scaling_factor},
            "weights_sha256": sha,
            "train": {k: train_info.get(k) for k in ("torch", "diffusers", "train_threads", "train_seconds")},
            "image_size": IMAGE_SIZE,
        }
        if retrain and shipped_meta is not None and seed == 0:
            info["matches_shipped_weights"] = sha == shipped_meta["sha256"]
        write_json(tmp / "world.json", info)
    report(f"toy world ready: {out}")
    return ToyWorld.at(out, info)


# ---------------------------------------------------------------- measuring
def measure_membership(
    world: ToyWorld, *, seed: int = 0, subset_size: int = 300, subsets: int = 20, batch_size: int = 64,
    device: str = "cpu", progress: bool = False,
) -> dict:
    """How strongly a toy model reveals membership, with the Denoising Loss.

    The per-image loss is cdi's ``denoising_loss`` feature (t = 100, mean of
    ``||eps_theta(x_t, t, c) - eps||_2`` over 5 seeded noises, the caption or
    class as condition), computed by the extraction engine for every member
    and non-member.

    Returns
    -------
    dict
        ``auc`` (members positive, lower loss = member), ``tpr_at_1pct_fpr``
        (largest TPR with FPR <= 1%), ``welch_p`` (one-sided Welch t-test,
        H1: members' mean loss is lower, all images), and over ``subsets``
        seeded draws of ``subset_size`` members and ``subset_size``
        non-members: ``subset_welch_p_median`` and ``subset_reject_rate_0.01``.
    """
    from scipy import stats

    from cdi.attacks.metrics import roc_auc, tpr_at_fpr
    from cdi.data.collection import ImageCollection
    from cdi.models import load_model
    from cdi.features.extract import extract_features
    from cdi.features.registry import resolve_features

    adapter = load_model(str(world.model_dir), device=device, dtype="float32")
    families = resolve_features("denoising_loss")
    losses = []
    for folder, name in ((world.members_dir, "members"), (world.nonmembers_dir, "nonmembers")):
        collection = ImageCollection.from_folder(folder, name=name)
        table = extract_features(adapter, collection, families, seed=seed, batch_size=batch_size,
                                 num_workers=0, progress=progress)
        losses.append(table.values[:, 0])
    members, nonmembers = losses
    scores = -np.concatenate([members, nonmembers])
    is_member = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    rng = np.random.default_rng(seed)
    size = min(subset_size, len(members), len(nonmembers))
    subset_p = np.array([
        stats.ttest_ind(rng.choice(members, size, replace=False), rng.choice(nonmembers, size, replace=False),
                        equal_var=False, alternative="less").pvalue
        for _ in range(subsets)
    ])
    return {
        "kind": world.info["kind"], "strength": world.info["strength"], "seed": world.info["seed"],
        "members": int(len(members)), "nonmembers": int(len(nonmembers)),
        "mean_loss_members": float(members.mean()), "mean_loss_nonmembers": float(nonmembers.mean()),
        "auc": roc_auc(scores, is_member), "tpr_at_1pct_fpr": tpr_at_fpr(scores, is_member, 0.01).tpr,
        "welch_p": float(stats.ttest_ind(members, nonmembers, equal_var=False, alternative="less").pvalue),
        "subset_size": int(size), "subsets": int(subsets),
        "subset_welch_p_median": float(np.median(subset_p)),
        "subset_reject_rate_0.01": float((subset_p < 0.01).mean()),
    }


# ------------------------------------------------------------------ command
def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cdi.toy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ship = sub.add_parser("train-shipped", help="train a toy model for seed 0 into cdi/toy/weights")
    ship.add_argument("--kind", choices=KINDS, required=True)
    ship.add_argument("--strength", choices=STRENGTHS, required=True)
    ship.add_argument("--out", default=None, help="write here instead of cdi/toy/weights (to check reproducibility)")
    meas = sub.add_parser("measure", help="build a world (shipped weights) and print its membership signal as JSON")
    meas.add_argument("--kind", choices=KINDS, required=True)
    meas.add_argument("--strength", choices=STRENGTHS, required=True)
    meas.add_argument("--out", default=None, help="world folder (default: the cache)")
    args = parser.parse_args(argv)
    if args.command == "measure":
        world = build_world(args.kind, args.strength, args.out, progress=False)
        print(json.dumps(measure_membership(world), indent=2))
        return 0
    folder = Path(args.out) if args.out else weights_dir(args.kind, args.strength)
    hashes = train_shipped(args.kind, args.strength, folder=folder)
    shipped = weights_dir(args.kind, args.strength) / "training.json"
    reference = json.loads(shipped.read_text())["sha256"] if shipped.is_file() else {}
    for name, digest in hashes.items():
        if folder == weights_dir(args.kind, args.strength):
            same = ""
        elif name not in reference:
            same = "  (no shipped file to compare with)"
        else:
            same = "  (identical to the shipped file)" if reference[name] == digest else "  (DIFFERS from the shipped file)"
        print(f"{folder / name}  sha256 {digest}{same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
