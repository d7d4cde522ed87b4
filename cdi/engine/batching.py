"""Choosing the batch size, and the roofline it is measured against.

``--batch-size N`` means N images per batch *and* at most N samples per
network call (``features.base``): every family runs the network at the same
batch size, however many timesteps, repetitions or conditions it expands each
image into. ``--batch-size auto`` picks N for the device:

* **CUDA:** the largest of 1, 2, 4, ..., ``MAX_AUTO_BATCH`` at which every
  family's ``extract`` runs on random images without running out of memory
  (larger batches keep a GPU busier). Decided by memory, not by time.
* **Elsewhere (CPU, MPS):** ``CPU_AUTO_BATCH``, a fixed number. It used to be
  the batch of the fastest bare forward loop, but a choice by wall-clock time
  changes with the machine's load (4 on one run, 32 the next), and values
  computed at different batch sizes differ by float rounding, so the same
  command gave a different ``result.json``. Per-sample time on a 2-core CPU
  (toy SD model): 1.45 ms at batch 8, 0.84 at 32-64, 0.94 at 128-512, so 32
  is near the best and small enough for any host memory.

``audit``, ``extract`` and ``benchmark`` use this rule; only ``cdi speed``
searches by timing (it passes ``fastest_forward_batch``). The batch size
actually used is recorded in ``result.json``.

The roofline is also what ``cdi speed`` compares extraction with: the time a
bare batched loop of denoiser calls takes at its best batch size.
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable, Sequence

import torch

from cdi.utils.errors import CDIError
from cdi.models.base import Condition, DiffusionAdapter
from cdi.features.base import EncodedBatch, FeatureFamily

#: Largest image batch ``batch_size="auto"`` picks.
MAX_AUTO_BATCH = 256
#: The batch size of ``batch_size="auto"`` off CUDA (a fixed rule: same command, same values).
CPU_AUTO_BATCH = 32
#: Largest network batch the roofline loop tries.
MAX_ROOFLINE_BATCH = 256
#: The roofline stops growing the batch once one call takes this long (s).
ROOFLINE_CALL_LIMIT = 10.0
#: ... or once this many doublings in a row improved the best per-sample time by less than 5%.
ROOFLINE_PATIENCE = 2
#: Each roofline batch size is timed for at least this long (s).
ROOFLINE_MIN_TIME = 0.3


def parse_batch_size(value: str | int) -> int | str:
    """``"auto"`` or a whole number >= 1 (as given on the command line); ``CDIError`` otherwise."""
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise CDIError(f"--batch-size must be a whole number of at least 1 or 'auto', got {value!r}")
    return int(text)


# --------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------
# Roofline
# --------------------------------------------------------------------------
def _time_call(device: torch.device, call: Callable[[], None]) -> float:
    """Seconds per call of ``call``: one warm-up call, then calls until ``ROOFLINE_MIN_TIME`` has passed."""
    call()
    sync(device)
    reps = 0
    start = time.perf_counter()
    while True:
        call()
        reps += 1
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= ROOFLINE_MIN_TIME:
            return elapsed / reps


def roofline_seconds_per_call(
    adapter: DiffusionAdapter, cond: Condition, *, backward: bool, max_batch: int = MAX_ROOFLINE_BATCH
) -> tuple[float, int]:
    """Fastest seconds per sample of a bare batched denoiser loop, and its batch size.

    ``cond`` is a one-sample condition, tiled to each batch size. With
    ``backward`` each call is a forward on ``x_t.requires_grad_()`` followed by
    ``.sum().backward()``; otherwise a forward under ``torch.no_grad``.
    Batch sizes 1, 2, 4, ... up to ``max_batch`` are tried; the search stops
    at the first size that runs out of CUDA memory, after a size whose call
    takes more than ``ROOFLINE_CALL_LIMIT`` seconds, or once
    ``ROOFLINE_PATIENCE`` doublings in a row brought less than 5% over the
    best per-sample time so far (the network is then saturated).
    """
    with torch.no_grad():
        probe = adapter.encode(torch.zeros((1, adapter.image_channels, adapter.resolution, adapter.resolution),
                                           device=adapter.device))
    shape = tuple(probe.shape[1:])
    gen = torch.Generator().manual_seed(0)
    best = (float("inf"), 1)
    stale = 0
    size = 1
    while size <= max_batch:
        x_t = torch.randn((size, *shape), generator=gen).to(adapter.device)
        t = torch.randint(0, adapter.num_train_timesteps, (size,), generator=gen).to(adapter.device)
        tiled = cond.repeat(size)

        def call() -> None:
            if backward:
                x = x_t.detach().requires_grad_(True)
                with torch.enable_grad():
                    adapter.eps(x, t, tiled).sum().backward()
            else:
                with torch.no_grad():
                    adapter.eps(x_t, t, tiled)

        try:
            per_call = _time_call(adapter.device, call)
        except Exception as exc:  # noqa: BLE001 (only OOM is expected; anything else is re-raised)
            if not _is_oom(exc):
                raise
            _free(adapter.device)
            break
        stale = 0 if per_call / size < 0.95 * best[0] else stale + 1
        if per_call / size < best[0]:
            best = (per_call / size, size)
        if per_call > ROOFLINE_CALL_LIMIT or stale >= ROOFLINE_PATIENCE:
            break
        size *= 2
    _free(adapter.device)
    return best


# --------------------------------------------------------------------------
# batch_size="auto"
# --------------------------------------------------------------------------
def _probe_batch(adapter: DiffusionAdapter, size: int, caption: str | None) -> EncodedBatch:
    """An encoded batch of ``size`` random images, chunked like the engine's (for the fit search)."""
    gen = torch.Generator().manual_seed(size)
    pixels = torch.rand((size, adapter.image_channels, adapter.resolution, adapter.resolution), generator=gen) * 2 - 1
    pixels = pixels.to(adapter.device)
    hashes = [hashlib.sha256(f"cdi-speed-probe-{i}".encode()).hexdigest() for i in range(size)]
    captions = [caption] * size
    return EncodedBatch(adapter.encode(pixels), hashes, captions, adapter.conditions(captions), 0, pixels,
                        max_chunk=size)


