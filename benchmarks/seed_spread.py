"""The verdict p-value over 20 seeds on an audit's own feature table (features fixed), per protocol.

    python benchmarks/seed_spread.py demo-out

Reads the audit folder's ``features.csv`` and ``result.json`` (member
directions), runs ``cdi.stats.audit_test`` with seeds 0..19 under the
pooled (the verdict), sequential and crossfit (200 permutations) protocols
and prints min, max and max/min of each as JSON lines.
"""
import json
import sys

from cdi.evidence import split_table
from cdi.verify import read_evidence_table
from cdi.result import AuditResult
from cdi.stats import audit_test

folder = sys.argv[1]
rec = AuditResult.load(folder)
P, U = split_table(read_evidence_table(folder))
d = rec.features["directions"]
print("table", P.values.shape, U.values.shape, "recorded verdict p", rec.p_value)
out = {}
for protocol in ("pooled", "sequential", "crossfit"):
    ps = [audit_test(P.values, U.values, directions=d, permutations=0 if protocol != "crossfit" else 200,
                     seed=s, protocol=protocol).verdict_p for s in range(20)]
    out[protocol] = {"min": min(ps), "max": max(ps), "max_over_min": max(ps) / min(ps)}
    print(json.dumps({"protocol": protocol, **out[protocol]}), flush=True)
