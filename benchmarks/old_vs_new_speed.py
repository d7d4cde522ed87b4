"""CPU time per image of feature extraction, two code trees run alternately on one machine.

Timing on a shared, busy machine is only meaningful as a ratio measured in
one interleaved run: each round runs the *old* tree and the *new* tree one
after the other (the order alternates between rounds), each in a fresh
process with one intra-op thread, and the report gives the median over the
rounds. The figure is **CPU time** (``time.process_time``) of one
``extract_features`` call on synthetic images after a warm-up batch: with
one thread and no decoding workers it is what the extraction costs, mostly
independent of how many other processes share the cores.

Besides CPU time per image, each process measures a CPU-time roofline: the
bare denoiser at the same batch size on random inputs (forward under
``no_grad``; forward + backward of the input gradient), combined with the
tree's own declared calls per image (``features.registry.total_cost``), and
reports ``efficiency = roofline / measured`` as ``cdi speed`` does (which
uses wall time and the fastest batch size instead).

Examples (the old tree: ``git worktree add --detach /tmp/old 9e68961``)::

    OMP_NUM_THREADS=1 python benchmarks/old_vs_new_speed.py --old /tmp/old --model MODEL_DIR \\
        --features cdi --batch-sizes 16 --images 32 --rounds 3
    OMP_NUM_THREADS=1 python benchmarks/old_vs_new_speed.py --old /tmp/old --model MODEL_DIR \\
        --features gsa1,gsa2 --batch-sizes 2,4,16 --images 16 --rounds 2

``MODEL_DIR``: the toy SD's pipeline folder, e.g. ``cdi toy build --kind sd
--out /tmp/toy`` then ``/tmp/toy/model``. Writes one JSON to stdout (and
``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

NEW = Path(__file__).resolve().parents[1]

#: Run inside a tree (its own code first on sys.path): times one extraction, prints one JSON line.
CHILD = r"""
import json, sys, tempfile, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from cdi.data.collection import ImageCollection
from cdi.models import load_model
from cdi.engine.speed import synthetic_images
from cdi.features.extract import extract_features
from cdi.features.registry import resolve_features, total_cost

args = json.loads(sys.argv[1])
adapter = load_model(args["model"], device="cpu", dtype="float32")
families = resolve_features(args["family"])
bs, n = args["batch_size"], args["images"]
with tempfile.TemporaryDirectory() as tmp:
    folder = synthetic_images(Path(tmp) / "images", n, adapter.resolution, adapter.image_channels)
    images = ImageCollection.from_folder(folder)
    warm = synthetic_images(Path(tmp) / "warm", bs, adapter.resolution, adapter.image_channels, seed=1)
    extract_features(adapter, ImageCollection.from_folder(warm), families, batch_size=bs, num_workers=0,
                     progress=False)
    start = time.process_time()
    extract_features(adapter, images, families, batch_size=bs, num_workers=0, progress=False)
    cpu = time.process_time() - start

# CPU-time roofline: the bare network at the same batch size.
gen = torch.Generator().manual_seed(0)
x0 = adapter.encode(torch.zeros(1, adapter.image_channels, adapter.resolution, adapter.resolution))
x = torch.randn((bs, *x0.shape[1:]), generator=gen)
t = torch.randint(0, adapter.num_train_timesteps, (bs,), generator=gen)
cond = adapter.conditions(["synthetic image 0"] * bs)

def per_sample(backward, reps=3):
    best = float("inf")
    for _ in range(reps):
        start = time.process_time()
        if backward:
            with torch.enable_grad():
                xg = x.clone().requires_grad_(True)
                adapter.eps(xg, t, cond).sum().backward()
        else:
            with torch.no_grad():
                adapter.eps(x, t, cond)
        best = min(best, (time.process_time() - start) / bs)
    return best

per_sample(False, 1)
forward = per_sample(False)
cost = total_cost(families, adapter)
backward = per_sample(True) if cost.backward else 0.0
roofline = (cost.forward - cost.backward) * forward + cost.backward * backward
print(json.dumps({"cpu_seconds_per_image": cpu / n, "calls": [cost.forward, cost.backward],
                  "roofline_cpu_seconds_per_image": roofline, "efficiency": roofline / (cpu / n)}))
"""


def run(tree: Path, settings: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings)], cwd=tree, env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{tree}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the old code tree (a git worktree of the base commit)")
    parser.add_argument("--new", default=str(NEW), help="the new code tree (default: this checkout)")
    parser.add_argument("--model", required=True, help="pipeline folder of the model")
    parser.add_argument("--features", default="cdi", help="comma-separated: each timed on its own (cdi, gsa1, ...)")
    parser.add_argument("--batch-sizes", default="16")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    trees = {"old": Path(args.old).resolve(), "new": Path(args.new).resolve()}
    results = []
    for family in args.features.split(","):
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            settings = {"model": str(Path(args.model).resolve()), "family": family, "batch_size": bs,
                        "images": args.images}
            runs: dict[str, list[dict]] = {"old": [], "new": []}
            for r in range(args.rounds):
                for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    runs[name].append(run(trees[name], settings))
                    print(f"{family} batch {bs} round {r} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
            row = {"features": family, "batch_size": bs}
            for name, values in runs.items():
                row[name] = {
                    "cpu_seconds_per_image": statistics.median(v["cpu_seconds_per_image"] for v in values),
                    "efficiency": statistics.median(v["efficiency"] for v in values),
                    "calls_per_image": values[0]["calls"],
                    "rounds": [v["cpu_seconds_per_image"] for v in values],
                }
            row["new_over_old"] = row["new"]["cpu_seconds_per_image"] / row["old"]["cpu_seconds_per_image"]
            results.append(row)
    report = {"old": str(trees["old"]), "new": str(trees["new"]), "model": args.model, "images": args.images,
              "rounds": args.rounds, "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
