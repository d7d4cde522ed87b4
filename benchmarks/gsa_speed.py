"""GSA1 and GSA2, seconds of CPU per image: an old ``features/gsa.py`` against this one, in one process.

The old module is loaded from another code tree by file path (it needs
nothing but ``features.base`` and ``cdi.models.base``, which this tree
provides), so both implementations run on the same adapter and the same
batches, alternately (old, new, then new, old in the next round), with one
intra-op thread. The figure is CPU time (``time.process_time``) of
``family.extract`` on one batch of ``B`` images, divided by ``B``; one
warm-up call of each first. Values are checked to agree (the new code's
per-sample gradients are batched, so only rounding differs).

Example (old tree: ``git worktree add --detach /tmp/old 9e68961``; toy SD:
``cdi toy build --kind sd --out /tmp/toy``)::

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/gsa_speed.py --old /tmp/old --model /tmp/toy/model --batch-sizes 2,4,16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from cdi.models import load_model
from cdi.features.base import EncodedBatch
from cdi.features.gsa import GSA1, GSA2


def _old_module(tree: Path):
    spec = importlib.util.spec_from_file_location("old_gsa", tree / "features" / "gsa.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_gsa"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _batch(adapter, n: int) -> EncodedBatch:
    gen = torch.Generator().manual_seed(n)
    pixels = torch.rand((n, adapter.image_channels, adapter.resolution, adapter.resolution), generator=gen) * 2 - 1
    captions = [f"synthetic image {i}" for i in range(n)]
    hashes = [f"{i:064x}" for i in range(n)]
    return EncodedBatch(adapter.encode(pixels), hashes, captions, adapter.conditions(captions), seed=0,
                        max_chunk=n)


def _cpu_seconds(family, adapter, batch) -> tuple[float, torch.Tensor]:
    start = time.process_time()
    with torch.no_grad():
        out = family.extract(adapter, batch)
    return time.process_time() - start, out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the old code tree")
    parser.add_argument("--model", required=True, help="pipeline folder")
    parser.add_argument("--batch-sizes", default="2,4,16")
    parser.add_argument("--families", default="gsa1,gsa2")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    adapter = load_model(args.model, device="cpu", dtype="float32")
    old = _old_module(Path(args.old).resolve())
    pairs = {name: pair for name, pair in {"gsa1": (old.GSA1, GSA1), "gsa2": (old.GSA2, GSA2)}.items()
             if name in args.families.split(",")}
    warm = _batch(adapter, 1)
    results = []
    for name, (old_cls, new_cls) in pairs.items():
        for cls in (old_cls, new_cls):
            _cpu_seconds(cls(), adapter, warm)
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            batch = _batch(adapter, bs)
            times: dict[str, list[float]] = {"old": [], "new": []}
            outs = {}
            for r in range(args.rounds):
                for which in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    cls = old_cls if which == "old" else new_cls
                    seconds, outs[which] = _cpu_seconds(cls(), adapter, batch)
                    times[which].append(seconds / bs)
            diff = float(((outs["new"] - outs["old"]).abs() / outs["old"].abs().clamp_min(1e-12)).max())
            row = {"family": name, "batch_size": bs,
                   "old_cpu_seconds_per_image": statistics.median(times["old"]),
                   "new_cpu_seconds_per_image": statistics.median(times["new"]),
                   "max_relative_difference": diff}
            row["speedup"] = row["old_cpu_seconds_per_image"] / row["new_cpu_seconds_per_image"]
            print(json.dumps(row), flush=True)
            results.append(row)
    report = {"model": args.model, "old": args.old, "rounds": args.rounds, "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
