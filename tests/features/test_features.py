"""The feature families: closed forms, batch invariance, model calls, registry.

Closed forms use ``tests/oracle.GaussianOracle``, whose eps prediction is the
exact posterior mean for Gaussian data; every feature is recomputed here by a
plain float64 numpy loop, one image at a time, from the same per-image noises
(``features.base.image_noise``). Noise optimisation is compared with
``torch.optim.LBFGS`` run on each image alone.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from cdi.utils.errors import CDIError
from cdi.models.base import Condition, DiffusionAdapter
from cdi.features.base import Cost, EncodedBatch, image_noise, per_sample_norm
from cdi.features.calls import evaluate, planned_calls
from cdi.features.clid import CLiD, mask_caption
from cdi.features.clid_captions import clip_captions, importance_captions, importance_ranking, released_count
from cdi.features.denoising_loss import DenoisingLoss
from cdi.features.gradient_masking import MASK_EDGE, GradientMasking, mask_weights, masked_count
from cdi.features.multiple_loss import MultipleLoss
from cdi.features.noise_optimization import NoiseOptimization, per_sample_lbfgs
from cdi.features.pia import PIA
from cdi.features.registry import (
    FAMILIES,
    FEATURE_SETS,
    columns_of,
    default_feature_set,
    directions_of,
    resolve_features,
    seed_dependence,
    total_cost,
)
from cdi.features.secmi import SecMI
from counting import counting  # tests/ is on sys.path under pytest
from oracle import GaussianOracle, linear_alphas_cumprod

SEED = 7
CAPTIONS = [
    "a red cat sitting on a green mat",
    "blue dog",
    "an old stone bridge over a quiet river at dawn",
    "portrait",
    "three small boats near the harbour wall",
    "a yellow house",
]
CLASS_LABELS = ["0", "3", "1", "4", "2", "0"]


# --------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------
def _hashes(n: int) -> list[str]:
    return [hashlib.sha256(f"image-{i}".encode()).hexdigest() for i in range(n)]


def _pixels(n: int, channels: int, size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    return torch.rand((n, channels, size, size), generator=gen) * 2 - 1


def _captions_for(adapter: DiffusionAdapter, n: int) -> list[str | None]:
    if adapter.conditioning == "text":
        return [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    if adapter.conditioning == "class":
        return [CLASS_LABELS[i % len(CLASS_LABELS)] for i in range(n)]
    return [None] * n


def make_batch(adapter: DiffusionAdapter, n: int = 6, order: list[int] | None = None) -> EncodedBatch:
    """Images 0..n-1 (or ``order``), encoded once, with their captions and conditions."""
    order = list(range(n)) if order is None else order
    pixels = _pixels(n, adapter.image_channels, adapter.resolution)[order]
    captions = [_captions_for(adapter, n)[i] for i in order]
    hashes = [_hashes(n)[i] for i in order]
    return EncodedBatch(adapter.encode(pixels), hashes, captions, adapter.conditions(captions), SEED)


def sub_batch(batch: EncodedBatch, idx: list[int]) -> EncodedBatch:
    return EncodedBatch(
        batch.x0[idx], [batch.hashes[i] for i in idx], [batch.captions[i] for i in idx],
        batch.cond.index(idx), batch.seed,
    )


class TinyUNetAdapter(DiffusionAdapter):
    """A real (random-weight) class-conditional UNet, for the network-level checks."""

    family = "ddpm"
    conditioning = "class"

    def __init__(self) -> None:
        super().__init__(
            model_id="tiny-unet", revision=None, fingerprint="1" * 64, resolution=8,
            image_channels=3, alphas_cumprod=linear_alphas_cumprod(),
            device=torch.device("cpu"), dtype=torch.float32,
        )
        torch.manual_seed(0)
        self.unet = UNet2DModel(
            sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
            block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=6,
        ).eval()

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def class_id(self, caption: str | None) -> int:
        return 5 if caption is None else int(caption)

    def _class_conditions(self, labels: list[int]) -> Condition:
        return Condition(len(labels), {"class_labels": torch.tensor(labels, dtype=torch.long)})

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        return self.unet(x_t, t, class_labels=cond.tensors["class_labels"]).sample


@pytest.fixture(scope="module")
def oracles() -> dict[str, GaussianOracle]:
    return {c: GaussianOracle(c) for c in ("text", "class", "none")}


@pytest.fixture(scope="module")
def tiny_unet() -> TinyUNetAdapter:
    return TinyUNetAdapter()


# --------------------------------------------------------------------------
# hand computations (float64 numpy, one image at a time)
# --------------------------------------------------------------------------
def _abar(adapter: GaussianOracle, t: int) -> float:
    return float(adapter.alphas_cumprod[t])


def _eps_hat(adapter: GaussianOracle, x: np.ndarray, t: int, mu: np.ndarray) -> np.ndarray:
    a, s2 = _abar(adapter, t), adapter.sigma**2
    return math.sqrt(1 - a) * (x - math.sqrt(a) * mu) / (a * s2 + 1 - a)


def _noise(batch: EncodedBatch, i: int, family: str, t: int | str = "shared", r: int = 0) -> np.ndarray:
    shape = batch.x0.shape[1:]
    return image_noise(shape, batch.seed, [batch.hashes[i]], family, t, r)[0].double().numpy()


def _noised(adapter: GaussianOracle, x0: np.ndarray, eps: np.ndarray, t: int) -> np.ndarray:
    a = _abar(adapter, t)
    return math.sqrt(a) * x0 + math.sqrt(1 - a) * eps


def _norm(x: np.ndarray, p: float = 2.0) -> float:
    return float(np.sum(np.abs(x) ** p) ** (1.0 / p))


def hand_denoising_loss(ad, batch, i, t=100, reps=5):
    x0, mu = batch.x0[i].double().numpy(), ad.mean_of(batch.captions[i])
    losses = []
    for r in range(reps):  # repetition 0: the image's shared noise at t (features.calls)
        eps = _noise(batch, i, "image", t) if r == 0 else _noise(batch, i, "denoising_loss", t, r)
        losses.append(_norm(_eps_hat(ad, _noised(ad, x0, eps, t), t, mu) - eps))
    return [sum(losses) / reps]


def hand_multiple_loss(ad, batch, i):
    x0, mu = batch.x0[i].double().numpy(), ad.mean_of(batch.captions[i])
    eps = {t: _noise(batch, i, "image", t) for t in range(0, 1000, 100)}  # one draw per (image, t)
    return [_norm(_eps_hat(ad, _noised(ad, x0, eps[t], t), t, mu) - eps[t]) for t in range(0, 1000, 100)]


def hand_secmi(ad, batch, i, t_sec=100, k=10):
    x, mu = batch.x0[i].double().numpy(), ad.mean_of(batch.captions[i])

    def step(x, s, s_to):
        e = _eps_hat(ad, x, s, mu)
        a, a_to = _abar(ad, s), _abar(ad, s_to)
        f = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
        return math.sqrt(a_to) * f + math.sqrt(1 - a_to) * e

    for s in range(0, t_sec, k):
        x = step(x, s, s + k)
    x_det = x
    x_step = step(step(x_det, t_sec, t_sec + k), t_sec + k, t_sec)
    return [_norm(x_det - x_step)]


def hand_pia(ad, batch, i, t=200, p=5.0):
    x0, mu = batch.x0[i].double().numpy(), ad.mean_of(batch.captions[i])
    e0 = _eps_hat(ad, x0, 0, mu)
    e0n = e0 * math.sqrt(2 / math.pi) / np.mean(np.abs(e0))
    out = []
    for e in (e0, e0n):
        out.append(_norm(e - _eps_hat(ad, _noised(ad, x0, e, t), t, mu), p))
    return out


def hand_gradient_masking(ad, batch, i, fraction=0.2):
    x0, mu = batch.x0[i].double().numpy(), ad.mean_of(batch.captions[i])
    k = max(1, round(fraction * x0.size))
    out = []
    for t in range(0, 1000, 100):
        eps = _noise(batch, i, "image", t)  # one draw per (image, t)
        # d/dx ||c (x - sqrt(a) mu) - eps|| = c r / ||r||, c > 0: |g| ranks like |r|.
        # The mask's edge is relative to the threshold, so |r| gives the same weights as |g|.
        r = np.abs(_eps_hat(ad, _noised(ad, x0, eps, t), t, mu) - eps)
        top = np.sort(r.ravel())[::-1]
        tau = (top[k - 1] + top[k]) / 2
        w = np.clip(0.5 + (r - tau) / (2 * MASK_EDGE * tau), 0.0, 1.0)
        x_tilde = x0 + w * (eps - x0)
        err = w * ((eps - x0) - _eps_hat(ad, x_tilde, t, mu))
        out.append(_norm(err))
    return out


def hand_clid(ad, batch, i, steps=(440, 450, 460), rates=(0.3, 0.5, 0.7)):
    x0, caption = batch.x0[i].double().numpy(), batch.captions[i]
    if ad.conditioning == "class":
        conds = [caption, None]
    else:
        conds = [caption] + [mask_caption(caption, r, batch.seed, batch.hashes[i]) for r in rates] + [None]
    losses = []
    for c in conds:
        mu = ad.mean_of(c)
        per_t = []
        for t in steps:
            eps = _noise(batch, i, "clid", t)
            per_t.append(np.mean((_eps_hat(ad, _noised(ad, x0, eps, t), t, mu) - eps) ** 2))
        losses.append(np.mean(per_t))
    return [losses[0]] + [l - losses[0] for l in losses[1:]]


HAND = {
    "denoising_loss": hand_denoising_loss,
    "multiple_loss": hand_multiple_loss,
    "secmi": hand_secmi,
    "pia": hand_pia,
    "gradient_masking": hand_gradient_masking,
    "clid": hand_clid,
}


# --------------------------------------------------------------------------
# closed forms
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, conditioning",
    [(n, c) for n in sorted(HAND) for c in ("text", "class", "none") if (n, c) != ("clid", "none")],
)
def test_family_matches_closed_form(oracles, name, conditioning):
    ad = oracles[conditioning]
    batch = make_batch(ad)
    family = FAMILIES[name]()
    got = family.extract(ad, batch)
    assert got.dtype == torch.float32 and got.shape == (len(batch), len(family.columns(ad)))
    want = np.array([HAND[name](ad, batch, i) for i in range(len(batch))])
    # Gradient Masking: an element inside the mask's edge has a weight that moves by the float32
    # rounding of |g| (relative, up to ~1e-5 where eps_hat - eps cancels) over 2 * MASK_EDGE, a gain
    # of 100; measured worst 4.8e-4 of the value against the float64 hand computation (gain 500).
    rtol = 2e-3 if name == "gradient_masking" else 1e-5
    np.testing.assert_allclose(got.double().numpy(), want, rtol=rtol, atol=1e-6)


def test_secmi_and_pia_configs_are_used(oracles):
    ad, batch = oracles["text"], make_batch(oracles["text"], 2)
    got = SecMI(timestep=60, interval=20).extract(ad, batch)
    want = [hand_secmi(ad, batch, i, t_sec=60, k=20) for i in range(2)]
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6)
    got = PIA(timestep=300, p=2.0).extract(ad, batch)
    want = [hand_pia(ad, batch, i, t=300, p=2.0) for i in range(2)]
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6)
    got = DenoisingLoss(timestep=250, repetitions=2).extract(ad, batch)
    want = [hand_denoising_loss(ad, batch, i, t=250, reps=2) for i in range(2)]
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6)


def test_pian_normalises_e0_to_half_normal_mean(oracles):
    """PIAN differs from PIA, and the rescaled e0 has mean |e0| = sqrt(2/pi)."""
    ad, batch = oracles["none"], make_batch(oracles["none"], 3)
    out = PIA().extract(ad, batch)
    assert not torch.allclose(out[:, 0], out[:, 1])
    e0 = _eps_hat(ad, batch.x0[0].double().numpy(), 0, np.zeros(ad.shape))
    assert np.mean(np.abs(e0 * math.sqrt(2 / math.pi) / np.mean(np.abs(e0)))) == pytest.approx(
        math.sqrt(2 / math.pi)
    )


# --------------------------------------------------------------------------
# noise optimisation: per-image L-BFGS
# --------------------------------------------------------------------------
def torch_lbfgs_features(adapter, batch, i, cfg):
    """Reference: torch.optim.LBFGS on image i alone, then the two features."""
    eps = image_noise(batch.x0.shape[1:], batch.seed, [batch.hashes[i]], "image", cfg.timestep)
    t = torch.tensor([cfg.timestep])
    cond = batch.cond.index([i])
    x_t = adapter.add_noise(batch.x0[i : i + 1], eps, t)
    d = torch.zeros_like(x_t, requires_grad=True)
    opt = torch.optim.LBFGS(
        [d], lr=cfg.lr, max_iter=cfg.max_iter, history_size=cfg.history_size,
        tolerance_grad=cfg.tolerance_grad, tolerance_change=cfg.tolerance_change, max_eval=cfg.max_eval,
    )

    def closure():
        opt.zero_grad()
        loss = per_sample_norm(adapter.eps(x_t + d, t, cond) - eps).sum()
        if cfg.objective == "squared":
            loss = loss**2
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return [per_sample_norm(adapter.eps(x_t + d, t, cond) - eps).item(), d.norm().item()]


def test_noise_optimization_matches_torch_lbfgs_on_a_network(tiny_unet):
    """Default settings, one image per batch: the same as torch's L-BFGS.

    (On this random network L-BFGS moves far, ||d|| ~ 450 for one image, and
    float32 rounding of the two ways to form the gradient of the squared norm
    grows to ~7e-5 of ||d||.)
    """
    batch = make_batch(tiny_unet, 3)
    family = NoiseOptimization()
    for i in range(3):
        got = family.extract(tiny_unet, sub_batch(batch, [i]))[0].double().numpy()
        want = torch_lbfgs_features(tiny_unet, batch, i, family.config)
        np.testing.assert_allclose(got, want, rtol=2e-4)
        assert got[1] > 0


def test_noise_optimization_matches_torch_lbfgs_on_the_oracle(oracles):
    """On an exactly linear model the squared objective is a quadratic: a sharp check in a batch.

    (The norm objective on a linear model is a cone: L-BFGS without line
    search overshoots by orders of magnitude and rounding differences between
    torch's flat dot products and ours grow to ~1e-3; the network test above
    checks the default objective.)
    """
    for conditioning, max_iter in (("text", 2), ("text", 5), ("none", 5)):
        ad = oracles[conditioning]
        batch = make_batch(ad, 4)
        family = NoiseOptimization(objective="squared", max_iter=max_iter)
        got = family.extract(ad, batch).double().numpy()
        want = [torch_lbfgs_features(ad, batch, i, family.config) for i in range(4)]
        # After 5 iterations the loss is at float32 rounding level (~1e-5 of its start).
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        if max_iter == 2:
            assert np.all(got[:, 0] > 0.1)


def test_noise_optimization_reference_variant_is_scipy_per_image(tiny_unet):
    """variant="reference": scipy's L-BFGS-B on the plain norm, per image (batch-independent),
    final loss re-noised as the reference code does."""
    from scipy.optimize import minimize

    batch = make_batch(tiny_unet, 2)
    family = NoiseOptimization(variant="reference")
    got = family.extract(tiny_unet, batch).double().numpy()
    alone = family.extract(tiny_unet, sub_batch(batch, [1]))[0].double().numpy()
    np.testing.assert_allclose(alone, got[1], rtol=1e-4)
    i, t = 0, torch.tensor([100])
    eps = image_noise(batch.x0.shape[1:], batch.seed, [batch.hashes[i]], "image", 100)
    x_t = tiny_unet.add_noise(batch.x0[i : i + 1], eps, t)
    cond = batch.cond.index([i])

    def fun(flat):
        d = torch.from_numpy(flat).float().view_as(x_t).requires_grad_(True)
        loss = per_sample_norm(tiny_unet.eps(x_t + d, t, cond) - eps).sum()
        (g,) = torch.autograd.grad(loss, d)
        return float(loss.detach()), g.double().numpy().ravel()

    d = torch.from_numpy(minimize(fun, np.zeros(x_t.numel()), jac=True, method="L-BFGS-B",
                                  options={"maxiter": 5}).x).float().view_as(x_t)
    with torch.no_grad():
        loss = per_sample_norm(tiny_unet.eps(tiny_unet.add_noise(x_t + d, eps, t), t, cond) - eps).item()
    np.testing.assert_allclose(got[0], [loss, d.norm().item()], rtol=1e-4)
    with pytest.raises(CDIError, match="variant"):
        NoiseOptimization(variant="scipy")


def _rosenbrock_like(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Smooth non-quadratic per-row objectives: (B, D) -> (B,), row i scaled by scales[i]."""
    core = ((1 - x[:, :-1]) ** 2 + 3.0 * (x[:, 1:] - x[:, :-1] ** 2) ** 2).sum(1) + 0.1 * (x**4).sum(1)
    return scales * core


