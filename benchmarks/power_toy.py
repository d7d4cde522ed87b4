"""Power of the audit against the loss-only baseline, on stored toy-model features.

    python benchmarks/power_toy.py tests/data/toy_sd_light_features.csv --draws 50

For each size n (images per collection) and each method, draw P from the
members and U from disjoint non-members ``--draws`` times and report the
share of draws with p < alpha, and the smallest n reaching 90%:

* ``cdi``: the audit's verdict test on the 26 CDI columns;
* ``cdi+clid``: the same on all 31 columns;
* ``loss``: the baseline, a one-sided Welch t-test on mean denoising loss
  (no learning).
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import stats as sps

from cdi.stats import audit_test
from cdi.table import FeatureTable
from features.registry import columns_of, directions_of, resolve_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("table")
    parser.add_argument("--sizes", default="25,50,100,150,200,300,400")
    parser.add_argument("--draws", type=int, default=50)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    table = FeatureTable.from_csv(args.table)
    is_member = np.array([p.startswith("members/") for p in table.paths])
    members, nonmembers = table.values[is_member], table.values[~is_member]
    cdi = resolve_features("cdi")
    clid = resolve_features("cdi+clid")
    sets = {
        "cdi": ([table.columns.index(c) for c in columns_of(cdi)], directions_of(cdi)),
        "cdi+clid": ([table.columns.index(c) for c in table.columns], None),
    }
    all_dirs = dict(zip(columns_of(clid), directions_of(clid)))
    sets["cdi+clid"] = (sets["cdi+clid"][0], [all_dirs[c] for c in table.columns])
    loss = table.columns.index("denoising_loss")
    rng = np.random.default_rng(args.seed)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{'n':>5} " + " ".join(f"{m:>10}" for m in [*sets, "loss"]))
    needed = {}
    for n in sizes:
        if n > len(members) or 2 * n > len(nonmembers) + n:
            break
        hits = {m: 0 for m in [*sets, "loss"]}
        for d in range(args.draws):
            p_rows = rng.choice(len(members), n, replace=False)
            u_rows = rng.choice(len(nonmembers), n, replace=False)
            for name, (cols, dirs) in sets.items():
                res = audit_test(members[p_rows][:, cols], nonmembers[u_rows][:, cols], directions=dirs,
                                 permutations=0, alpha=args.alpha, seed=d)
                hits[name] += res.verdict_p < args.alpha
            p = sps.ttest_ind(members[p_rows, loss], nonmembers[u_rows, loss], equal_var=False,
                              alternative="less").pvalue
            hits["loss"] += p < args.alpha
        shares = {m: h / args.draws for m, h in hits.items()}
        for m, s in shares.items():
            if s >= 0.9 and m not in needed:
                needed[m] = n
        print(f"{n:>5} " + " ".join(f"{shares[m]:>10.2f}" for m in shares), flush=True)
    print("smallest n with >= 90% detection:", {m: needed.get(m) for m in [*sets, "loss"]})


if __name__ == "__main__":
    main()
