"""Model loading and the five family adapters, on tiny saved pipelines (tests/conftest.py)."""

from __future__ import annotations

import copy
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch

from cdi.utils.errors import CDIError
from cdi.models import Condition, fingerprint_weights, load_model, resolve_device, resolve_dtype

FAMILIES = ("sd", "sd_v", "sdxl", "ldm", "dit", "ddpm", "ddpm_uncond")
CAPTIONS = {
    "sd": ["a red square", "a blue circle", "a cat"],
    "sd_v": ["a red square", "a blue circle", "a cat"],
    "sdxl": ["a red square", "a blue circle", "a cat"],
    "dit": ["3", "two", "Digit Five"],
    "ddpm": ["a handwritten digit one", "7", "A Handwritten Digit Nine"],
    "ldm": [None, None, None],
    "ddpm_uncond": [None, None, None],
}
# (channels, size) of x0 for 16 px inputs: 8x8 latents for latent models, pixels for DDPM.
X0_SHAPE = {"sd": (4, 8), "sd_v": (4, 8), "sdxl": (4, 8), "ldm": (3, 8), "dit": (4, 8), "ddpm": (3, 16),
            "ddpm_uncond": (3, 16)}
CONDITIONAL = {"sd", "sd_v", "sdxl", "dit", "ddpm"}
T = torch.tensor([0, 500, 999])


