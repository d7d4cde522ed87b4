"""The extraction engine: every feature family on every image, encoded once.

For each batch of images the engine decodes the files (in DataLoader worker
processes, overlapping the model's work), calls ``adapter.encode`` once and
``adapter.conditions(captions)`` once, then runs every requested family's
``extract`` on the same ``EncodedBatch`` and moves each family's numbers to
the host once. Nothing a family computes depends on the batch: every random
draw is a function of (seed, image hash, family, timestep, repetition)
(``features.base.image_noise``), so a value is the same whatever the batch
size, the order, the sharding or a resumption.

With a ``FeatureStore`` the engine first looks up which (image, family)
values are missing, processes only the images that miss something and, for
each, only the families it misses (images with the same missing families are
batched together); each batch's values are committed to the store, in one
transaction, as soon as they are computed. A run killed at any point loses at
most the batch in flight; re-running it computes only what is missing.

Sharding: ``shard=(i, n)`` makes this process handle only the images whose
SHA-256, read as a hexadecimal integer, satisfies ``int(sha256, 16) % n == i``.
The assignment depends on image content only (not on file names, order or
folder), so ``n`` processes (on one or several machines) with ``i = 0..n-1``
cover every image exactly once. Give them one store (one machine) or merge
their tables with ``FeatureTable.concat``; a final unsharded run against a
shared store reads everything back without computing anything.

Who computes: by default this process, batch after batch (``BatchComputer``:
one encode, every family, values to the host once). With a runner
(``cdi.engine.distributed.RayRunner``) the same plan's batches go to Ray workers,
each holding a model replica and calling the same ``BatchComputer``; their
values stream back here, and this process alone writes the store.

Out of GPU memory (``torch.cuda.OutOfMemoryError``): the batch is halved, a
warning goes to the ``cdi`` logger and the progress console, the CUDA cache is
freed and extraction goes on; values do not change. If a single image does
not fit, a ``CDIError`` says what to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections import defaultdict
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from cdi import __version__
from cdi.engine.batching import auto_batch_size, parse_batch_size, sync
from cdi.data.image_loader import image_batches
from cdi.utils.errors import CDIError
from cdi.models.base import DiffusionAdapter
from cdi.data.preprocess import Preprocess
from cdi.utils.progress import progress_bar
from cdi.engine.store import FeatureStore
from cdi.engine.table import FeatureTable
from cdi.features.base import EncodedBatch, FeatureFamily
from cdi.features.calls import evaluate as evaluate_shared_calls, planned_calls

if TYPE_CHECKING:
    from cdi.data.collection import ImageCollection, ImageRecord

logger = logging.getLogger("cdi")


# --------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------
def model_key(adapter: DiffusionAdapter, preprocess: Preprocess) -> str:
    """The store key of everything on the model side that decides a feature value.

    A SHA-256 over the weights' fingerprint, the dtype the network computes
    in, the family, conditioning and prediction type, the noise schedule
    (``alphas_cumprod``), and the image preprocessing (resolution, channels,
    crop, resampling, and any harmonisation: ``Preprocess.record``); prefixed with the family and dtype for readability. Device
    is not part of it: CPU and GPU results agree to float32 rounding.
    """
    schedule = adapter.alphas_cumprod.detach().to("cpu", torch.float32).numpy().tobytes()
    dtype = str(adapter.dtype).replace("torch.", "")
    payload = {
        "fingerprint": adapter.fingerprint,
        "dtype": dtype,
        "family": adapter.family,
        "conditioning": adapter.conditioning,
        "prediction_type": adapter.prediction_type,
        "learned_variance": bool(adapter.learned_variance),
        "alphas_cumprod_sha256": hashlib.sha256(schedule).hexdigest(),
        "preprocess": preprocess.record(),
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"{adapter.family or 'model'}-{dtype}-{digest[:32]}"


def condition_key(adapter: DiffusionAdapter, caption: str | None) -> str:
    """What an image is conditioned on, as part of its store key.

    ``""`` for unconditional models (captions are ignored there), the class id
    for class-conditional models (so ``"7"`` and ``"seven"`` share values when
    they name the same class), and a digest of the caption text for text
    models (``text:none`` when there is no caption).
    """
    if adapter.conditioning == "none":
        return ""
    if adapter.conditioning == "class":
        return f"class:{adapter.class_id(caption)}"
    if caption is None:
        return "text:none"
    return "text:" + hashlib.sha256(caption.encode("utf-8")).hexdigest()[:32]


def parse_shard(spec: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"I/N"`` (or ``(I, N)``) -> ``(I, N)`` with ``0 <= I < N``; None stays None."""
    if spec is None:
        return None
    if isinstance(spec, str):
        parts = spec.strip().split("/")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise CDIError(
                f"bad shard {spec!r}: write it as I/N, e.g. 0/4 for the first of four shards"
            )
        index, count = (int(p) for p in parts)
    else:
        try:
            index, count = (int(v) for v in spec)
        except (TypeError, ValueError):
            raise CDIError(f"bad shard {spec!r}: expected a pair (I, N) of integers") from None
    if count < 1 or not 0 <= index < count:
        raise CDIError(
            f"bad shard {index}/{count}: need N >= 1 and 0 <= I < N (shards are numbered 0..N-1)"
        )
    return index, count


