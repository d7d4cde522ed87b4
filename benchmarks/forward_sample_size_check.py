"""How good is the forward sample-size estimate? True n for 90% power against the estimates single audits give.

    python benchmarks/forward_sample_size_check.py tests/data/toy_sd_light_features.csv

On a stored toy table (members and non-members): the verdict's power at
n = 150..250 per side (200 draws each; where it crosses 0.9 is the true
answer), then 200 audits each at n = 50, 100, 150: the median and quartiles
of ``cdi.sample_size.forward_sample_size``'s estimate and the share of its
95% intervals that hold the true range (200 to 225 images on the light toy).
"""
import sys

import numpy as np
from cdi.table import FeatureTable
from cdi.stats import audit_test
from cdi.sample_size import forward_sample_size
from cdi.features.registry import directions_of, resolve_features
t = FeatureTable.from_csv(sys.argv[1] if len(sys.argv) > 1 else "tests/data/toy_sd_light_features.csv")
fam = resolve_features("cdi+clid+sima"); d = directions_of(fam)
m = np.array([p.startswith("members/") for p in t.paths])
M, N = t.values[m], t.values[~m]
rng = np.random.default_rng(11)
def draw(n):
    return M[rng.choice(len(M), n, replace=False)], N[rng.choice(len(N), 2 * n, replace=False)][:n]
# true power curve
for n in (150, 175, 200, 225, 250):
    hits = np.mean([audit_test(*draw(n), directions=d, permutations=0).verdict_p < 0.01 for _ in range(200)])
    print("true power n=%d: %.3f" % (n, hits), flush=True)
for n0 in (50, 100, 150):
    est, lo, hi = [], [], []
    for _ in range(200):
        r = audit_test(*draw(n0), directions=d, permutations=0)
        f = forward_sample_size(r.statistic, n0, n0)
        est.append(f.published_needed or np.inf); lo.append(f.published_low or np.inf); hi.append(f.published_high or np.inf)
    est = np.array(est, float)
    print(f"from audits at n={n0}: median estimate {np.median(est):.0f}, quartiles {np.percentile(est,25):.0f}-{np.percentile(est,75):.0f}, "
          f"share of 95% intervals holding 200..225: {np.mean((np.array(lo) <= 225) & (np.array(hi) >= 200)):.2f}", flush=True)
