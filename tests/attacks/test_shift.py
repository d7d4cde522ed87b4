"""Dataset-shift measures: Frechet, Mahalanobis, normalised Wasserstein, held-out linear probe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg

from cdi.attacks.shift import (
    frechet_distance,
    l2_normalise,
    linear_probe,
    mahalanobis_distance,
    measure_shift,
    pooled_covariance,
    wasserstein_distance,
)
from cdi.utils.errors import CDIError


@pytest.fixture(scope="module")
def gaussian_sets():
    rng = np.random.default_rng(0)
    cov = np.diag(np.linspace(0.5, 2.0, 6))
    return rng.multivariate_normal(np.zeros(6), cov, 300), rng.multivariate_normal(np.zeros(6), cov, 250)


def test_identical_sets_are_at_distance_zero(gaussian_sets):
    a, _ = gaussian_sets
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-10)
    assert mahalanobis_distance(a, a) == pytest.approx(0.0, abs=1e-12)
    distance, points, subsampled = wasserstein_distance(a, a)
    assert distance == pytest.approx(0.0, abs=1e-6) and points == 300 and not subsampled


def test_frechet_matches_the_scipy_sqrtm_formula(gaussian_sets):
    a, b = gaussian_sets
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(0) - b.mean(0)
    expected = diff @ diff + np.trace(s_a + s_b - 2 * np.real(scipy.linalg.sqrtm(s_a @ s_b)))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_distances_grow_with_a_mean_shift(gaussian_sets):
    a, b = gaussian_sets
    direction = np.ones(6) / np.sqrt(6)
    shifts = [0.0, 0.5, 1.0, 2.0]
    fd = [frechet_distance(a, b + s * direction) for s in shifts]
    md = [mahalanobis_distance(a, b + s * direction) for s in shifts]
    wd = [wasserstein_distance(a, b + s * direction)[0] for s in shifts]
    for values in (fd, md, wd):
        assert all(x < y for x, y in zip(values, values[1:])), values
    # FD of a pure mean shift adds ||shift||^2 (covariances unchanged).
    assert fd[3] - fd[0] == pytest.approx(
        2.0**2 + 2 * 2.0 * direction @ (b.mean(0) - a.mean(0)), rel=1e-9
    )


def test_mahalanobis_is_symmetric_and_uses_the_pooled_covariance(gaussian_sets):
    a, b = gaussian_sets
    b = b * [1, 1, 1, 3, 3, 3] + 0.3  # different covariances: set a's alone would be asymmetric
    assert mahalanobis_distance(a, b) == pytest.approx(mahalanobis_distance(b, a), rel=1e-12)
    pooled, ridge = pooled_covariance(a, b)
    assert ridge == 0.0
    diff = a.mean(0) - b.mean(0)
    assert mahalanobis_distance(a, b) == pytest.approx(np.sqrt(diff @ np.linalg.inv(pooled) @ diff))
    stacked = ((len(a) - 1) * np.cov(a, rowvar=False) + (len(b) - 1) * np.cov(b, rowvar=False)) / (len(a) + len(b) - 2)
    np.testing.assert_allclose(pooled, stacked)


def test_wasserstein_is_exact_on_a_case_solvable_by_hand():
    # Four points on the axes, scaled so that each coordinate has within-set variance 1
    # (ddof 1) and no covariance: the pooled covariance is the identity, whitening a no-op.
    a = np.array([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]]) * np.sqrt(1.5)
    b = a + [3.0, 0.0]  # a translation
    pooled, ridge = pooled_covariance(a, b)
    np.testing.assert_allclose(pooled, np.eye(2))
    assert ridge == 0.0
    distance, points, subsampled = wasserstein_distance(a, b)
    # For a pure translation the optimal plan maps each point to its own translate: W2 = |shift|.
    assert distance == pytest.approx(3.0)
    assert points == 4 and not subsampled
    # The same set listed in another order: distance 0 (the plan is a permutation).
    assert wasserstein_distance(a, a[[1, 0, 3, 2]])[0] == pytest.approx(0.0, abs=1e-9)
    # 1-d: a = {0, 2}, b = {2.5, 0.5}; both variances (ddof 1) are 2, so whitening divides by sqrt(2).
    # Optimal plan 0 -> 0.5, 2 -> 2.5: mean squared cost (0.25 + 0.25) / 2 / 2 = 0.125;
    # the plan in listed order (0 -> 2.5, 2 -> 0.5) would cost 2.125.
    distance, _, _ = wasserstein_distance(np.array([[0.0], [2.0]]), np.array([[2.5], [0.5]]))
    assert distance == pytest.approx(np.sqrt(0.125))


def test_wasserstein_subsamples_unequal_sets_with_a_seed(gaussian_sets):
    a, b = gaussian_sets
    first = wasserstein_distance(a, b, seed=1)
    assert first[1] == 250 and first[2]
    assert wasserstein_distance(a, b, seed=1) == first
    assert wasserstein_distance(a[:40], a[40:80], max_points=30, seed=0)[1:] == (30, True)


def test_linear_probe_is_scored_on_held_out_images():
    # 40 images in 200 dimensions with random labels: separable in-sample,
    # so only a held-out probe stays near chance.
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 200)), rng.normal(size=(20, 200))
    probe = linear_probe(a, b, seed=0)
    assert 0.2 < probe["accuracy"] < 0.8 and 0.2 < probe["auc"] < 0.8
    assert probe["folds"] == 5 and probe["majority_rate"] == 0.5
    # A real shift is found held out.
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(100, 5)), rng.normal(size=(100, 5)) + [2.0, 0, 0, 0, 0]
    probe = linear_probe(a, b, seed=0)
    assert probe["accuracy"] > 0.8 and probe["auc"] > 0.9


def test_measure_shift_normalises_records_and_notes(gaussian_sets):
    a, b = gaussian_sets
    result = measure_shift(a + 5.0, b + 5.0, encoder="builtin", seed=0)
    # Row scaling changes nothing after L2 normalisation.
    scaled = measure_shift(3.0 * (a + 5.0), 0.5 * (b + 5.0), encoder="builtin", seed=0)
    assert scaled.frechet == pytest.approx(result.frechet, rel=1e-9)
    assert result.frechet == pytest.approx(frechet_distance(l2_normalise(a + 5.0), l2_normalise(b + 5.0)))
    assert result.wasserstein_subsampled and any("subsamples" in note for note in result.notes)
    assert json.loads(json.dumps(result.to_dict()))["encoder"] == "builtin"
    assert "Frechet distance" in result.format_text()
    # More dimensions than images: singular covariance, ridge recorded and explained.
    rng = np.random.default_rng(3)
    wide = measure_shift(rng.normal(size=(10, 30)), rng.normal(size=(10, 30)), seed=0)
    assert wide.ridge > 0 and any("singular" in note for note in wide.notes)
    assert np.isfinite([wide.frechet, wide.mahalanobis, wide.wasserstein]).all()


def test_bad_embeddings_are_user_errors():
    with pytest.raises(CDIError, match="same dim"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(CDIError, match="at least 2"):
        measure_shift(np.ones((1, 3)), np.ones((5, 3)))
    with pytest.raises(CDIError, match="NaN"):
        frechet_distance(np.full((3, 2), np.nan), np.zeros((3, 2)))


# ------------------------------------------------------------------------- CLI
def _write_images(folder, n, brightness, seed):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = np.clip(rng.normal(brightness, 40.0, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:03d}.png")
    return folder


def test_cli_shift_rejects_bad_options(tmp_path):
    from typer.testing import CliRunner

    from cdi.cli.main import app

    result = CliRunner().invoke(app, ["shift", "--a", str(tmp_path), "--b", str(tmp_path), "--encoder", "vgg"])
    assert result.exit_code == 2 and "--encoder" in result.output
    result = CliRunner().invoke(app, ["shift", "--a", str(tmp_path), "--b", str(tmp_path), "--format", "xml"])
    assert result.exit_code == 2 and "--format" in result.output


def test_cli_shift_end_to_end(tmp_path):
    from typer.testing import CliRunner

    from cdi.cli.main import app

    a = _write_images(tmp_path / "a", 24, 100.0, seed=0)
    same = _write_images(tmp_path / "same", 24, 100.0, seed=1)
    bright = _write_images(tmp_path / "bright", 24, 180.0, seed=2)
    runner = CliRunner()
    out = {}
    for name, b in [("same", same), ("bright", bright)]:
        result = runner.invoke(app, ["shift", "--a", str(a), "--b", str(b), "--encoder", "builtin", "--format", "json"])
        assert result.exit_code == 0, result.output
        out[name] = json.loads(result.stdout)
    assert out["same"]["n_a"] == out["same"]["n_b"] == 24
    assert out["bright"]["frechet"] > out["same"]["frechet"]
    assert out["bright"]["probe"]["auc"] > 0.9
    text = runner.invoke(app, ["shift", "--a", str(a), "--b", str(bright), "--encoder", "builtin"])
    assert text.exit_code == 0 and "Frechet distance" in text.output


def test_mixing_raises_frechet_and_blind_auc_with_the_shifted_share(tmp_path):
    """The mixing experiment's ingredients on toy digits, no model needed: as the shifted share of the
    non-members grows, the Frechet distance to the members and the blind baseline's AUC both rise."""
    from cdi.attacks.blind import blind_baseline, embedding_columns
    from cdi.attacks.protocol import evaluate, split_calibration_test
    from cdi.attacks.shift import frechet_distance
    from cdi.data.collection import ImageCollection
    from cdi.data.shift_guard import image_embeddings
    from cdi.toy.data import load_digit_images, write_image_folder, write_shifted_images

    images, labels = load_digit_images()
    write_image_folder(tmp_path / "members", range(0, 400, 2), images, labels)
    write_image_folder(tmp_path / "nonmembers", range(1, 400, 2), images, labels)
    members, _ = image_embeddings(ImageCollection.from_folder(tmp_path / "members"), encoder="builtin")
    distances, aucs = [], []
    for fraction in (0.0, 0.5, 1.0):
        folder = tmp_path / f"mix-{fraction:g}"
        write_shifted_images(tmp_path / "nonmembers", folder, fraction=fraction, seed=0)
        nonmembers, _ = image_embeddings(ImageCollection.from_folder(folder), encoder="builtin")
        split = split_calibration_test(len(members), len(nonmembers), calibration_fraction=0.5, seed=0)
        x_cal, y_cal, x_test, y_test = split.apply(members, nonmembers)
        result = evaluate(blind_baseline(seed=0), x_cal, y_cal, x_test, y_test,
                          columns=embedding_columns(members.shape[1]), folds=5, n_bootstrap=20, seed=0)
        distances.append(frechet_distance(members, nonmembers))
        aucs.append(result.calibration["auc"])
    assert distances[0] < distances[1] < distances[2]
    assert aucs[0] < 0.7 and aucs[0] < aucs[1] < aucs[2] and aucs[2] > 0.95
