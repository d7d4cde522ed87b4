"""PFAMI and GSA feature families on a tiny adapter with a real torch network and counted calls."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from cdi.utils.errors import CDIError
from cdi.models.base import Condition, DiffusionAdapter
from cdi.features.base import Cost, EncodedBatch
from cdi.features.gsa import GSA1, GSA2, NOISE_KEY, denoiser_parameters
from cdi.features.pfami import PFAMI, center_crop_resize, crop_ratios


class _CountBackward(torch.autograd.Function):
    """Identity that counts the samples flowing back through it (usable under torch.func transforms)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, counter):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.counter = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        ctx.counter["backward"] += grad.shape[0]
        return grad, None


class TinyNet(nn.Module):
    """A small conditional conv net: eps = f(x_t, t, c)."""

    def __init__(self, channels: int = 3, cond_dim: int = 4) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv_in = nn.Conv2d(channels, 6, 3, padding=1)
        self.time = nn.Linear(1, 6)
        self.cond = nn.Linear(cond_dim, 6)
        self.conv_out = nn.Conv2d(6, channels, 3, padding=1)
        self.unused = nn.Linear(2, 2)  # never called: its gradient is zero
        for p in self.parameters():
            p.data = 0.3 * torch.randn(p.shape, generator=gen)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x) + self.time(t.float()[:, None] / 1000.0)[..., None, None] + self.cond(c)[..., None, None]
        return self.conv_out(torch.tanh(h))


class TinyAdapter(DiffusionAdapter):
    """Text-conditioned latent-style adapter: 2x2 average-pool encoder, TinyNet denoiser."""

    family = "tiny-test"
    conditioning = "text"

    def __init__(self) -> None:
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        super().__init__(
            model_id="tiny-test", revision=None, fingerprint="0" * 64, resolution=8, image_channels=3,
            alphas_cumprod=torch.cumprod(1 - betas, 0).float(), device=torch.device("cpu"), dtype=torch.float32,
        )
        self.denoiser = TinyNet()
        self.denoiser.requires_grad_(False)  # as an inference adapter would leave it
        self.counter = {"forward": 0, "backward": 0, "encode": 0}

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.counter["encode"] += pixels.shape[0]
        return torch.nn.functional.avg_pool2d(pixels, 2)

    def _text_conditions(self, prompts: list[str]) -> Condition:
        rows = []
        for p in prompts:
            digest = hashlib.sha256(p.encode()).digest()
            rows.append([b / 255.0 for b in digest[:4]])
        return Condition(len(prompts), {"emb": torch.tensor(rows, dtype=torch.float32)})

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        self.counter["forward"] += x_t.shape[0]
        out = self.denoiser(x_t, t, cond.tensors["emb"])
        return _CountBackward.apply(out, self.counter) if torch.is_grad_enabled() else out


def make_batch(adapter: TinyAdapter, n: int, seed: int = 0, offset: int = 0) -> EncodedBatch:
    gen = torch.Generator().manual_seed(1000 + offset)
    pixels = torch.rand((n, 3, 8, 8), generator=gen) * 2 - 1
    hashes = [hashlib.sha256(f"image-{offset + i}".encode()).hexdigest() for i in range(n)]
    captions = [f"caption {offset + i}" for i in range(n)]
    batch = EncodedBatch(x0=adapter.encode(pixels), hashes=hashes, captions=captions,
                         cond=adapter.conditions(captions), seed=seed)
    batch.pixels = pixels
    return batch


def sub_batch(adapter: TinyAdapter, batch: EncodedBatch, rows: list[int]) -> EncodedBatch:
    part = EncodedBatch(x0=batch.x0[rows], hashes=[batch.hashes[i] for i in rows],
                        captions=[batch.captions[i] for i in rows], cond=batch.cond.index(rows), seed=batch.seed)
    part.pixels = batch.pixels[rows]
    return part


@pytest.fixture(scope="module")
def adapter() -> TinyAdapter:
    return TinyAdapter()


@pytest.fixture(scope="module")
def batch(adapter) -> EncodedBatch:
    return make_batch(adapter, 2)


# -------------------------------------------------------------------------- PFAMI
def test_crop_ratios_and_pixel_space_crop():
    ratios = crop_ratios(PFAMI().config)
    assert len(ratios) == 10
    assert ratios[0] == pytest.approx(0.95) and ratios[-1] == pytest.approx(0.70)
    assert all(a > b for a, b in zip(ratios, ratios[1:]))
    # A 0.5 crop of an 8x8 image keeps the central 4x4: a constant centre inside a
    # different border becomes a constant image.
    image = torch.full((1, 1, 8, 8), -1.0)
    image[..., 2:6, 2:6] = 0.25
    torch.testing.assert_close(center_crop_resize(image, 0.5), torch.full((1, 1, 8, 8), 0.25))
    torch.testing.assert_close(center_crop_resize(image, 1.0), image)


