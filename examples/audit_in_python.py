"""An audit from Python, as in a notebook: load the model once, audit subsets in memory.

Run from the repository root (a few minutes on one CPU thread):

    python examples/audit_in_python.py

It builds the embedded toy world (a tiny text-to-image model trained by cdi
on digit images; written once to ~/.cache/cdi/toy), then audits 150 member
images against 150 non-members, and 150 non-members against 150 others (a
null case, which must not be detected). Nothing is written by the audits;
the last lines show how to write the usual files and the HTML report.
"""

import cdi
from cdi.data.collection import ImageCollection
from cdi.toy.world import build_world

world = build_world("sd", "overtrained", progress=False)
adapter = cdi.api.load_adapter(world.model_dir, device="cpu")  # load once, audit many times

members = ImageCollection.from_folder(world.members_dir, name="published")
nonmembers = ImageCollection.from_folder(world.nonmembers_dir, name="unpublished")

settings = dict(features="cdi", permutations=200, sample_size_resamples=0, shift_encoder="builtin")
used = cdi.api.audit(members.subset(range(150)), nonmembers.subset(range(150)), adapter, **settings)
null = cdi.api.audit(nonmembers.subset(range(150, 300)), nonmembers.subset(range(150)), adapter, **settings)

for name, result in [("members vs non-members", used), ("non-members vs non-members", null)]:
    print(f"{name}: verdict {result.verdict}, p = {result.p_value:.3g}, AUC = {result.auc:.3f}")

# To keep the evidence: result.json + report.html (+ features.csv with out=... in cdi.api.audit).
# result.save("audit-out"); cdi.write_report("audit-out", result)