def _closure(scales: torch.Tensor, grad_factor: torch.Tensor | None = None):
    def closure(x: torch.Tensor):
        x = x.detach().requires_grad_(True)
        loss = _rosenbrock_like(x, scales)
        (g,) = torch.autograd.grad(loss.sum(), x)
        if grad_factor is not None:
            g = g * grad_factor[:, None]
        return loss.detach(), g

    return closure


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=1.0, max_iter=5, history_size=100),
        dict(lr=0.5, max_iter=9, history_size=2),  # the history is full and drops pairs
        dict(lr=1.0, max_iter=12, history_size=3, tolerance_change=1e-3, max_eval=10),  # early stops
    ],
)
def test_per_sample_lbfgs_equals_torch_lbfgs_per_row(kwargs):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn((5, 6), generator=gen)
    x[2] = 1.0
    scales = torch.tensor([1.0, 0.01, 2.0, 30.0, 0.5])
    got, _ = per_sample_lbfgs(_closure(scales), x, **kwargs)
    for i in range(5):
        xi = x[i : i + 1].clone().requires_grad_(True)
        opt = torch.optim.LBFGS([xi], **kwargs)

        def closure():
            opt.zero_grad()
            loss = _rosenbrock_like(xi, scales[i : i + 1]).sum()
            loss.backward()
            return loss

        opt.step(closure)
        torch.testing.assert_close(got[i], xi.detach()[0], rtol=1e-5, atol=1e-6)


