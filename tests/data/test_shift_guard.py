"""Shift guard: model-free descriptors, embeddings (built-in, CLIP from a local folder), the guard's test."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage, stats

from cdi.data.descriptors import DESCRIPTOR_COLUMNS, descriptor_features
from cdi.utils.errors import CDIError
from cdi.data.shift_guard import image_embeddings, shift_guard


def synthetic_images(n: int, rng: np.random.Generator, *, size: int = 32, contrast: float = 1.0,
                     red: float = 0.0) -> torch.Tensor:
    """``n`` images (n, 3, size, size) in [-1, 1]: smooth random fields, a colour tint, a rectangle.

    ``contrast`` scales deviations from mid-grey; ``red`` adds to the red channel.
    """
    up = ndimage.zoom(np.eye(4), (size / 4, 1), order=3)  # (size, 4) cubic-spline upsampling
    x = np.einsum("ij,ncjk,lk->ncil", up, rng.standard_normal((n, 3, 4, 4)), up) * 0.35
    x += rng.normal(0, 0.25, (n, 3, 1, 1))
    for i in range(n):
        top, left = rng.integers(0, size // 2, 2)
        h, w = rng.integers(4, size // 2, 2)
        x[i, :, top:top + h, left:left + w] += rng.normal(0, 0.5, (3, 1, 1))
    x += 0.05 * rng.standard_normal(x.shape)
    x *= contrast
    x[:, 0] += red
    return torch.as_tensor(np.clip(x, -1, 1), dtype=torch.float32)


# -- descriptors ----------------------------------------------------------------


def test_descriptor_values_on_plain_images():
    grey = torch.zeros(1, 3, 16, 16)  # mid-grey
    red = torch.full((1, 3, 16, 16), -1.0)
    red[:, 0] = 1.0
    out = descriptor_features(torch.cat([grey, red]))
    col = {name: i for i, name in enumerate(DESCRIPTOR_COLUMNS)}
    assert out.shape == (2, len(DESCRIPTOR_COLUMNS)) and np.all(np.isfinite(out))
    assert out[0, col["r_mean"]] == pytest.approx(0.5) and out[0, col["luma_std"]] == pytest.approx(0.0)
    assert out[0, col["grad_mean"]] == 0.0 and out[0, col["saturation_mean"]] == 0.0
    assert out[0, col["hist_r1g1b1"]] == pytest.approx(1.0)
    assert out[1, col["r_mean"]] == pytest.approx(1.0) and out[1, col["g_mean"]] == pytest.approx(0.0)
    assert out[1, col["hist_r2g0b0"]] == pytest.approx(1.0) and out[1, col["saturation_mean"]] == pytest.approx(1.0)
    assert out[1, col["luma_mean"]] == pytest.approx(0.299)


def test_greyscale_is_treated_as_equal_channels_and_pil_matches_tensors():
    rng = np.random.default_rng(0)
    x = synthetic_images(3, rng, size=64)
    grey = x[:, :1]
    np.testing.assert_allclose(descriptor_features(grey), descriptor_features(grey.expand(-1, 3, -1, -1)))
    # a 64 x 64 PIL image is not resized by the preprocessing: same descriptors as its tensor
    arr = np.round((x[0].numpy().transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)
    from_pil = descriptor_features([Image.fromarray(arr)])
    from_tensor = descriptor_features(torch.as_tensor(arr.transpose(2, 0, 1) / 127.5 - 1.0)[None])
    np.testing.assert_allclose(from_pil, from_tensor, atol=1e-6)


def test_descriptor_input_errors():
    with pytest.raises(CDIError, match="C = 1 or 3"):
        descriptor_features(torch.zeros(2, 4, 8, 8))
    with pytest.raises(CDIError, match="NaN"):
        descriptor_features(torch.full((1, 3, 8, 8), float("nan")))


# -- embeddings -----------------------------------------------------------------


def test_builtin_embeddings_of_a_collection(tmp_path):
    from cdi.data.collection import ImageCollection

    rng = np.random.default_rng(1)
    x = synthetic_images(5, rng, size=40)
    for i in range(5):
        arr = np.round((x[i].numpy().transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / f"img{i}.png")
    collection = ImageCollection.from_folder(tmp_path)
    emb, name = image_embeddings(collection, encoder="builtin", batch_size=2, num_workers=0)
    assert name == "builtin" and emb.shape == (5, len(DESCRIPTOR_COLUMNS))
    again, _ = image_embeddings(collection, encoder=name, batch_size=5, num_workers=0)
    np.testing.assert_array_equal(emb, again)


def test_auto_falls_back_to_builtin_when_clip_is_not_cached(monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    x = synthetic_images(4, np.random.default_rng(2))
    with caplog.at_level(logging.WARNING, logger="cdi"):
        emb, name = image_embeddings(x, encoder="auto", clip_model="cdi-tests/no-such-clip-model")
    assert name == "builtin" and emb.shape == (4, len(DESCRIPTOR_COLUMNS))
    assert "not in the local cache" in caplog.text
    with pytest.raises(CDIError, match="not available locally.*builtin"):
        image_embeddings(x, encoder="clip", clip_model="cdi-tests/no-such-clip-model")
    with pytest.raises(CDIError, match="unknown shift encoder"):
        image_embeddings(x, encoder="resnet")


def test_clip_embeddings_from_a_local_folder(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=224, patch_size=32, projection_dim=16)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "clip")
    x = synthetic_images(3, np.random.default_rng(3), size=48)
    emb, name = image_embeddings(x, encoder="clip", clip_model=str(tmp_path / "clip"), device="cpu")
    assert name == "clip" and emb.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)
    again, _ = image_embeddings(x, encoder="clip", clip_model=str(tmp_path / "clip"), device="cpu", batch_size=1)
    np.testing.assert_allclose(emb, again, atol=1e-5)


# -- the guard ---------------------------------------------------------------------


@pytest.mark.parametrize("shift", [{"contrast": 0.8}, {"red": 0.25}])
def test_guard_detects_a_contrast_or_colour_shift(shift):
    rng = np.random.default_rng(4)
    P = descriptor_features(synthetic_images(60, rng, **shift))
    U = descriptor_features(synthetic_images(60, rng))
    res = shift_guard(P, U, alpha=0.01, seed=0)
    assert res.detected and res.p_value < 0.01 and res.auc > 0.7, res
    assert json.loads(json.dumps(res.to_dict()))["encoder"] == "builtin"


def test_guard_is_calibrated_on_two_draws_from_one_distribution():
    """120 guards on disjoint sets of one distribution (40 + 40 and 30 + 50 images).

    Descriptors of 4,800 images are computed once; every pass over them
    (60 guards) uses disjoint slices.
    """
    rng = np.random.default_rng(5)
    pool = np.concatenate([descriptor_features(synthetic_images(400, rng)) for _ in range(12)])
    pvalues = []
    for i in range(120):
        if i % 60 == 0:
            order, used = rng.permutation(len(pool)), 0
        n_p, n_u = (40, 40) if i % 2 == 0 else (30, 50)
        rows = order[used:used + n_p + n_u]
        used += n_p + n_u
        pvalues.append(shift_guard(pool[rows[:n_p]], pool[rows[n_p:]], alpha=0.05, seed=i).p_value)
    pvalues = np.array(pvalues)
    for alpha in (0.05, 0.01):
        high = stats.binom.isf(0.005, 120, alpha)
        assert np.sum(pvalues < alpha) <= high, (alpha, np.sum(pvalues < alpha))
    assert stats.kstest(pvalues, "uniform").pvalue > 0.001


def test_guard_edge_cases():
    rng = np.random.default_rng(6)
    P = descriptor_features(synthetic_images(12, rng))
    U = descriptor_features(synthetic_images(14, rng))
    assert shift_guard(P, U).folds == 2  # the most blocks 12 images allow
    with pytest.raises(CDIError, match="at least 10 published"):
        shift_guard(P[:8], U)
    with pytest.raises(CDIError, match="same columns"):
        shift_guard(P, U[:, :5])
    flat = shift_guard(np.ones((20, 3)), np.ones((20, 3)))
    assert flat.p_value == 1.0 and not flat.detected and "nothing separates" in flat.note
