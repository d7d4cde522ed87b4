"""The verdict p-value over 20 seeds on an audit's own feature table (features fixed), per protocol.

    python benchmarks/seed_spread.py demo-out

Reads the audit folder's ``features.csv`` and ``result.json`` (member
directions), runs ``cdi.stats.verdict.audit_test`` with seeds 0..19 under the
pooled (the verdict), sequential and crossfit (200 permutations) protocols
and prints min, max and max/min of each as JSON lines.
"""
from __future__ import annotations

import json
import sys

from cdi.audit.evidence import split_table
from cdi.audit.result import AuditResult
from cdi.stats.verdict import audit_test
from cdi.audit.verify import read_evidence_table


def main() -> None:
    folder = sys.argv[1]
    recorded = AuditResult.load(folder)
    published, unpublished = split_table(read_evidence_table(folder))
    directions = recorded.features["directions"]
    print("table", published.values.shape, unpublished.values.shape, "recorded verdict p", recorded.p_value)
    for protocol in ("pooled", "sequential", "crossfit"):
        ps = [audit_test(published.values, unpublished.values, directions=directions, seed=seed, protocol=protocol,
                         permutations=200 if protocol == "crossfit" else 0).verdict_p for seed in range(20)]
        print(json.dumps({"protocol": protocol, "min": min(ps), "max": max(ps), "max_over_min": max(ps) / min(ps)}),
              flush=True)


if __name__ == "__main__":
    main()
