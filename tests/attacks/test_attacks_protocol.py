"""The calibration/test protocol, the scorers and the blind baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cdi.attacks.blind import blind_baseline, embedding_columns
from cdi.attacks.protocol import (
    FPR_BOUNDS,
    MethodResult,
    cross_fit_scores,
    evaluate,
    evaluate_scores,
    split_calibration_test,
)
from cdi.attacks.scorers import SCORERS, CLiDThreshold, Scorer, make_scorer
from cdi.utils.errors import CDIError


# ----------------------------------------------------------------------------- split
def test_split_is_stratified_balanced_disjoint_and_seeded():
    split = split_calibration_test(30, 50, seed=3)
    assert split.calibration_members.size == split.calibration_nonmembers.size == 15
    assert split.test_members.size == split.test_nonmembers.size == 15
    assert split.unused_members.size == 0 and split.unused_nonmembers.size == 20
    for parts, n in [
        ((split.calibration_members, split.test_members, split.unused_members), 30),
        ((split.calibration_nonmembers, split.test_nonmembers, split.unused_nonmembers), 50),
    ]:
        joined = np.concatenate(parts)
        assert sorted(joined.tolist()) == list(range(n))  # disjoint and complete
    again = split_calibration_test(30, 50, seed=3)
    assert split.to_dict() == again.to_dict()
    assert split.to_dict() != split_calibration_test(30, 50, seed=4).to_dict()

    unbalanced = split_calibration_test(30, 50, balance=False, calibration_fraction=0.4, seed=3)
    assert (unbalanced.calibration_members.size, unbalanced.test_members.size) == (12, 18)
    assert (unbalanced.calibration_nonmembers.size, unbalanced.test_nonmembers.size) == (20, 30)
    with pytest.raises(CDIError, match="too few"):
        split_calibration_test(1, 50)


def test_split_apply_arranges_rows_and_labels():
    split = split_calibration_test(4, 6, seed=0)
    members = np.arange(4)[:, None] + 100.0
    nonmembers = np.arange(6)[:, None] + 200.0
    x_cal, y_cal, x_test, y_test = split.apply(members, nonmembers)
    assert x_cal.shape == (4, 1) and x_test.shape == (4, 1)
    np.testing.assert_array_equal(y_cal, [1, 1, 0, 0])
    np.testing.assert_array_equal(x_cal[:2, 0], 100 + split.calibration_members)
    np.testing.assert_array_equal(x_test[2:, 0], 200 + split.test_nonmembers)


# -------------------------------------------------------------------- fixed rules
def _loss_data(rng, n_members, n_nonmembers, shift=1.0):
    """A loss column: members have lower losses."""
    x = np.r_[rng.normal(-shift, 1.0, n_members), rng.normal(0.0, 1.0, n_nonmembers)][:, None]
    return x, np.r_[np.ones(n_members, int), np.zeros(n_nonmembers, int)]


def test_fixed_rule_thresholds_transfer_unchanged_to_test():
    # Calibration by hand (loss column, lower = member, scores = -loss):
    # members' losses 1, 2, 3; non-members' 2.5, 4, 5, ..., 101 (100 non-members).
    cal_loss = np.r_[1.0, 2.0, 3.0, 2.5, np.arange(4.0, 103.0)]
    y_cal = np.r_[1, 1, 1, np.zeros(100, int)]
    # FPR <= 1%: threshold -3 (TPR 1, FPR 1/100); FPR <= 0.1%: threshold -2 (TPR 2/3, FPR 0).
    test_loss = np.r_[0.5, 2.2, 2.9, 10.0, 1.5, 2.0, 2.8, 50.0, 60.0]
    y_test = np.r_[1, 1, 1, 1, 0, 0, 0, 0, 0]
    result = evaluate(
        make_scorer("loss"), cal_loss[:, None], y_cal, test_loss[:, None], y_test,
        columns=["denoising_loss"], n_bootstrap=50,
    )
    cal = result.calibration
    assert (cal["tpr_at_1fpr"], cal["fpr_at_1fpr"], cal["threshold_1"]) == pytest.approx((1.0, 0.01, -3.0))
    assert (cal["tpr_at_01fpr"], cal["fpr_at_01fpr"], cal["threshold_01"]) == pytest.approx((2 / 3, 0.0, -2.0))
    assert cal["auc"] == pytest.approx((3 * 100 - 1) / 300)  # member loss 3 loses to 2.5 once
    test = result.test
    # Threshold -3 (loss <= 3): members 0.5, 2.2, 2.9 -> 3/4; non-members 1.5, 2.0, 2.8 -> 3/5.
    assert (test["tpr_1"], test["fpr_1"]) == pytest.approx((0.75, 0.6))
    # Threshold -2 (loss <= 2): members 0.5 -> 1/4; non-members 1.5, 2.0 -> 2/5.
    assert (test["tpr_01"], test["fpr_01"]) == pytest.approx((0.25, 0.4))
    assert test["fpr_1_exceeds_bound"] and test["fpr_01_exceeds_bound"]
    assert result.calibration_protocol == "fixed rule"
    assert result.columns == ["denoising_loss"]
    assert result.n_calibration == {"members": 3, "nonmembers": 100}


def test_flags_stay_down_when_the_test_fpr_is_within_bound():
    rng = np.random.default_rng(1)
    x_cal, y_cal = _loss_data(rng, 300, 300, shift=3.0)
    x_test = np.r_[x_cal[:300], np.full((300, 1), 50.0)]  # test non-members far from every threshold
    result = evaluate(make_scorer("loss"), x_cal, y_cal, x_test, y_cal, columns=["denoising_loss"], n_bootstrap=20)
    assert result.test["fpr_1"] == 0.0 and result.test["fpr_01"] == 0.0
    assert not result.test["fpr_1_exceeds_bound"] and not result.test["fpr_01_exceeds_bound"]


def test_result_intervals_are_seeded_and_cover_the_estimates():
    rng = np.random.default_rng(2)
    x_cal, y_cal = _loss_data(rng, 400, 400)
    x_test, y_test = _loss_data(rng, 400, 400)
    args = (make_scorer("loss"), x_cal, y_cal, x_test, y_test)
    result = evaluate(*args, columns=["denoising_loss"], n_bootstrap=200, seed=5)
    again = evaluate(*args, columns=["denoising_loss"], n_bootstrap=200, seed=5)
    assert result.to_dict() == again.to_dict()
    assert result.intervals != evaluate(*args, columns=["denoising_loss"], n_bootstrap=200, seed=6).intervals
    keys = {"calibration.auc", "calibration.tpr_at_1fpr", "calibration.tpr_at_01fpr", "test.auc"}
    keys |= {f"test.{r}_{k}" for k in FPR_BOUNDS for r in ("tpr", "fpr")}
    assert set(result.intervals) == keys
    for key, (low, high) in result.intervals.items():
        split, name = key.split(".")
        value = (result.calibration if split == "calibration" else result.test)[name]
        assert low <= value <= high, key


def test_result_dict_is_strict_json_and_round_trips():
    # All scores tied: no threshold meets 1% FPR, so the thresholds are +inf.
    result = evaluate_scores("flat", np.zeros(6), [1, 1, 1, 0, 0, 0], np.zeros(4), [1, 1, 0, 0], n_bootstrap=10,
                             cost={"forward": 12, "backward": 0, "seconds": 0.5})
    assert result.calibration["threshold_1"] == np.inf
    data = result.to_dict()
    assert data["calibration"]["threshold_1"] is None
    text = json.dumps(data, allow_nan=False)
    back = MethodResult.from_dict(json.loads(text))
    assert back.calibration["threshold_1"] == np.inf
    assert back.to_dict() == data
    assert data["cost"] == {"forward": 12, "backward": 0, "seconds": 0.5}


# ----------------------------------------------------------------- trained methods
class _Memoriser(Scorer):
    """Scores 1 for rows it was trained on, 0 otherwise: in-sample it is perfect."""

    name = "memoriser"
    trained = True

    def select(self, columns):
        return ["id"]

    def fit(self, x, y):
        self.seen_ = {float(v): int(label) for v, label in zip(x[:, 0], y)}
        return self

    def score(self, x):
        return np.array([float(self.seen_.get(float(v), 0.5)) for v in x[:, 0]])


def test_cross_fitting_never_scores_an_image_with_a_model_that_saw_it():
    x = np.arange(40, dtype=float)[:, None]
    y = np.r_[np.ones(20, int), np.zeros(20, int)]
    oof = cross_fit_scores(_Memoriser(), x, y, folds=5, seed=0)
    np.testing.assert_array_equal(oof, 0.5)  # never a remembered row
    result = evaluate(_Memoriser(), x, y, x + 100, y, columns=["id"], n_bootstrap=20)
    assert result.calibration["auc"] == 0.5  # in-sample it would be 1.0
    assert result.calibration_protocol == "out-of-fold (5-fold cross-fitting)"
    with pytest.raises(CDIError, match="folds"):
        cross_fit_scores(_Memoriser(), x[:6], np.r_[1, 1, 1, 0, 0, 0], folds=5)


@pytest.mark.parametrize("name", ["gsa1", "cdi", "blind"])
def test_trained_classifiers_report_out_of_fold_figures(name):
    # Pure noise in many columns: every classifier could fit it in-sample,
    # but out-of-fold its calibration AUC must stay near chance.
    rng = np.random.default_rng(3)
    prefix = {"gsa1": "gsa1_", "cdi": "f_", "blind": "emb_"}[name]
    columns = [f"{prefix}{i:03d}" for i in range(30)]
    x_cal, x_test = rng.normal(size=(60, 30)), rng.normal(size=(60, 30))
    y = np.r_[np.ones(30, int), np.zeros(30, int)]
    scorer = make_scorer(name, seed=0)
    in_sample = make_scorer(name, seed=0)
    in_sample.fit(x_cal, y)
    from cdi.attacks.metrics import roc_auc

    assert roc_auc(in_sample.score(x_cal), y) > 0.9
    result = evaluate(scorer, x_cal, y, x_test, y, columns=columns, n_bootstrap=20)
    assert result.calibration["auc"] < 0.75
    assert result.test["auc"] < 0.75


def test_trained_classifier_finds_a_real_signal():
    rng = np.random.default_rng(4)
    columns = ["clid_loss", "clid_d1", "clid_d2"]

    def data(n):
        y = np.r_[np.ones(n, int), np.zeros(n, int)]
        loss = rng.normal(0.0, 1.0, 2 * n) - 1.5 * y
        d = rng.normal(0.0, 1.0, (2 * n, 2)) + 1.5 * y[:, None]
        return np.column_stack([loss, d]), y

    (x_cal, y_cal), (x_test, y_test) = data(150), data(150)
    for name in ["clid_vec", "clid_th", "cdi"]:
        result = evaluate(make_scorer(name), x_cal, y_cal, x_test, y_test, columns=columns, n_bootstrap=20)
        assert result.calibration["auc"] > 0.85 and result.test["auc"] > 0.85, name


def test_clid_threshold_weight_follows_the_informative_column():
    rng = np.random.default_rng(5)
    y = np.r_[np.ones(200, int), np.zeros(200, int)]
    loss = rng.normal(size=400)  # uninformative L(c)
    d = rng.normal(size=(400, 3)) + 2.0 * y[:, None]  # members: larger discrepancy
    only_d = CLiDThreshold().fit(np.column_stack([loss, d]), y)
    assert only_d.weight_ >= 0.8
    loss = rng.normal(size=400) - 2.0 * y  # members: lower loss
    only_loss = CLiDThreshold().fit(np.column_stack([loss, rng.normal(size=(400, 3))]), y)
    assert only_loss.weight_ <= 0.2


def test_secmi_plus_plus_normalises_over_the_pooled_set():
    rng = np.random.default_rng(6)
    columns = ["secmi_t050", "secmi_t100"]
    # The second timestep's errors are 1000x larger; members are lower at both.
    def data(n):
        y = np.r_[np.ones(n, int), np.zeros(n, int)]
        base = np.abs(rng.normal(1.0, 0.1, (2 * n, 2))) - 0.05 * y[:, None]
        return base * [1.0, 1000.0], y

    (x_cal, y_cal), (x_test, y_test) = data(100), data(100)
    scorer = make_scorer("secmi++")
    assert scorer.transductive and not scorer.trained
    result = evaluate(scorer, x_cal, y_cal, x_test, y_test, columns=columns, n_bootstrap=20)
    pooled = np.concatenate([x_cal, x_test]).mean(axis=0)
    expected = -(x_cal / pooled).mean(axis=1)
    np.testing.assert_allclose(result.scores["calibration_scores"], expected)
    assert result.calibration["auc"] > 0.6


def test_blind_baseline_sees_a_shift_and_nothing_else():
    rng = np.random.default_rng(7)
    columns = embedding_columns(8)
    y = np.r_[np.ones(100, int), np.zeros(100, int)]
    same = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    shifted = [x + 1.5 * y[:, None] * np.eye(8)[0] for x in same]
    for classifier in ["logistic", "xgboost"]:
        flat = evaluate(blind_baseline(classifier), same[0], y, same[1], y, columns=columns, n_bootstrap=20)
        moved = evaluate(blind_baseline(classifier), shifted[0], y, shifted[1], y, columns=columns, n_bootstrap=20)
        assert flat.calibration["auc"] < 0.65, classifier
        assert moved.calibration["auc"] > 0.65 and moved.test["auc"] > 0.65, classifier
        assert moved.method == "blind"
    with pytest.raises(CDIError, match="blind classifier"):
        blind_baseline("convnext")


def test_scorer_registry_and_missing_columns():
    assert set(SCORERS) == {
        "loss", "secmi", "secmi++", "pia", "pian", "sima", "pfami", "gsa1", "gsa2", "clid_th", "clid_vec", "cdi", "blind",
    }
    for name in SCORERS:
        assert make_scorer(name).name == name
    with pytest.raises(CDIError, match="unknown attack"):
        make_scorer("lira")
    with pytest.raises(CDIError, match=r"\['pia'\]"):
        evaluate(make_scorer("pia"), np.zeros((4, 1)), [1, 1, 0, 0], np.zeros((4, 1)), [1, 1, 0, 0],
                 columns=["secmi"], n_bootstrap=5)
    with pytest.raises(CDIError, match="gsa2_"):
        make_scorer("gsa2").select(["gsa1_a", "gsa1_b"])
    with pytest.raises(CDIError, match="NaN or infinite"):
        evaluate(make_scorer("pia"), np.array([[0.0], [np.nan], [1.0], [2.0]]), [1, 1, 0, 0],
                 np.zeros((4, 1)), [1, 1, 0, 0], columns=["pia"], n_bootstrap=5)


def test_column_rules_read_their_column_with_its_direction():
    columns = ["denoising_loss", "secmi", "pia", "pian", "pfami"]
    x = np.arange(10.0).reshape(2, 5)
    for name, column in [("loss", "denoising_loss"), ("secmi", "secmi"), ("pia", "pia"), ("pian", "pian"),
                         ("pfami", "pfami")]:
        scorer = make_scorer(name)
        used = scorer.select(columns)
        assert used == [column]
        np.testing.assert_array_equal(scorer.score(x[:, [columns.index(column)]]), -x[:, columns.index(column)])