def _largest_fitting_batch(adapter: DiffusionAdapter, families: Sequence[FeatureFamily], caption: str | None) -> int:
    fits = 0
    size = 1
    while size <= MAX_AUTO_BATCH:
        try:
            with torch.no_grad():
                batch = _probe_batch(adapter, size, caption)
                for family in families:
                    family.extract(adapter, batch)
            sync(adapter.device)
        except Exception as exc:  # noqa: BLE001 (only OOM is expected; anything else is re-raised)
            if not _is_oom(exc):
                raise
            break
        finally:
            batch = None
            _free(adapter.device)
        fits = size
        size *= 2
    if fits == 0:
        raise CDIError(
            f"not even one image fits in {adapter.device} memory with these feature families; "
            f"use --dtype bfloat16, fewer families, or a GPU with more memory"
        )
    return fits


def auto_batch_size(
    adapter: DiffusionAdapter, families: Sequence[FeatureFamily], caption: str | None = None, *,
    fastest_forward_batch: int | None = None,
) -> int:
    """The batch size of ``batch_size="auto"`` (see the module docstring).

    On CUDA the largest batch of at most ``MAX_AUTO_BATCH`` images at which
    every family fits in memory; elsewhere ``CPU_AUTO_BATCH``, or
    ``fastest_forward_batch`` when the caller has measured the fastest batch
    of the bare forward loop and wants it (only ``cdi speed`` does: a choice
    by timing is not reproducible). ``caption`` conditions the memory probes
    (a conditional model's first caption; None: the null condition).
    """
    if adapter.device.type == "cuda":
        return _largest_fitting_batch(adapter, families, caption)
    if fastest_forward_batch is not None:
        return min(fastest_forward_batch, MAX_AUTO_BATCH)
    return CPU_AUTO_BATCH


def auto_batch_rule(device: torch.device | str) -> str:
    """How ``batch_size="auto"`` chooses on ``device``, in words (recorded beside the batch size)."""
    if torch.device(device).type == "cuda":
        return f"auto: largest of 1, 2, 4, ..., {MAX_AUTO_BATCH} that fits in CUDA memory"
    return f"auto: fixed {CPU_AUTO_BATCH} off CUDA"


def resolve_batch_size(
    value: int | str, adapter: DiffusionAdapter, families: Sequence[FeatureFamily], caption: str | None = None, *,
    fastest_forward_batch: int | None = None,
) -> int:
    """An integer batch size from ``value`` (a number or ``"auto"``; see ``auto_batch_size``)."""
    value = parse_batch_size(value)
    if value != "auto":
        return value
    return auto_batch_size(adapter, families, caption, fastest_forward_batch=fastest_forward_batch)