def test_per_sample_lbfgs_stopped_row_does_not_move_others():
    """A row whose gradient is zero stops at once; the other rows are unaffected by it."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn((3, 4), generator=gen)
    alone, _ = per_sample_lbfgs(_closure(torch.ones(2)), x[[0, 2]], max_iter=5)
    got, evaluations = per_sample_lbfgs(_closure(torch.ones(3), torch.tensor([1.0, 0.0, 1.0])), x, max_iter=5)
    assert torch.equal(got[1], x[1])
    torch.testing.assert_close(got[[0, 2]], alone, rtol=1e-6, atol=1e-7)
    assert evaluations == 5


# --------------------------------------------------------------------------
# batch invariance
# --------------------------------------------------------------------------
def _all_families(adapter):
    spec = default_feature_set(adapter)
    return resolve_features(spec)


def _extract_all(adapter, batch, max_chunk=None):
    out = []
    for family in _all_families(adapter):
        family.max_chunk = max_chunk
        out.append(family.extract(adapter, batch))
    return torch.cat(out, dim=1)


def _check_invariance(adapter, n, rtol, atol, loose_columns=(), loose_rtol=0.0):
    full = _extract_all(adapter, make_batch(adapter, n))
    columns = columns_of(_all_families(adapter), adapter)
    tight = [j for j, c in enumerate(columns) if c not in loose_columns]
    loose = [j for j, c in enumerate(columns) if c in loose_columns]
    order = list(range(n))[::-1][:1] + list(range(n - 1))  # e.g. [3, 0, 1, 2]
    others = {
        "shuffled": _extract_all(adapter, make_batch(adapter, n, order))[torch.argsort(torch.tensor(order))],
        "alone": torch.cat([_extract_all(adapter, make_batch(adapter, n, [i])) for i in range(n)]),
        "chunked": _extract_all(adapter, make_batch(adapter, n), max_chunk=7),
    }
    for what, other in others.items():
        torch.testing.assert_close(other[:, tight], full[:, tight], rtol=rtol, atol=atol, msg=what)
        torch.testing.assert_close(other[:, loose], full[:, loose], rtol=max(rtol, loose_rtol), atol=atol, msg=what)


@pytest.mark.parametrize("conditioning", ["text", "class", "none"])
def test_values_do_not_depend_on_batch_mates_order_or_chunking_oracle(conditioning, oracles):
    """The oracle's arithmetic does not depend on the batch size, so neither may any value."""
    _check_invariance(oracles[conditioning], 5, rtol=1e-6, atol=1e-7)


