"""Memory planning: the device and host memory an audit needs, computed before any weight is loaded.

A plan states, for a model (its configs), a compute dtype, a device and a
feature set:

* **weights**: the parameter count of every component, times its bytes per
  parameter (the compute dtype; the autoencoder stays float32, as
  ``load_model`` keeps it). Counted exactly by building each component from
  its config on PyTorch's ``meta`` device (shapes only, no memory, no
  download).
* **activations**: the largest memory the network calls of the feature set
  hold at once, per sample, measured by *tracing* them on the meta device: a
  forward of the denoiser at the model's native resolution (one sample),
  with, for the families that back-propagate to their input (noise
  optimisation, gradient masking, GSA), the backward as well. Every tensor an
  operation creates is counted from its creation until Python frees it
  (``_LiveBytes``), so the peak includes what autograd saves for the
  backward and the transients of each layer. Attention is counted as the
  fused kernels PyTorch uses on CUDA and CPU compute it (output and
  log-sum-exp saved, no L x L matrix; ``_FusedAttention``); on the meta
  device PyTorch would otherwise take the unfused path. The autoencoder's
  encoder (float32, one image) and each text encoder (one batch of
  ``TEXT_BATCH`` captions, no gradients) are traced the same way.
* **phases**: on CUDA the text encoders encode every caption first and then
  leave the device (``FlowMatchingAdapter.prepare_captions``), so the device
  peak is the larger of the caption phase (text encoders + their
  activations) and the denoising phase (denoiser + autoencoder + the larger
  of the autoencoder's and the feature set's activations times the batch),
  plus ``CUDA_OVERHEAD`` (context, cuBLAS workspaces, allocator slack: what
  ``torch.cuda.max_memory_allocated`` does not see). Off CUDA every
  component stays in host memory the whole time.
* **caption cache**: the text embeddings kept per caption (in host memory
  up to ``CAPTION_CACHE_BYTES``, then on disk: ``CaptionCache``)
  (sequence length x width in the compute dtype), times the captions of an
  audit (each image's caption, CLiD's reduced captions).

Where a model's configs come from: a local pipeline folder (its
``model_index.json`` and component ``config.json`` files), or, for the
aliases in ``PUBLISHED``, the published configuration numbers written out
below (each with the repository file it was copied from), so a plan for
FLUX.1-dev needs no download and no Hugging Face login.
"""

from __future__ import annotations

import contextlib
import json
import logging
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from cdi.models.flow_matching import CAPTION_CACHE_BYTES
from cdi.models.loading import checkpoints_gradients
from cdi.utils.errors import CDIError

GiB = 2**30
#: Captions encoded per text-encoder call (``FlowMatchingAdapter.prepare_captions``'s batch).
TEXT_BATCH = 16
#: Device memory outside PyTorch's allocator: CUDA context (~0.5 GiB on an H100), cuBLAS/cuDNN workspaces
#: and allocator fragmentation; a round allowance, not a measurement.
CUDA_OVERHEAD = int(1.5 * GiB)
#: Device memory assumed when planning for CUDA on a machine without one: an 80 GB card as PyTorch sees
#: it (``total_memory`` of an H100 80GB HBM3: 85.0e9 bytes, 79.2 GiB).
DEFAULT_GPU_GIB = 79.2
#: The families whose network calls back-propagate to their input (their ``cost().backward`` > 0).
BACKWARD_FAMILIES = ("noise_optimization", "gradient_masking", "gsa1", "gsa2")
#: The families whose network calls the planner traces (the others get no plan).
PLANNED_FAMILIES = ("sd", "sdxl", "sd3", "flux", "zimage")
#: Families that also need the gradient of every denoiser weight (per-sample gradients).
WEIGHT_GRADIENT_FAMILIES = ("gsa1", "gsa2")


# --------------------------------------------------------------------------
# Published configurations (no download)
# --------------------------------------------------------------------------
def _clip(hidden: int, layers: int, heads: int, intermediate: int, projection: int | None = None) -> dict:
    config = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
              "intermediate_size": intermediate, "vocab_size": 49408, "max_position_embeddings": 77,
              "hidden_act": "quick_gelu" if hidden == 768 else "gelu"}
    if projection is not None:
        config["projection_dim"] = projection
    return config


