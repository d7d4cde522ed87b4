"""The toy world's data: scikit-learn's digits as captioned 32x32 RGB images.

``load_digit_images`` (white digit on black, upsampled bicubically),
``caption`` (``"a handwritten digit seven"``), the seeded member split
(``split_members``), the image folders with their ``metadata.jsonl``
(``write_image_folder``), the visibly shifted copy of a folder
(``shift_image``, ``write_shifted_images``) and the web copy of an image
(``web_copy``: what a creator publishes). ``cdi.toy.world`` assembles the world
from them; its docstring describes the layout.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageFilter

from cdi.utils.errors import CDIError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGE_SIZE = 32
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NULL_CLASS_ID = 10

# The shift applied to ``nonmembers_shifted``: a blur, then a warm tint that
# also lifts the black background to dark brown. Members are grey (R = G = B),
# so the mean of R - B is exactly 0 for them and about 20/255 for shifted
# images; the blur lowers the mean gradient magnitude.
SHIFT_BLUR_RADIUS = 1.0
SHIFT_GAIN = (1.0, 0.8, 0.55)
SHIFT_OFFSET = (28.0, 18.0, 8.0)

#: JPEG quality of the toy world's web copies (``web_copy``): a common "save for web" setting.
WEB_QUALITY = 85


def caption(label: int) -> str:
    """The caption of a digit class, e.g. ``"a handwritten digit seven"``."""
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


# ----------------------------------------------------------------------- data
def load_digit_images(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as smooth RGB images.

    Returns
    -------
    images : ndarray of uint8, shape (1797, size, size, 3)
        White digit on black: the 0..16 values are scaled to 0..255 and the
        8x8 image is upsampled bicubically; the three channels are equal.
    labels : ndarray of int64, shape (1797,)
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.empty((len(digits.images), size, size, 3), dtype=np.uint8)
    for i, small in enumerate(digits.images):
        grey = Image.fromarray(np.round(small * (255.0 / 16.0)).astype(np.uint8), mode="L")
        images[i] = np.asarray(grey.resize((size, size), Image.Resampling.BICUBIC).convert("RGB"))
    return images, digits.target.astype(np.int64)


def split_members(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified half/half split of image indices into members and non-members.

    scikit-learn's ``train_test_split(stratify=labels, test_size=0.5,
    random_state=seed)``; each class is halved (odd counts give the extra
    image to the non-members). Both index arrays are sorted.
    """
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    members, nonmembers = train_test_split(
        index, test_size=0.5, stratify=labels, random_state=int(seed), shuffle=True
    )
    return np.sort(members), np.sort(nonmembers)


def _file_name(index: int) -> str:
    return f"digit_{int(index):04d}.png"


def write_image_folder(folder: Path, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
    """``images[i]`` for ``i`` in ``indices`` as ``digit_<i>.png``, plus an imagefolder ``metadata.jsonl``
    with each image's caption (``caption(labels[i])``). ``folder`` must not exist yet."""
    folder.mkdir(parents=True, exist_ok=False)
    lines = []
    for i in indices:
        name = _file_name(i)
        Image.fromarray(images[i]).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": caption(labels[i])}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def shift_image(image: Image.Image) -> Image.Image:
    """The toy world's distribution shift: Gaussian blur, then a warm tint.

    ``out_c = offset_c + gain_c * blur(x)_c`` with gain (1.0, 0.8, 0.55) and
    offset (28, 18, 8) on the 0..255 scale: a visible brown cast over the whole
    image (background included) and softer strokes. A colour statistic (mean
    of R - B) or a gradient statistic separates shifted from unshifted images
    perfectly.
    """
    blurred = np.asarray(
        image.convert("RGB").filter(ImageFilter.GaussianBlur(SHIFT_BLUR_RADIUS)), dtype=np.float32
    )
    out = np.asarray(SHIFT_OFFSET, np.float32) + np.asarray(SHIFT_GAIN, np.float32) * blurred
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), mode="RGB")


def write_shifted_images(src_dir: str | Path, dst_dir: str | Path, fraction: float = 1.0, seed: int = 0) -> None:
    """Copy an image folder, applying ``shift_image`` to a fraction of its images.

    Parameters
    ----------
    src_dir : path
        An image folder (optionally with a ``metadata.jsonl``/``metadata.csv``,
        which is copied unchanged so captions stay attached).
    dst_dir : path
        Created; must not exist or be empty. Written atomically (built beside
        it, then renamed).
    fraction : float in [0, 1]
        Share of the images that are shifted: ``round(fraction * n)`` images
        chosen uniformly at random (seeded); the rest are copied byte for
        byte. Shifted images keep their file name and format.
    seed : int
        Seed of the choice of shifted images.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if not 0.0 <= float(fraction) <= 1.0:
        raise CDIError(f"fraction must be between 0 and 1, got {fraction}")
    if not src.is_dir():
        raise CDIError(f"image folder {src} does not exist")
    names = sorted(p.name for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not names:
        raise CDIError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {src}")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CDIError(f"{dst} already exists and is not empty; choose another folder or remove it")
    chosen = np.random.default_rng(int(seed)).choice(len(names), size=round(fraction * len(names)), replace=False)
    shifted = {names[i] for i in chosen}
    with atomic_dir(dst) as tmp:
        for name in names:
            if name in shifted:
                with Image.open(src / name) as image:
                    shift_image(image).save(tmp / name)
            else:
                shutil.copy2(src / name, tmp / name)
        for meta in ("metadata.jsonl", "metadata.csv"):
            if (src / meta).is_file():
                shutil.copy2(src / meta, tmp / meta)


def web_copy(image: Image.Image, quality: int | str = WEB_QUALITY) -> bytes:
    """The web copy of an image, as a creator's website would show it: the bytes of a JPEG file.

    The image in RGB, saved by Pillow's libjpeg at ``quality`` with its
    default chroma subsampling (4:2:0), baseline, same size. ``quality`` may
    also name one of Pillow's presets (``"web_high"``: Photoshop-like
    "save for web" tables, not libjpeg's, with 4:4:4 chroma).
    """
    import io

    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality if isinstance(quality, str) else int(quality))
    return buffer.getvalue()


def web_copy_name(name: str) -> str:
    """File name of a web copy: the same stem with ``.jpg``."""
    return Path(name).with_suffix(".jpg").name


# --------------------------------------------------------------- file helpers
@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh folder beside ``target``; on success it replaces ``target``.

    An existing ``target`` is moved aside first and removed only after the
    new folder is in place; on failure the temporary folder is removed and
    ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; give it a normal folder's mode
    try:
        yield tmp
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temporary file, then ``os.replace``)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