#: Largest batch-size difference allowed per column, as a share of the column's spread across images.
#: Issue 24's bound is 1 %. Measured on this tiny UNet (16 images, one at a time against all 16 and in
#: chunks of 7; docs/notes/issue-24-batch.md): noise_opt_norm 8e-4 (L-BFGS amplifies the kernels'
#: rounding), every other column at most 5e-5. The bound is a share of the spread, not of the value,
#: so it does not depend on how the instruction set or the thread count round (relative rounding of
#: 5e-5 on noise_opt_norm, as measured on an AVX-512/MKL machine, is 3e-5 of its spread here).
SPREAD_SHARE = {"noise_opt_loss": 1e-2, "noise_opt_norm": 1e-2}
SPREAD_SHARE_OTHERS = 1e-3


def test_values_do_not_depend_on_batch_mates_order_or_chunking_network(tiny_unet):
    """On a network the batch size changes the rounding of its kernels, and no column may amplify it.

    Each column's differences (alone, shuffled, chunked, against the full
    batch of 8) must stay under ``SPREAD_SHARE`` of its standard deviation
    across the 8 images: 1 % for the noise-optimisation columns, whose
    L-BFGS amplifies rounding (measured at most 8e-4), 0.1 % for every other
    column (measured at most 5e-5; Gradient Masking's mask edge keeps a
    near-tie of the top-k from turning rounding into a jump). (With the
    literal ``objective="norm"`` L-BFGS divides by a near-zero curvature and
    amplifies that rounding to ~1e-3 of ||d||: one reason the default is
    the squared objective.)
    """
    n = 8
    full = _extract_all(tiny_unet, make_batch(tiny_unet, n)).double()
    columns = columns_of(_all_families(tiny_unet), tiny_unet)
    spread = full.std(dim=0)
    share = torch.tensor([SPREAD_SHARE.get(c, SPREAD_SHARE_OTHERS) for c in columns], dtype=torch.float64)
    order = [n - 1] + list(range(n - 1))
    others = {
        "shuffled": _extract_all(tiny_unet, make_batch(tiny_unet, n, order))[torch.argsort(torch.tensor(order))],
        "alone": torch.cat([_extract_all(tiny_unet, make_batch(tiny_unet, n, [i])) for i in range(n)]),
        "chunked": _extract_all(tiny_unet, make_batch(tiny_unet, n), max_chunk=3),
    }
    assert bool((spread > 0).all())
    for what, other in others.items():
        worst = ((other.double() - full).abs().amax(dim=0) / spread)
        bad = {c: float(w) for c, w, b in zip(columns, worst, share) if w > b}
        assert not bad, f"{what}: differences over their share of the spread across images: {bad}"


