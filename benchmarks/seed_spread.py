"""How the verdict p-value depends on ``--seed``: with the features fixed, and through the features' noise draws.

Two questions, two modes.

1. The test's own randomness (features fixed)::

       python benchmarks/seed_spread.py demo-out

   reads the audit folder's ``features.csv`` and ``result.json`` (member
   directions), runs ``cdi.stats.verdict.audit_test`` with seeds 0..19 under the
   pooled (the verdict), sequential and crossfit (200 permutations)
   protocols and prints min, max and max/min of each as JSON lines. The
   pooled verdict's parametric p-value uses no random draw, so it is the
   same for every seed *of the test*.

2. The features' noise draws (issue 21): ``--seed`` also seeds every noise
   draw of the feature families, so a re-run of ``cdi audit`` with another
   seed computes other features::

       python benchmarks/seed_spread.py extract demo-out --seeds 0-9 --out seeds/
       python benchmarks/seed_spread.py families seeds/

   ``extract`` computes the default features of the demo's
   ``data/published`` and ``data/unpublished`` once per seed with the demo's
   model (read from ``result.json``), one ``seedS.npz`` per seed.
   ``families`` then works on those tables alone: the verdict p-value per
   seed (min, max, max/min, the spread of the verdict's Z), which feature
   families carry the spread (each family's columns taken from seed s while
   the others stay at the first seed, and the reverse: each family frozen at
   the first seed while the others vary), and what averaging R seeds'
   noise draws per image would leave (``--repeats``: the tables of every
   R-subset of the seeds averaged column by column, ``emulated``; the
   seed-free columns are identical in every table).

       python benchmarks/seed_spread.py draws seeds/ --draws 2,3

   emulates audits with ``--noise-draws R`` from disjoint groups of R seed
   tables and compares the draws' statistic with and without its
   reliability weighting (``cdi.stats.draws``; docs/notes/issue-21-seed.md,
   Session 6).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats as sps

from cdi.stats.verdict import audit_test

#: Feature families by column prefix; the others (secmi, pia, pian, sima_*) draw no noise.
NOISE_FAMILIES = {
    "denoising_loss": ("denoising_loss",),
    "multiple_loss": ("multiple_loss_",),
    "noise_optimization": ("noise_opt_",),
    "gradient_masking": ("grad_mask_",),
    "clid": ("clid_",),
}


def _seeds(spec: str) -> list[int]:
    if "-" in spec:
        lo, hi = spec.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in spec.split(",")]


def fixed_features(folder: str) -> None:
    """Mode 1: the test's seed on one fixed feature table."""
    from cdi.audit.evidence import split_table
    from cdi.audit.result import AuditResult
    from cdi.audit.verify import read_evidence_table

    recorded = AuditResult.load(folder)
    published, unpublished = split_table(read_evidence_table(folder))
    directions = recorded.features["directions"]
    print("table", published.values.shape, unpublished.values.shape, "recorded verdict p", recorded.p_value)
    for protocol in ("pooled", "sequential", "crossfit"):
        ps = [audit_test(published.values, unpublished.values, directions=directions, seed=seed, protocol=protocol,
                         permutations=200 if protocol == "crossfit" else 0).verdict_p for seed in range(20)]
        print(json.dumps({"protocol": protocol, "min": min(ps), "max": max(ps), "max_over_min": max(ps) / min(ps)}),
              flush=True)


def extract(folder: str, seeds: list[int], out: str, batch_size: int, threads: int) -> None:
    """Mode 2a: the demo's default features once per seed, one ``seedS.npz`` each."""
    import torch

    from cdi.data.collection import ImageCollection
    from cdi.features.extract import extract_features
    from cdi.features.registry import default_feature_set, directions_of, resolve_features
    from cdi.models import load_model

    torch.set_num_threads(threads)
    model = json.loads((Path(folder) / "result.json").read_text())["model"]["model_id"]
    adapter = load_model(model, device="cpu")
    spec = default_feature_set(adapter)
    sides = {side: ImageCollection.from_folder(Path(folder) / "data" / side) for side in ("published", "unpublished")}
    Path(out).mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        started = time.perf_counter()
        tables = {side: extract_features(adapter, images, resolve_features(spec), seed=seed, batch_size=batch_size,
                                         store=None, num_workers=0, progress=False)
                  for side, images in sides.items()}
        np.savez(Path(out) / f"seed{seed}.npz", published=tables["published"].values,
                 unpublished=tables["unpublished"].values, columns=np.array(tables["published"].columns),
                 directions=np.array(directions_of(resolve_features(spec), adapter)))
        print(json.dumps({"seed": seed, "seconds": round(time.perf_counter() - started, 1)}), flush=True)


