"""How good is the forward sample-size estimate? True n for 90% power against the estimates single audits give.

    python benchmarks/forward_sample_size_check.py tests/data/toy_sd_light_features.csv

On a stored toy table (members and non-members): the verdict's power at
n = 150..250 per side (200 draws each; where it crosses 0.9 is the true
answer), then 200 audits each at n = 50, 100, 150: the median and quartiles
of ``cdi.stats.sample_size.forward_sample_size``'s estimate and the share of its
95% intervals that hold the true range (200 to 225 images on the light toy).
"""

from __future__ import annotations

import sys

import numpy as np

from cdi.features.registry import directions_of, resolve_features
from cdi.stats.sample_size import forward_sample_size
from cdi.stats.verdict import audit_test
from cdi.engine.table import FeatureTable

DRAWS = 200
TRUE_RANGE = (200, 225)


def main() -> None:
    table = FeatureTable.from_csv(sys.argv[1] if len(sys.argv) > 1 else "tests/data/toy_sd_light_features.csv")
    directions = directions_of(resolve_features("cdi+clid+sima"))
    is_member = np.array([p.startswith("members/") for p in table.paths])
    members, nonmembers = table.values[is_member], table.values[~is_member]
    rng = np.random.default_rng(11)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        return (members[rng.choice(len(members), n, replace=False)],
                nonmembers[rng.choice(len(nonmembers), n, replace=False)])

    for n in (150, 175, 200, 225, 250):
        hits = [audit_test(*draw(n), directions=directions, permutations=0).verdict_p < 0.01 for _ in range(DRAWS)]
        print(f"true power n={n}: {np.mean(hits):.3f}", flush=True)
    for n in (50, 100, 150):
        estimates = [forward_sample_size(audit_test(*draw(n), directions=directions, permutations=0).statistic, n, n)
                     for _ in range(DRAWS)]
        needed = np.array([e.published_needed or np.inf for e in estimates], float)
        covered = [(e.published_low or np.inf) <= TRUE_RANGE[1] and (e.published_high or np.inf) >= TRUE_RANGE[0]
                   for e in estimates]
        print(f"from audits at n={n}: median estimate {np.median(needed):.0f}, quartiles "
              f"{np.percentile(needed, 25):.0f}-{np.percentile(needed, 75):.0f}, share of 95% intervals holding "
              f"{TRUE_RANGE[0]}..{TRUE_RANGE[1]}: {np.mean(covered):.2f}", flush=True)


if __name__ == "__main__":
    main()
