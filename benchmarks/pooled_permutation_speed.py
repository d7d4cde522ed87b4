"""Time of the pooled verdict's exact permutation p-value at the default number of permutations (issue 21).

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 taskset -c 0 python benchmarks/pooled_permutation_speed.py

Draws 150 members and 150 non-members of the stored light-toy features
(``tests/data/toy_sd_light_features.csv``, 35 columns), runs
``cdi.stats.audit_test`` with the default permutations of the pooled protocol
(``DEFAULT_PERMUTATIONS["pooled"]`` = 99,999: the permutation p-value
resolves 1e-5) and prints the wall time, the permutation p-value and the
parametric p-value. Pin it to one core as above: with several BLAS threads
on a busy machine the small matrix products of every chunk spend most of
their time waiting for threads.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cdi.engine.table import FeatureTable
from cdi.features.registry import directions_of, resolve_features
from cdi.stats.verdict import DEFAULT_PERMUTATIONS, audit_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default="tests/data/toy_sd_light_features.csv")
    parser.add_argument("--n", type=int, default=150, help="Images per collection.")
    parser.add_argument("--permutations", type=int, default=None, help="Default: the pooled protocol's default.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    table = FeatureTable.from_csv(args.table)
    directions = directions_of(resolve_features("cdi+clid+sima"))
    members = table.values[[p.startswith("members/") for p in table.paths]]
    nonmembers = table.values[[p.startswith("nonmembers/") for p in table.paths]]
    rng = np.random.default_rng(args.seed)
    P = members[rng.choice(len(members), args.n, replace=False)]
    U = nonmembers[rng.choice(len(nonmembers), args.n, replace=False)]
    start = time.perf_counter()
    res = audit_test(P, U, directions=directions, permutations=args.permutations, seed=args.seed)
    seconds = time.perf_counter() - start
    print(f"{args.n} + {args.n} images x {P.shape[1]} features, {res.permutations} permutations "
          f"(default {DEFAULT_PERMUTATIONS['pooled']}): {seconds:.2f} s; permutation p = {res.permutation_p:.3g} "
          f"(floor {1 / (res.permutations + 1):.3g}), parametric p = {res.ttest_p:.3g}")


if __name__ == "__main__":
    main()