def verdict_log_p(published: np.ndarray, unpublished: np.ndarray, directions: np.ndarray) -> float:
    """Natural log of the pooled verdict's parametric p-value (no permutations)."""
    result = audit_test(published, unpublished, directions=directions, permutations=0, protocol="pooled")
    return result.verdict_log10_p * math.log(10)


def spread(log_ps: list[float]) -> dict:
    """min, max, max/min of p and the range and standard deviation of the verdict's Z."""
    log_ps = np.asarray(log_ps)
    z = sps.norm.isf(np.exp(log_ps))
    return {"n": len(log_ps), "p_min": float(np.exp(log_ps.min())), "p_max": float(np.exp(log_ps.max())),
            "max_over_min": float(np.exp(log_ps.max() - log_ps.min())),
            "z_range": float(z.max() - z.min()), "z_sd": float(z.std(ddof=1)) if len(z) > 1 else 0.0}


def emulated(log_ps: list[float], seeds: int, r: int, runs: int = 10) -> dict:
    """The spread of the verdict with r noise draws per image, from all r-subsets of the seed tables.

    Each subset's tables averaged column by column are one table with r
    draws per image. The subsets share seeds, so their Z's are correlated:
    for a mean of r out of a finite population of ``seeds`` draws the
    variance is ``sigma^2 / r * (seeds - r) / (seeds - 1)``, hence
    ``z_sd = sd over subsets * sqrt((seeds - 1) / (seeds - r))`` (exact
    where Z is linear in the noise). ``predicted_max_over_min`` is what
    ``runs`` independent seeds would give on average: the expected range of
    ``runs`` normal draws (3.08 sd for 10) times ``d ln p / d Z`` at the
    mean Z (``Z + 1/Z``, from the normal tail).
    """
    z = sps.norm.isf(np.exp(np.asarray(log_ps)))
    z_sd = float(z.std(ddof=1) * math.sqrt((seeds - 1) / (seeds - r))) if len(z) > 1 else 0.0
    z_mean = float(z.mean())
    expected_range = {10: 3.078, 5: 2.326}.get(runs, 3.078)
    return {"subsets": len(z), "z_mean": z_mean, "z_sd": z_sd,
            "predicted_max_over_min": float(math.exp(expected_range * z_sd * (z_mean + 1 / z_mean)))}


def families(folder: str, repeats: list[int], repeat_families: list[str] = ()) -> None:
    """Mode 2b: spread of the verdict over the seed tables and the families that carry it."""
    paths = sorted(Path(folder).glob("seed*.npz"), key=lambda p: int(p.stem[4:]))
    tables = [np.load(p) for p in paths]
    columns = [str(c) for c in tables[0]["columns"]]
    directions = tables[0]["directions"]
    both = np.stack([np.vstack([t["published"], t["unpublished"]]) for t in tables])  # (S, n, d)
    n_p = tables[0]["published"].shape[0]
    free = [c for j, c in enumerate(columns) if np.array_equal(both[0][:, j], both[-1][:, j])]

    def log_p(x: np.ndarray) -> float:
        return verdict_log_p(x[:n_p], x[n_p:], directions)

    print(json.dumps({"seeds": [p.stem for p in paths], "columns": len(columns), "seed_free_columns": free}))
    all_seeds = [log_p(x) for x in both]
    print(json.dumps({"what": "all columns from seed s", **spread(all_seeds)}), flush=True)
    print(json.dumps({"what": "1 noise draw per image", **emulated(all_seeds, len(both), 1)}), flush=True)
    for family, prefixes in NOISE_FAMILIES.items():
        cols = [j for j, c in enumerate(columns) if c.startswith(prefixes)]
        if not cols:
            continue
        only, frozen = [], []
        for x in both:
            y = both[0].copy()
            y[:, cols] = x[:, cols]
            only.append(log_p(y))
            z = x.copy()
            z[:, cols] = both[0][:, cols]
            frozen.append(log_p(z))
        print(json.dumps({"what": f"only {family} from seed s", **spread(only)}), flush=True)
        print(json.dumps({"what": f"{family} frozen at the first seed", **spread(frozen)}), flush=True)
    s_count = len(both)
    for r in repeats:
        if r >= s_count:
            continue
        groups = [list(g) for g in itertools.combinations(range(s_count), r)]
        for family in [None, *repeat_families]:
            cols = (list(range(len(columns))) if family is None
                    else [j for j, c in enumerate(columns) if c.startswith(NOISE_FAMILIES[family])])
            log_ps = []
            for g in groups:
                x = both[g[0]].copy()
                x[:, cols] = both[g][:, :, cols].mean(axis=0)
                log_ps.append(log_p(x))
            print(json.dumps({"what": f"{r} noise draws per image" + (f" for {family} only" if family else ""),
                              **emulated(log_ps, s_count, r)}), flush=True)


