"""Pixel-space DDPM (``DDPMPipeline`` / ``DDIMPipeline``), unconditional or class-conditional.

The folder holds ``unet`` (UNet2DModel) and ``scheduler``; x0 is the image
itself in [-1, 1]. A UNet with ``num_class_embeds`` set is class-conditional;
diffusers' pipelines have no convention for its class names, so cdi uses
one (the toy world writes it): a ``labels.json`` at the folder root,

    {"id2label": {"0": "a handwritten digit zero", ...}, "null_class_id": 10}

where ``null_class_id`` is the label the model was trained with when the
class was dropped (classifier-free guidance). A caption names a class by
its index (``"3"``) or by its label (case-insensitive, whole label); None
is the null class.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import SchedulerMixin, UNet2DModel

from cdi.utils.errors import CDIError
from cdi.models.base import Condition, DiffusionAdapter, square_resolution


class DDPMAdapter(DiffusionAdapter):
    """Adapter for pixel-space ``DDPMPipeline``/``DDIMPipeline`` folders (see the module docstring).

    Parameters
    ----------
    unet, scheduler
        The pipeline's components, on ``device`` in eval mode with frozen
        parameters, the UNet in ``dtype``.
    labels : dict, optional
        The parsed labels.json (required when the UNet has ``num_class_embeds``).
    model_id, revision, fingerprint, device, dtype
        As in ``DiffusionAdapter``.
    """

    family = "ddpm"
    components = {"unet": UNet2DModel, "scheduler": SchedulerMixin}
    full_precision_components = ()
    denoiser_name = "unet"

    def __init__(
        self,
        *,
        unet: UNet2DModel,
        scheduler: SchedulerMixin,
        labels: dict | None = None,
        model_id: str,
        revision: str | None = None,
        fingerprint: str = "",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.unet = self.denoiser = unet
        self._read_scheduler(scheduler, unet)
        self.num_class_embeds = unet.config.num_class_embeds
        self.id2label: dict[int, str] = {}
        self.null_class_id: int | None = None
        if self.num_class_embeds is not None:
            self.conditioning = "class"
            self._read_labels(labels, model_id)
        super().__init__(
            model_id=model_id,
            revision=revision,
            fingerprint=fingerprint,
            resolution=square_resolution(unet.config.sample_size),
            image_channels=unet.config.in_channels,
            alphas_cumprod=scheduler.alphas_cumprod,
            device=device,
            dtype=dtype,
        )

    def _read_labels(self, labels: dict | None, model_id: str) -> None:
        example = '{"id2label": {"0": "first class name", ...}, "null_class_id": N}'
        if not labels or "null_class_id" not in labels:
            raise CDIError(
                f"{model_id}: the UNet is class-conditional (num_class_embeds={self.num_class_embeds}) but the "
                f"pipeline folder has no labels.json with a null_class_id; add one: {example}"
            )
        try:
            self.id2label = {int(k): str(v) for k, v in labels.get("id2label", {}).items()}
            self.null_class_id = int(labels["null_class_id"])
        except (TypeError, ValueError, AttributeError):
            raise CDIError(f"{model_id}: labels.json is malformed; expected {example}") from None
        out_of_range = [i for i in [*self.id2label, self.null_class_id] if not 0 <= i < self.num_class_embeds]
        if out_of_range:
            raise CDIError(
                f"{model_id}: labels.json names class ids {out_of_range} but the UNet has "
                f"{self.num_class_embeds} class embeddings (0 to {self.num_class_embeds - 1})"
            )
        self._label_ids = {label.strip().lower(): i for i, label in self.id2label.items()}

    @classmethod
    def conditioning_of(cls, folder: Path, index: dict) -> str:
        """``"class"`` when the UNet has class embeddings (``num_class_embeds`` in unet/config.json)."""
        try:
            config = json.loads((Path(folder) / "unet" / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return cls.conditioning  # the loader reports a missing or broken config
        return "class" if isinstance(config, dict) and config.get("num_class_embeds") is not None else "none"

    @classmethod
    def extra_inputs(cls, folder: Path, index: dict) -> dict:
        """``labels``: the parsed labels.json at the folder root, if any."""
        path = Path(folder) / "labels.json"
        if not path.is_file():
            return {"labels": None}
        try:
            return {"labels": json.loads(path.read_text())}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CDIError(f"{path} is not valid JSON ({exc})") from None

    def class_id(self, caption: str | None) -> int:
        """None -> ``null_class_id``; ``"3"`` -> 3; a label (case-insensitive, whole label) -> its id."""
        if self.conditioning != "class":
            return super().class_id(caption)
        if caption is None:
            return self.null_class_id
        text = caption.strip()
        if text.isdigit():
            class_id = int(text)
            if class_id >= self.num_class_embeds:
                raise CDIError(
                    f"class id {class_id} is out of range: {self.model_id} has class ids 0 to "
                    f"{self.num_class_embeds - 1}"
                )
            return class_id
        class_id = self._label_ids.get(text.lower())
        if class_id is None:
            examples = ", ".join(repr(label) for label in list(self.id2label.values())[:5])
            raise CDIError(
                f"caption {caption!r} names no class of {self.model_id}; use a class id or one of its labels"
                + (f", e.g. {examples}" if examples else "")
            )
        return class_id

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def _class_conditions(self, labels: list[int]) -> Condition:
        return Condition(len(labels), {"class_labels": torch.tensor(labels, dtype=torch.long, device=self.device)})

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        labels = cond.tensors.get("class_labels")
        return self.unet(x_t, t, class_labels=None if labels is None else labels.to(self.device)).sample
