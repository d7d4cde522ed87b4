"""Flow-matching (rectified-flow) models seen through the variance-preserving interface.

SD3/3.5, FLUX, Z-Image and the other current open text-to-image models are
trained on ``x_s = (1 - s) x0 + s eps`` with ``s`` in [0, 1] and predict the
velocity ``v = eps - x0``. Every feature family of cdi is written for the
variance-preserving (VP) process ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``
and an eps-prediction. The two are the same process after a rescaling
(REFERENCE.md section 10): with ``c(s) = sqrt((1 - s)^2 + s^2)``,

* ``abar(s) = (1 - s)^2 / c(s)^2``, so ``x_s = c(s) x_t``;
* the network sees ``c(s) x_t`` at sigma ``s`` (in its own timestep
  convention: ``1000 s`` for SD3, ``s`` for FLUX, ``1 - s`` for Z-Image);
* its velocity becomes ``eps = x_s + (1 - s) v`` (since ``x0 = x_s - s v``).

``FlowMatchingAdapter`` does this once, so every family (loss, SecMI,
PIA/PIAN, multiple loss, noise optimisation, gradient masking, CLiD, SimA,
PFAMI, GSA) runs unchanged; a family adapter only encodes images and
captions and calls its network on ``x_s`` (``_velocity``). The latent
families (SD3, FLUX, Z-Image) share ``encode_flow_autoencoder`` and, for
resolution-dependent shifting, ``dynamic_shift_mu``.

**Which ``s`` a discrete ``t`` means (the timestep grid).** Default
``grid="model"``: the model's own shifted sigmas (its sampling grid), read from its
scheduler configuration (``FlowMatchEulerDiscreteScheduler``): ``t`` in
0..N-1 is ``u = (t + 1) / N`` (the scheduler's unshifted sigmas), shifted by
``shift * u / (1 + (shift - 1) u)`` (SD3: shift 3.0), or, with
``use_dynamic_shifting`` (FLUX.1, Z-Image), by the exponential time shift at
the resolution-dependent ``mu`` that the pipeline computes for the model's
native image size (``calculate_shift`` of its latent token count), then
stretched to ``shift_terminal`` where the config has one. This is the grid
the model is sampled on, and for SD3 the one it is trained on (diffusers'
SD3 training script draws an index into ``scheduler.sigmas``, which are
shifted). It is not FLUX's training grid: diffusers' FLUX training scripts
take ``scheduler.sigmas`` of a scheduler built with ``use_dynamic_shifting``
and never shifted (``set_timesteps`` is not called with ``mu``), so they
train on unshifted ``u``, and kohya's scripts draw their own (``shift`` /
``flux_shift`` / sigmoid) densities; ``--timestep-grid sd15`` compares
families at equal noise levels instead. It is what the other
adapters do: every model's ``t`` is its own training schedule (SD's
scaled-linear, DDPM's linear betas). At the low ``t`` where membership
features live, SD3's shift 3.0 lands close to SD 1.5 anyway (``t = 100``:
``abar`` 0.898 against 0.894; they part at higher t: ``t = 300``, 0.375
against 0.590). ``grid="sd15"`` instead takes, for each ``t``,
the ``s`` that gives SD 1.5's ``abar_t`` (``s = sqrt(1 - abar) / (sqrt(abar)
+ sqrt(1 - abar))``), so that ``t`` means the same noise level on every
model; choose it to compare feature values across model families.
Either way ``s`` stays inside (0, 1], where rectified-flow models are trained
(logit-normal or uniform densities over the whole interval).

**Captions.** Large text encoders (T5-XXL, Qwen3) encode each distinct
caption once into a cache in host memory (``prepare_captions`` encodes a whole
collection's captions before its first denoiser call, then moves the text
encoders off the accelerator when ``offload_text_encoders`` is on, the
default on CUDA, where ``load_model`` also leaves them in host memory at
load). The engine passes CLiD's reduced captions with the images' own
(``FeatureFamily.extra_captions``), and the audit does so once for both
collections, so the encoders visit the GPU once per audit. A caption met
later (CLiD's "impt" rule, which ranks words by re-encoding) brings them back
for that encoding, then off again. The cache holds the
embeddings in the compute dtype: FLUX's 512 x 4096 T5 tokens are 4 MiB per
caption in bfloat16; past ``CAPTION_CACHE_BYTES`` (4 GiB) further captions are
kept in a temporary folder (``CaptionCache``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Sequence

import torch

from cdi.utils.errors import CDIError
from cdi.models.base import Condition, DiffusionAdapter, autoencoder_downsampling

logger = logging.getLogger("cdi")

GRIDS = ("model", "sd15")


def _check_flow_scheduler(scheduler) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise CDIError(
            f"a flow-matching pipeline needs a FlowMatchEulerDiscreteScheduler, but its scheduler is "
            f"{type(scheduler).__name__}; restore the scheduler folder of the original checkpoint"
        )


def training_sigmas(scheduler, mu: float | None = None) -> torch.Tensor:
    """The model's sigma for each discrete timestep ``t = 0..N-1`` (ascending), float32.

    ``u = (t + 1) / N``; then the scheduler's static shift, or with
    ``use_dynamic_shifting`` its time shift at ``mu`` (required then); then
    its ``shift_terminal`` stretch. The same arithmetic as
    ``FlowMatchEulerDiscreteScheduler.set_timesteps`` over all N steps.
    """
    _check_flow_scheduler(scheduler)
    config = scheduler.config
    n = int(config.num_train_timesteps)
    u = torch.arange(n, 0, -1, dtype=torch.float64) / n  # descending, as the scheduler orders them
    if config.use_dynamic_shifting:
        if mu is None:
            raise CDIError("this scheduler shifts its timesteps by resolution (use_dynamic_shifting): mu is needed")
        sigmas = scheduler.time_shift(float(mu), 1.0, u)
    else:
        shift = float(config.shift)
        sigmas = shift * u / (1 + (shift - 1) * u)
    if config.shift_terminal:
        sigmas = scheduler.stretch_shift_to_terminal(sigmas)
    return torch.as_tensor(sigmas, dtype=torch.float64).flip(0).float()


def dynamic_shift_mu(scheduler, image_seq_len: int) -> float | None:
    """The pipelines' ``calculate_shift`` of ``image_seq_len`` (None without ``use_dynamic_shifting``)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = scheduler.config
    if not config.use_dynamic_shifting:
        return None
    return float(calculate_shift(
        image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5), config.get("max_shift", 1.15),
    ))


