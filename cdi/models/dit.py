"""Diffusion Transformer (``DiTPipeline``, e.g. facebook/DiT-XL-2-256): class labels, learned variance.

The folder holds ``transformer`` (DiTTransformer2DModel; older folders name
it Transformer2DModel, which diffusers maps to the same class), ``vae``
(AutoencoderKL), ``scheduler``, and the ImageNet class names as ``id2label``
in model_index.json (values are comma-separated synonyms,
e.g. ``"tench, Tinca tinca"``).

* x0 = VAE posterior mean times ``scaling_factor`` (the pipeline decodes
  ``latents / scaling_factor``).
* condition: ``class_labels``. The null class is the index the label
  embedding reserves for classifier-free guidance: the number of classes,
  ``transformer.config.num_embeds_ada_norm`` (1000 for ImageNet; the
  pipeline hard-codes 1000).
* the transformer outputs eps and, in the second half of its channels, the
  learned variance; ``learned_variance`` makes the base class keep the first
  half, as the pipeline does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, SchedulerMixin

from cdi.utils.errors import CDIError
from cdi.models.base import Condition, DiffusionAdapter, autoencoder_downsampling, square_resolution
from cdi.models.stable_diffusion import encode_autoencoder_kl


class DiTAdapter(DiffusionAdapter):
    """Adapter for ``DiTPipeline`` folders (see the module docstring).

    Parameters
    ----------
    transformer, vae, scheduler
        The pipeline's components, on ``device`` in eval mode with frozen
        parameters: the transformer in ``dtype``, the VAE in float32.
    id2label : dict, optional
        Class index (int or str) -> comma-separated names, from model_index.json.
    model_id, revision, fingerprint, device, dtype
        As in ``DiffusionAdapter``.
    """

    family = "dit"
    conditioning = "class"
    components = {"transformer": DiTTransformer2DModel, "vae": AutoencoderKL, "scheduler": SchedulerMixin}
    full_precision_components = ("vae",)
    denoiser_name = "transformer"

    def __init__(
        self,
        *,
        transformer: DiTTransformer2DModel,
        vae: AutoencoderKL,
        scheduler: SchedulerMixin,
        id2label: dict | None = None,
        model_id: str,
        revision: str | None = None,
        fingerprint: str = "",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.transformer = self.denoiser = transformer
        self.vae = vae
        self._read_scheduler(scheduler, transformer)
        self.num_classes = int(transformer.config.num_embeds_ada_norm)
        self.null_class_id = self.num_classes
        self.id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
        self._label_ids: dict[str, set[int]] = {}
        for class_id, names in self.id2label.items():
            for name in {names, *names.split(",")}:
                self._label_ids.setdefault(name.strip().lower(), set()).add(class_id)
        super().__init__(
            model_id=model_id,
            revision=revision,
            fingerprint=fingerprint,
            resolution=square_resolution(transformer.config.sample_size, autoencoder_downsampling(vae)),
            image_channels=vae.config.in_channels,
            alphas_cumprod=scheduler.alphas_cumprod,
            device=device,
            dtype=dtype,
        )

    @classmethod
    def extra_inputs(cls, folder: Path, index: dict) -> dict:
        return {"id2label": index.get("id2label")}

    def class_id(self, caption: str | None) -> int:
        """The class a caption names: None -> the null class; ``"207"`` -> 207; a class name -> its index.

        A class name matches any of the comma-separated synonyms of a class
        (or the whole entry), case-insensitively. A name shared by several
        classes (ImageNet has a few, e.g. "crane") is refused: use the index.
        """
        if caption is None:
            return self.null_class_id
        text = caption.strip()
        if text.isdigit():
            class_id = int(text)
            if class_id >= self.num_classes:
                raise CDIError(
                    f"class id {class_id} is out of range: {self.model_id} has classes 0 to {self.num_classes - 1}"
                )
            return class_id
        ids = self._label_ids.get(text.lower())
        if not ids:
            examples = ", ".join(f"{k}: {v!r}" for k, v in list(self.id2label.items())[:5])
            raise CDIError(
                f"caption {caption!r} names no class of {self.model_id}; use a class index (0 to "
                f"{self.num_classes - 1}) or one of its class names" + (f", e.g. {examples}" if examples else "")
            )
        if len(ids) > 1:
            choices = ", ".join(f"{i} ({self.id2label[i]!r})" for i in sorted(ids))
            raise CDIError(f"class name {caption!r} is ambiguous ({choices}); use the class index instead")
        return next(iter(ids))

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_autoencoder_kl(self.vae, pixels)

    def _class_conditions(self, labels: list[int]) -> Condition:
        return Condition(len(labels), {"class_labels": torch.tensor(labels, dtype=torch.long, device=self.device)})

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        labels = cond.tensors["class_labels"].to(self.device)
        return self.transformer(x_t, timestep=t, class_labels=labels).sample