def _inputs(adapter, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.rand(3, adapter.image_channels, adapter.resolution, adapter.resolution, generator=gen) * 2 - 1
    x0 = adapter.encode(pixels)
    noise = torch.randn(x0.shape, generator=gen)
    return pixels, x0, adapter.add_noise(x0, noise, T)


def _copy(folder: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def _equal(a: Condition, b: Condition) -> bool:
    return len(a) == len(b) and a.tensors.keys() == b.tensors.keys() and all(
        torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors
    )


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ----------------------------------------------------------- every family
@pytest.mark.parametrize("family", FAMILIES)
def test_family_encode_condition_predict(tiny_adapters, family):
    adapter = tiny_adapters[family]
    channels, size = X0_SHAPE[family]
    assert adapter.resolution == 16 and adapter.image_channels == 3
    assert adapter.alphas_cumprod.dtype == torch.float32 and adapter.num_train_timesteps == 1000
    assert adapter.is_conditional == (family in CONDITIONAL)
    assert adapter.describe()["family"] == family.split("_")[0] and len(adapter.fingerprint) == 64

    pixels, x0, x_t = _inputs(adapter)
    assert x0.shape == (3, channels, size, size) and x0.dtype == torch.float32
    assert torch.equal(x0, adapter.encode(pixels))  # deterministic: posterior mean, not a sample
    if family.startswith("ddpm"):
        assert torch.equal(x0, pixels)

    cond = adapter.conditions(CAPTIONS[family])
    null = adapter.null_condition(3)
    assert len(cond) == 3 and len(null) == 3
    assert _equal(null, adapter.conditions([None] * 3))
    eps = adapter.eps(x_t, T, cond)
    assert eps.shape == x0.shape and eps.dtype == torch.float32 and torch.isfinite(eps).all()
    assert torch.equal(eps, adapter.eps(x_t, T, cond))  # same call twice = identical
    eps_null = adapter.eps(x_t, T, null)
    if family in CONDITIONAL:
        assert not _equal(cond, null)
        assert (eps - eps_null).abs().amax(dim=(1, 2, 3)).min() > 0  # every sample's condition matters
    else:
        assert cond.tensors == {} and torch.equal(eps, eps_null)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_flow_to_the_input(tiny_adapters, family):
    adapter = tiny_adapters[family]
    _, _, x_t = _inputs(adapter)
    x_t = x_t.clone().requires_grad_()
    adapter.eps(x_t, T, adapter.conditions(CAPTIONS[family])).square().sum().backward()
    assert torch.isfinite(x_t.grad).all() and x_t.grad.abs().sum() > 0
    assert all(p.grad is None for p in adapter.denoiser.parameters())  # frozen weights


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_composition_does_not_change_a_sample(tiny_adapters, family):
    adapter = tiny_adapters[family]
    _, _, x_t = _inputs(adapter)
    cond = adapter.conditions(CAPTIONS[family])
    together = adapter.eps(x_t, T, cond)
    alone = torch.cat([adapter.eps(x_t[i:i + 1], T[i:i + 1], cond.index([i])) for i in range(3)])
    torch.testing.assert_close(alone, together, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------ prediction types
def test_v_prediction_converted_to_eps(tiny_adapters):
    adapter = tiny_adapters["sd_v"]
    assert adapter.prediction_type == "v_prediction"
    _, _, x_t = _inputs(adapter)
    cond = adapter.conditions(CAPTIONS["sd_v"])
    with torch.no_grad():
        v = adapter.unet(x_t, T, encoder_hidden_states=cond.tensors["encoder_hidden_states"]).sample
    abar = adapter.alphas_cumprod[T].view(-1, 1, 1, 1)
    torch.testing.assert_close(adapter.eps(x_t, T, cond), abar.sqrt() * v + (1 - abar).sqrt() * x_t)


def test_sample_prediction_converted_to_eps(tiny_adapters):
    adapter = copy.copy(tiny_adapters["sd"])
    adapter.prediction_type = "sample"
    _, _, x_t = _inputs(adapter)
    cond = adapter.conditions(CAPTIONS["sd"])
    with torch.no_grad():
        x0_hat = adapter.unet(x_t, T, encoder_hidden_states=cond.tensors["encoder_hidden_states"]).sample
    abar = adapter.alphas_cumprod[T].view(-1, 1, 1, 1)
    torch.testing.assert_close(adapter.eps(x_t, T, cond), (x_t - abar.sqrt() * x0_hat) / (1 - abar).sqrt())


def test_dit_drops_the_variance_channels(tiny_adapters):
    adapter = tiny_adapters["dit"]
    assert adapter.learned_variance
    _, x0, x_t = _inputs(adapter)
    cond = adapter.conditions(CAPTIONS["dit"])
    with torch.no_grad():
        raw = adapter.transformer(x_t, timestep=T, class_labels=cond.tensors["class_labels"]).sample
    assert raw.shape[1] == 2 * x0.shape[1]
    torch.testing.assert_close(adapter.eps(x_t, T, cond), raw[:, : x0.shape[1]])


# ---------------------------------------------- agreement with diffusers
def test_tiny_sd_loads_in_diffusers_and_matches_its_prompt_encoding(tiny_model_dirs, tiny_adapters):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_model_dirs["sd"])
    assert isinstance(pipe, StableDiffusionPipeline)
    adapter = tiny_adapters["sd"]
    prompts = CAPTIONS["sd"]
    embeds, negative = pipe.encode_prompt(prompts, "cpu", 1, True)
    torch.testing.assert_close(adapter.conditions(prompts).tensors["encoder_hidden_states"], embeds)
    torch.testing.assert_close(adapter.null_condition(3).tensors["encoder_hidden_states"], negative)
    _, x0, x_t = _inputs(adapter)
    with torch.no_grad():
        expected = pipe.unet(x_t, T, encoder_hidden_states=embeds).sample
    torch.testing.assert_close(adapter.eps(x_t, T, adapter.conditions(prompts)), expected)
    pixels = torch.zeros(1, 3, 16, 16)
    torch.testing.assert_close(
        adapter.encode(pixels), pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    )


def test_sdxl_conditions_match_the_pipeline(tiny_model_dirs, tiny_adapters):
    from diffusers import StableDiffusionXLPipeline

    from cdi.models.sdxl import StableDiffusionXLAdapter

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dirs["sdxl"])
    adapter = tiny_adapters["sdxl"]
    prompts = CAPTIONS["sdxl"]
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, device="cpu")
    cond, null = adapter.conditions(prompts), adapter.null_condition(3)
    torch.testing.assert_close(cond.tensors["encoder_hidden_states"], embeds)
    torch.testing.assert_close(cond.tensors["text_embeds"], pooled)
    # force_zeros_for_empty_prompt (the default): the pipeline's unconditional input is zeros
    assert pipe.config.force_zeros_for_empty_prompt and not negative.any() and not negative_pooled.any()
    torch.testing.assert_close(null.tensors["encoder_hidden_states"], negative)
    torch.testing.assert_close(null.tensors["text_embeds"], negative_pooled)
    time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32, text_encoder_projection_dim=32)
    torch.testing.assert_close(cond.tensors["time_ids"], time_ids.expand(3, -1))
    torch.testing.assert_close(null.tensors["time_ids"], time_ids.expand(3, -1))

    # without force_zeros the null condition is the empty prompt's embedding
    modules = {name: getattr(adapter, name) for name in StableDiffusionXLAdapter.components}
    plain = StableDiffusionXLAdapter(**modules, force_zeros_for_empty_prompt=False, model_id="no-zeros")
    _, negative, _, negative_pooled = pipe.encode_prompt(prompts, device="cpu", negative_prompt=[""] * 3)
    null = plain.null_condition(3)
    assert negative.any()
    torch.testing.assert_close(null.tensors["encoder_hidden_states"], negative)
    torch.testing.assert_close(null.tensors["text_embeds"], negative_pooled)


