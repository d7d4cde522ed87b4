"""Extract the default features (cdi+clid+sima) of every toy-world image once, into a CSV.

    python benchmarks/toy_features.py --strength light --out tests/data/toy_sd_light_features.csv

``--draw R`` extracts at the seed of noise draw R (``features.base.draw_seed``):
with ``--features`` limited to the families that draw noise, the extra draws
that an audit with ``--noise-draws`` averages over (``cdi.stats.draws``).

The table (members and non-members, a ``member`` column in the sidecar's
meta) feeds the null-calibration test on real model features and the power
comparison of ``benchmarks/power_toy.py``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from cdi.data.collection import ImageCollection
from cdi.models import load_model
from cdi.engine.table import FeatureTable
from cdi.toy.world import build_world
from cdi.features.base import draw_seed
from cdi.features.extract import extract_features
from cdi.features.registry import resolve_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kind", default="sd")
    parser.add_argument("--strength", default="light")
    parser.add_argument("--features", default="cdi+clid+sima")
    parser.add_argument("--out", required=True)
    parser.add_argument("--store", default=None)
    parser.add_argument("--batch-size", default="auto", help="a number or auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--draw", type=int, default=0,
                        help="noise draw: extract at features.base.draw_seed(0, DRAW) (0: the audit's own seed 0)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    world = build_world(args.kind, args.strength)
    adapter = load_model(str(world.model_dir), device="cpu")
    families = resolve_features(args.features)
    tables = []
    for folder in (world.members_dir, world.nonmembers_dir):
        collection = ImageCollection.from_folder(folder)
        tables.append(extract_features(adapter, collection, families, seed=draw_seed(0, args.draw),
                                       batch_size=args.batch_size,
                                       store=args.store, num_workers=0))
    members, nonmembers = tables
    both = FeatureTable(
        paths=[f"members/{p}" for p in members.paths] + [f"nonmembers/{p}" for p in nonmembers.paths],
        hashes=members.hashes + nonmembers.hashes,
        captions=members.captions + nonmembers.captions,
        columns=members.columns,
        values=np.vstack([members.values, nonmembers.values]),
        meta={**members.meta, "draw": args.draw, "toy": {"kind": args.kind, "strength": args.strength,
                                     "n_members": len(members), "n_nonmembers": len(nonmembers)}},
    )
    both.to_csv(args.out)
    print(f"wrote {len(both)} rows x {len(both.columns)} columns to {args.out}")


if __name__ == "__main__":
    main()
