"""Time the audit's permutation test (issue 7.3).

Runs ``cdi.stats.verdict.audit_test`` with the default protocol on synthetic
features shaped like an audit's (correlated columns, a small member shift in
the known directions) and prints the wall-clock time of the whole test and
of the permutation part. Target: 1,000 permutations on 10,000 + 10,000
images with 31 features in at most 30 s on 2 cores.

    .venv/bin/python benchmarks/permutation_speed.py
    .venv/bin/python benchmarks/permutation_speed.py --published 2000 --unpublished 2000 --permutations 200

The machine's CPU count and load average are printed beside the figure: on
a shared machine the time depends on what else runs.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def synthetic_audit(n_published: int, n_unpublished: int, n_features: int, shift: float, seed: int):
    """Correlated Gaussian features, published rows shifted by ``shift`` SD along the directions."""
    rng = np.random.default_rng(seed)
    mixing = 0.3 * rng.standard_normal((n_features, n_features)) + np.eye(n_features)
    directions = np.where(np.arange(n_features) % 3 == 0, 1, -1)
    P = rng.standard_normal((n_published, n_features)) @ mixing + shift * directions
    U = rng.standard_normal((n_unpublished, n_features)) @ mixing
    return P, U, directions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--published", type=int, default=10_000)
    parser.add_argument("--unpublished", type=int, default=10_000)
    parser.add_argument("--features", type=int, default=31)
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--shift", type=float, default=0.003)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from cdi.stats.verdict import audit_test

    P, U, directions = synthetic_audit(args.published, args.unpublished, args.features, args.shift, args.seed)
    print(f"cpus: {os.cpu_count()}  load average: {os.getloadavg()}")
    print(f"{args.published} + {args.unpublished} images, {args.features} features, "
          f"{args.permutations} permutations, folds={args.folds}")
    start = time.perf_counter()
    without = audit_test(P, U, directions=directions, permutations=0, folds=args.folds, seed=args.seed)
    t_verdict = time.perf_counter() - start
    start = time.perf_counter()
    result = audit_test(P, U, directions=directions, permutations=args.permutations, folds=args.folds,
                        seed=args.seed)
    t_total = time.perf_counter() - start
    assert result.verdict_p == without.verdict_p
    print(f"verdict p = {result.verdict_p:.3g}, permutation p = {result.permutation_p:.3g}")
    print(f"audit without permutations: {t_verdict:.2f} s")
    print(f"audit with {args.permutations} permutations: {t_total:.2f} s "
          f"(permutations alone about {t_total - t_verdict:.2f} s)")


if __name__ == "__main__":
    main()