def autoencoder_native_size(vae, scheduler) -> tuple[int, float | None]:
    """The native resolution of a model sized by its autoencoder, and ``mu`` there (FLUX.1, Z-Image).

    The resolution is the autoencoder's ``sample_size``; ``mu`` is
    ``dynamic_shift_mu`` of its latent's token count in 2x2 patches,
    ``(resolution / downsampling / 2)^2``, as both pipelines compute it.
    """
    resolution = int(vae.config.sample_size)
    latent = resolution // autoencoder_downsampling(vae)
    return resolution, dynamic_shift_mu(scheduler, (latent // 2) ** 2)


def encode_flow_autoencoder(vae, pixels: torch.Tensor) -> torch.Tensor:
    """``(posterior mean - shift_factor) * scaling_factor``: the latents SD3, FLUX and Z-Image denoise."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mean
    return (latents - shift) * vae.config.scaling_factor


def sd15_alphas_cumprod(num_train_timesteps: int = 1000) -> torch.Tensor:
    """SD 1.5's abar: 1000 scaled-linear betas from 0.00085 to 0.012."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def abar_of_sigma(sigmas: torch.Tensor) -> torch.Tensor:
    """``abar = (1 - s)^2 / ((1 - s)^2 + s^2)``: the VP signal level of flow sigma ``s``."""
    s = sigmas.double()
    return ((1 - s) ** 2 / ((1 - s) ** 2 + s**2)).float()


def sigma_of_abar(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``s = sqrt(1 - abar) / (sqrt(abar) + sqrt(1 - abar))``: the inverse of ``abar_of_sigma``."""
    a = alphas_cumprod.double()
    return ((1 - a).sqrt() / (a.sqrt() + (1 - a).sqrt())).float()


#: Host memory the caption cache may hold before it keeps further captions on disk (bytes).
CAPTION_CACHE_BYTES = 4 * 2**30


class CaptionCache:
    """Caption -> its encoded tensors, in host memory up to ``max_bytes``, then in a temporary folder.

    FLUX's T5 embeddings are 4 MiB per caption in bfloat16 (8 in float32) and
    an audit of 2,000 images with CLiD's three reduced captions holds 8,000
    of them (31-62 GiB); past the limit each caption's tensors are written to
    one file (``torch.save``) and read back when used, so host memory stays
    bounded and the text encoders still run once per caption. The folder is
    removed when the cache is.
    """

    def __init__(self, max_bytes: int = CAPTION_CACHE_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self.bytes_in_memory = 0
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        self._files: dict[str, str] = {}
        self._folder: str | None = None

    def __contains__(self, prompt: object) -> bool:
        return prompt in self._memory or prompt in self._files

    def __len__(self) -> int:
        return len(self._memory) + len(self._files)

    def keys(self) -> set[str]:
        return set(self._memory) | set(self._files)

    def __getitem__(self, prompt: str) -> dict[str, torch.Tensor]:
        if prompt in self._memory:
            return self._memory[prompt]
        return torch.load(self._files[prompt], map_location="cpu", weights_only=True)

    def __setitem__(self, prompt: str, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.bytes_in_memory + size <= self.max_bytes:
            self._memory[prompt] = tensors
            self.bytes_in_memory += size
            return
        if self._folder is None:
            import shutil
            import tempfile
            import weakref

            self._folder = tempfile.mkdtemp(prefix="cdi-captions-")
            weakref.finalize(self, shutil.rmtree, self._folder, True)
        path = os.path.join(self._folder, f"{len(self._files):08d}.pt")
        torch.save(tensors, path)
        self._files[prompt] = path


class FlowMatchingAdapter(DiffusionAdapter):
    """Base adapter of rectified-flow models (see the module docstring).

    Subclasses set ``family``, ``components``, ``denoiser_name`` and
    ``text_encoder_names``, and implement ``_encode``, ``_encode_prompts``
    (the pipeline's own prompt encoding for a list of prompts, returning one
    tensor per condition name with the batch on dim 0) and ``_velocity``
    (the network's velocity at ``x_s`` and flow sigma ``s``).

    Parameters
    ----------
    scheduler
        The pipeline's ``FlowMatchEulerDiscreteScheduler``.
    resolution, image_channels
        The model's native pixel size and image channels.
    mu : float, optional
        The resolution-dependent shift, for schedulers with ``use_dynamic_shifting``.
    grid : {"model", "sd15"}
        Which sigma each discrete timestep means (module docstring).
    offload_text_encoders : bool or None
        Move the text encoders off the device between caption encodings;
        None: on CUDA only.
    model_id, revision, fingerprint, device, dtype
        As in ``DiffusionAdapter``.
    """

    conditioning = "text"
    prediction_type = "flow_prediction"
    full_precision_components = ("vae",)
    #: Components holding text encoders (moved off the device when offloading).
    text_encoder_names: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        scheduler,
        resolution: int,
        image_channels: int,
        mu: float | None = None,
        grid: str = "model",
        offload_text_encoders: bool | None = None,
        model_id: str,
        revision: str | None,
        fingerprint: str,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        if grid not in GRIDS:
            raise CDIError(f"unknown timestep grid {grid!r}; choose one of {', '.join(GRIDS)}")
        self.scheduler = scheduler
        self.grid = grid
        self.mu = None if mu is None else float(mu)
        n = int(scheduler.config.num_train_timesteps)
        if grid == "model":
            sigmas = training_sigmas(scheduler, self.mu)
            alphas_cumprod = abar_of_sigma(sigmas)
        else:
            _check_flow_scheduler(scheduler)
            alphas_cumprod = sd15_alphas_cumprod(n)
            sigmas = sigma_of_abar(alphas_cumprod)
        super().__init__(
            model_id=model_id, revision=revision, fingerprint=fingerprint, resolution=resolution,
            image_channels=image_channels, alphas_cumprod=alphas_cumprod, device=device, dtype=dtype,
        )
        # Re-derived from the float32 abar the families use, so that x_s = c(s) x_t holds to float32
        # rounding (near t = 0, 1 - abar ~ 1e-5 keeps only a few float32 digits: s moves by up to 0.3%).
        self.sigmas = sigma_of_abar(self.alphas_cumprod.cpu()).to(self.device)
        self.offload_text_encoders = (self.device.type == "cuda") if offload_text_encoders is None \
            else bool(offload_text_encoders)
        self._caption_cache = CaptionCache()

    def describe(self) -> dict:
        return {**super().describe(), "timestep_grid": self.grid, "shift_mu": self.mu,
                "scheduler_shift": float(self.scheduler.config.shift)}

    # ------------------------------------------------------------- prediction
    def sigma(self, t: torch.Tensor, ndim: int = 1) -> torch.Tensor:
        """The flow sigma ``s`` of discrete timesteps ``t``, shaped for broadcasting over ``ndim`` dims."""
        t = torch.as_tensor(t, device=self.device, dtype=torch.long)
        return self.sigmas[t].view(-1, *([1] * (ndim - 1)))

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        s = self.sigma(t, x_t.dim())
        x_s = x_t * ((1 - s) ** 2 + s**2).sqrt().to(x_t.dtype)
        return self._velocity(x_s, s.flatten(), cond)

    def to_eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``eps = x_s + (1 - s) v`` with ``x_s = c(s) x_t`` (module docstring)."""
        s = self.sigma(t, x_t.dim())
        return x_t * ((1 - s) ** 2 + s**2).sqrt() + (1 - s) * output

    def _velocity(self, x_s: torch.Tensor, s: torch.Tensor, cond: Condition) -> torch.Tensor:
        """The network's velocity at ``x_s`` (in ``self.dtype``) and sigmas ``s`` (float32, shape (B,))."""
        raise NotImplementedError

    # --------------------------------------------------------------- captions
    def prepare_captions(self, captions: Sequence[str | None], batch_size: int = 16) -> None:
        """Encode every distinct caption not cached yet, then offload the text encoders.

        Called before the first batch with every caption the extraction will
        condition on (the images' and CLiD's reduced ones, ``extra_captions``;
        the audit calls it once for both collections), so large text encoders
        visit the accelerator once and leave it before the denoiser runs.
        """
        # "" is the null condition (the empty prompt) that CLiD and the unconditional calls use
        prompts = sorted(({"" if c is None else c for c in captions} | {""}) - self._caption_cache.keys())
        if prompts:
            with self._text_encoders_on_device():
                for start in range(0, len(prompts), batch_size):
                    self._cache_prompts(prompts[start:start + batch_size])

    def _text_conditions(self, prompts: list[str]) -> Condition:
        missing = sorted(set(prompts) - self._caption_cache.keys())
        if missing:  # a caption prepare_captions was not given (CLiD's "impt" rule ranks words on the fly)
            with self._text_encoders_on_device():
                self._cache_prompts(missing)
        cached = [self._caption_cache[p] for p in prompts]
        stacked = {name: torch.stack([c[name] for c in cached]) for name in cached[0]}
        return Condition(len(prompts), {
            name: value.to(self.device, torch.float32 if value.is_floating_point() else value.dtype)
            for name, value in stacked.items()
        })

    @torch.no_grad()
    def _cache_prompts(self, prompts: list[str]) -> None:
        encoded = self._encode_prompts(prompts)
        for i, prompt in enumerate(prompts):
            self._caption_cache[prompt] = {
                k: v[i].detach().to("cpu", self.dtype if v.is_floating_point() else v.dtype)
                for k, v in encoded.items()
            }

    def _encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (getattr(self, n, None) for n in self.text_encoder_names) if m is not None]

    @contextlib.contextmanager
    def _text_encoders_on_device(self) -> Iterator[None]:
        """The text encoders on the device for the block, and off it afterwards (on error too) when offloading."""
        try:
            for module in self._text_encoders():
                module.to(self.device)
            yield
        finally:
            self._offload()

    def _offload(self) -> None:
        if self.offload_text_encoders and self.device.type != "cpu":
            for module in self._text_encoders():
                module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