def test_mask_weights_are_the_top_k_mask_away_from_ties():
    """With the k-th and (k+1)-th magnitudes further apart than the edge, the weights are the hard top-k."""
    gen = torch.Generator().manual_seed(5)
    m = torch.rand((50, 256), generator=gen, dtype=torch.float64)
    k = 51
    w = mask_weights(m, k)
    top = m.sort(dim=1, descending=True).values
    clear = (top[:, k - 1] - top[:, k]) >= 2 * MASK_EDGE * (top[:, k - 1] + top[:, k]) / 2
    hard = torch.zeros_like(m).scatter_(1, m.topk(k, dim=1).indices, 1.0)
    assert bool(clear.any()) and bool((~clear).any())
    assert torch.equal(w[clear], hard[clear])
    assert torch.equal(mask_weights(m, 256), torch.ones_like(m))


def test_mask_weights_move_continuously_through_a_near_tie():
    """Two magnitudes crossing at the threshold swap weights smoothly, never by a jump; ties weigh alike."""
    base = torch.linspace(1.0, 2.0, 11, dtype=torch.float64)  # k = 5: the 5th and 6th largest are 1.6, 1.5
    k = 5
    tau = 1.55
    last = None
    for delta in torch.linspace(-0.2 * MASK_EDGE, 0.2 * MASK_EDGE, 41, dtype=torch.float64):
        m = base.clone()
        m[5], m[6] = tau * (1 - delta), tau * (1 + delta)  # 1.5 and 1.6 replaced by a near-tie
        w = mask_weights(m[None], k)[0]
        assert abs(float(w.sum()) - k) < 1e-9
        if last is not None:  # rounding delta * tau moves a weight by at most delta / (2 * MASK_EDGE)
            assert float((w - last).abs().max()) <= 0.01 * MASK_EDGE / (2 * MASK_EDGE) * 1.0001
        last = w
    tied = torch.tensor([[3.0, 2.0, 2.0, 1.0]], dtype=torch.float64)
    assert torch.equal(mask_weights(tied, 2), torch.tensor([[1.0, 0.5, 0.5, 0.0]], dtype=torch.float64))


