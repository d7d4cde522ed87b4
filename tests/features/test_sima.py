"""SimA: the l4 norm (to the fourth power) of the noise prediction on the clean input."""

from __future__ import annotations

import numpy as np
import pytest

from cdi.attacks.scorers import make_scorer
from cdi.utils.errors import CDIError
from cdi.features.registry import columns_of, directions_of, resolve_features, total_cost
from cdi.features.sima import SimA, SimAConfig
from oracle import GaussianOracle  # tests/ is on sys.path under pytest
from test_features import _eps_hat, make_batch


def test_sima_is_the_l4_norm_to_the_fourth_of_eps_on_the_clean_input():
    adapter = GaussianOracle("none")
    batch = make_batch(adapter, 4)
    family = SimA(SimAConfig(timesteps=(0, 50, 200)))
    out = family.extract(adapter, batch).double().numpy()
    assert out.shape == (4, 3)
    for i in range(4):
        x0 = batch.x0[i].double().numpy()
        for j, t in enumerate((0, 50, 200)):
            e = _eps_hat(adapter, x0, t, np.zeros(adapter.shape))
            assert out[i, j] == pytest.approx(np.sum(np.abs(e) ** 4), rel=1e-4)


def test_sima_values_do_not_depend_on_batch_mates_or_chunking():
    adapter = GaussianOracle("text")
    batch = make_batch(adapter, 5)
    whole = SimA().extract(adapter, batch)
    one = SimA(max_chunk=1)
    np.testing.assert_allclose(one.extract(adapter, batch).numpy(), whole.numpy(), rtol=1e-5)


def test_sima_is_registered_with_its_columns_directions_and_cost():
    families = resolve_features("sima")
    assert columns_of(families) == ["sima_t000", "sima_t050", "sima_t100", "sima_t200"]
    assert directions_of(families) == [-1, -1, -1, -1]
    assert total_cost(families, GaussianOracle("none")).forward == 4
    with pytest.raises(CDIError, match="repeated"):
        SimAConfig(timesteps=(0, 0))


def test_sima_benchmark_method_picks_the_best_timestep_on_calibration_images():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(100), np.zeros(100)]
    x = rng.standard_normal((200, 3))
    x[:, 1] -= 1.5 * y  # the t = 50 column separates (lower = member)
    scorer = make_scorer("sima")
    assert scorer.select(["pia", "sima_t000", "sima_t050", "sima_t100"]) == ["sima_t000", "sima_t050", "sima_t100"]
    with pytest.raises(CDIError, match="fit"):
        scorer.score(x)
    scorer.fit(x, y)
    assert scorer.column_ == 1
    np.testing.assert_array_equal(scorer.score(x), -x[:, 1])