#: openai/clip-vit-large-patch14 text model (SD 1.x, SDXL's first, SD3's first, FLUX's CLIP).
CLIP_L = _clip(768, 12, 12, 3072, projection=768)
#: laion/CLIP-ViT-bigG-14 text model (SDXL's and SD3's second encoder).
CLIP_G = _clip(1280, 32, 20, 5120, projection=1280)
#: google/t5-v1_1-xxl encoder (text_encoder_3 of SD3, text_encoder_2 of FLUX.1: config.json of those folders).
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
          "relative_attention_max_distance": 128}
_VAE_4 = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
          "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
          "norm_num_groups": 32}
_VAE_16 = {**_VAE_4, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
           "sample_size": 1024}


@dataclass(frozen=True)
class ModelSpec:
    """What a plan needs of a model, all from configs.

    ``components``: name -> (class name in diffusers/transformers, config
    dict). ``text_lengths``: text encoder -> tokens per caption it encodes.
    ``caption_tokens``, ``caption_width`` and ``caption_pooled``: the shape
    of one caption's cached embedding (sequence, and pooled vector). ``max_sequence_length``: FLUX/SD3/Z-Image's T5/Qwen
    length. ``source``: where the numbers come from.
    """

    family: str
    components: dict[str, tuple[str, dict]]
    text_lengths: dict[str, int]
    caption_tokens: int
    caption_width: int
    resolution: int
    source: str
    caption_pooled: int = 0


_SOURCE = "the config.json of each component folder of https://huggingface.co/{repo}"

def _sd3_spec(repo: str, **transformer: Any) -> ModelSpec:
    """An SD 3.5 spec: the MMDiT's own numbers, the shared ones, and SD3's three text encoders."""
    config = {"attention_head_dim": 64, "in_channels": 16, "joint_attention_dim": 4096, "out_channels": 16,
              "patch_size": 2, "pooled_projection_dim": 2048, "qk_norm": "rms_norm", "sample_size": 128,
              **transformer}
    return ModelSpec(
        "sd3",
        {"transformer": ("SD3Transformer2DModel", config), "vae": ("AutoencoderKL", _VAE_16),
         "text_encoder": ("CLIPTextModelWithProjection", CLIP_L),
         "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G),
         "text_encoder_3": ("T5EncoderModel", T5_XXL)},
        {"text_encoder": 77, "text_encoder_2": 77, "text_encoder_3": 256}, caption_tokens=77 + 256,
        caption_width=4096, caption_pooled=2048, resolution=1024, source=_SOURCE.format(repo=repo))


