"""The seed check's pieces on hand-made tables (the end-to-end run is in test_audit.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cdi.audit.config import AuditConfig
from cdi.audit.noise_draws import (DEFAULT_NOISE_DRAWS, MAX_NOISE_DRAWS, draw_values, redrawn_tables,
                                   split_draw_columns, with_draw_columns)
from cdi.audit.seed_check import MAX_SEED_CHECK, SeedCheck, other_seeds, run_seed_check
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
    """Each other seed brings its draws (here two: values s and s + 0.5); the test sees them in draw order."""
    hashes = ["a", "b"]
    tables = [_table([[1.0, 0.0], [2.0, 0.0]], ["free", "noisy"], hashes)] * 2
    redrawn = {s: [[_table([[float(s + d)], [float(s + d)]], ["noisy"], hashes)] * 2 for d in (0.0, 0.5)]
               for s in (8, 9)}
    seen = []

    def test(arrays):
        seen.append([p[0, 1] for p, _ in arrays])
        assert all(p[:, 0].tolist() == [1.0, 2.0] for p, _ in arrays)  # the seed-free column stays
        p = arrays[0][0]
        return 10.0 ** -p[0, 1], "used" if p[0, 1] > 8.5 else "not_detected"

    check = run_seed_check(tables, redrawn, seed=7, families_redrawn=["noisy_family"], test=test,
                           first=(1e-7, "used"), p_kind="parametric", calls_per_image={"forward": 5, "backward": 1})
    assert seen == [[8.0, 8.5], [9.0, 9.5]]
    assert check.seeds == [7, 8, 9] and check.p_values == [1e-7, 1e-8, 1e-9]
    assert check.verdicts == ["used", "not_detected", "used"] and not check.same_verdict
    assert check.extra_calls_per_image == {"forward": 20, "backward": 4}  # 2 seeds x 2 draws
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
    config = AuditConfig(None, None, None, str(tmp_path / "out"), published_features="p.csv",
                         unpublished_features="u.csv", noise_draws=2)
    with pytest.raises(CDIError, match="--noise-draws above 1"):
        config.validate()


def test_draws_resolve_per_source(tmp_path):
    assert AuditConfig("P", "U", "m", str(tmp_path / "o")).draws == DEFAULT_NOISE_DRAWS
    assert AuditConfig(None, None, None, str(tmp_path / "o"), published_features="p.csv",
                       unpublished_features="u.csv").draws == 1
    for bad in (0, MAX_NOISE_DRAWS + 1, 1.5):
        with pytest.raises(CDIError, match="--noise-draws"):
            AuditConfig("P", "U", "m", str(tmp_path / "o"), noise_draws=bad).validate()


def test_draw_columns_round_trip():
    hashes = ["a", "b"]
    base = _table([[1, 2], [3, 4]], ["free", "noisy"], hashes)
    draws = [_table([[10 * r], [20 * r]], ["noisy"], hashes) for r in (1, 2)]
    both = with_draw_columns(base, draws)
    assert both.columns == ["free", "noisy", "noisy@draw1", "noisy@draw2"]
    main, back = split_draw_columns(both)
    assert main.columns == ["free", "noisy"] and main.values.tolist() == [[1, 2], [3, 4]]
    assert [t.columns for t in back] == [["noisy"], ["noisy"]]
    assert [t.values[:, 0].tolist() for t in back] == [[10, 20], [20, 40]]
    assert [v[0][:, 1].tolist() for v in draw_values([main], [[t] for t in back])] == [[10, 20], [20, 40]]
    for bad in (["free", "noisy", "noisy@draw2"], ["free", "noisy", "other@draw1"]):
        with pytest.raises(CDIError):
            split_draw_columns(_table([[1, 2, 3], [4, 5, 6]], bad, hashes))
