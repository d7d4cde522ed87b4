"""The seed check's pieces on hand-made tables (the end-to-end run is in test_audit.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cdi.audit.config import AuditConfig
from cdi.audit.seed_check import MAX_SEED_CHECK, SeedCheck, other_seeds, redrawn_tables, run_seed_check
from cdi.engine.table import FeatureTable
from cdi.utils.errors import CDIError


def _table(values, columns, hashes) -> FeatureTable:
    n = len(hashes)
    return FeatureTable(values=np.asarray(values, dtype=np.float64), columns=list(columns), hashes=list(hashes),
                        paths=[f"{h}.png" for h in hashes], captions=[None] * n, meta={})


def test_other_seeds_follow_the_audit_seed_and_wrap():
    assert other_seeds(5, 3) == [6, 7, 8]
    assert other_seeds(2**63 - 2, 3) == [2**63 - 1, 0, 1]
    assert other_seeds(0, 0) == []


def test_redrawn_tables_replace_only_the_redrawn_columns():
    hashes = ["a", "b", "c"]
    base = _table([[1, 2, 3], [4, 5, 6], [7, 8, 9]], ["x", "noisy", "y"], hashes)
    new = _table([[20], [50], [80]], ["noisy"], hashes)
    (values,) = redrawn_tables([base], [new])
    assert values.tolist() == [[1, 20, 3], [4, 50, 6], [7, 80, 9]]
    assert base.values[:, 1].tolist() == [2, 5, 8]  # the audit's own table is left as it was
    with pytest.raises(RuntimeError, match="other images"):
        redrawn_tables([base], [_table([[1], [2], [3]], ["noisy"], ["a", "c", "b"])])


def test_run_seed_check_tests_every_seed_in_order():
    hashes = ["a", "b"]
    tables = [_table([[1.0, 0.0], [2.0, 0.0]], ["free", "noisy"], hashes)] * 2
    redrawn = {s: [_table([[float(s)], [float(s)]], ["noisy"], hashes)] * 2 for s in (8, 9)}
    seen = []

    def test(p, u):
        seen.append(p[:, 1].tolist())
        return 10.0 ** -p[0, 1], "used" if p[0, 1] > 8.5 else "not_detected"

    check = run_seed_check(tables, redrawn, seed=7, families_redrawn=["noisy_family"], test=test,
                           first=(1e-7, "used"), p_kind="parametric", calls_per_image={"forward": 5, "backward": 1})
    assert seen == [[8.0, 8.0], [9.0, 9.0]]
    assert check.seeds == [7, 8, 9] and check.p_values == [1e-7, 1e-8, 1e-9]
    assert check.verdicts == ["used", "not_detected", "used"] and not check.same_verdict
    assert check.extra_calls_per_image == {"forward": 10, "backward": 2}
    assert check.max_over_min == pytest.approx(100.0)
    record = check.to_dict()
    assert record["p_min"] == 1e-9 and record["p_max"] == 1e-7 and record["same_verdict"] is False
    assert "seed 8: not_detected" in record["text"] and "the one at seed 7" in record["text"]


def test_seed_check_text_without_a_ratio():
    check = SeedCheck(seeds=[0, 1], p_values=[0.0, 1e-3], verdicts=["used", "used"], p_kind="permutation",
                      families_redrawn=["clid"], extra_calls_per_image={"forward": 15, "backward": 0})
    assert check.max_over_min is None and check.same_verdict
    assert "the smallest p is 0" in check.text() and "`used` at every seed" in check.text()


@pytest.mark.parametrize("count, needle", [(-1, "--seed-check"), (MAX_SEED_CHECK + 1, "--seed-check"),
                                           (True, "--seed-check")])
def test_seed_check_option_is_checked(tmp_path, count, needle):
    config = AuditConfig("P", "U", "m", str(tmp_path / "out"), seed_check=count)
    with pytest.raises(CDIError, match=needle):
        config.validate()


def test_seed_check_needs_the_model(tmp_path):
    config = AuditConfig(None, None, None, str(tmp_path / "out"), published_features="p.csv",
                         unpublished_features="u.csv", seed_check=2)
    with pytest.raises(CDIError, match="needs the images and the model"):
        config.validate()
    config = AuditConfig("P", "U", "m", str(tmp_path / "out2"), reference_model="base", seed_check=2)
    with pytest.raises(CDIError, match="--reference-model"):
        config.validate()