# ------------------------------------------------------------ class ids
def test_dit_class_ids(tiny_adapters):
    from cdi.models.dit import DiTAdapter

    adapter = tiny_adapters["dit"]
    assert adapter.null_class_id == adapter.num_classes == 10
    assert [adapter.class_id(c) for c in ["3", "two", " Digit Five ", "one, digit one, class 1 thing", None]] == [
        3, 2, 5, 1, 10]
    with pytest.raises(CDIError, match="'a zebra' names no class"):
        adapter.class_id("a zebra")
    with pytest.raises(CDIError, match="out of range"):
        adapter.class_id("10")
    modules = {name: getattr(adapter, name) for name in DiTAdapter.components}
    cranes = DiTAdapter(**modules, id2label={0: "crane", 1: "crane, lifting machine"}, model_id="cranes")
    assert cranes.class_id("lifting machine") == 1
    with pytest.raises(CDIError, match="ambiguous"):
        cranes.class_id("Crane")


def test_ddpm_class_ids(tiny_adapters):
    adapter = tiny_adapters["ddpm"]
    assert adapter.null_class_id == 10
    assert [adapter.class_id(c) for c in ["A handwritten digit SEVEN", "4", None]] == [7, 4, 10]
    with pytest.raises(CDIError, match=r"'a photo of a dog'.*'a handwritten digit zero'"):
        adapter.class_id("a photo of a dog")
    with pytest.raises(CDIError, match="not class-conditional"):
        tiny_adapters["ddpm_uncond"].class_id("1")


def test_class_conditional_ddpm_needs_labels_json(tiny_model_dirs, tmp_path):
    folder = _copy(tiny_model_dirs["ddpm"], tmp_path)
    (folder / "labels.json").unlink()
    with pytest.raises(CDIError, match="labels.json"):
        load_model(str(folder), device="cpu")


# ----------------------------------------------------------- conditions
def test_condition_repeat_index_cat_round_trip(tiny_adapters):
    cond = tiny_adapters["sdxl"].conditions(CAPTIONS["sdxl"])
    tiled = cond.repeat(2)  # a b c a b c
    assert _equal(tiled.index([3, 4, 5]), cond) and _equal(tiled.index(slice(0, 3)), cond)
    interleaved = cond.repeat_interleave(2)  # a a b b c c
    assert _equal(interleaved.index([0, 2, 4]), cond) and _equal(interleaved.index([1, 3, 5]), cond)
    assert _equal(Condition.cat([cond.index([0]), cond.index(torch.tensor([1, 2]))]), cond)
    assert _equal(Condition.cat([cond, cond]), tiled)
    assert _equal(cond.index(torch.tensor([False, True, True])), cond.index([1, 2]))  # a mask, not ids 0/1
    empty = Condition(3)
    assert len(empty.repeat(2)) == 6 and len(Condition.cat([empty, empty.index([0])])) == 4


# ------------------------------------------------------ dtype and device
def test_bfloat16_on_cpu_returns_float32(tiny_model_dirs, tiny_adapters):
    adapter = load_model(str(tiny_model_dirs["sd"]), device="cpu", dtype="bf16")
    assert adapter.dtype == torch.bfloat16 and adapter.describe()["dtype"] == "bfloat16"
    assert next(adapter.unet.parameters()).dtype == torch.bfloat16
    assert next(adapter.text_encoder.parameters()).dtype == torch.bfloat16
    assert next(adapter.vae.parameters()).dtype == torch.float32  # the autoencoder stays in float32
    reference = tiny_adapters["sd"]
    _, x0, x_t = _inputs(reference)
    assert torch.equal(adapter.encode(torch.zeros(1, 3, 16, 16)), reference.encode(torch.zeros(1, 3, 16, 16)))
    eps = adapter.eps(x_t, T, adapter.conditions(CAPTIONS["sd"]))
    expected = reference.eps(x_t, T, reference.conditions(CAPTIONS["sd"]))
    assert eps.dtype == torch.float32
    assert (eps - expected).norm() / expected.norm() < 0.05


