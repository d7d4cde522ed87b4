"""Loading a collection's images for the model: a torch ``DataLoader`` of preprocessed batches.

Decoding happens in a torch ``DataLoader`` (``image_batches``), whose worker
processes read each file once, check that its SHA-256 still matches the scan
(``decode_checked``), and preprocess it (``cdi.data.preprocess.preprocess_image``).
A file that changed or vanished since the scan is a ``CDIError`` naming it.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from cdi.utils.errors import CDIError
from cdi.data.image_files import NotRegular, decodable_formats, open_regular_file, pillow_limits
from cdi.data.preprocess import Preprocess, preprocess_image

if TYPE_CHECKING:
    from cdi.data.collection import ImageCollection

class CollectionDataset(torch.utils.data.Dataset):
    """The images of a collection as preprocessed tensors, for a ``DataLoader``.

    Item ``i`` is ``(pixels, position)``: the (C, H, W) tensor of
    ``collection.records[position]``, where ``position = indices[i]`` (or
    ``i`` when ``indices`` is None). The file is read once; its SHA-256 must
    still equal the recorded one, so every number cdi computes belongs to the
    exact bytes that were scanned and hashed.
    """

    def __init__(self, collection: ImageCollection, preprocess: Preprocess,
                 indices: Sequence[int] | None = None) -> None:
        n = len(collection.records)
        positions = list(range(n)) if indices is None else [int(i) for i in indices]
        for i in positions:
            if not 0 <= i < n:
                raise IndexError(f"index {i} out of range for a collection of {n} images")
        self.collection = collection
        self.preprocess = preprocess
        self.positions = positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        position = self.positions[i]
        data, where = self.read(position)
        record = self.collection.records[position]
        return decode_checked(data, record.sha256, self.preprocess, self.collection.max_pixels, where), position

    def read(self, position: int) -> tuple[bytes, str]:
        """The file bytes of ``collection.records[position]`` and the words naming it in errors."""
        record = self.collection.records[position]
        where = f"{self.collection.name} image {record.path} (in {self.collection.root})"
        try:
            with open_regular_file(self.collection.root / record.path) as fh:
                return fh.read(), where
        except NotRegular as exc:
            raise CDIError(f"the {where} is now {exc.args[0]}; restore the image file") from None
        except OSError as exc:
            raise CDIError(f"cannot read the {where} any more: {exc.strerror or exc}; "
                           "restore it, or scan the folder again") from None


def decode_checked(data: bytes, sha256: str, pre: Preprocess, max_pixels: int, where: str) -> torch.Tensor:
    """Preprocess an image file's bytes, after checking they still hash to ``sha256`` (``CDIError`` if not).

    ``where`` names the image in the error message. Used by the loader here
    and by Ray workers, which receive the bytes from the driver.
    """
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise CDIError(
            f"the {where} changed since the folder was scanned (SHA-256 {sha256[:12]}... then, "
            f"{digest[:12]}... now); scan the folder again so the recorded hashes match the images used"
        )
    with pillow_limits(max_pixels):
        image = Image.open(io.BytesIO(data), formats=decodable_formats())
        image.load()
    return preprocess_image(image, pre)


def default_num_workers() -> int:
    """Decoding worker processes by default: min(4, usable CPUs - 1), so 0 on one CPU."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(4, cpus - 1))


def image_batches(
    collection: ImageCollection,
    pre: Preprocess,
    *,
    batch_size: int,
    indices: Sequence[int] | None = None,
    num_workers: int | None = None,
) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """Yield ``(pixels, positions)`` batches in order, decoded in worker processes.

    ``pixels`` is (B, C, H, W) float32 in [-1, 1]; ``positions`` are indices
    into ``collection.records``. Decoding runs in ``num_workers`` processes
    (default ``default_num_workers()``; 0 decodes in this process) so it
    overlaps the caller's model work; the output does not depend on the
    number of workers. A file that changed or vanished since the scan raises
    a ``CDIError`` naming it.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CDIError(f"batch_size must be a positive whole number, got {batch_size!r}")
    if num_workers is None:
        num_workers = default_num_workers()
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise CDIError(f"the number of decoding workers must be 0 or more, got {num_workers!r}")
    dataset = CollectionDataset(collection, pre, indices)
    n_batches = -(-len(dataset) // batch_size)
    loader = torch.utils.data.DataLoader(
        _Guarded(dataset),
        batch_size=batch_size,
        shuffle=False,
        num_workers=min(num_workers, n_batches),
        collate_fn=_collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
    return _checked_batches(loader)  # arguments are checked now, files are read when iterated


def _checked_batches(loader: torch.utils.data.DataLoader) -> Iterator[tuple[torch.Tensor, list[int]]]:
    for pixels, positions, error in loader:
        if error is not None:
            raise CDIError(error)
        yield pixels, positions


class _Guarded(torch.utils.data.Dataset):
    """Returns a ``CDIError``'s message instead of raising it, so that an error
    in a worker process reaches the user as its plain message (the DataLoader
    would wrap it in a worker traceback)."""

    def __init__(self, dataset: CollectionDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | str:
        try:
            return self.dataset[i]
        except CDIError as exc:
            return str(exc)


def _collate(items: list) -> tuple[torch.Tensor | None, list[int], str | None]:
    for item in items:
        if isinstance(item, str):
            return None, [], item
    # numpy's single-threaded copy: torch.stack is slow when many threads compete for the CPU
    pixels = torch.from_numpy(np.stack([t.numpy() for t, _ in items]))
    return pixels, [p for _, p in items], None