def test_pfami_counts_calls_and_matches_a_direct_computation(adapter, batch):
    family = PFAMI()
    assert family.columns() == ["pfami"] and family.directions() == [-1]
    assert family.cost(adapter) == Cost(forward=110)
    adapter.counter.update(forward=0, encode=0)
    values = family.extract(adapter, batch)
    assert values.shape == (2, 1) and values.dtype == torch.float32
    assert adapter.counter["forward"] == 110 * 2  # (N + 1) * |T| network evaluations per image
    assert adapter.counter["encode"] == 10 * 2  # each neighbour encoded once

    # Direct, image by image and call by call: the same eps for the image and its neighbours.
    i = 1
    pixels = batch.pixels[i : i + 1]
    x_variants = [batch.x0[i : i + 1]] + [adapter.encode(center_crop_resize(pixels, r)) for r in crop_ratios(family.config)]
    cond = batch.cond.index([i])
    expected = 0.0
    for t in family.config.timesteps:
        eps = batch.noise("pfami", t)[i : i + 1]
        step = torch.tensor([t])
        losses = [((adapter.eps(adapter.add_noise(x, eps, step), step, cond) - eps) ** 2).mean() for x in x_variants]
        expected += sum((losses[0] - lk) / losses[0] for lk in losses[1:]) / (len(losses) - 1)
    assert values[i, 0].item() == pytest.approx(float(expected), rel=1e-5)


