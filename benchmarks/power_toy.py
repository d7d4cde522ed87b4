"""Power of the audit's protocols on stored toy-model features, paired draws.

    python benchmarks/power_toy.py tests/data/toy_sd_light_features.csv --out full.jsonl
    python benchmarks/power_toy.py tests/data/toy_sd_light_features.csv --out half.jsonl \\
        --sizes 300,400 --member-fraction 0.5
    python benchmarks/power_toy.py --summarise full.jsonl half.jsonl

Runs can be split by method (``--methods``) or by draws (``--first-draw``,
``--draws``) and summarised together: the draws of a cell depend only on
``--seed``, the size and the member fraction.

For each size n (images per collection) draw P (``--member-fraction`` of it
from the members, the rest from non-members) and U from disjoint
non-members ``--draws`` times, run every method on the SAME draw, and report
the share of draws with p < alpha. Methods (on all stored columns, with the
registry's member directions):

* ``pooled``: the verdict (``protocol="pooled"``, parametric p-value);
* ``sequential``: the former verdict protocol (block seed = draw index);
* ``crossfit``: 5-fold cross-fitted logistic regression calibrated by
  ``--permutations`` permutations (the CDI reference protocol made exact;
  computed only as far as the decision at alpha needs, ``crossfit_pvalue``);
* ``loss``: the baseline, a one-sided Welch t-test on the denoising loss;
* ``verdict``: the decision word of the pooled protocol (issue 21,
  ``cdi.stats.verdict.direction_rule``): the pooled p-value where the
  verdict is ``used``, 1 where it is not (so "p < alpha" counts ``used``);
* ``prior``: part 1 of the pooled test alone (one-sided t-test of the prior
  score, the known member directions).

Other tables (``--member-prefix``, ``--nonmember-prefixes``, ``--features``),
e.g. the fine-tune toy's (P from the LoRA's training images, U from the
artist's images it never saw):

    python benchmarks/power_toy.py tests/data/toy_lora_strong_features.csv --features denoising_loss,pia,multiple_loss,clid \
        --member-prefix artist_published/ --nonmember-prefixes artist_unpublished/,artist_unused/ --sizes 25,50,100,200

Paired comparison: for each other method, the draws where only ``pooled``
detects (b) and only the other detects (c); the difference of shares
``(b - c) / draws`` with its 95% interval (Wald for paired proportions) and
the exact one-sided McNemar p-value of "the other is more powerful"
(binomial test of c among b + c). "At least as powerful within the draws'
noise" means that McNemar p-value is above 0.05 in every cell.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
from scipy import stats as sps

from cdi.stats.feature_checks import check_features
from cdi.stats.scoring import CrossFit
from cdi.stats.verdict import audit_test, permutation_pvalue, protocol_statistic
from cdi.engine.table import FeatureTable
from cdi.features.registry import columns_of, directions_of, resolve_features

METHODS = ("pooled", "verdict", "prior", "sequential", "crossfit", "loss")


def crossfit_pvalue(P: np.ndarray, U: np.ndarray, directions, draw: int, permutations: int, alpha: float,
                    chunk: int = 20) -> float:
    """The crossfit protocol's permutation p-value, computed only as far as the decision at ``alpha`` needs.

    Permutations run in chunks; once ``(1 + count) / (1 + B)`` reaches
    ``alpha`` the decision "p >= alpha" is certain and that lower bound is
    returned. So the share with p < alpha is exactly the full test's (same
    ``B``), at a fraction of the cost when the test does not reject.
    """
    X, y, _ = check_features(P, U)
    crossfit = CrossFit(X, y, directions=directions, protocol="crossfit", folds=5, seed=draw)
    raw, _ = crossfit.observe()
    z_obs = float(protocol_statistic(crossfit, raw[:, None], y[:, None].astype(np.float64))[0][0])
    threshold = z_obs - 1e-9 * (1.0 + abs(z_obs))
    rng = np.random.default_rng([draw, 0x9E57])
    count = done = 0
    while done < permutations:
        Y = crossfit.permuted_labels(rng, min(chunk, permutations - done))
        count += int(np.sum(protocol_statistic(crossfit, crossfit.scores(Y), Y)[0] >= threshold))
        done += Y.shape[1]
        if permutation_pvalue(count, permutations) >= alpha:
            break
    return permutation_pvalue(count, permutations)


def method_pvalue(method: str, P: np.ndarray, U: np.ndarray, directions, loss: int, draw: int,
                  permutations: int, alpha: float) -> float:
    """One method's p-value on one draw."""
    if method == "loss":
        return float(sps.ttest_ind(P[:, loss], U[:, loss], equal_var=False, alternative="less").pvalue)
    if method == "crossfit":
        return crossfit_pvalue(P, U, directions, draw, permutations, alpha)
    if method in ("verdict", "prior"):
        res = audit_test(P, U, directions=directions, permutations=0, alpha=alpha)
        if method == "prior":
            return math.exp(res.pooled["prior_log_p"])
        return res.verdict_p if res.verdict == "used" else 1.0
    return audit_test(P, U, directions=directions, protocol=method, permutations=0, seed=draw).verdict_p