def test_float16_on_cpu_is_refused(tiny_model_dirs):
    with pytest.raises(CDIError, match="float32 or bfloat16"):
        load_model(str(tiny_model_dirs["ddpm"]), device="cpu", dtype="fp16")


def test_compile_wraps_the_denoiser_in_place(tiny_model_dirs, tiny_adapters, monkeypatch):
    """``compile=True`` compiles the same module (parameters, fingerprint unchanged; nothing is run here:
    compiling takes minutes on a CPU), and without a C++ compiler on the CPU it is refused up front."""
    adapter = load_model(str(tiny_model_dirs["ddpm"]), device="cpu", compile=True)
    assert adapter.compiled and adapter.describe()["compiled"] is True
    assert adapter.denoiser is adapter.unet and adapter.unet._compiled_call_impl is not None
    assert adapter.fingerprint == tiny_adapters["ddpm"].fingerprint
    assert tiny_adapters["ddpm"].describe()["compiled"] is False
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(CDIError, match="C\\+\\+ compiler"):
        load_model(str(tiny_model_dirs["ddpm"]), device="cpu", compile=True)


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(CDIError, match="CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(CDIError, match="unknown device"):
        resolve_device("gpu please")
    assert resolve_dtype("fp32", "cpu") == torch.float32 and resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    with pytest.raises(CDIError, match="unknown dtype"):
        resolve_dtype("int8", "cpu")


# --------------------------------------------------------------- the hub
def test_alias_offline_not_cached_is_one_clear_error(monkeypatch, tmp_path, no_network):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CDIError) as info:
        load_model("sd15", device="cpu")
    message = str(info.value)
    assert "'stable-diffusion-v1-5/stable-diffusion-v1-5' is not in the local Hugging Face cache" in message
    assert "HF_HUB_OFFLINE" in message
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in message and "local pipeline folder" in message
    with pytest.raises(CDIError, match="'nobody/no-such-model-4f2a' is not in the local Hugging Face cache"):
        load_model("nobody/no-such-model-4f2a", device="cpu")


def test_bad_names(tmp_path):
    with pytest.raises(CDIError, match="neither a local folder, a model alias nor a Hugging Face hub id"):
        load_model("no such thing", device="cpu")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(CDIError, match="cannot read the checkpoint"):  # a single-file checkpoint, corrupt
        load_model(str(weights), device="cpu")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CDIError, match="not a checkpoint"):
        load_model(str(tmp_path / "notes.txt"), device="cpu")
    with pytest.raises(CDIError, match="no model_index.json"):
        load_model(str(tmp_path), device="cpu")


