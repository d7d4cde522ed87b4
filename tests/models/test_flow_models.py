"""Flow-matching adapters (SD3, FLUX.1 dev/schnell, Z-Image) on tiny saved pipelines, and the VP mapping.

The tiny pipelines (tests/conftest.py ``tiny_flow_dirs``) are built from
configs with random weights, saved with ``save_pretrained`` and loaded by
``load_model`` offline, the path a user's checkpoint takes.
"""

from __future__ import annotations

import copy
import hashlib
import math

import pytest
import torch

from cdi.utils.errors import CDIError
from cdi.models import load_model
from cdi.models.flow_matching import (
    FlowMatchingAdapter,
    abar_of_sigma,
    sd15_alphas_cumprod,
    sigma_of_abar,
    training_sigmas,
)

FLOW = ("sd3", "sd3_no_t5", "flux_dev", "flux_schnell", "zimage")
CAPTIONS = ["a red square", "a blue circle", "a cat"]
T = torch.tensor([0, 100, 999])


def _inputs(adapter, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.rand(3, 3, adapter.resolution, adapter.resolution, generator=gen) * 2 - 1
    x0 = adapter.encode(pixels)
    return pixels, x0, adapter.add_noise(x0, torch.randn(x0.shape, generator=gen), T)


# ---------------------------------------------------------- every family
@pytest.mark.parametrize("key", FLOW)
def test_flow_family_shapes_conditions_determinism(tiny_flow_adapters, key):
    adapter = tiny_flow_adapters[key]
    assert adapter.family == key.split("_")[0] and adapter.prediction_type == "flow_prediction"
    assert adapter.resolution == 16 and adapter.image_channels == 3 and adapter.num_train_timesteps == 1000
    assert adapter.conditioning == "text" and len(adapter.fingerprint) == 64
    abar = adapter.alphas_cumprod
    assert abar.dtype == torch.float32 and (abar[1:] < abar[:-1]).all() and abar[-1] == 0
    pixels, x0, x_t = _inputs(adapter)
    assert x0.shape == (3, 4, 8, 8) and torch.equal(x0, adapter.encode(pixels))
    cond, null = adapter.conditions(CAPTIONS), adapter.null_condition(3)
    eps = adapter.eps(x_t, T, cond)
    assert eps.shape == x0.shape and eps.dtype == torch.float32 and torch.isfinite(eps).all()
    assert torch.equal(eps, adapter.eps(x_t, T, cond))
    assert (eps - adapter.eps(x_t, T, null)).abs().amax(dim=(1, 2, 3))[:2].min() > 0
    # at t = 999 (s = 1) the velocity has weight 0: eps is x_t itself
    torch.testing.assert_close(eps[2], x_t[2])
    alone = torch.cat([adapter.eps(x_t[i:i + 1], T[i:i + 1], cond.index([i])) for i in range(3)])
    torch.testing.assert_close(alone, eps, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key", FLOW)
def test_flow_family_loads_identically_twice(tiny_flow_dirs, tiny_flow_adapters, key, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = load_model(str(tiny_flow_dirs[key]), device="cpu")
    first = tiny_flow_adapters[key]
    assert again.fingerprint == first.fingerprint
    _, _, x_t = _inputs(first)
    torch.testing.assert_close(again.eps(x_t, T, again.conditions(CAPTIONS)), first.eps(x_t, T, first.conditions(CAPTIONS)),
                               rtol=0, atol=0)


def _hand_velocity(adapter, key, x_s, s, cond):
    """The network's velocity at x_s, called as each pipeline's __call__ calls it."""
    from diffusers import FluxPipeline

    net, h = adapter.transformer, cond.tensors["encoder_hidden_states"]
    with torch.no_grad():
        if key.startswith("sd3"):
            return net(hidden_states=x_s, timestep=s * 1000, encoder_hidden_states=h,
                       pooled_projections=cond.tensors["pooled_projections"]).sample
        if key.startswith("flux"):
            packed = FluxPipeline._pack_latents(x_s, 3, 4, 8, 8)
            guidance = torch.ones(3) if key == "flux_dev" else None
            out = net(hidden_states=packed, timestep=s, guidance=guidance,
                      pooled_projections=cond.tensors["pooled_projections"], encoder_hidden_states=h,
                      txt_ids=torch.zeros(h.shape[1], 3), img_ids=FluxPipeline._prepare_latent_image_ids(3, 4, 4, "cpu",
                                                                                                     torch.float32)).sample
            return FluxPipeline._unpack_latents(out, 16, 16, 2)
        lengths = cond.tensors["caption_lengths"]
        out = net(list(x_s.unsqueeze(2).unbind(0)), 1 - s, [h[i, : lengths[i]] for i in range(3)],
                  return_dict=False)[0]
        return -torch.stack(out).squeeze(2)


def _hand_sigma(key, t):
    u = (t.double() + 1) / 1000
    if key.startswith("flux"):  # resolution-dependent: 16 px -> 8x8 latents -> 16 packed tokens
        m = (1.15 - 0.5) / (4096 - 256)
        mu = 16 * m + (0.5 - m * 256)
        return (math.exp(mu) / (math.exp(mu) + (1 / u - 1))).float()
    return (3 * u / (1 + 2 * u)).float()  # static shift 3.0


@pytest.mark.parametrize("key", FLOW)
def test_flow_eps_is_the_hand_conversion_of_the_velocity(tiny_flow_adapters, key):
    adapter = tiny_flow_adapters[key]
    _, _, x_t = _inputs(adapter)
    cond = adapter.conditions(CAPTIONS)
    s = _hand_sigma(key, T)
    torch.testing.assert_close(adapter.sigmas[T], s, rtol=5e-3, atol=0)  # re-derived from float32 abar
    s = adapter.sigmas[T]
    x_s = torch.sqrt((1 - s) ** 2 + s**2).view(-1, 1, 1, 1) * x_t
    v = _hand_velocity(adapter, key, x_s, s, cond)
    torch.testing.assert_close(adapter.eps(x_t, T, cond), x_s + (1 - s).view(-1, 1, 1, 1) * v,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", FLOW)
def test_flow_gradients_reach_the_input_only(tiny_flow_adapters, key):
    adapter = tiny_flow_adapters[key]
    _, _, x_t = _inputs(adapter)
    x_t = x_t.clone().requires_grad_()
    adapter.eps(x_t, T, adapter.conditions(CAPTIONS)).square().sum().backward()
    assert torch.isfinite(x_t.grad).all() and x_t.grad.abs().sum() > 0
    assert all(p.grad is None for p in adapter.denoiser.parameters())


@pytest.mark.parametrize("key", [k for k in FLOW if k != "sd3_no_t5"])  # one run per family
def test_every_feature_family_is_finite_on_flow_models(tiny_flow_adapters, key):
    from cdi.features.base import EncodedBatch
    from cdi.features.registry import FAMILIES

    adapter = tiny_flow_adapters[key]
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    captions = CAPTIONS[:2]
    hashes = [hashlib.sha256(f"image-{i}".encode()).hexdigest() for i in range(2)]
    batch = EncodedBatch(adapter.encode(pixels), hashes, captions, adapter.conditions(captions), 0, pixels=pixels)
    for name, cls in FAMILIES.items():
        family = cls()
        family.check_applicable(adapter)
        out = family.extract(adapter, batch)
        assert out.shape == (2, len(family.columns(adapter))) and torch.isfinite(out).all(), name


def test_sd3_without_t5_feeds_zeros_like_the_pipeline(tiny_flow_adapters):
    with_t5, without = tiny_flow_adapters["sd3"], tiny_flow_adapters["sd3_no_t5"]
    assert without.text_encoder_3 is None and with_t5.text_encoder_3 is not None
    assert with_t5.max_sequence_length == 32  # pipeline default 256, capped at the T5 tokenizer's 32
    hidden = without.conditions(["a cat"]).tensors["encoder_hidden_states"]
    assert hidden.shape == (1, 32 + 256, 32) and (hidden[:, 32:] == 0).all()


def test_flux_dev_feeds_the_guidance_scale(tiny_flow_adapters):
    dev, schnell = tiny_flow_adapters["flux_dev"], tiny_flow_adapters["flux_schnell"]
    assert dev.guidance_distilled and not schnell.guidance_distilled
    assert dev.describe()["guidance_scale"] == 1.0 and schnell.describe()["guidance_scale"] is None
    _, _, x_t = _inputs(dev)
    cond = dev.conditions(CAPTIONS)
    other = copy.copy(dev)
    other.guidance_scale = 3.5
    assert not torch.allclose(dev.eps(x_t, T, cond)[:2], other.eps(x_t, T, cond)[:2])


def test_captions_are_encoded_once_then_cached(tiny_flow_dirs):
    adapter = load_model(str(tiny_flow_dirs["sd3"]), device="cpu")
    calls = []
    original = adapter.pipeline.encode_prompt
    adapter.pipeline.encode_prompt = lambda prompts, **kw: calls.append(list(prompts)) or original(prompts, **kw)
    adapter.prepare_captions(["a cat", "a dog", "a cat", None])
    assert calls == [["", "a cat", "a dog"]]
    first = adapter.conditions(["a dog", "a cat"])
    adapter.conditions(["a cat", None])
    assert len(calls) == 1  # cache hits
    adapter.conditions(["a bird"])
    assert calls[-1] == ["a bird"]
    # the cached condition equals a fresh encoding
    fresh = load_model(str(tiny_flow_dirs["sd3"]), device="cpu").conditions(["a dog", "a cat"])
    for name in first.tensors:
        torch.testing.assert_close(first.tensors[name], fresh.tensors[name], rtol=0, atol=0)


# --------------------------------------------------------- the VP mapping
def test_training_sigmas_follow_the_scheduler():
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    static = FlowMatchEulerDiscreteScheduler(shift=3.0)
    torch.testing.assert_close(training_sigmas(static), static.sigmas.flip(0).float(), rtol=1e-6, atol=1e-7)
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(CDIError, match="mu"):
        training_sigmas(dynamic)
    u = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    dynamic.set_timesteps(sigmas=u.numpy(), mu=0.8)
    torch.testing.assert_close(training_sigmas(dynamic, 0.8), dynamic.sigmas[:-1].flip(0).float(),
                               rtol=1e-6, atol=1e-7)
    s = torch.linspace(0.01, 0.99, 50)
    torch.testing.assert_close(sigma_of_abar(abar_of_sigma(s)), s, rtol=0, atol=5e-6)  # float32 abar
    sd15 = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    torch.testing.assert_close(sd15_alphas_cumprod(), sd15.float())
    # SD3's shift 3.0 at t = 100 is close to SD 1.5's noise level there (abar 0.898 vs 0.894)
    assert abar_of_sigma(training_sigmas(static))[100].item() == pytest.approx(0.898, abs=1e-3)
    assert sd15_alphas_cumprod()[100].item() == pytest.approx(0.894, abs=1e-3)


class GaussianFlow(FlowMatchingAdapter):
    """A flow model whose velocity is the exact optimum for x0 ~ N(mu, sd^2 I).

    x_s = (1 - s) x0 + s eps is Gaussian, so E[v | x_s] with v = eps - x0 is linear:
    -mu + (s - (1 - s) sd^2) / ((1 - s)^2 sd^2 + s^2) * (x_s - (1 - s) mu).
    """

    family = "gaussian"
    conditioning = "none"

    def __init__(self, scheduler, mu_data, sd, grid="model", mu=None):
        self.mu_data, self.sd = mu_data, sd
        super().__init__(scheduler=scheduler, resolution=4, image_channels=2, mu=mu, grid=grid, model_id="gaussian",
                         revision=None, fingerprint="", device="cpu", dtype=torch.float64)

    def _velocity(self, x_s, s, cond):
        s = s.view(-1, 1, 1, 1).double()
        gain = (s - (1 - s) * self.sd**2) / ((1 - s) ** 2 * self.sd**2 + s**2)
        return -self.mu_data + gain * (x_s - (1 - s) * self.mu_data)


@pytest.mark.parametrize("grid, dynamic", [("model", False), ("model", True), ("sd15", False)])
def test_adapter_eps_is_the_analytic_eps_of_a_gaussian(grid, dynamic):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from cdi.models.base import Condition

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=dynamic)
    mu_data = torch.tensor([0.7, -1.2]).view(1, 2, 1, 1).double()
    adapter = GaussianFlow(scheduler, mu_data, sd=0.5, grid=grid, mu=0.9 if dynamic else None)
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 50, 100, 250, 500, 750, 900, 998, 999])
    x0 = mu_data + 0.5 * torch.randn(len(t), 2, 4, 4, generator=gen, dtype=torch.float64)
    x_t = adapter.add_noise(x0.float(), torch.randn(x0.shape, generator=gen).float(), t).double()
    got = adapter.eps(x_t, t, Condition(len(t)))
    # E[eps | x_t] for x_t = sqrt(a) x0 + sqrt(1 - a) eps, x0 ~ N(mu, sd^2): linear regression on x_t
    a = adapter.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    want = (1 - a).sqrt() / (a * 0.25 + 1 - a) * (x_t - a.sqrt() * mu_data)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    if grid == "sd15":
        torch.testing.assert_close(adapter.alphas_cumprod, sd15_alphas_cumprod())


def test_unknown_grid_and_wrong_scheduler_are_user_errors():
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    with pytest.raises(CDIError, match="grid"):
        GaussianFlow(FlowMatchEulerDiscreteScheduler(), torch.zeros(1), 1.0, grid="karras")
    with pytest.raises(CDIError, match="FlowMatchEulerDiscreteScheduler"):
        GaussianFlow(DDPMScheduler(), torch.zeros(1), 1.0)


def test_gated_alias_without_a_token_says_what_to_do(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(CDIError, match=r"gated: accept its licence on https://huggingface.co/black-forest-labs/FLUX"
                                       r".*hf auth login.*no Hugging Face token"):
        load_model("flux-dev", device="cpu", local_files_only=False)


@pytest.mark.parametrize("key", ["sd3", "zimage"])
def test_timestep_reaches_a_bfloat16_transformer_in_float32(tiny_flow_dirs, key):
    """As the diffusers pipelines pass it: a bfloat16 cast would round Z-Image's 1 - s to steps of 0.004."""
    adapter = load_model(str(tiny_flow_dirs[key]), device="cpu", dtype="bfloat16")
    seen = []
    hook = adapter.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep"] if "timestep" in kwargs else args[1]),
        with_kwargs=True)
    try:
        x_t = torch.randn(2, adapter.transformer.config.in_channels, 4, 4, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([0, 37])
        adapter.eps(x_t, t, adapter.conditions(["a cat", "a dog"]))
    finally:
        hook.remove()
    s = adapter.sigmas[t]
    expected = 1000 * s if key == "sd3" else 1 - s
    assert seen[0].dtype == torch.float32
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)
    assert not torch.equal(expected.to(torch.bfloat16).float(), expected)  # the test can tell the cast apart


def test_clid_reduced_captions_are_encoded_before_the_first_batch(tiny_flow_dirs, tmp_path):
    """The text encoders run in prepare_captions only: the images' captions and CLiD's reduced ones."""
    import numpy as np
    from PIL import Image

    from cdi.data.collection import ImageCollection
    from cdi.features.extract import extract_features
    from cdi.features.registry import resolve_features

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
        (tmp_path / f"im{i}.txt").write_text(f"a small red square number {i}")
    adapter = load_model(str(tiny_flow_dirs["sd3"]), device="cpu")
    calls, phase = [], ["prepare"]
    original_prepare, original_encode = adapter.prepare_captions, adapter.pipeline.encode_prompt
    adapter.pipeline.encode_prompt = lambda prompts, **kw: calls.append((phase[0], len(prompts))) or \
        original_encode(prompts, **kw)

    def prepare(captions, **kw):
        phase[0] = "prepare"
        original_prepare(captions, **kw)
        phase[0] = "extract"

    adapter.prepare_captions = prepare
    table = extract_features(adapter, ImageCollection.from_folder(tmp_path), resolve_features("clid"), seed=0,
                             batch_size=2, progress=False)
    assert table.values.shape[0] == 3 and np.isfinite(table.values).all()
    assert calls and all(when == "prepare" for when, _ in calls), calls
    # 3 captions + 3 x 3 reduced ones + the null caption, encoded in batches of 16
    assert sum(n for _, n in calls) <= 13


def test_guidance_and_timestep_grid_options_reach_the_adapter(tiny_flow_dirs, tiny_model_dirs):
    from cdi.cli.options import LoaderOptions
    from cdi.models.loading import flow_options

    options = LoaderOptions(guidance=3.5, timestep_grid="sd15").loading_options()
    assert options["guidance_scale"] == 3.5 and options["timestep_grid"] == "sd15"
    dev = load_model(str(tiny_flow_dirs["flux_dev"]), device="cpu", guidance_scale=3.5, timestep_grid="sd15")
    assert dev.describe()["guidance_scale"] == 3.5 and dev.describe()["timestep_grid"] == "sd15"
    with pytest.raises(CDIError, match="--guidance applies to guidance-distilled models"):
        load_model(str(tiny_flow_dirs["flux_schnell"]), device="cpu", guidance_scale=3.5)
    with pytest.raises(CDIError, match="--timestep-grid applies to flow-matching models"):
        load_model(str(tiny_model_dirs["sd"]), device="cpu", timestep_grid="sd15")
    for bad in ({"guidance": float("nan"), "timestep_grid": None}, {"guidance": None, "timestep_grid": "sd3"}):
        with pytest.raises(CDIError):
            flow_options(**bad)


def test_gradient_checkpointing_changes_no_gradient(tiny_flow_dirs):
    """What load_model turns on for flow transformers on CUDA, checked on the CPU: the same input gradients."""
    from cdi.models.loading import checkpoints_gradients

    assert checkpoints_gradients("flux", "cuda") and not checkpoints_gradients("flux", "cpu")
    assert not checkpoints_gradients("sd", "cuda")
    grads = []
    for checkpointing in (False, True):
        adapter = load_model(str(tiny_flow_dirs["flux_dev"]), device="cpu")
        if checkpointing:
            adapter.transformer.enable_gradient_checkpointing()
        _, _, x_t = _inputs(adapter)
        x_t = x_t.clone().requires_grad_(True)
        adapter.eps(x_t, T, adapter.conditions(CAPTIONS)).pow(2).sum().backward()
        grads.append(x_t.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_caption_cache_keeps_captions_past_its_limit_on_disk(tiny_flow_dirs):
    from cdi.models.flow_matching import CaptionCache

    adapter = load_model(str(tiny_flow_dirs["sd3"]), device="cpu")
    reference = adapter.conditions(CAPTIONS)
    small = load_model(str(tiny_flow_dirs["sd3"]), device="cpu")
    small._caption_cache = CaptionCache(max_bytes=1)  # nothing fits in memory: every caption goes to disk
    spilled = small.conditions(CAPTIONS)
    assert small._caption_cache.bytes_in_memory == 0 and len(small._caption_cache) == len(CAPTIONS)
    for name in reference.tensors:
        torch.testing.assert_close(spilled.tensors[name], reference.tensors[name], rtol=0, atol=0)
