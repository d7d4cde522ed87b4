"""The verdict with 1, 2 or 3 noise draws on stored toy features: null calibration and power, paired draws.

    python benchmarks/toy_features.py --strength light --out light.csv
    python benchmarks/toy_features.py --strength light --draw 1 \\
        --features denoising_loss,multiple_loss,noise_optimization,gradient_masking,clid --out light_draw1.csv
    (and --draw 2 -> light_draw2.csv), then
    python benchmarks/noise_draws_toy.py light.csv light_draw1.csv light_draw2.csv

(the three tables are in tests/data: toy_sd_light_features.csv and toy_sd_light_draw{1,2}_features.csv).

For each cell, P and U are drawn as rows of the first table (``--member-fraction``
of P from the members; null cells: P and U from disjoint non-members) and the
SAME rows are taken from every draw table, whose noise-drawing columns
replace the first table's (``cdi.audit.noise_draws``). Each draw of the cell
is tested with R = 1, 2, 3 noise draws (``audit_test(..., draws=...)``) and
the share of draws with ``used`` at ``--alpha`` (power cells), or with p below
0.05 and 0.01 (null cells, with the 99% binomial interval of the nominal
rate) is printed with the paired difference to R = 1.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import stats as sps

from cdi.engine.table import FeatureTable
from cdi.features.registry import columns_of, directions_of, resolve_features
from cdi.stats.draws import DrawAveragedStatistic
from cdi.stats.verdict import audit_test


def use_plain_draws() -> None:
    """Make ``audit_test`` average the draws without the reliability weighting (session 5's statistic), to compare."""
    import functools

    import cdi.stats.verdict

    cdi.stats.verdict.DrawAveragedStatistic = functools.partial(DrawAveragedStatistic, reliability_weighted=False)


def merged(first: FeatureTable, extra: FeatureTable) -> np.ndarray:
    """``first``'s values with ``extra``'s columns (same rows) swapped in."""
    if list(extra.hashes) != list(first.hashes):
        raise SystemExit("the draw tables must list the same images in the same order as the first table")
    values = np.array(first.values, dtype=np.float64, copy=True)
    for k, column in enumerate(extra.columns):
        values[:, first.columns.index(column)] = extra.values[:, k]
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", nargs="+", help="the first table, then the draw tables (noise columns only)")
    parser.add_argument("--sizes", default="50,100,200,300,400")
    parser.add_argument("--null-sizes", default="100,300")
    parser.add_argument("--draws", type=int, default=200, help="draws per power cell")
    parser.add_argument("--null-draws", type=int, default=300, help="draws per null cell")
    parser.add_argument("--member-fraction", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features", default="cdi+clid+sima")
    parser.add_argument("--plain", action="store_true",
                        help="the draws' statistic without reliability weighting (session 5's), for comparison")
    args = parser.parse_args()
    if args.plain:
        use_plain_draws()
    tables = [FeatureTable.from_csv(p) for p in args.tables]
    first = tables[0]
    known = dict(zip(columns_of(resolve_features(args.features)), directions_of(resolve_features(args.features))))
    directions = [known[c] for c in first.columns]
    values = [first.values.astype(np.float64)] + [merged(first, t) for t in tables[1:]]
    member = np.array([p.startswith("members/") for p in first.paths])
    members, nonmembers = np.flatnonzero(member), np.flatnonzero(~member)
    counts = list(range(1, len(values) + 1))

    def verdicts(pi: np.ndarray, ui: np.ndarray) -> dict[int, tuple[float, str]]:
        out = {}
        for r in counts:
            res = audit_test(values[0][pi], values[0][ui], directions=directions, permutations=0, alpha=args.alpha,
                             draws=[(v[pi], v[ui]) for v in values[1:r]])
            out[r] = (res.verdict_p, res.verdict)
        return out

    rng = np.random.default_rng([args.seed, 0x0D4A])
    print(f"null cells: share of draws with p < 0.05 / p < 0.01 (99% interval of the nominal rate)")
    for n in [int(s) for s in args.null_sizes.split(",") if s]:
        ps = {r: [] for r in counts}
        for _ in range(args.null_draws):
            order = rng.permutation(nonmembers)
            res = verdicts(order[:n], order[n:2 * n])
            for r in counts:
                ps[r].append(res[r][0])
        band = {a: sps.binom.ppf([0.005, 0.995], args.null_draws, a) / args.null_draws for a in (0.05, 0.01)}
        line = "  ".join(f"R={r}: {np.mean(np.array(ps[r]) < 0.05):.3f} / {np.mean(np.array(ps[r]) < 0.01):.3f}"
                         for r in counts)
        print(f"  n={n:>4} {line}   (0.05: {band[0.05][0]:.3f}-{band[0.05][1]:.3f}; 0.01: "
              f"{band[0.01][0]:.3f}-{band[0.01][1]:.3f})", flush=True)
    print(f"power cells (member fraction {args.member_fraction}): share of draws with verdict 'used' at "
          f"alpha {args.alpha}; paired difference to R=1 [95% Wald interval]")
    k = int(round(args.member_fraction * 1000))
    for n in [int(s) for s in args.sizes.split(",") if s]:
        cell = np.random.default_rng([args.seed, n, k])
        used = {r: [] for r in counts}
        n_members = int(round(args.member_fraction * n))
        for _ in range(args.draws):
            order = cell.permutation(nonmembers)
            pi = np.concatenate([cell.choice(members, n_members, replace=False), order[:n - n_members]])
            res = verdicts(pi, order[n - n_members:2 * n - n_members])
            for r in counts:
                used[r].append(res[r][1] == "used")
        base = np.array(used[1])
        parts = []
        for r in counts:
            hits = np.array(used[r])
            diff = hits.mean() - base.mean()
            b, c = int(np.sum(hits & ~base)), int(np.sum(~hits & base))
            half = 1.96 * np.sqrt(max(((b + c) / len(hits) - diff**2) / len(hits), 0.0))
            parts.append(f"R={r}: {hits.mean():.3f}" + ("" if r == 1 else f" ({diff:+.3f} [{diff - half:+.3f}, "
                                                                       f"{diff + half:+.3f}])"))
        print(f"  n={n:>4} " + "  ".join(parts), flush=True)


if __name__ == "__main__":
    main()