def _fake_cache(cache: Path, repo_id: str, source: Path, commit: str = "ab" * 20) -> Path:
    """A Hugging Face cache entry for ``repo_id`` whose main snapshot is a copy of ``source``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_hub_id_from_the_local_cache(monkeypatch, tmp_path, tiny_model_dirs, tiny_adapters, no_network):
    import huggingface_hub
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    _fake_cache(cache, "tiny-org/tiny-ddpm", tiny_model_dirs["ddpm"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    calls = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    adapter = load_model("tiny-org/tiny-ddpm", device="cpu")  # online allowed, but everything is cached
    assert all(call["local_files_only"] for call in calls)
    assert adapter.model_id == "tiny-org/tiny-ddpm" and adapter.revision == "ab" * 20
    assert adapter.fingerprint == tiny_adapters["ddpm"].fingerprint  # same files, same fingerprint
    assert "unet/diffusion_pytorch_model.safetensors" in adapter.files and "labels.json" in adapter.files


def test_download_asks_only_for_the_needed_files(monkeypatch, tmp_path, tiny_model_dirs):
    """Not cached and online: snapshot_download is asked for configs, tokenizers and safetensors of the
    adapter's components, nothing else (no safety checker, no pickles, no other variants)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    remote = _copy(tiny_model_dirs["sd"], tmp_path, "remote")
    for extra in ["safety_checker/model.safetensors", "unet/diffusion_pytorch_model.bin",
                  "unet/diffusion_pytorch_model.non_ema.safetensors", "text_encoder/pytorch_model.bin"]:
        (remote / extra).parent.mkdir(exist_ok=True)
        (remote / extra).write_bytes(b"not needed")
    snapshot = tmp_path / "snapshot"
    requested: list[list[str]] = []

    def fake_snapshot_download(repo_id, *, revision=None, allow_patterns=None, local_files_only=False, cache_dir=None, token=None):
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        requested.append(allow_patterns)
        files = [p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()]
        for rel in filter_repo_objects(files, allow_patterns=allow_patterns):
            (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(remote / rel, snapshot / rel)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    adapter = load_model("some-org/tiny-sd", device="cpu")
    fetched = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
    assert requested[0] == ["model_index.json"]
    assert not any(f.startswith("safety_checker") or f.endswith(".bin") or "non_ema" in f for f in fetched)
    assert {"unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
            "tokenizer/vocab.json", "scheduler/scheduler_config.json"} <= fetched
    assert set(adapter.files) <= fetched and adapter.revision == "snapshot"


# ------------------------------------------------------------- weights
def test_pickle_only_weights_need_allow_pickle(tiny_model_dirs, tiny_adapters, tmp_path):
    from safetensors.torch import load_file

    folder = _copy(tiny_model_dirs["ddpm_uncond"], tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(CDIError, match=r"'unet' has only pickle weights \(.bin\).*--allow-pickle"):
        load_model(str(folder), device="cpu")
    adapter = load_model(str(folder), device="cpu", allow_pickle=True)
    assert "unet/diffusion_pytorch_model.bin" in adapter.files
    reference = tiny_adapters["ddpm_uncond"]
    _, x0, x_t = _inputs(reference)
    torch.testing.assert_close(adapter.eps(x_t, T, adapter.null_condition(3)),
                               reference.eps(x_t, T, reference.null_condition(3)))


def test_variant_weights(tiny_model_dirs, tmp_path):
    folder = _copy(tiny_model_dirs["ddpm_uncond"], tmp_path)
    unet = folder / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(CDIError, match="only for the variant.*--variant fp16"):
        load_model(str(folder), device="cpu")
    with pytest.raises(CDIError, match="no weights for variant 'ema'"):
        load_model(str(folder), device="cpu", variant="ema")
    adapter = load_model(str(folder), device="cpu", variant="fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in adapter.files


def test_unknown_pipeline_class(tiny_model_dirs, tmp_path):
    folder = _copy(tiny_model_dirs["ddpm_uncond"], tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "QwenImagePipeline"}))
    with pytest.raises(CDIError, match="QwenImagePipeline, which cdi does not support.*StableDiffusionXLPipeline"):
        load_model(str(folder), device="cpu")


def test_fingerprint(tiny_model_dirs, tiny_adapters, tmp_path):
    folder = _copy(tiny_model_dirs["ddpm_uncond"], tmp_path)
    files = [folder / "unet" / "diffusion_pytorch_model.safetensors", folder / "unet" / "config.json"]
    first = fingerprint_weights(folder, files)
    assert first == fingerprint_weights(folder, files[::-1])  # order does not matter
    assert first == fingerprint_weights(folder, [f.relative_to(folder) for f in files])
    assert load_model(str(folder), device="cpu").fingerprint == tiny_adapters["ddpm_uncond"].fingerprint
    data = bytearray(files[0].read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    files[0].write_bytes(bytes(data))
    assert fingerprint_weights(folder, files) != first
    assert load_model(str(folder), device="cpu").fingerprint != tiny_adapters["ddpm_uncond"].fingerprint
    assert fingerprint_weights(folder, files[:1]) != fingerprint_weights(folder, files)


def test_ldm_latent_scale_from_the_config_file(tiny_model_dirs, tiny_adapters, tmp_path):
    adapter = tiny_adapters["ldm"]
    assert adapter.latent_scale == pytest.approx(0.18215)  # written by save_pretrained
    folder = _copy(tiny_model_dirs["ldm"], tmp_path)
    config_path = folder / "vqvae" / "config.json"
    config = json.loads(config_path.read_text())
    del config["scaling_factor"]  # as in CompVis/ldm-celebahq-256, trained with scale 1.0
    config_path.write_text(json.dumps(config))
    unscaled = load_model(str(folder), device="cpu")
    assert unscaled.latent_scale == 1.0
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(adapter.encode(pixels), unscaled.encode(pixels) * 0.18215)
    with torch.no_grad():
        assert torch.equal(unscaled.encode(pixels), unscaled.vqvae.encode(pixels).latents)


def test_corrupt_weights_are_one_clear_error(tiny_model_dirs, tmp_path):
    folder = _copy(tiny_model_dirs["ddpm_uncond"], tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CDIError, match="cannot load the 'unet'.*fetch them again"):
        load_model(str(folder), device="cpu")


def test_single_model_pipeline_with_files_at_the_root(tiny_model_dirs, tiny_adapters, tmp_path):
    """google/ddpm-cifar10-32 keeps config, weights and scheduler config at the root; diffusers loads that."""
    folder = _copy(tiny_model_dirs["ddpm_uncond"], tmp_path)
    for component in ("unet", "scheduler"):
        for path in (folder / component).iterdir():
            path.rename(folder / path.name)
        (folder / component).rmdir()
    adapter = load_model(str(folder), device="cpu")
    assert "diffusion_pytorch_model.safetensors" in adapter.files and "scheduler_config.json" in adapter.files
    reference = tiny_adapters["ddpm_uncond"]
    _, _, x_t = _inputs(reference)
    torch.testing.assert_close(adapter.eps(x_t, T, adapter.null_condition(3)),
                               reference.eps(x_t, T, reference.null_condition(3)))


def test_distilled_models_are_named_as_such(tiny_model_dirs, tmp_path):
    """Aliases, known hub ids, and a checkpoint whose name marks it: the audit record, `cdi models`, the report."""
    import copy
    import json
    import shutil

    from typer.testing import CliRunner

    from cdi.cli.main import app
    from cdi.models import load_model
    from cdi.models.registry import distillation, distillation_text

    assert distillation("flux-schnell")["how"].startswith("latent adversarial")
    assert distillation("sd35-large-turbo")["base"] == "sd35-large"
    assert distillation("z-image-turbo") is not None and distillation("stabilityai/sdxl-turbo")["base"] == "sdxl"
    assert distillation("ByteDance/SDXL-Lightning") is not None
    assert distillation("sd15") is None and distillation("flux-dev") is None
    assert "audit its base model (sd35-large)" in distillation_text(distillation("sd35-large-turbo"))
    folder = tmp_path / "my-sd-lcm"
    shutil.copytree(tiny_model_dirs["sd"], folder)
    adapter = load_model(str(folder), device="cpu")
    assert adapter.describe()["distilled"]["how"] == "its name says 'lcm'"
    assert "distilled" not in load_model(str(tiny_model_dirs["sd"]), device="cpu").describe()
    listed = json.loads(CliRunner().invoke(app, ["models", "--format", "json"]).stdout)
    schnell = next(a for a in listed["aliases"] if a["alias"] == "flux-schnell")
    assert schnell["distilled"] and next(a for a in listed["aliases"] if a["alias"] == "sd15")["distilled"] is None

    from reports.html import render_report
    from test_report import make_example_result

    result = copy.deepcopy(make_example_result(40, 40, seed=0))
    result.model["distilled"] = distillation("sd35-large-turbo")
    assert 'id="distilled"' in render_report(result) and "sd35-large" in render_report(result)


def test_default_dtype_is_the_release_dtype_on_cuda_only():
    import torch

    from cdi.models.loading import ray_dtype, resolve_dtype_for

    assert resolve_dtype_for("default", "cuda", "flux") == torch.bfloat16
    assert resolve_dtype_for("default", "cuda", "sd") == torch.float32
    assert resolve_dtype_for("default", "cpu", "flux") == torch.float32
    assert resolve_dtype_for("float32", "cuda", "flux") == torch.float32  # --dtype float32 still possible
    # a --ray driver's CPU copy loads what the GPU workers load
    assert ray_dtype("default", "auto") == "release" and ray_dtype("default", "cpu") == "default"
    assert resolve_dtype_for("release", "cpu", "zimage") == torch.bfloat16
