"""How fast feature extraction runs, and how close it is to the network's own speed.

``measure_speed`` runs the extraction engine (``features.extract``) on a
collection of images and reports, for the whole feature set and for each
family: images per second, model calls per image (forward, backward: the
families' declared ``cost``), and the **efficiency**

    efficiency = roofline seconds / measured seconds

where the roofline is the time a bare loop of the same number of denoiser
calls takes on the same device at the best batch size: random ``x_t`` of the
model's input shape, random timesteps, the first image's condition, each
forward call timed under ``torch.no_grad`` and each backward call as a
forward with ``x_t.requires_grad`` plus ``.sum().backward()`` (a family's
backward calls are among its forward calls: its roofline is
``(forward - backward) * t_forward + backward * t_forward_backward``). The
batch sizes 1, 2, 4, ... are tried and the fastest per-sample time is kept.
1.0 means no time is spent beyond the unavoidable network work; encoding,
text conditioning, noise generation, image decoding and host transfers are
what the measured time adds.

Timing: one warm-up extraction (first calls are slow: allocation, kernel
selection) on a separate batch of synthetic images, then one timed
extraction. A family's time is the wall time of its ``extract`` calls (with a
CUDA synchronisation around each); the whole set's time is the wall time of
``extract_features``, so it also holds decoding, ``encode`` and
``conditions``. The process's thread settings are used as they are (and
reported as ``torch_threads``): on a machine whose cores are busy with other
work, several intra-op threads can make small networks many times slower
(measured: the toy SD model ran 8.5 times faster with ``OMP_NUM_THREADS=1``
than with 2 threads on a loaded 2-core machine), so compare runs at the same
thread count.
"""

from __future__ import annotations

import functools
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from cdi.engine.batching import resolve_batch_size, roofline_seconds_per_call, sync
from cdi.data.collection import ImageCollection
from cdi.utils.errors import CDIError
from cdi.models.base import DiffusionAdapter
from cdi.features.base import Cost, EncodedBatch, FeatureFamily
from cdi.features.calls import planned_calls
from cdi.features.extract import extract_features
from cdi.features.registry import total_cost

# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------
def synthetic_images(folder: str | Path, count: int, resolution: int, channels: int, *, seed: int = 0) -> Path:
    """Write ``count`` seeded random PNGs (``resolution`` px, with captions) to ``folder``.

    Image ``i`` is uniform noise from ``numpy.random.default_rng([seed, i])``
    (greyscale when ``channels == 1``) with the caption ``"synthetic image
    i"`` in ``image_i.txt``, so every file is distinct and reproducible.
    """
    if int(count) < 1:
        raise CDIError(f"need at least one image to time, got {count}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(int(count)):
        rng = np.random.default_rng([int(seed), i])
        shape = (resolution, resolution) if channels == 1 else (resolution, resolution, 3)
        pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
        Image.fromarray(pixels, mode="L" if channels == 1 else "RGB").save(folder / f"image_{i:05d}.png")
        (folder / f"image_{i:05d}.txt").write_text(f"synthetic image {i}\n", encoding="utf-8")
    return folder


def host_peak_rss_bytes() -> int:
    """Peak resident memory of this process (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# --------------------------------------------------------------------------
# The measurement
# --------------------------------------------------------------------------
class _TimedFamily:
    """Wraps a family's ``extract`` to add up its wall time (CUDA synchronised)."""

    def __init__(self, family: FeatureFamily, device: torch.device) -> None:
        self.family = family
        self.device = device
        self.seconds = 0.0
        self._extract = family.extract

    def install(self) -> None:
        @functools.wraps(self._extract)
        def timed(adapter: DiffusionAdapter, batch: EncodedBatch) -> torch.Tensor:
            sync(self.device)
            start = time.perf_counter()
            out = self._extract(adapter, batch)
            sync(self.device)
            self.seconds += time.perf_counter() - start
            return out

        self.family.extract = timed  # instance attribute: this family object only

    def remove(self) -> None:
        self.family.__dict__.pop("extract", None)


def _sum_costs(costs) -> Cost:
    total = Cost(0, 0)
    for cost in costs:
        total = total + cost
    return total


def _own_cost(family: FeatureFamily, adapter: DiffusionAdapter) -> Cost:
    """The calls a family makes in its own ``extract`` when the engine makes its shared calls."""
    shared = _sum_costs(call.cost for call in family.shared_calls(adapter))
    cost = family.cost(adapter)
    return Cost(cost.forward - shared.forward, cost.backward - shared.backward)


def _entry(cost: Cost, images: int, measured: float, per_forward: float, per_backward: float) -> dict[str, Any]:
    per_image = (cost.forward - cost.backward) * per_forward + (cost.backward * per_backward if cost.backward else 0.0)
    roofline = images * per_image
    return {
        "images_per_second": images / measured if measured > 0 else float("inf"),
        "calls_per_image": {"forward": cost.forward, "backward": cost.backward},
        "measured_seconds": measured,
        "roofline_seconds": roofline,
        "efficiency": roofline / measured if measured > 0 else float("nan"),
    }


def measure_speed(
    adapter: DiffusionAdapter,
    families: Sequence[FeatureFamily],
    *,
    collection: ImageCollection | None = None,
    images: int | None = None,
    batch_size: int | str = "auto",
    audit_size: int = 1000,
    seed: int = 0,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Time feature extraction of ``families`` on ``adapter`` and compare it with the roofline.

    Parameters
    ----------
    adapter : DiffusionAdapter
        The loaded model (its device and dtype are used as they are).
    families : sequence of FeatureFamily
        The families to time (fresh instances: their ``extract`` is wrapped
        with a timer for the duration of the call).
    collection : ImageCollection, optional
        The images to time; default ``images`` synthetic images (seeded random
        PNGs at the model's resolution, with captions) in a temporary folder.
    images : int or None
        Number of synthetic images when no collection is given; None: two
        full batches (at least 32), so every family is timed at the batch
        size it will run at.
    batch_size : int or "auto"
        Batch size of the extraction (``cdi.engine.batching.auto_batch_size`` for
        "auto": on CPU, the roofline's fastest batch).
    audit_size : int
        Images per collection of the audit whose duration is estimated:
        ``audit_estimate_seconds = 2 * audit_size * measured seconds per image``.
    seed : int
        Seed of the extraction's noise draws and of the synthetic images.
    num_workers : int or None
        Image-decoding worker processes (None: ``cdi.data.image_loader``'s default).

    Returns
    -------
    dict
        ``images_per_second``, ``efficiency``, ``calls_per_image``
        ({forward, backward}), ``peak_memory_bytes`` ({host, device}; device
        is None off CUDA), ``roofline_seconds``, ``measured_seconds``,
        ``families`` (name -> the same timing keys for that family alone),
        ``device``, ``dtype``, ``batch_size``, ``images``,
        ``audit_size``, ``audit_estimate_seconds``, ``roofline``
        (seconds per sample and batch size of the forward and backward loops)
        and ``shared_calls`` (the timing keys for the network calls the
        engine makes once for several families, ``features.calls``; a
        family's entry counts only the calls of its own ``extract``).
    """
    families = list(families)
    if not families:
        raise CDIError("no feature families to time; name at least one in --features")
    if int(audit_size) < 1:
        raise CDIError(f"--audit-size must be at least 1, got {audit_size}")
    if images is not None and int(images) < 1:
        raise CDIError(f"--images must be at least 1, got {images}")
    device = adapter.device
    caption = collection.records[0].caption if collection is not None and len(collection) else "synthetic image 0"
    cond = adapter.conditions([caption])
    # The forward roofline first: on CPU, batch_size="auto" is its fastest batch.
    per_forward, forward_batch = roofline_seconds_per_call(adapter, cond, backward=False)
    batch_size = resolve_batch_size(batch_size, adapter, families, caption, fastest_forward_batch=forward_batch)
    with tempfile.TemporaryDirectory(prefix="cdi-speed-") as tmp:
        if collection is None:
            count = int(images) if images is not None else max(32, 2 * batch_size)
            folder = synthetic_images(Path(tmp) / "images", count, adapter.resolution, adapter.image_channels,
                                      seed=seed)
            collection = ImageCollection.from_folder(folder, name="synthetic images")
        if len(collection) == 0:
            raise CDIError(f"no images to time in {collection.root}")
        warm_folder = synthetic_images(Path(tmp) / "warmup", min(batch_size, len(collection)), adapter.resolution,
                                       adapter.image_channels, seed=seed + 1)
        warm = ImageCollection.from_folder(warm_folder, name="warm-up images")
        extract_features(adapter, warm, families, seed=seed, batch_size=batch_size, num_workers=num_workers,
                         progress=False)

        timers = [_TimedFamily(f, device) for f in families]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for timer in timers:
            timer.install()
        try:
            sync(device)
            start = time.perf_counter()
            table = extract_features(adapter, collection, families, seed=seed, batch_size=batch_size,
                                     num_workers=num_workers, progress=False)
            sync(device)
            measured = time.perf_counter() - start
        finally:
            for timer in timers:
                timer.remove()
        device_peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
        host_peak = host_peak_rss_bytes()

        needs_backward = any(f.cost(adapter).backward for f in families)
        per_backward, backward_batch = (
            roofline_seconds_per_call(adapter, cond, backward=True) if needs_backward else (float("nan"), None)
        )

    n = len(collection)
    report = _entry(total_cost(families, adapter), n, measured, per_forward, per_backward)
    report["families"] = {
        timer.family.name: _entry(_own_cost(timer.family, adapter), n, timer.seconds, per_forward, per_backward)
        for timer in timers
    }
    shared = _sum_costs(call.cost for call in planned_calls(families, adapter))
    report["shared_calls"] = _entry(shared, n, table.meta["extraction"]["shared_calls_seconds"], per_forward,
                                    per_backward)
    report.update(
        peak_memory_bytes={"host": host_peak, "device": device_peak},
        device=str(device),
        dtype=str(adapter.dtype).replace("torch.", ""),
        batch_size=batch_size,
        images=n,
        audit_size=int(audit_size),
        audit_estimate_seconds=2 * int(audit_size) * measured / n,
        roofline={
            "forward_seconds_per_call": per_forward,
            "forward_batch_size": forward_batch,
            "backward_seconds_per_call": None if backward_batch is None else per_backward,
            "backward_batch_size": backward_batch,
        },
        torch_threads=torch.get_num_threads(),
        model=adapter.describe(),
    )
    return report


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------
def to_json(report: dict[str, Any]) -> str:
    """The report as indented JSON (NaN and infinity written as null)."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not np.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    return json.dumps(clean(report), indent=2)


def _bytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f} MiB"


def speed_table(report: dict[str, Any]):
    """A rich ``Table`` of the report: one row per family and one for the whole set."""
    from rich.table import Table

    table = Table(
        title=f"cdi speed: {report['images']} images, batch {report['batch_size']}, "
              f"{report['device']} {report['dtype']}",
        caption=(
            f"peak memory: host {_bytes(report['peak_memory_bytes']['host'])}, "
            f"device {_bytes(report['peak_memory_bytes']['device'])}\n"
            f"estimated audit of 2 x {report['audit_size']} images: "
            f"{report['audit_estimate_seconds'] / 3600:.2f} h ({report['audit_estimate_seconds']:.0f} s)\n"
            "efficiency = roofline (bare denoiser loop, best batch) / measured time; "
            "family rows time the family's extract only"
        ),
    )
    table.add_column("family", no_wrap=True, min_width=18)
    for column in ("img/s", "fwd", "bwd", "time s", "roofline s", "efficiency"):
        table.add_column(column, justify="right", no_wrap=True)

    def row(name: str, entry: dict[str, Any], style: str | None = None) -> None:
        calls = entry["calls_per_image"]
        table.add_row(
            name, f"{entry['images_per_second']:.3g}", str(calls["forward"]), str(calls["backward"]),
            f"{entry['measured_seconds']:.3g}", f"{entry['roofline_seconds']:.3g}", f"{entry['efficiency']:.2f}",
            style=style,
        )

    for name, entry in report["families"].items():
        row(name, entry)
    if report.get("shared_calls", {}).get("calls_per_image", {}).get("forward"):
        row("shared calls", report["shared_calls"])
    row("all", report, style="bold")
    return table