def shard_of(sha256: str, count: int) -> int:
    """The shard (``0..count-1``) an image belongs to: ``int(sha256, 16) % count``."""
    return int(sha256, 16) % count


# --------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------
def captions_to_encode(adapter: DiffusionAdapter, records: Sequence, families: Sequence[FeatureFamily],
                       seed: int) -> list[str | None]:
    """Every caption extracting ``families`` on ``records`` conditions on: each image's own and the
    families' ``extra_captions`` (CLiD's reduced ones), for ``adapter.prepare_captions``."""
    captions = [r.caption for r in records]
    for family in families:
        captions += family.extra_captions(adapter, [r.caption for r in records], [r.sha256 for r in records], seed)
    return captions


def extract_features(
    adapter: DiffusionAdapter,
    collection: "ImageCollection",
    families: Sequence[FeatureFamily],
    *,
    seed: int = 0,
    batch_size: int | str = "auto",
    store: FeatureStore | str | os.PathLike | None = None,
    shard: tuple[int, int] | str | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    runner=None,
    preprocess: Preprocess | None = None,
) -> FeatureTable:
    """Compute the features of ``families`` for the images of ``collection``.

    Parameters
    ----------
    adapter : DiffusionAdapter
        The loaded model; its dtype and device are used as they are.
    collection : cdi.data.collection.ImageCollection
        The images (with captions). Preprocessed with ``preprocess``.
    families : sequence of FeatureFamily
        The feature families; their columns must not clash.
    seed : int
        Global seed of every noise draw.
    batch_size : int or "auto"
        Images per batch, and the most samples per network call: a family
        that expands each image into n samples (timesteps, repetitions,
        conditions) runs them in chunks of at most ``batch_size`` (see
        ``features.base``). Halved automatically on CUDA out-of-memory.
        ``"auto"``: ``cdi.engine.batching.auto_batch_size``, chosen only when some
        value must be computed. Values do not depend on it.
    store : FeatureStore, path or None
        Feature cache: values already there are read instead of computed,
        new ones are written batch by batch. A path is opened (and closed)
        here.
    shard : (i, n), "i/n" or None
        Handle only the images with ``int(sha256, 16) % n == i``.
    num_workers : int or None
        Image-decoding worker processes (None: ``cdi.data.image_loader.default_num_workers``).
    progress : bool
        Show a progress bar (images/s, ETA) on stderr.
    runner : cdi.engine.distributed.RayRunner or None
        Who computes the batches: None, this process; a ``RayRunner``, its
        Ray workers (one model replica each), the values streamed back here
        and written to the store by this process alone. Values do not
        depend on it.
    preprocess : cdi.data.preprocess.Preprocess or None
        How images become model input; default
        ``Preprocess(adapter.resolution, adapter.image_channels)``. The audit
        passes one with the collections' harmonisation (``cdi.data.harmonise``);
        it is part of the store key (``model_key``).

    Returns
    -------
    FeatureTable
        One row per image handled (collection order), the families' columns
        in the order given, and the provenance in ``meta``.
    """
    families = list(families)
    _check_families(families, adapter)
    batch_size = parse_batch_size(batch_size)
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise CDIError(f"seed must be an integer between 0 and 2**63 - 1, got {seed}")
    shard = parse_shard(shard)
    if preprocess is not None and (preprocess.resolution, preprocess.channels) != (
            adapter.resolution, adapter.image_channels):
        raise CDIError(f"the preprocessing makes {preprocess.resolution} px images with {preprocess.channels} "
                       f"channel(s), the model takes {adapter.resolution} px with {adapter.image_channels}")
    owned = isinstance(store, (str, os.PathLike))
    store = FeatureStore(store) if owned else store
    try:
        return _Extraction(adapter, collection, families, seed, batch_size, store, shard,
                           num_workers, progress, runner, preprocess).run()
    finally:
        if owned:
            store.close()