def paired(hits_a: np.ndarray, hits_b: np.ndarray) -> tuple[float, float, float, float]:
    """Difference of shares a - b, its 95% Wald interval, and McNemar's one-sided p of "b better"."""
    b = int(np.sum(hits_a & ~hits_b))
    c = int(np.sum(~hits_a & hits_b))
    n = len(hits_a)
    diff = (b - c) / n
    var = ((b + c) / n - diff**2) / n
    half = 1.96 * math.sqrt(max(var, 0.0))
    p = float(sps.binomtest(c, b + c, 0.5, alternative="greater").pvalue) if b + c else 1.0
    return diff, diff - half, diff + half, p


def draws_of(members: np.ndarray, nonmembers: np.ndarray, n: int, fraction: float, draws: int, seed: int):
    """The cell's draws ``(P, U)``, the same whatever methods run (so separate runs pair up)."""
    rng = np.random.default_rng([seed, n, int(round(fraction * 1000))])
    n_members = int(round(fraction * n))
    for _ in range(draws):
        order = rng.permutation(len(nonmembers))
        P = np.concatenate([members[rng.choice(len(members), n_members, replace=False)],
                            nonmembers[order[:n - n_members]]])
        yield P, nonmembers[order[n - n_members:2 * n - n_members]]


def summarise(paths: list[str], alpha: float) -> None:
    """The power table, with paired comparisons, from the JSON lines of earlier runs."""
    rows: dict[tuple, dict[str, float]] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                rows.setdefault((r["fraction"], r["n"], r["draw"]), {}).update(r["p"])
    cells = sorted({(k[0], k[1]) for k in rows}, key=lambda c: (-c[0], c[1]))
    methods = [m for m in METHODS if any(m in v for v in rows.values())]
    print(f"share of draws with p < {alpha} (verdict: share 'used'); paired: pooled minus other, diff [95% CI], McNemar p (other better)")
    print(f"{'fraction':>8} {'n':>4} " + " ".join(f"{m:>14}" for m in methods))
    for fraction, n in cells:
        keys = [k for k in rows if k[:2] == (fraction, n)]
        line = f"{fraction:>8} {n:>4} "
        comparisons = []
        for m in methods:
            have = [k for k in keys if m in rows[k]]
            hits = np.array([rows[k][m] < alpha for k in have])
            line += f" {hits.mean():>7.3f} ({len(have):>3})" if have else f" {'-':>13}"
            both = [k for k in have if "pooled" in rows[k]]
            if m != "pooled" and both:
                diff, lo, hi, p = paired(np.array([rows[k]["pooled"] < alpha for k in both]),
                                         np.array([rows[k][m] < alpha for k in both]))
                comparisons.append(f"{m}: {diff:+.3f} [{lo:+.3f}, {hi:+.3f}] p={p:.2g} ({len(both)} draws)")
        print(line)
        for c in comparisons:
            print(f"{'':>14}{c}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", nargs="?")
    parser.add_argument("--sizes", default="50,100,200,300,400")
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--first-draw", type=int, default=0, help="Skip the cell's first draws (to split a run).")
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--member-fraction", type=float, default=1.0)
    parser.add_argument("--permutations", type=int, default=100, help="Permutations of the crossfit method.")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--columns", default=None,
                        help="Comma-separated columns to use (default: all); e.g. to add or leave out a family.")
    parser.add_argument("--features", default="cdi+clid+sima", help="Feature set whose member directions apply.")
    parser.add_argument("--member-prefix", default="members/", help="Paths of the member rows start with this.")
    parser.add_argument("--nonmember-prefixes", default="nonmembers/",
                        help="Comma-separated path prefixes of the non-member rows.")
    parser.add_argument("--out", default=None, help="Append every draw's p-values to this JSON-lines file.")
    parser.add_argument("--summarise", nargs="+", default=None, metavar="JSONL",
                        help="Print the table from the JSON lines of earlier runs instead of running.")
    args = parser.parse_args()
    if args.summarise:
        summarise(args.summarise, args.alpha)
        return
    table = FeatureTable.from_csv(args.table)
    families = resolve_features(args.features)
    known = dict(zip(columns_of(families), directions_of(families)))
    cols = table.columns if args.columns is None else args.columns.split(",")
    idx = [table.columns.index(c) for c in cols]
    directions = [known[c] for c in cols]
    is_member = np.array([p.startswith(args.member_prefix) for p in table.paths])
    is_nonmember = np.array([p.startswith(tuple(args.nonmember_prefixes.split(","))) for p in table.paths])
    members, nonmembers = table.values[is_member][:, idx], table.values[is_nonmember][:, idx]
    loss = cols.index("denoising_loss")
    methods = args.methods.split(",")
    out = open(args.out, "a") if args.out else None
    for n in [int(s) for s in args.sizes.split(",")]:
        hits = {m: [] for m in methods}
        for d, (P, U) in enumerate(draws_of(members, nonmembers, n, args.member_fraction, args.draws, args.seed)):
            if d < args.first_draw:
                continue
            ps = {m: method_pvalue(m, P, U, directions, loss, d, args.permutations, args.alpha) for m in methods}
            for m in methods:
                hits[m].append(ps[m] < args.alpha)
            if out:
                out.write(json.dumps({"fraction": args.member_fraction, "n": n, "draw": d, "p": ps}) + "\n")
                out.flush()
        print(f"n={n} " + " ".join(f"{m}={np.mean(h):.3f}" for m, h in hits.items()), flush=True)


if __name__ == "__main__":
    main()
