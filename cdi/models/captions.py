"""Captions: the early check that a text model gets them, and pseudo-captions from a captioner.

Text-conditioned features (CLiD, and the conditional losses of every family
on a text-to-image model) condition the model on each image's caption. Many
owners have no captions. Two things live here:

* ``check_captions``, run before the diffusion model loads (the model's
  conditioning is read from its ``model_index.json`` without loading any
  weight, ``model_conditioning``): a text model with images lacking a caption
  is refused with a message that offers ``--captions auto``, when CLiD is
  among the features or when only some images have one (conditioned and
  unconditioned images mixed would make the conditioning itself differ
  between P and U). When *no* image has a caption and no family needs one,
  the audit runs every family on the null (empty) caption, with a warning,
  and records this as ``captions.conditioning = "unconditional"``: both
  collections are treated alike, so the test stays valid, only weaker.
* ``--captions auto[:MODEL]``: every image is captioned by an image-to-text
  model (``Captioner``), once per image and captioner, cached by the image's
  SHA-256 (``CaptionCache``). Every image of both collections gets a
  generated caption, also those that came with one, so that P and U are
  conditioned the same way (a published image's original alt-text beside an
  unpublished image's machine caption would itself separate the two).

The default captioner is Florence-2 base (``florence-community/Florence-2-base``,
0.23 B parameters, MIT licence, 2024), asked for its ``<CAPTION>`` task: a
current captioner that is small enough to caption thousands of images on a
CPU or beside the diffusion model on one GPU, whose one-sentence captions
resemble the alt-text captions of web-scale training sets, and which loads
through transformers' standard classes (``AutoProcessor`` and
``AutoModelForImageTextToText``, native since transformers 4.56; no remote
code). The CLiD paper used BLIP (``auto:blip``, Salesforce's BLIP large);
any image-to-text checkpoint those two classes load works (``auto:ORG/NAME``
or a local folder): BLIP/GIT-style captioners are run without a prompt,
Florence-2 with its task token, chat VLMs (SmolVLM, Qwen2.5-VL, ...) through
their chat template with ``CHAT_PROMPT``. Decoding is greedy (deterministic),
at most ``MAX_NEW_TOKENS`` tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cdi.utils.errors import CDIError
from cdi.utils.io import atomic_write_text

logger = logging.getLogger("cdi")

#: Short names for captioners.
CAPTIONERS: dict[str, str] = {
    "florence2": "florence-community/Florence-2-base",
    "florence2-large": "florence-community/Florence-2-large",
    "blip": "Salesforce/blip-image-captioning-large",
}
DEFAULT_CAPTIONER = "florence2"
MAX_NEW_TOKENS = 40
CHAT_PROMPT = "Describe this image in one short sentence."
FLORENCE_TASK = "<CAPTION>"
CAPTION_BATCH = 16

# Files a captioner needs from the Hub: configs, tokenizer and processor files, safetensors weights.
_CAPTIONER_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


# --------------------------------------------------------------------------- the option


@dataclass(frozen=True)
class CaptionOption:
    """What ``--captions`` asked for: ``"files"`` (the folders' own captions) or ``"auto"`` with a captioner."""

    source: str  # "files" | "auto"
    captioner: str | None = None  # alias, hub id or local folder (source "auto")


def parse_captions_option(value: str | None) -> CaptionOption:
    """Parse ``--captions``: ``files`` (default), ``auto`` or ``auto:MODEL``."""
    if value is None or value.strip().lower() == "files":
        return CaptionOption("files")
    text = value.strip()
    head, _, model = text.partition(":")
    if head.lower() != "auto":
        raise CDIError(f"--captions must be files, auto or auto:MODEL (a captioner alias "
                       f"{', '.join(CAPTIONERS)}, a hub id or a local folder), got {value!r}")
    model = model.strip()
    if ":" in text and not model:
        raise CDIError("--captions auto: needs a captioner after the colon, e.g. auto:blip; or plain auto")
    return CaptionOption("auto", model or DEFAULT_CAPTIONER)


# --------------------------------------------------------------------------- the early check


def model_conditioning(name: str, *, revision: str | None = None) -> str | None:
    """``"text"``, ``"class"`` or ``"none"``: how the model named ``name`` is conditioned, or None if unknown.

    Read from ``model_index.json`` (a local pipeline folder, or a hub model
    already in the local Hugging Face cache) and the component configs the
    adapter reads, without loading any weight; an alias gives its family.
    None when the model is neither (a hub model not yet downloaded): the
    feature families then check their captions after loading, as before.
    """
    from cdi.models.loading import adapter_class, detect_family, read_model_index
    from cdi.models.registry import ALIASES

    folder = Path(os.fspath(name)).expanduser()
    if not folder.is_dir():
        hub_id = ALIASES[name].checkpoint if name in ALIASES else name
        folder = _cached_pipeline(hub_id, revision)
        if folder is None:
            return None
    index = read_model_index(folder)
    return adapter_class(detect_family(index, folder)).conditioning_of(folder, index)


def _cached_pipeline(hub_id: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of a hub pipeline (its model_index.json is cached), else None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(hub_id, "model_index.json", revision=revision)
    except Exception:  # not a valid repo id, no cache: unknown
        return None
    return Path(path).parent if isinstance(path, str) else None


def check_captions(
    conditioning: str | None,
    families: Sequence[Any],
    collections: Sequence[Any],
    option: CaptionOption,
) -> dict[str, Any]:
    """Refuse, before the model loads, captions that the features cannot work with.

    Parameters
    ----------
    conditioning : {"text", "class", "none"} or None
        From ``model_conditioning``; None (unknown) and ``"none"`` check nothing.
    families : feature families
        Those to be extracted; a family with ``requires_condition`` (CLiD) needs
        a caption (text model) or class label (class model) for every image.
    collections : ImageCollection
        The scanned folders.
    option : CaptionOption
        ``auto`` captions every image, so nothing can be missing.

    Returns
    -------
    dict
        The ``captions`` record of the result: ``source``, ``conditioning``
        (``"caption"``, ``"class label"``, ``"unconditional"`` or ``"none"``)
        and ``missing`` per collection.

    Raises
    ------
    CDIError
        Images lack the caption a family needs, or a text model's images are
        a mix of captioned and uncaptioned ones.
    """
    missing = {c.name: [r.path for r in c.records if r.caption is None or not r.caption.strip()]
               for c in collections}
    n_missing = sum(len(m) for m in missing.values())
    total = sum(len(c.records) for c in collections)
    record: dict[str, Any] = {"source": option.source, "missing": {k: len(v) for k, v in missing.items()}}
    if conditioning in (None, "none"):
        record["conditioning"] = "none" if conditioning == "none" else "unknown"
        return record
    what = "caption" if conditioning == "text" else "class label"
    record["conditioning"] = what
    if option.source == "auto" or n_missing == 0:
        if option.source == "auto":
            record["missing"] = {k: 0 for k in missing}
        return record
    needing = [f.name for f in families if getattr(f, "requires_condition", False)]
    offer = ("; or pass --captions auto to caption every image with an image-to-text model "
             f"(default {CAPTIONERS[DEFAULT_CAPTIONER]}, cached by image hash)") if conditioning == "text" else ""
    listing = "\n".join(f"  {name}: {len(paths)} of {len(c.records)} image(s) without a {what}"
                        + (f", e.g. {', '.join(paths[:3])}" if paths else "")
                        for (name, paths), c in zip(missing.items(), collections))
    add = ("add captions (metadata.jsonl with file_name and text, or a NAME.txt beside each image)"
           if conditioning == "text" else "add class labels (the caption field names the class)")
    if needing:
        raise CDIError(
            f"the feature famil{'ies' if len(needing) > 1 else 'y'} {', '.join(needing)} condition the model on "
            f"each image's {what}, but {n_missing} of {total} image(s) have none:\n{listing}\n"
            f"Either {add}, or drop {', '.join(needing)} from --features (e.g. --features cdi){offer}."
        )
    if n_missing < total:
        raise CDIError(
            f"this {conditioning}-conditioned model would see {n_missing} of {total} image(s) without a {what} and "
            f"the others with one:\n{listing}\n"
            f"Mixing conditioned and unconditioned images makes the conditioning itself differ between the "
            f"images, which the test would pick up. Either {add} for every image{offer}."
        )
    logger.warning(
        "no image has a %s: every feature is computed with the model's empty (null) %s, unconditionally; "
        "the test stays valid but the model's memory of the %ss is not used (pass --captions auto to "
        "caption the images)", what, what, what)
    record["conditioning"] = "unconditional"
    return record


# --------------------------------------------------------------------------- the captioner


class Captioner:
    """An image-to-text model loaded with ``AutoProcessor`` + ``AutoModelForImageTextToText``.

    ``id`` is what was asked for (alias resolved to its hub id), ``folder``
    the local files, ``fingerprint`` the SHA-256 over the configs,
    tokenizer/processor files and weights (``cdi.models.loading.fingerprint_weights``),
    ``files`` each of their SHA-256.
    """

    def __init__(self, name: str, *, device: str = "auto", dtype: str = "float32",
                 revision: str | None = None, local_files_only: bool | None = None) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from cdi.models.loading import file_digests, fingerprint_weights, resolve_device, resolve_dtype

        self.id = CAPTIONERS.get(name, name)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.folder, self.revision = _captioner_folder(self.id, revision, local_files_only)
        files = sorted(p for p in self.folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not any(p.suffix == ".safetensors" for p in files):
            raise CDIError(f"captioner {self.id!r} ({self.folder}) has no safetensors weights; give a folder "
                           "saved with save_pretrained (safetensors), or another captioner")
        try:
            self.processor = AutoProcessor.from_pretrained(self.folder, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(
                self.folder, local_files_only=True, dtype=self.dtype, use_safetensors=True,
            ).to(self.device).eval().requires_grad_(False)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CDIError(
                f"cannot load the captioner {self.id!r} from {self.folder} ({type(exc).__name__}: {exc}); it must "
                "be an image-to-text model that transformers' AutoProcessor and AutoModelForImageTextToText load "
                "(BLIP, GIT, Florence-2, SmolVLM, Qwen2.5-VL, ...)"
            ) from None
        self.files = file_digests(self.folder, files)
        self.fingerprint = fingerprint_weights(self.folder, files)
        self.model_type = getattr(self.model.config, "model_type", "")
        self.prompt = self._prompt()
        self._torch = torch

    def _prompt(self) -> str | None:
        if self.model_type == "florence2":
            return FLORENCE_TASK
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CHAT_PROMPT}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return None

    def describe(self) -> dict[str, Any]:
        """What the result records about the captioner."""
        return {"id": self.id, "revision": self.revision, "fingerprint": self.fingerprint, "files": self.files,
                "model_type": self.model_type, "prompt": self.prompt, "max_new_tokens": MAX_NEW_TOKENS,
                "decoding": "greedy"}

    def settings_key(self) -> str:
        """What decides a caption besides the image: fingerprint, prompt, decoding."""
        text = json.dumps([self.fingerprint, self.prompt, MAX_NEW_TOKENS, "greedy"])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __call__(self, images: list) -> list[str]:
        """One caption per PIL image (RGB), greedy decoding, whitespace collapsed."""
        kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        if self.prompt is not None:
            kwargs["text"] = [self.prompt] * len(images)
        inputs = self.processor(**kwargs).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with self._torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1)
        if self.prompt is not None and "input_ids" in inputs and not self.model.config.is_encoder_decoder:
            out = out[:, inputs["input_ids"].shape[1]:]  # decoder-only VLMs echo the prompt
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]


def _captioner_folder(name: str, revision: str | None, local_files_only: bool | None) -> tuple[Path, str | None]:
    """A local folder as it is; a hub id through the Hugging Face cache (downloaded unless offline)."""
    from cdi.models.loading import _hub_errors, _offline

    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder.resolve(), None
    if folder.exists() or name.startswith((".", "/", "~")):
        raise CDIError(f"captioner {name!r} is not a folder; give a local folder, a hub id or one of "
                       f"{', '.join(CAPTIONERS)}")
    from huggingface_hub import snapshot_download

    offline = _offline(local_files_only)
    with _hub_errors(name, revision, offline):
        path = Path(snapshot_download(name, revision=revision, allow_patterns=_CAPTIONER_FILES,
                                      local_files_only=offline))
    return path, path.name


# --------------------------------------------------------------------------- the cache


class CaptionCache:
    """Generated captions by image SHA-256, for one captioner and its settings, in a small JSON file.

    The file is ``captions-<settings key>.json`` in ``folder``: beside the
    feature store when one is given (``cache_folder``), else in the cdi cache
    (``$CDI_CACHE/captions`` or ``~/.cache/cdi/captions``). It is rewritten
    atomically after each collection.
    """

    def __init__(self, folder: str | os.PathLike, captioner: Captioner) -> None:
        self.path = Path(folder) / f"captions-{captioner.settings_key()}.json"
        self.header = {"format": "cdi.captions", "captioner": captioner.id, "fingerprint": captioner.fingerprint,
                       "prompt": captioner.prompt, "max_new_tokens": MAX_NEW_TOKENS}
        self.captions: dict[str, str] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if data.get("fingerprint") == captioner.fingerprint:
                    self.captions = {str(k): str(v) for k, v in data.get("captions", {}).items()}
            except (OSError, ValueError, AttributeError):
                logger.warning("caption cache %s is unreadable; captions are generated again", self.path)

    def save(self) -> None:
        try:
            atomic_write_text(self.path, json.dumps({**self.header, "captions": dict(sorted(self.captions.items()))},
                                                    indent=1) + "\n")
        except OSError as exc:
            logger.warning("cannot write the caption cache %s (%s); captions will be generated again next time",
                           self.path, exc.strerror or exc)


def cache_folder(store: str | os.PathLike | None) -> Path:
    """Where captions are cached: the feature store's folder, else ``$CDI_CACHE/captions`` (``~/.cache/cdi``)."""
    if store is not None:
        path = Path(store).expanduser()
        return path.parent if path.suffix == ".sqlite" else path
    if os.environ.get("CDI_CACHE"):
        return Path(os.environ["CDI_CACHE"]).expanduser() / "captions"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "cdi" / "captions"


def caption_collections(collections: Sequence[Any], captioner: Captioner, cache: CaptionCache,
                        *, batch_size: int = CAPTION_BATCH) -> tuple[list[Any], dict[str, Any]]:
    """Give every image of ``collections`` its generated caption (cached by SHA-256).

    Returns the collections with their records' captions replaced, and the
    ``captions`` record of the result: source, captioner (``describe``),
    how many captions were generated and how many read from the cache, and
    the cache file.
    """
    from PIL import Image

    from cdi.data.image_files import open_regular_file, pillow_limits, upright_rgb

    todo = sorted({r.sha256: (c, r) for c in collections for r in c.records if r.sha256 not in cache.captions}.items())
    generated = 0
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        images = []
        for _, (collection, record) in chunk:
            with open_regular_file(collection.root / record.path) as fh, pillow_limits(collection.max_pixels):
                data = fh.read()
                if hashlib.sha256(data).hexdigest() != record.sha256:
                    raise CDIError(f"the {collection.name} image {record.path} changed since the folder was "
                                   "scanned; scan it again")
                images.append(upright_rgb(Image.open(io.BytesIO(data))))
        for (sha, _), text in zip(chunk, captioner(images)):
            cache.captions[sha] = text
        generated += len(chunk)
    if generated:
        cache.save()
    captioned = [dataclasses.replace(c, records=[dataclasses.replace(r, caption=cache.captions[r.sha256] or None)
                                                  for r in c.records]) for c in collections]
    total = len({r.sha256 for c in collections for r in c.records})
    record = {"source": "auto", "captioner": captioner.describe(), "generated": generated,
              "from_cache": total - generated, "cache_file": str(cache.path)}
    return captioned, record