def _check_families(families: list[FeatureFamily], adapter: DiffusionAdapter) -> None:
    if not families:
        raise CDIError("no feature families to extract; name at least one in --features")
    for kind, values in (("names", [f.name for f in families]), ("keys", [f.key() for f in families])):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise CDIError(f"feature families requested twice (same {kind}): {repeated}")
    columns = [c for f in families for c in f.columns(adapter)]
    clashing = sorted({c for c in columns if columns.count(c) > 1})
    if clashing:
        raise CDIError(f"feature families produce clashing column names {clashing}")
    for family in families:
        family.check_applicable(adapter)


class _RateColumn(ProgressColumn):
    """Images per second."""

    def render(self, task) -> Text:  # noqa: ANN001 (rich's Task)
        speed = task.finished_speed or task.speed
        return Text("-- img/s" if speed is None else f"{speed:.2f} img/s", style="progress.data.speed")


class BatchComputer:
    """The feature values of image batches on one adapter: the step every way of running the engine shares.

    ``compute`` encodes a batch once, builds its conditions once and runs
    every family on the same ``EncodedBatch``, in model batches of at most
    ``chunk`` images; on CUDA out-of-memory it halves ``chunk`` (calling
    ``warn``), frees the cache and goes on, values unchanged. The local loop
    of ``extract_features`` and each Ray worker of ``cdi.engine.distributed`` call
    it; only the driver writes the store.

    Parameters
    ----------
    adapter : DiffusionAdapter
    columns : dict
        Family name -> its column names (for the shape check).
    seed : int
        Global seed of every noise draw.
    chunk : int
        Images per model batch and most samples per network call.
    warn : callable, optional
        Called with the message when out of memory halves the batch.
    """

    def __init__(self, adapter: DiffusionAdapter, columns: dict[str, list[str]], seed: int, chunk: int | None,
                 warn=logger.warning) -> None:
        self.adapter, self.columns, self.seed, self.chunk, self.warn = adapter, columns, seed, chunk, warn
        self.shared_seconds = 0.0  # wall time of the shared network calls (features.calls)

    def compute(self, pixels: torch.Tensor, records: Sequence["ImageRecord"], families: Sequence[FeatureFamily]):
        """Yield ``(start, stop, {family name: (stop - start, n_columns) float64})`` over the batch."""
        start = 0
        with torch.no_grad():
            while start < len(records):
                size = min(self.chunk, len(records) - start)
                out_of_memory = False
                try:
                    results = self.compute_one(pixels[start : start + size], records[start : start + size], families)
                except torch.cuda.OutOfMemoryError:
                    out_of_memory = True
                if out_of_memory:  # outside the except block, so the failed batch's tensors are freed
                    self._shrink(size)
                    continue
                yield start, start + size, results
                start += size

    def compute_one(self, pixels: torch.Tensor, records: Sequence["ImageRecord"],
                    families: Sequence[FeatureFamily]) -> dict[str, np.ndarray]:
        """One model batch: ``{family name: (B, n_columns) float64}``."""
        captions = [r.caption for r in records]
        x0 = self.adapter.encode(pixels)
        batch = EncodedBatch(
            x0=x0, hashes=[r.sha256 for r in records], captions=captions,
            cond=self.adapter.conditions(captions), seed=self.seed, pixels=pixels, max_chunk=self.chunk,
        )
        # The calls several families need, made once for all of them (features.calls).
        started = time.perf_counter()
        evaluate_shared_calls(self.adapter, batch, planned_calls(families, self.adapter))
        sync(self.adapter.device)
        self.shared_seconds += time.perf_counter() - started
        results = {}
        for family in families:
            out = family.extract(self.adapter, batch)
            expected = (len(records), len(self.columns[family.name]))
            if tuple(out.shape) != expected:
                raise RuntimeError(
                    f"feature family {family.name!r} returned shape {tuple(out.shape)}, expected {expected}"
                )
            values = out.detach().float().cpu().numpy().astype(np.float64)
            bad = ~np.isfinite(values).all(axis=1)
            if bad.any():
                names = [records[k].path for k in np.flatnonzero(bad)[:5]]
                raise CDIError(
                    f"feature family {family.name!r} gave non-finite values for {int(bad.sum())} image(s), "
                    f"e.g. {names}, with the model in {str(self.adapter.dtype).replace('torch.', '')}; "
                    f"this is usually overflow in reduced precision: use --dtype float32"
                )
            results[family.name] = values
        return results

    def _shrink(self, size: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if size <= 1:
            raise CDIError(
                "out of GPU memory with a batch of one image; try --dtype bfloat16 (or float16 on GPU), "
                "a GPU with more memory, fewer or cheaper feature families, or --device cpu"
            )
        self.chunk = max(1, size // 2)
        self.warn(f"out of GPU memory with {size} images per batch; going on with {self.chunk}")


class _Extraction:
    """One call of ``extract_features`` (state shared by its steps)."""

    def __init__(self, adapter, collection, families, seed, batch_size, store, shard, num_workers, progress,
                 runner=None, preprocess=None):
        self.adapter = adapter
        self.collection = collection
        self.families = families
        self.seed = seed
        self.batch_size = batch_size  # an int, or "auto" until run() needs it
        self.runner = runner  # None: this process computes; else e.g. cdi.engine.distributed.RayRunner
        self.computer: BatchComputer | None = None
        self.store = store
        self.shard = shard
        self.num_workers = num_workers
        self.progress_enabled = progress
        self.preprocess = preprocess or Preprocess(adapter.resolution, adapter.image_channels)
        self.model_key = model_key(adapter, self.preprocess)
        self.columns = {f.name: list(f.columns(adapter)) for f in families}
        self.records = collection.records
        self.rows = [
            i for i, r in enumerate(self.records) if shard is None or shard_of(r.sha256, shard[1]) == shard[0]
        ]
        self.conditions = {i: condition_key(adapter, self.records[i].caption) for i in self.rows}
        self.values: dict[str, dict[int, np.ndarray]] = {f.name: {} for f in families}
        self.computed = {f.name: 0 for f in families}
        self.from_store = {f.name: 0 for f in families}
        self.run_ids: dict[str, int | None] = {f.name: None for f in families}
        self.progress: Progress | None = None

    # ------------------------------------------------------------------ plan
    def _plan(self) -> list[tuple[list[FeatureFamily], list[int]]]:
        """Which families each image still misses, grouped: [(families, rows)]."""
        missing: dict[int, list[int]] = {i: [] for i in self.rows}
        for j, family in enumerate(self.families):
            if self.store is None:
                for i in self.rows:
                    missing[i].append(j)
                continue
            found = self.store.get_many(
                self.model_key, family.key(), self.seed,
                [self.records[i].sha256 for i in self.rows], [self.conditions[i] for i in self.rows],
            )
            for i in self.rows:
                value = found.get(self.records[i].sha256)
                if value is None:
                    missing[i].append(j)
                elif value.shape != (len(self.columns[family.name]),):
                    raise CDIError(
                        f"feature store {self.store.path} holds {value.size} values for family "
                        f"{family.name!r}, which has {len(self.columns[family.name])} columns; the store is "
                        f"inconsistent with this cdi version, use a new --store path"
                    )
                else:
                    self.values[family.name][i] = value
                    self.from_store[family.name] += 1
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i in self.rows:
            if missing[i]:
                groups[tuple(missing[i])].append(i)
        plan = [([self.families[j] for j in key], rows) for key, rows in groups.items()]
        return sorted(plan, key=lambda item: item[1][0])

    # ------------------------------------------------------------------- run
    def run(self) -> FeatureTable:
        started = time.perf_counter()
        plan = self._plan()
        todo = sum(len(rows) for _, rows in plan)
        if plan:  # text encoders encode every caption once, then may leave the device (flow models)
            self.adapter.prepare_captions([c for families, rows in plan for c in captions_to_encode(
                self.adapter, [self.records[i] for i in rows], families, self.seed)])
        if self.batch_size == "auto":
            first = self.records[plan[0][1][0]].caption if plan else None
            needed = list({f.name: f for fams, _ in plan for f in fams}.values())
            choose = auto_batch_size if self.runner is None else self.runner.auto_batch_size
            self.batch_size = choose(self.adapter, needed, first) if plan else None  # nothing to compute
        self.computer = BatchComputer(self.adapter, self.columns, self.seed, self.batch_size, self._warn)
        if self.store is not None:
            for family in {f.name: f for fams, _ in plan for f in fams}.values():
                self.run_ids[family.name] = self.store.record_provenance(
                    self.model_key, self.adapter.describe(), family.key(),
                    {"name": family.name, "config": family.config_dict(), "columns": self.columns[family.name]},
                    self.seed,
                )
        cached = len(self.rows) - todo
        description = "extracting features" + (f" ({cached} images already in the store)" if cached else "")
        if self.runner is not None:
            description += f" on {self.runner.describe()['workers']} Ray workers"
        self.progress = progress_bar(
            (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
             _RateColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()),
            disable=not self.progress_enabled,
        )
        with self.progress:
            task = self.progress.add_task(description, total=todo)
            if self.runner is not None:
                self.runner.run(self, plan, lambda n: self.progress.advance(task, n))
                return self._table(time.perf_counter() - started)
            with torch.no_grad():
                for families, rows in plan:
                    for pixels, positions in image_batches(
                        self.collection, self.preprocess, batch_size=self.batch_size,
                        indices=rows, num_workers=self.num_workers,
                    ):
                        self._process(pixels, list(positions), families, task)
        return self._table(time.perf_counter() - started)

    def _process(self, pixels: torch.Tensor, positions: list[int], families: list[FeatureFamily], task) -> None:
        """One loader batch: compute it (in model batches, halved on OOM) and save each part."""
        records = [self.records[i] for i in positions]
        for start, stop, results in self.computer.compute(pixels, records, families):
            self._save(positions[start:stop], families, results)
            self.progress.advance(task, stop - start)

    def _warn(self, message: str) -> None:
        logger.warning(message)
        if self.progress is not None and self.progress_enabled:
            self.progress.console.print(f"[yellow]warning:[/] {message}")

    def _save(self, positions: list[int], families: list[FeatureFamily], results: dict[str, np.ndarray]) -> None:
        for family in families:
            for k, i in enumerate(positions):
                self.values[family.name][i] = results[family.name][k]
            self.computed[family.name] += len(positions)
        if self.store is None:
            return
        with self.store.transaction():
            for family in families:
                self.store.put_many(
                    self.model_key, family.key(), self.seed,
                    {self.records[i].sha256: results[family.name][k] for k, i in enumerate(positions)},
                    self.columns[family.name],
                    conditions={self.records[i].sha256: self.conditions[i] for i in positions},
                    run_id=self.run_ids[family.name],
                )

    # ----------------------------------------------------------------- table
    def _table(self, seconds: float) -> FeatureTable:
        columns = [c for f in self.families for c in self.columns[f.name]]
        values = np.empty((len(self.rows), len(columns)), dtype=np.float64)
        for r, i in enumerate(self.rows):
            values[r] = np.concatenate([self.values[f.name][i] for f in self.families])
        collection = self.collection
        meta = {
            "kind": "cdi.features",
            "cdi_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": self.adapter.describe(),
            "model_key": self.model_key,
            "preprocess": self.preprocess.record(),
            "families": [
                {"name": f.name, "key": f.key(), "config": f.config_dict(), "columns": self.columns[f.name]}
                for f in self.families
            ],
            "seed": self.seed,
            "shard": list(self.shard) if self.shard else None,
            "images": {
                "root": str(collection.root),
                "n_images": len(collection.records),
                "n_rows": len(self.rows),
                "skipped": [{"path": s.path, "reason": s.reason} for s in getattr(collection, "skipped", [])],
                "duplicates": [list(d) for d in getattr(collection, "duplicates", [])],
            },
            "store": str(self.store.path) if self.store is not None else None,
            "extraction": {
                "computed": dict(self.computed),
                "from_store": dict(self.from_store),
                "batch_size": self.batch_size,
                "final_batch_size": self.computer.chunk,
                "distributed": None if self.runner is None else self.runner.describe(),
                "seconds": round(seconds, 3),
                "shared_calls_seconds": round(self.computer.shared_seconds, 3),  # local runs only
            },
            "environment": {"python": platform.python_version(), "torch": torch.__version__},
        }
        return FeatureTable(
            [self.records[i].path for i in self.rows],
            [self.records[i].sha256 for i in self.rows],
            [self.records[i].caption for i in self.rows],
            columns, values, meta,
        )