#: alias -> the published configs of its components (copied from the repositories' config.json files).
PUBLISHED: dict[str, ModelSpec] = {
    "flux-dev": ModelSpec(
        "flux",
        {"transformer": ("FluxTransformer2DModel", {
            "attention_head_dim": 128, "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096,
            "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38, "patch_size": 1,
            "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56]}),
         "vae": ("AutoencoderKL", _VAE_16),
         "text_encoder": ("CLIPTextModel", CLIP_L),
         "text_encoder_2": ("T5EncoderModel", T5_XXL)},
        {"text_encoder": 77, "text_encoder_2": 512}, caption_tokens=512, caption_width=4096, caption_pooled=768,
        resolution=1024, source=_SOURCE.format(repo="black-forest-labs/FLUX.1-dev")),
    "sd35-large": _sd3_spec("stabilityai/stable-diffusion-3.5-large", caption_projection_dim=2432,
                            num_attention_heads=38, num_layers=38, pos_embed_max_size=192),
    "sd35-medium": _sd3_spec("stabilityai/stable-diffusion-3.5-medium", caption_projection_dim=1536,
                             num_attention_heads=24, num_layers=24, pos_embed_max_size=384,
                             dual_attention_layers=list(range(13))),
    "sdxl": ModelSpec(
        "sdxl",
        {"unet": ("UNet2DConditionModel", {
            "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "cross_attention_dim": 2048,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
            "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816, "use_linear_projection": True, "sample_size": 128}),
         "vae": ("AutoencoderKL", {**_VAE_4, "sample_size": 1024}),
         "text_encoder": ("CLIPTextModel", CLIP_L),
         "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G)},
        {"text_encoder": 77, "text_encoder_2": 77}, caption_tokens=77, caption_width=2048, caption_pooled=1280, resolution=1024,
        source=_SOURCE.format(repo="stabilityai/stable-diffusion-xl-base-1.0")),
    "sd15": ModelSpec(
        "sd",
        {"unet": ("UNet2DConditionModel", {
            "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
            "attention_head_dim": 8, "sample_size": 64}),
         "vae": ("AutoencoderKL", {**_VAE_4, "sample_size": 512}),
         "text_encoder": ("CLIPTextModel", CLIP_L)},
        {"text_encoder": 77}, caption_tokens=77, caption_width=768, resolution=512,
        source=_SOURCE.format(repo="stable-diffusion-v1-5/stable-diffusion-v1-5")),
}


# --------------------------------------------------------------------------
# Specs from a local folder
# --------------------------------------------------------------------------
_DENOISERS = ("transformer", "unet")
_FAMILY_OF_CLASS = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3",
                    "ZImageTransformer2DModel": "zimage", "UNet2DConditionModel": "sd"}


def spec_from_folder(folder: str | Path) -> ModelSpec:
    """The ``ModelSpec`` of a diffusers pipeline folder, from its ``model_index.json`` and component configs."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    components: dict[str, tuple[str, dict]] = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[1] is None:
            continue
        if name not in (*_DENOISERS, "vae") and not name.startswith("text_encoder"):
            continue  # what the adapters load (no safety checker, image encoder, tokenizer, scheduler)
        config = folder / name / "config.json"
        if config.is_file():
            data = {k: v for k, v in json.loads(config.read_text()).items() if not k.startswith("_")}
            components[name] = (value[1], data)
    denoiser = next((n for n in _DENOISERS if n in components), None)
    cls, config = components[denoiser] if denoiser is not None else ("", {})
    family = _FAMILY_OF_CLASS.get(cls, "other")
    if family == "sd" and config.get("addition_embed_type") == "text_time":
        family = "sdxl"
    lengths = {}
    for name in sorted(components):
        if name.startswith("text_encoder"):
            tok = folder / name.replace("text_encoder", "tokenizer") / "tokenizer_config.json"
            limit = json.loads(tok.read_text()).get("model_max_length", 77) if tok.is_file() else 77
            lengths[name] = int(min(limit, {"flux": 512, "sd3": 256, "zimage": 512}.get(family, 77))
                                if "clip" not in components[name][0].lower() else min(limit, 77))
    vae = components.get("vae", (None, {}))[1]
    down = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    resolution = int(vae.get("sample_size", 0)) if family in ("flux", "zimage") else \
        int(config.get("sample_size", 0)) * down
    text_width = int(config.get("joint_attention_dim") or config.get("cross_attention_dim")
                     or config.get("cap_feat_dim") or 0)
    caption_tokens = sum(lengths.values()) if family == "sd3" else max(lengths.values(), default=0)
    if family == "sd3":
        caption_tokens = 77 + lengths.get("text_encoder_3", 256)
    pooled = int(config.get("pooled_projection_dim") or 0)
    return ModelSpec(family, components, lengths, caption_tokens=caption_tokens, caption_width=text_width,
                     caption_pooled=pooled, resolution=resolution, source=str(folder))


def model_spec(name: str | Path) -> ModelSpec | None:
    """The spec of an alias in ``PUBLISHED`` or a local pipeline folder; None when neither (a hub id)."""
    if str(name) in PUBLISHED:
        return PUBLISHED[str(name)]
    path = Path(str(name)).expanduser()
    if path.is_dir() and (path / "model_index.json").is_file():
        return spec_from_folder(path)
    return None


# --------------------------------------------------------------------------
# Tracing on the meta device
# --------------------------------------------------------------------------
class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of tensors created under it while they are alive; keeps the peak.

    A tensor is counted once per storage (views share their base's storage)
    from the operation that creates it until Python frees it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor._base is None:
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self._seen:
                    nbytes = storage.nbytes()
                    self._seen.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(tensor, self._release, key, nbytes)
        return out


class _FusedAttention(torch.autograd.Function):
    """Attention's memory as PyTorch's fused kernels (flash / memory-efficient) use it, for tracing.

    Saves q, k, v, the output and the float32 log-sum-exp for the backward,
    as ``_scaled_dot_product_flash_attention`` does; no L x L matrix.
    """

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    return _FusedAttention.apply(query, key, value)


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def build_on_meta(cls_name: str, config: Mapping[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    """The component ``cls_name`` (diffusers or transformers) built from ``config`` on the meta device."""
    import diffusers
    import transformers

    if hasattr(diffusers, cls_name):
        cls = getattr(diffusers, cls_name)
        with torch.device("meta"):
            model = cls.from_config(dict(config))
        quiet = logging.getLogger("diffusers")  # .to(dtype) warns that no module is kept in float32
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            return model.to(dtype).eval().requires_grad_(False)
        finally:
            quiet.setLevel(level)
    elif hasattr(transformers, cls_name):
        cls = getattr(transformers, cls_name)
        config_cls = cls.config_class
        with torch.device("meta"):
            model = cls(config_cls(**dict(config)))
    else:
        raise CDIError(f"unknown component class {cls_name!r}; cannot plan its memory")
    return model.to(dtype).eval().requires_grad_(False)


def trace_peak(call: Callable[[], torch.Tensor], *, backward: bool) -> int:
    """Peak bytes of the tensors ``call`` creates on the meta device (and of its backward when asked)."""
    mode = _LiveBytes()
    with _fused_attention(), mode, torch.device("meta"), torch.set_grad_enabled(backward):
        out = call()
        if backward:
            out.float().sum().backward()
        del out
    return int(mode.peak)


def _denoiser_call(spec: ModelSpec, model: torch.nn.Module, dtype: torch.dtype, batch: int, *, grad: bool
                   ) -> Callable[[], torch.Tensor]:
    """A closure running the denoiser as the family's adapter does, on meta inputs at native resolution."""
    config = model.config
    family = spec.family

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, dtype=dt)

    def call() -> torch.Tensor:
        if family in ("sd", "sdxl"):
            size = int(config.sample_size)
            x = randn(batch, config.in_channels, size, size).requires_grad_(grad)
            extra = {}
            if family == "sdxl":
                time_dim = int(config.addition_time_embed_dim) * 6
                extra["added_cond_kwargs"] = {
                    "text_embeds": randn(batch, int(config.projection_class_embeddings_input_dim) - time_dim),
                    "time_ids": randn(batch, 6)}
            return model(x, torch.ones(batch), encoder_hidden_states=randn(batch, spec.caption_tokens,
                                                                           int(config.cross_attention_dim)),
                         **extra).sample
        if family == "sd3":
            size = int(config.sample_size)
            x = randn(batch, config.in_channels, size, size).requires_grad_(grad)
            return model(hidden_states=x, timestep=torch.ones(batch),
                         encoder_hidden_states=randn(batch, spec.caption_tokens, int(config.joint_attention_dim)),
                         pooled_projections=randn(batch, int(config.pooled_projection_dim))).sample
        if family == "flux":
            side = spec.resolution // 16  # 8x autoencoder, 2x2 packing
            x = randn(batch, side * side, int(config.in_channels)).requires_grad_(grad)
            guidance = torch.ones(batch) if config.guidance_embeds else None
            return model(hidden_states=x, timestep=torch.ones(batch), guidance=guidance,
                         pooled_projections=randn(batch, int(config.pooled_projection_dim)),
                         encoder_hidden_states=randn(batch, spec.caption_tokens, int(config.joint_attention_dim)),
                         txt_ids=torch.zeros(spec.caption_tokens, 3), img_ids=torch.zeros(side * side, 3)).sample
        if family == "zimage":
            side = spec.resolution // 8
            latents = [randn(int(config.in_channels), 1, side, side).requires_grad_(grad) for _ in range(batch)]
            captions = [randn(spec.caption_tokens, int(config.cap_feat_dim)) for _ in range(batch)]
            out = model(latents, torch.ones(batch), captions, return_dict=False)[0]
            return torch.stack(out)
        raise CDIError(f"no memory plan for the {family!r} family's network calls")

    return call


def _vae_call(model: torch.nn.Module, resolution: int, batch: int) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        x = torch.randn(batch, int(model.config.in_channels), resolution, resolution, dtype=torch.float32)
        return model.encode(x).latent_dist.mean

    return call


def _text_call(model: torch.nn.Module, length: int, batch: int) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        ids = torch.zeros(batch, length, dtype=torch.long)
        out = model(input_ids=ids)
        return out[0]

    return call


# --------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    """The memory an audit of one model needs (bytes); see the module docstring for each term."""

    model: str
    family: str
    dtype: str
    device: str
    features: list[str]
    batch_size: int
    weights: dict[str, int]
    parameters: dict[str, int]
    denoiser_forward_per_sample: int
    denoiser_backward_per_sample: int
    autoencoder_per_image: int
    text_encoder_activations: int
    largest_family: str
    caption_cache_per_caption: int
    captions: int
    device_memory: int | None
    device_memory_assumed: bool
    source: str
    weight_gradients: int = 0
    traced: bool = True
    gradient_checkpointing: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def text_weights(self) -> int:
        return sum(v for k, v in self.weights.items() if k.startswith("text_encoder"))

    @property
    def denoiser_weights(self) -> int:
        return sum(v for k, v in self.weights.items() if k in _DENOISERS)

    @property
    def activations(self) -> int:
        """The denoising phase's activations at ``batch_size``: the largest family's or the autoencoder's."""
        per_sample = self.denoiser_backward_per_sample if self.largest_family in BACKWARD_FAMILIES \
            else self.denoiser_forward_per_sample
        return self.batch_size * max(per_sample, self.autoencoder_per_image)

    @property
    def caption_phase(self) -> int:
        return self.text_weights + self.text_encoder_activations

    @property
    def denoising_phase(self) -> int:
        # GSA's per-sample weight gradients: one copy per sample of a network call (torch.func.vmap)
        return sum(self.weights.values()) - self.text_weights + self.activations + \
            self.weight_gradients * self.batch_size

    @property
    def peak(self) -> int:
        """Device peak: the larger phase, plus ``CUDA_OVERHEAD`` on CUDA."""
        overhead = CUDA_OVERHEAD if self.device.startswith("cuda") else 0
        if self.device.startswith("cuda"):
            return max(self.caption_phase, self.denoising_phase) + overhead
        return self.caption_phase + self.denoising_phase  # off CUDA every component stays in memory

    @property
    def caption_cache(self) -> int:
        return self.captions * self.caption_cache_per_caption

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.peak <= self.device_memory

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(activations=self.activations, caption_phase=self.caption_phase,
                   denoising_phase=self.denoising_phase, peak=self.peak, caption_cache=self.caption_cache,
                   fits=self.fits, cuda_overhead=CUDA_OVERHEAD if self.device.startswith("cuda") else 0)
        return out

    def summary(self) -> str:
        """One line for the start of an audit."""
        limit = "" if self.device_memory is None else \
            f" of {_gib(self.device_memory)}{' (assumed)' if self.device_memory_assumed else ''}"
        verdict = {True: "fits", False: "DOES NOT FIT", None: "no limit known"}[self.fits]
        if not self.traced:
            return (f"memory plan ({self.device}, {self.dtype}): weights {_gib(sum(self.weights.values()))}, caption "
                    f"cache {_gib(self.caption_cache)} (at most {_gib(CAPTION_CACHE_BYTES)} in host memory); activations "
                    "not traced off CUDA "
                    "(`cdi speed --plan` traces them)")
        return (f"memory plan ({self.device}, {self.dtype}, batch {self.batch_size}): peak {_gib(self.peak)}"
                f"{limit}, {verdict} (weights {_gib(sum(self.weights.values()))}, activations "
                f"{_gib(self.activations)} for {self.largest_family}; caption cache "
                f"{_gib(self.caption_cache)}, at most {_gib(CAPTION_CACHE_BYTES)} of it in host memory)")

    def lines(self) -> list[str]:
        """The plan for people, one fact a line, each with where it comes from."""
        rows = [f"memory plan for {self.model} ({self.family}) on {self.device} in {self.dtype}, batch "
                f"{self.batch_size}, features {','.join(self.features)}",
                f"  configs: {self.source}"]
        for name, nbytes in self.weights.items():
            rows.append(f"  weights {name:16s} {self.parameters[name] / 1e9:7.3f} B parameters  {_gib(nbytes)}")
        rows.append(f"  text encoders, one batch of {TEXT_BATCH} captions: {_gib(self.text_encoder_activations)}")
        rows.append(f"  denoiser per sample: forward {_gib(self.denoiser_forward_per_sample)}, forward + "
                    f"backward {_gib(self.denoiser_backward_per_sample)} (traced on the meta device"
                    f"{', gradient checkpointing' if self.gradient_checkpointing else ''})")
        rows.append(f"  autoencoder encode per image (float32): {_gib(self.autoencoder_per_image)}")
        if self.weight_gradients:
            rows.append(f"  weight gradients (GSA): {_gib(self.weight_gradients)}")
        rows.append(f"  caption phase {_gib(self.caption_phase)}; denoising phase {_gib(self.denoising_phase)} "
                    f"(largest family: {self.largest_family})")
        if self.device.startswith("cuda"):
            rows.append(f"  + CUDA context and workspaces {_gib(CUDA_OVERHEAD)}")
        limit = "no limit known" if self.device_memory is None else \
            f"{_gib(self.device_memory)}{' (assumed)' if self.device_memory_assumed else ''}"
        rows.append(f"  peak device memory {_gib(self.peak)} of {limit}: "
                    f"{ {True: 'fits', False: 'DOES NOT FIT', None: '-'}[self.fits] }")
        rows.append(f"  caption cache: {_gib(self.caption_cache_per_caption)} per caption x {self.captions} captions "
                    f"= {_gib(self.caption_cache)} (host memory up to {_gib(CAPTION_CACHE_BYTES)}, the rest in a "
                    "temporary folder)")
        rows.extend(f"  note: {n}" for n in self.notes)
        return rows


def _gib(nbytes: int, digits: int = 1) -> str:
    if abs(nbytes) < GiB:
        return f"{nbytes / 2**20:.{digits}f} MiB"
    return f"{nbytes / GiB:.{digits}f} GiB"


def _largest_family(features: Sequence[str]) -> str:
    backward = [f for f in features if f in BACKWARD_FAMILIES]
    return (backward or list(features) or ["denoising_loss"])[0]


def plan_memory(spec: ModelSpec, *, model: str, dtype: torch.dtype, device: str, features: Sequence[str],
                batch_size: int = 1, images: int = 2000, captions_per_image: int = 1,
                device_memory: int | None = None, device_memory_assumed: bool = False,
                trace: bool = True) -> MemoryPlan:
    """The ``MemoryPlan`` of ``spec`` (see the module docstring); builds nothing but meta tensors.

    ``images``: images of the audit (both collections), each with
    ``captions_per_image`` distinct captions in the cache (CLiD adds its
    reduced captions). ``trace=False`` counts weights and caches only (the
    traces take 1-40 s on a CPU: ~2 ms per operation on the meta device);
    the plan then says its activations were not traced.
    """
    parameters, weights = {}, {}
    modules = {}
    for name, (cls_name, config) in spec.components.items():
        component_dtype = torch.float32 if name == "vae" else dtype
        module = build_on_meta(cls_name, config, component_dtype)
        modules[name] = module
        parameters[name] = sum(p.numel() for p in module.parameters())
        weights[name] = sum(p.numel() * p.element_size() for p in module.parameters())
    denoiser_name = next(n for n in _DENOISERS if n in modules)
    denoiser = modules[denoiser_name]
    checkpointing = checkpoints_gradients(spec.family, "cuda" if device.startswith("cuda") else "cpu")
    if checkpointing:  # as load_model sets it up on CUDA
        denoiser.enable_gradient_checkpointing()
    features = list(features)
    forward = backward = vae = text = 0
    if trace:
        forward = trace_peak(_denoiser_call(spec, denoiser, dtype, 1, grad=False), backward=False)
        needs_backward = any(f in BACKWARD_FAMILIES for f in features)
        backward = trace_peak(_denoiser_call(spec, denoiser, dtype, 1, grad=True), backward=True) \
            if needs_backward else forward
        vae = trace_peak(_vae_call(modules["vae"], spec.resolution, 1), backward=False) if "vae" in modules else 0
        text = max((trace_peak(_text_call(modules[n], spec.text_lengths.get(n, 77), TEXT_BATCH), backward=False)
                    for n in modules if n.startswith("text_encoder")), default=0)
    per_caption = (spec.caption_tokens * spec.caption_width + spec.caption_pooled) * \
        torch.tensor([], dtype=dtype).element_size()
    gradients = weights[denoiser_name] if any(f in WEIGHT_GRADIENT_FAMILIES for f in features) else 0
    return MemoryPlan(
        model=model, family=spec.family, dtype=str(dtype).replace("torch.", ""), device=device, features=features,
        batch_size=int(batch_size), weights=weights, parameters=parameters, denoiser_forward_per_sample=forward,
        denoiser_backward_per_sample=backward, autoencoder_per_image=vae, text_encoder_activations=text,
        largest_family=_largest_family(features), caption_cache_per_caption=per_caption,
        captions=int(images) * int(captions_per_image), device_memory=device_memory,
        device_memory_assumed=device_memory_assumed, source=spec.source, weight_gradients=gradients,
        traced=trace, gradient_checkpointing=checkpointing)


# --------------------------------------------------------------------------
# Plans for commands: devices and dtypes by name, before any model loads
# --------------------------------------------------------------------------
def planned_device(name: str) -> str:
    """``--device`` for a plan: like ``resolve_device``, but ``cuda`` may be planned on a machine without one."""
    text = str(name).strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise CDIError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return text


def device_memory_of(device: str, gpu_memory_gib: float | None) -> tuple[int | None, bool]:
    """(bytes the plan may use, whether that number is assumed): ``--gpu-memory``, the GPU's own, or 80 GiB."""
    if gpu_memory_gib is not None:
        if not gpu_memory_gib > 0:
            raise CDIError(f"--gpu-memory must be a positive number of GiB, got {gpu_memory_gib}")
        return int(gpu_memory_gib * GiB), False
    if not device.startswith("cuda"):
        return None, False
    if torch.cuda.is_available():
        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).total_memory), False
    return int(DEFAULT_GPU_GIB * GiB), True


def plan_for(model: str, *, device: str = "auto", dtype: str = "default", features: str | None = None,
             batch_size: int | str = 1, images: int = 2000, gpu_memory_gib: float | None = None,
             trace: bool = True) -> MemoryPlan | None:
    """The plan of ``model`` as the commands name things; None when its configs are not local (a hub id).

    ``features``: a feature spec (default: the model's default set);
    ``batch_size`` "auto" is planned at 1 (the smallest the audit can run);
    ``images``: both collections together.
    """
    from cdi.features.registry import FEATURE_SETS, default_set_for, resolve_features
    from cdi.models.loading import resolve_dtype_for

    spec = model_spec(model)
    if spec is None or spec.family not in PLANNED_FAMILIES:
        return None
    device_name = planned_device(device)
    torch_dtype = resolve_dtype_for(dtype, device_name, spec.family)
    names = [f.name for f in resolve_features(features)] if features else FEATURE_SETS[default_set_for("text")]
    memory, assumed = device_memory_of(device_name, gpu_memory_gib)
    captions = 1 + (3 if "clid" in names else 0)  # CLiD's default: three masked captions (the null is shared)
    batch = 1 if str(batch_size) == "auto" else int(batch_size)
    return plan_memory(spec, model=str(model), dtype=torch_dtype, device=device_name, features=names,
                       batch_size=batch, images=images, captions_per_image=captions, device_memory=memory,
                       device_memory_assumed=assumed, trace=trace)


def options_that_fit(plan: MemoryPlan) -> list[str]:
    """What would make a plan that does not fit fit: each option with the peak it would give."""
    suggestions = []
    if plan.dtype == "float32" and plan.device.startswith("cuda"):
        suggestions.append("--dtype bfloat16 (halves the weights and activations)")
    if plan.largest_family in BACKWARD_FAMILIES:
        forward_only = [f for f in plan.features if f not in BACKWARD_FAMILIES]
        suggestions.append(f"--features {','.join(forward_only)} (drops the families that back-propagate: "
                           f"activations {_gib(plan.batch_size * max(plan.denoiser_forward_per_sample, plan.autoencoder_per_image))})")
    if plan.weight_gradients:
        suggestions.append(f"drop GSA (gsa1, gsa2) from --features: it needs the gradient of every one of the "
                           f"{plan.parameters[next(n for n in _DENOISERS if n in plan.parameters)] / 1e9:.1f} B "
                           f"denoiser weights per sample ({_gib(plan.weight_gradients)} more)")
    if plan.batch_size > 1:
        suggestions.append("--batch-size 1")
    suggestions.append("a GPU with more memory (see the peak above)")
    return suggestions


def check_fits(plan: MemoryPlan) -> None:
    """``CDIError`` naming the options that would make it fit, when the plan needs more than the device has."""
    if plan.traced and plan.fits is False:
        raise CDIError(f"{plan.summary()}; this audit would run out of device memory. Options that reduce it: "
                       + "; ".join(options_that_fit(plan)))