def draws(folder: str, counts: list[int]) -> None:
    """Mode 2c: the verdict of audits with R noise draws (``--noise-draws R``), each audit a disjoint group of R
    seed tables (independent draws, as ``draw_seed`` gives them), with and without the reliability weighting
    (``cdi.stats.draws``): the seed sd and mean of Z, max/min of p over all groups and over the first 10, and over
    every set of 5 groups (the issue's bar: ``--seed 1..5`` within a factor of 10) the median max/min and the share
    of sets within 10."""
    from cdi.stats.draws import DrawAveragedStatistic

    paths = sorted(Path(folder).glob("seed*.npz"), key=lambda p: int(p.stem[4:]))
    tables = [np.load(p) for p in paths]
    directions = tables[0]["directions"].astype(float)
    n_p = tables[0]["published"].shape[0]
    both = [np.vstack([t["published"], t["unpublished"]]) for t in tables]
    y = np.r_[np.ones(n_p), np.zeros(len(both[0]) - n_p)]
    for r in counts:
        groups = [both[k:k + r] for k in range(0, len(both) - r + 1, r)]
        for weighted in (False, True):
            parts = [DrawAveragedStatistic(g, y, directions, reliability_weighted=weighted).observe()[0]
                     for g in groups]
            log_p = np.array([o.log_p for o in parts])
            fives = [math.exp(np.ptp(log_p[list(c)])) for c in itertools.combinations(range(len(log_p)), 5)]
            print(json.dumps({"draws": r, "reliability_weighted": weighted, "audits": len(groups),
                              **spread(list(log_p)), "z_mean": float(np.mean([o.z for o in parts])),
                              "first_10_max_over_min": float(math.exp(np.ptp(log_p[:10]))),
                              "five_audits_median_max_over_min": float(np.median(fives)) if fives else None,
                              "five_audits_share_within_10": float(np.mean(np.array(fives) <= 10)) if fives else None}),
                  flush=True)


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] not in ("extract", "families", "draws", "-h", "--help"):
        fixed_features(sys.argv[1])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    ex = sub.add_parser("extract", help="the demo's features once per seed")
    ex.add_argument("folder")
    ex.add_argument("--seeds", default="0-9")
    ex.add_argument("--out", required=True)
    ex.add_argument("--batch-size", type=int, default=16)
    ex.add_argument("--threads", type=int, default=1)
    fa = sub.add_parser("families", help="the verdict's spread over the seed tables, by family")
    fa.add_argument("folder")
    fa.add_argument("--repeats", default="2,4,8", help="averaged draws per image to emulate")
    fa.add_argument("--repeat-families", default="", help="also emulate the repeats for these families alone")
    dr = sub.add_parser("draws", help="audits with R noise draws each, emulated from disjoint groups of seed tables")
    dr.add_argument("folder")
    dr.add_argument("--draws", default="2,3", help="noise draws per audit")
    args = parser.parse_args()
    if args.mode == "extract":
        extract(args.folder, _seeds(args.seeds), args.out, args.batch_size, args.threads)
    elif args.mode == "draws":
        draws(args.folder, [int(r) for r in args.draws.split(",") if r])
    else:
        families(args.folder, [int(r) for r in args.repeats.split(",") if r],
                 [f for f in args.repeat_families.split(",") if f])


if __name__ == "__main__":
    main()