def test_seed_changes_the_noise(oracles):
    ad = oracles["none"]
    a = make_batch(ad, 2)
    b = EncodedBatch(a.x0, a.hashes, a.captions, a.cond, SEED + 1)
    fam = DenoisingLoss()
    assert not torch.allclose(fam.extract(ad, a), fam.extract(ad, b))


def test_draws_noise_says_whether_values_depend_on_the_seed(oracles):
    """``draws_noise`` is what the report's seed sentence rests on: it must match the values."""
    ad = oracles["text"]
    a = make_batch(ad, 2)
    b = EncodedBatch(a.x0, a.hashes, a.captions, a.cond, SEED + 1)
    for family in resolve_features("cdi+clid+sima"):
        same = torch.equal(family.extract(ad, a), family.extract(ad, b))
        assert same == (not family.draws_noise), family.name


def test_seed_dependence_never_says_same_for_every_seed_when_noise_is_drawn():
    noisy = seed_dependence(resolve_features("cdi+clid+sima"))
    assert "same for every seed" not in noisy["text"] and "another verdict p-value" in noisy["text"]
    assert noisy["families_drawing_noise"] == ["denoising_loss", "multiple_loss", "noise_optimization",
                                               "gradient_masking", "clid"]
    assert noisy["demo_measurement"]["max_over_min"] > 1
    free = seed_dependence(resolve_features("secmi,pia,sima"))
    assert free["families_drawing_noise"] == [] and "same for every seed" in free["text"]


def test_gradient_families_run_under_inference_mode(oracles, tiny_unet):
    """The engine may build batches in inference mode; autograd must still work inside."""
    for adapter in (oracles["text"], tiny_unet):
        want = torch.cat([f.extract(adapter, make_batch(adapter, 2)) for f in
                          (NoiseOptimization(), GradientMasking())], dim=1)
        with torch.inference_mode():
            batch = make_batch(adapter, 2)
            got = torch.cat([f.extract(adapter, batch) for f in (NoiseOptimization(), GradientMasking())], 1)
        torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------
