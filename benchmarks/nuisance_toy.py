"""How often the verdict says `used` when the collections differ by something other than training (issue 21).

    OMP_NUM_THREADS=1 python benchmarks/nuisance_toy.py --sizes 100,300 --draws 200
    (with the audit's default two noise draws: --draw-tables tests/data/toy_sd_light_draw1_features.csv)

On the stored light-toy features (``tests/data/toy_sd_light_features.csv``),
P and U are both drawn from the 899 non-members and P's rows are shifted
(``cdi.stats.calibration.nuisance_rates``): against the member direction by
``--strengths`` column SDs on a random ``--fractions`` of the columns, and
along random directions orthogonal to the prior. Prints, per cell, the share
of draws where the combined pooled test alone rejects at ``--alpha`` (what
the verdict said before issue 21), where the verdict is ``used`` (with the
99% binomial bound it must stay under) and ``inconclusive``.
"""

from __future__ import annotations

import argparse

from cdi.engine.table import FeatureTable
from cdi.features.registry import directions_of, resolve_features
from cdi.stats.calibration import nuisance_rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default="tests/data/toy_sd_light_features.csv")
    parser.add_argument("--sizes", default="100,300")
    parser.add_argument("--strengths", default="0.05,0.1,0.2,0.5,1.0")
    parser.add_argument("--fractions", default="0.1,0.3,0.6,1.0")
    parser.add_argument("--orthogonal-strengths", default="0.01,0.02,0.05,0.1,0.5")
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draw-tables", default="",
                        help="comma-separated further noise draws of --table (benchmarks/toy_features.py --draw R)")
    parser.add_argument("--plain", action="store_true",
                        help="average the draws without the reliability weighting (session 5's statistic), to compare")
    args = parser.parse_args()
    if args.plain:
        from noise_draws_toy import use_plain_draws  # this folder is on the path when the script runs

        use_plain_draws()
    table = FeatureTable.from_csv(args.table)
    directions = directions_of(resolve_features("cdi+clid+sima"))
    rows = [p.startswith("nonmembers/") for p in table.paths]
    pool = table.values[rows]
    draw_pools = []
    for path in [p for p in args.draw_tables.split(",") if p]:
        extra = FeatureTable.from_csv(path)
        values = table.values.astype(float).copy()
        for k, column in enumerate(extra.columns):
            values[:, table.columns.index(column)] = extra.values[:, k]
        draw_pools.append(values[rows])
    floats = lambda text: [float(v) for v in text.split(",")]  # noqa: E731
    cells = [("against", s, f) for s in floats(args.strengths) for f in floats(args.fractions)]
    cells += [("orthogonal", s, 1.0) for s in floats(args.orthogonal_strengths)]
    print(f"{'kind':>10} {'n':>4} {'SD':>5} {'cols':>5} {'combined':>9} {'used':>6} {'bound':>6} {'inconcl':>8}")
    for n in [int(v) for v in args.sizes.split(",")]:
        for kind, strength, fraction in cells:
            r = nuisance_rates(pool, directions, n=n, strength=strength, kind=kind, fraction=fraction,
                               draws=args.draws, alpha=args.alpha, seed=args.seed, draw_pools=draw_pools)
            print(f"{kind:>10} {n:>4} {strength:>5} {fraction:>5} {r.rejected / r.draws:>9.3f} {r.used / r.draws:>6.3f} "
                  f"{r.high / r.draws:>6.3f} {r.inconclusive / r.draws:>8.3f}{'' if r.ok else '  OVER'}", flush=True)


if __name__ == "__main__":
    main()
