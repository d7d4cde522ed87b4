"""Images/s of extraction in one process with 2 threads against Ray with 2 one-thread workers.

    nice -n 10 python benchmarks/ray_speed.py --images 2000 --rounds 4 --out ray_speed.json

Toy SD world (shipped weights), the full CDI feature set (``cdi``), the same
fixed batch size for both, no store (every value computed). The images are
split into ``rounds`` equal parts; each part is extracted by the single
process, then by Ray, so that both configurations meet the same load on a
shared machine (interleaved); the figure is the ratio of their images/s. The
Ray workers are started (and load the model) before the clock starts; their
start-up time is reported apart. The tables of both are compared (float32:
equal to rounding).
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import numpy as np
import torch

from cdi.data.collection import ImageCollection
from cdi.engine.distributed import RayRunner
from cdi.models import load_model
from cdi.toy.world import build_world
from cdi.features.extract import extract_features
from cdi.features.registry import resolve_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--features", default="cdi")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import ray

    world = build_world("sd", "overtrained", progress=False)
    collection = ImageCollection.from_folder(world.root)  # members, non-members and the shifted copy
    if len(collection) < args.images:
        raise SystemExit(f"the toy world has {len(collection)} images, fewer than {args.images}")
    families = resolve_features(args.features)
    torch.set_num_threads(2)
    adapter = load_model(str(world.model_dir), device="cpu")
    for attempt in range(5):  # Ray gives its raylet 30 s to register: not always enough on a busy machine
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception as exc:  # noqa: BLE001 (Ray raises a bare Exception)
            print(f"ray.init failed ({exc}); retrying", flush=True)
            ray.shutdown()
    else:
        raise SystemExit("could not start a local Ray instance")
    started = time.perf_counter()
    runner = RayRunner(functools.partial(load_model, str(world.model_dir), device="cpu"), workers=2, threads=1,
                       device="cpu")
    runner.start(adapter)
    startup = time.perf_counter() - started
    bounds = np.linspace(0, args.images, args.rounds + 1).astype(int)
    rounds = []
    for r in range(args.rounds):
        part = collection.subset(range(bounds[r], bounds[r + 1]))
        row = {"round": r, "images": len(part)}
        tables = {}
        for name, kw in (("one_process_2_threads", {}), ("ray_2_workers_1_thread", {"runner": runner})):
            t0 = time.perf_counter()
            tables[name] = extract_features(adapter, part, families, seed=0, batch_size=args.batch_size,
                                            num_workers=0, progress=False, **kw)
            row[name] = len(part) / (time.perf_counter() - t0)
        a, b = tables.values()
        diff = np.abs(a.values - b.values)
        row["max_abs_difference"] = float(diff.max())
        row["max_difference_column"] = a.columns[int(diff.max(axis=0).argmax())]
        row["max_relative_difference"] = float((diff / np.maximum(np.abs(a.values), 1e-12)).max())
        rounds.append(row)
        print(json.dumps(row), flush=True)
    runner.close()
    ray.shutdown()
    total = {name: args.images / sum(row["images"] / row[name] for row in rounds)
             for name in ("one_process_2_threads", "ray_2_workers_1_thread")}
    summary = {
        "images": args.images, "features": args.features, "batch_size": args.batch_size,
        "columns": len(a.columns), "ray_startup_s": startup, "rounds": rounds, "images_per_s": total,
        "ratio_ray_over_one_process": total["ray_2_workers_1_thread"] / total["one_process_2_threads"],
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