def test_pfami_is_zero_without_perturbation_and_independent_of_batch(adapter, batch):
    identity = PFAMI(neighbours=3, crop_max=1.0, crop_min=1.0, timesteps=(50, 300))
    torch.testing.assert_close(identity.extract(adapter, batch), torch.zeros(2, 1))
    family = PFAMI(timesteps=(50, 250, 500), max_chunk=7)
    together = family.extract(adapter, batch)
    alone = torch.cat([family.extract(adapter, sub_batch(adapter, batch, [i])) for i in range(2)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_pfami_needs_pixels_and_valid_config(adapter, batch):
    bare = EncodedBatch(x0=batch.x0, hashes=batch.hashes, captions=batch.captions, cond=batch.cond, seed=0)
    with pytest.raises(RuntimeError, match="pixels"):
        PFAMI().extract(adapter, bare)
    with pytest.raises(CDIError, match="crop_min"):
        PFAMI(crop_min=0.9, crop_max=0.8)
    with pytest.raises(CDIError, match="timesteps"):
        PFAMI(timesteps=(50, 1000)).check_applicable(adapter)


# ---------------------------------------------------------------------------- GSA
def _direct_gradient_norms(adapter, batch, i, timesteps, per_t):
    """Gradient norms by plain loss.backward() on a fresh copy of the network."""
    net = TinyNet()
    net.load_state_dict(adapter.denoiser.state_dict())
    eps = torch.stack([batch.noise(NOISE_KEY, t)[i] for t in timesteps])
    steps = torch.tensor(timesteps)
    x_t = adapter.add_noise(batch.x0[i : i + 1].expand_as(eps), eps, steps)
    emb = batch.cond.tensors["emb"][i : i + 1].expand(len(timesteps), -1)
    groups = [[j] for j in range(len(timesteps))] if per_t else [list(range(len(timesteps)))]
    total = torch.zeros(len(list(net.parameters())))
    for rows in groups:
        net.zero_grad()
        loss = ((net(x_t[rows], steps[rows], emb[rows]) - eps[rows]) ** 2).flatten(1).mean(1).sum()
        loss.backward()
        total += torch.stack([torch.zeros(()) if p.grad is None else p.grad.norm() for p in net.parameters()])
    return total


@pytest.mark.parametrize("cls", [GSA1, GSA2])
def test_gsa_columns_cost_and_counted_calls(adapter, batch, cls):
    family = cls()
    names = [name for name, _ in adapter.denoiser.named_parameters()]
    assert family.columns(adapter) == [f"{family.name}_{n}" for n in names]
    assert family.directions(adapter) == [-1] * len(names)
    assert family.cost(adapter) == Cost(forward=20, backward=20)
    assert family.config.timesteps == tuple(range(0, 1000, 50))
    adapter.counter.update(forward=0, backward=0)
    values = family.extract(adapter, batch)
    assert values.shape == (2, len(names))
    # Batched per-sample gradients (torch.func.vmap(grad)): the network runs once for all
    # 2 x 20 samples; inside vmap it sees one sample's inputs, all T of the image for GSA1,
    # one for GSA2. (The backward is torch.func's; test_gsa_matches_plain_backward checks it.)
    group = 20 if cls is GSA1 else 1
    assert adapter.counter["forward"] == group
    adapter.counter.update(forward=0, backward=0)
    torch.testing.assert_close(cls(max_chunk=20).extract(adapter, batch), values)
    assert adapter.counter["forward"] == 2 * group  # two chunks of 20 network inputs
    # Inference settings of the network are restored.
    assert not any(p.requires_grad for p in adapter.denoiser.parameters())
    unused = [k for k, n in enumerate(names) if n.startswith("unused")]
    assert unused and (values[:, unused] == 0).all()
    assert (values[:, [k for k in range(len(names)) if k not in unused]] > 0).all()


@pytest.mark.parametrize("cls,per_t", [(GSA1, False), (GSA2, True)])
def test_gsa_matches_plain_backward(adapter, batch, cls, per_t):
    timesteps = (0, 500, 900)
    family = cls(timesteps=timesteps)
    values = family.extract(adapter, batch)
    for i in range(2):
        expected = _direct_gradient_norms(adapter, batch, i, list(timesteps), per_t)
        torch.testing.assert_close(values[i], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls", [GSA1, GSA2])
def test_gsa_per_image_norms_do_not_depend_on_the_batch(adapter, batch, cls):
    family = cls(timesteps=(0, 300, 600))
    together = family.extract(adapter, batch)
    alone = torch.cat([family.extract(adapter, sub_batch(adapter, batch, [i])) for i in range(2)])
    # Batched per-sample gradients: the batch changes the rounding of the kernels (~1e-7), nothing more.
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-6)
    reordered = family.extract(adapter, sub_batch(adapter, batch, [1, 0]))
    torch.testing.assert_close(reordered, together[[1, 0]], rtol=1e-6, atol=1e-6)
    # Chunking the timesteps (GSA1 accumulates chunk gradients) changes nothing but rounding.
    torch.testing.assert_close(cls(timesteps=(0, 300, 600), max_chunk=2).extract(adapter, batch), together)


def test_gsa1_and_gsa2_differ_and_need_a_white_box(adapter, batch):
    timesteps = (100, 600)
    assert not torch.allclose(GSA1(timesteps=timesteps).extract(adapter, batch),
                              GSA2(timesteps=timesteps).extract(adapter, batch))

    class BlackBox(TinyAdapter):
        def __init__(self):
            super().__init__()
            self.network, self.denoiser = self.denoiser, None

        def _predict(self, x_t, t, cond):
            return self.network(x_t, t, cond.tensors["emb"])

    with pytest.raises(CDIError, match="white-box"):
        denoiser_parameters(BlackBox())
    with pytest.raises(ValueError, match="adapter"):
        GSA1().columns()


# ------------------------------------------------------------- real tiny pipelines
@pytest.mark.parametrize("family", ["sd", "dit"])
def test_pfami_and_gsa_on_tiny_pipelines(tiny_adapters, family):
    adapter = tiny_adapters[family]
    gen = torch.Generator().manual_seed(0)
    size = adapter.resolution
    pixels = torch.rand((2, adapter.image_channels, size, size), generator=gen) * 2 - 1
    captions = ["a red square", "a blue circle"] if adapter.conditioning == "text" else [None, None]
    batch = EncodedBatch(x0=adapter.encode(pixels), hashes=["a" * 64, "b" * 64], captions=captions,
                         cond=adapter.conditions(captions), seed=0)
    batch.pixels = pixels
    flags = [p.requires_grad for p in adapter.denoiser.parameters()]
    gsa = GSA1(timesteps=(0, 500))
    values = gsa.extract(adapter, batch)
    assert values.shape == (2, len(gsa.columns(adapter))) == (2, len(flags))
    assert torch.isfinite(values).all() and (values.sum(dim=1) > 0).all()
    assert [p.requires_grad for p in adapter.denoiser.parameters()] == flags
    alone = gsa.extract(adapter, sub_batch(adapter, batch, [1]))
    torch.testing.assert_close(alone[0], values[1])
    pfami = PFAMI(neighbours=2, timesteps=(50, 300))
    change = pfami.extract(adapter, batch)
    assert change.shape == (2, 1) and torch.isfinite(change).all()
    torch.testing.assert_close(pfami.extract(adapter, sub_batch(adapter, batch, [1]))[0], change[1],
                               rtol=1e-4, atol=1e-5)