# model calls per image: declared == counted
# --------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["text", "class", "tiny_unet"])
def test_declared_cost_equals_counted_calls(which, oracles, tiny_unet):
    adapter = tiny_unet if which == "tiny_unet" else oracles[which]
    batch = make_batch(adapter, 3)
    for family in _all_families(adapter):
        with counting(adapter) as counts:
            family.extract(adapter, batch)
        declared = family.cost(adapter)
        counted = Cost(counts["forward"] // 3, counts["backward"] // 3)
        assert counts["forward"] % 3 == 0 and counts["backward"] % 3 == 0
        if family.name == "noise_optimization" and which != "tiny_unet":
            # on the exactly linear oracles the squared objective is a quadratic that
            # L-BFGS may finish early: the declared cost is the ceiling
            assert counted.forward <= declared.forward and counted.backward <= declared.backward
        else:
            assert counted == declared, family.name
        assert counts["encode"] == 0, f"{family.name} must not re-encode"


def test_reference_totals(oracles):
    cdi = resolve_features("cdi")
    cost = total_cost(cdi, oracles["text"])
    assert cost == Cost(43, 14)  # the reference's 56 + 15, each shared call made once
    assert sum((f.cost(oracles["text"]) for f in cdi), Cost(0, 0)) == Cost(56, 15)
    assert CLiD().cost(oracles["text"]) == Cost(15, 0)  # k = 4
    assert CLiD().cost(oracles["class"]) == Cost(6, 0)  # k = 1
    assert NoiseOptimization().cost(oracles["text"]) == Cost(6, 5)
    assert GradientMasking().cost(oracles["text"]) == Cost(20, 10)


def test_shared_calls_are_made_once_and_change_no_value(tiny_unet):
    """The engine's plan (features.calls): the CDI set costs 43 forward + 14 backward calls per
    image instead of 56 + 15, and every value is what each family computes on its own."""
    families = resolve_features("cdi")
    alone = torch.cat([f.extract(tiny_unet, make_batch(tiny_unet, 3)) for f in families], dim=1)
    batch = make_batch(tiny_unet, 3)
    with counting(tiny_unet) as counts:
        evaluate(tiny_unet, batch, planned_calls(families, tiny_unet))
        together = torch.cat([f.extract(tiny_unet, batch) for f in families], dim=1)
    assert counts["forward"] % 3 == 0 and counts["backward"] % 3 == 0
    assert Cost(counts["forward"] // 3, counts["backward"] // 3) == total_cost(families, tiny_unet) == Cost(43, 14)
    assert sorted(batch.shared) == [("clean", 0)] + [("noised", t) for t in range(0, 1000, 100)]
    # Batched calls round differently (~1e-7); L-BFGS amplifies that in ||d|| (see below).
    loose = columns_of(families, tiny_unet).index("noise_opt_norm")
    tight = [j for j in range(together.shape[1]) if j != loose]
    torch.testing.assert_close(together[:, tight], alone[:, tight], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together[:, loose], alone[:, loose], rtol=1e-3, atol=1e-5)


def test_shared_noise_is_one_per_image(oracles):
    """Multiple Loss, Gradient Masking, Noise Optimisation and Denoising Loss's first repetition
    see the same noise: with one timestep each, Multiple Loss at t is Denoising Loss with R = 1."""
    ad = oracles["text"]
    batch = make_batch(ad, 3)
    ml = MultipleLoss(timesteps=(100, 300)).extract(ad, batch)
    dl = DenoisingLoss(timestep=300, repetitions=1).extract(ad, batch)
    torch.testing.assert_close(ml[:, 1:], dl)
    assert [c.grad for c in GradientMasking().shared_calls(ad)] == [True] * 10
    assert planned_calls([MultipleLoss(), GradientMasking()], ad) == GradientMasking().shared_calls(ad)
    from cdi.features.sima import SimA  # SimA's t = 0 is PIA's e0 and SecMI's first step: one call
    clean = [c for c in planned_calls([SecMI(), PIA(), SimA()], ad) if c.timestep == 0]
    assert len(clean) == 1 and total_cost([SecMI(), PIA(), SimA()], ad) == Cost(12 + 3 + 4 - 2)


# --------------------------------------------------------------------------
# CLiD specifics
# --------------------------------------------------------------------------
def test_mask_caption_is_a_seeded_subset():
    caption = "one two three four five six seven eight nine ten"
    h = _hashes(1)[0]
    for rate, kept in ((0.3, 7), (0.5, 5), (0.7, 3), (1.0, 0)):
        masked = mask_caption(caption, rate, 0, h)
        words = masked.split()
        assert len(words) == kept
        assert words == [w for w in caption.split() if w in words]  # order kept
        assert mask_caption(caption, rate, 0, h) == masked  # deterministic
    draws = {mask_caption(caption, 0.5, s, h) for s in range(20)}
    assert len(draws) > 5  # the seed matters
    others = {mask_caption(caption, 0.5, 0, g) for g in _hashes(20)}
    assert len(others) > 5  # so does the image hash
    assert mask_caption("", 0.5, 0, h) == ""


def test_clid_released_caption_rules():
    """impt: the released count (ceil(rate * n), 2 of 4 at 50 %) of one nested ranking;
    clip: the released character thirds, at the released timesteps."""
    assert [released_count(r, 4) for r in (0.3, 0.5, 0.7)] == [2, 2, 3]
    assert [released_count(r, 10) for r in (0.3, 0.5, 0.7)] == [3, 5, 7]
    caption, ranking = "one two three four", [2, 0, 3, 1]
    assert importance_captions(caption, ranking, 0.3, "<E>") == "<E> two <E> four"
    assert importance_captions(caption, ranking, 0.7, "<E>") == "<E> two <E> <E>"
    assert clip_captions("abcdefghij") == ["abc", "def", "ghij"]
    assert CLiD(reduction="clip").timesteps() == [485, 495, 505]
    assert CLiD(reduction="clip", timesteps=(440,)).timesteps() == [440]
    with pytest.raises(CDIError, match="reduction"):
        CLiD(reduction="nope")


def test_clid_importance_ranking_follows_the_condition(oracles):
    """The proxy ranking: the word whose replacement moves the condition most comes first;
    "impt" features equal the closed form with those reduced captions."""
    ad = oracles["text"]
    caption = CAPTIONS[0]
    (ranking,) = importance_ranking(ad, [caption], "<|endoftext|>")
    words = caption.split()
    moved = [float((ad.prompt_mean(" ".join("<|endoftext|>" if k == j else w for k, w in enumerate(words)))
                    - ad.prompt_mean(caption)).pow(2).sum()) for j in range(len(words))]
    assert sorted(ranking) == list(range(len(words)))
    assert [moved[j] for j in ranking] == sorted(moved, reverse=True)
    batch = make_batch(ad, 3)
    family = CLiD(reduction="impt")
    got = family.extract(ad, batch)
    reduced = family.reduced_captions(ad, batch)
    for i in range(3):
        conds = [batch.captions[i]] + [r[i] for r in reduced] + [None]
        losses = []
        for c in conds:
            mu = ad.mean_of(c)
            per_t = [np.mean((_eps_hat(ad, _noised(ad, batch.x0[i].double().numpy(), _noise(batch, i, "clid", t), t),
                                       t, mu) - _noise(batch, i, "clid", t)) ** 2) for t in (440, 450, 460)]
            losses.append(np.mean(per_t))
        want = [losses[0]] + [l - losses[0] for l in losses[1:]]
        np.testing.assert_allclose(got[i].double().numpy(), want, rtol=1e-5, atol=1e-6)
    assert CLiD(reduction="clip").extract(ad, batch).shape == (3, 5)


def test_clid_is_refused_on_unconditional_models(oracles):
    with pytest.raises(CDIError, match="conditional"):
        CLiD().check_applicable(oracles["none"])
    with pytest.raises(CDIError, match="conditional"):
        CLiD().extract(oracles["none"], make_batch(oracles["none"], 2))


def test_clid_needs_captions(oracles):
    ad = oracles["text"]
    batch = make_batch(ad, 2)
    batch.captions[1] = None
    with pytest.raises(CDIError, match="caption"):
        CLiD().extract(ad, batch)


def test_clid_columns_follow_the_conditioning(oracles):
    assert CLiD().columns(oracles["text"]) == ["clid_loss", "clid_d1", "clid_d2", "clid_d3", "clid_d4"]
    assert CLiD().columns(oracles["class"]) == ["clid_loss", "clid_d1"]
    assert CLiD().directions(oracles["text"]) == [-1, 1, 1, 1, 1]


# --------------------------------------------------------------------------
# registry and configuration
# --------------------------------------------------------------------------
def test_feature_sets_and_columns(oracles):
    cdi = resolve_features("cdi")
    cols = columns_of(cdi)
    assert len(cols) == 26 and len(set(cols)) == 26
    assert cols[:4] == ["denoising_loss", "secmi", "pia", "pian"]
    assert "multiple_loss_t000" in cols and "grad_mask_t900" in cols and "noise_opt_norm" in cols
    assert len(columns_of(resolve_features("cdi+clid"), oracles["text"])) == 31
    assert len(columns_of(resolve_features("cdi+clid"), oracles["class"])) == 28
    dirs = directions_of(resolve_features("cdi+clid"), oracles["text"])
    assert len(dirs) == 31 and set(dirs) <= {-1, 1} and dirs[-4:] == [1, 1, 1, 1]
    assert FEATURE_SETS["cdi+clid"] == FEATURE_SETS["cdi"] + ["clid"]
    assert [f.name for f in resolve_features(" PIA, secmi,pia ")] == ["pia", "secmi"]
    assert [f.name for f in resolve_features("cdi,clid")] == FEATURE_SETS["cdi+clid"]
    assert default_feature_set(oracles["text"]) == "cdi+clid+sima"
    assert default_feature_set(oracles["class"]) == "cdi+clid+sima"
    assert default_feature_set(oracles["none"]) == "cdi+sima"
    assert FEATURE_SETS["cdi+clid+sima"] == FEATURE_SETS["cdi+clid"] + ["sima"]
    assert len(columns_of(resolve_features("cdi+clid+sima"), oracles["text"])) == 35


def test_unknown_feature_names_are_user_errors():
    with pytest.raises(CDIError, match="valid families: denoising_loss"):
        resolve_features("cdi,loss")
    with pytest.raises(CDIError, match="no features"):
        resolve_features(" , ")


def test_configs_validate_and_key(oracles):
    with pytest.raises(CDIError, match="repetitions"):
        DenoisingLoss(repetitions=0)
    with pytest.raises(CDIError, match="multiple of interval"):
        SecMI(timestep=95)
    with pytest.raises(CDIError, match="mask_fraction"):
        GradientMasking(mask_fraction=0.0)
    with pytest.raises(CDIError, match="objective"):
        NoiseOptimization(objective="mse")
    with pytest.raises(CDIError, match="timesteps"):
        MultipleLoss(timesteps=(0, 1000)).check_applicable(oracles["none"])
    assert DenoisingLoss().key() != DenoisingLoss(repetitions=4).key()
    assert DenoisingLoss(max_chunk=2).key() == DenoisingLoss().key()
    assert masked_count(0.2, 48) == 10 and masked_count(0.2, 2) == 1


# --------------------------------------------------------------------------
# every family on the tiny real adapters (tests/conftest.py session fixture)
# --------------------------------------------------------------------------
TINY_KEYS = ["sd", "sd_v", "sdxl", "ldm", "dit", "ddpm", "ddpm_uncond"]


@pytest.mark.parametrize("key", TINY_KEYS)
def test_every_applicable_family_runs_on_tiny_adapters(request, key):
    adapters = request.getfixturevalue("tiny_adapters")
    adapter = adapters[key]
    n = 2
    pixels = _pixels(n, adapter.image_channels, adapter.resolution)
    if adapter.conditioning == "text":
        captions = CAPTIONS[:n]
    elif adapter.conditioning == "class":
        captions = ["1", "0"]
    else:
        captions = [None] * n
    with counting(adapter) as counts:
        x0 = adapter.encode(pixels)
    assert counts["encode"] == n
    batch = EncodedBatch(x0, _hashes(n), captions, adapter.conditions(captions), SEED)
    families = _all_families(adapter)
    if not adapter.is_conditional:
        assert [f.name for f in families] == FEATURE_SETS["cdi+sima"]
        with pytest.raises(CDIError, match="conditional"):
            CLiD().check_applicable(adapter)
    for family in families:
        family.check_applicable(adapter)
        with counting(adapter) as counts:
            out = family.extract(adapter, batch)
        assert out.shape == (n, len(family.columns(adapter)))
        assert out.device == adapter.device and torch.isfinite(out).all(), family.name
        assert Cost(counts["forward"] // n, counts["backward"] // n) == family.cost(adapter)
        assert counts["encode"] == 0
    alone = torch.cat([f.extract(adapter, sub_batch(batch, [1])) for f in families], dim=1)[0]
    both = torch.cat([f.extract(adapter, batch) for f in families], dim=1)[1]
    # L-BFGS on a random float32 network amplifies the ~1e-7 batch rounding of its
    # kernels in ||d|| (2e-4 relative on the random pixel DDPM); in float64 the whole
    # table is bit-identical across batch sizes (tests/test_extract.py).
    loose = columns_of(families, adapter).index("noise_opt_norm")
    tight = [j for j in range(len(both)) if j != loose]
    torch.testing.assert_close(alone[tight], both[tight], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone[loose], both[loose], rtol=1e-3, atol=1e-5)
