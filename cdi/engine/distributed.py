"""Feature extraction on a Ray cluster: one model replica per GPU, one writer.

``RayRunner`` is another way to run the batches of the extraction engine
(``features.extract``), not a second engine. The driver (the process that
runs ``cdi extract`` or ``cdi audit``) plans as usual: it looks up in its
feature store which (image, family) values are missing and groups the images
that miss the same families. Then, instead of computing the batches itself,
it sends them to Ray actors:

* each actor (``ExtractionWorker``) loads the model once, on its own GPU
  (``num_gpus=1``; one actor per GPU of the cluster) or, on CPU-only
  clusters, with ``threads`` torch threads (``num_cpus=threads``);
* a batch travels as the image files' bytes (no shared file system needed
  for the images); the worker checks each file's SHA-256 against the scan,
  decodes it and runs ``BatchComputer.compute``, the very function the local
  loop runs (one encode per image, CUDA out-of-memory halves the batch);
* each batch's values come back to the driver as soon as they are computed;
  the driver alone writes them to the store, one transaction per batch, so
  the SQLite store stays on the driver's local disk and stays crash-safe.

Values do not depend on the number of workers, on which worker computes
which batch, or on retries: every noise draw is a function of (seed, image
hash, family, timestep, repetition) (``features.base.image_noise``), the
batches are the ones a single process would form, and float64 networks give
bit-identical tables (float32 agrees to its rounding, as for any change of
batch composition).

Failures: a worker process that dies (killed, out of host memory, node lost)
is restarted by Ray (``max_restarts``), reloads the model, and its unfinished
batches are run again (``max_task_retries=-1``); the driver receives each
batch's values exactly once, so nothing is lost or counted twice. A worker
that dies more than ``max_restarts`` times stops the run with a ``CDIError``;
what was computed is in the store. A killed driver takes its actors with it;
running the same command again computes only what the store lacks.

Every worker's model must be the driver's: each reports its model key
(weights fingerprint, dtype, schedule, preprocessing) and a mismatch stops
the run before any value is computed.

Ray is an optional dependency (``pip install 'cdi[ray]'``), imported only
when a ``RayRunner`` starts.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable, Sequence

import numpy as np
import torch

from cdi.utils.errors import CDIError

#: Batches queued on each worker beyond the one it computes (hides the round trip).
IN_FLIGHT_PER_WORKER = 2
#: Restarts Ray grants a worker process that died before the run gives up.
MAX_RESTARTS = 3


def import_ray():
    """The ``ray`` module, or a ``CDIError`` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise CDIError(
            "--ray needs the Ray package, which is not installed: pip install 'cdi[ray]' "
            "(or run without --ray, or use --shard I/N to split the images between machines)"
        ) from None
    return ray


def check_ray_options(address: str | None, workers: int | None, threads: int, device: str, dtype: str) -> None:
    """Validate the Ray options before anything is loaded (``CDIError``); also checks that Ray is installed."""
    if address is None:
        if workers is not None:
            raise CDIError("--ray-workers needs --ray (local, auto or a cluster address)")
        return
    if not str(address).strip():
        raise CDIError("--ray needs a value: local (a Ray instance on this machine), auto or HOST:PORT")
    if workers is not None and workers < 1:
        raise CDIError(f"--ray-workers must be at least 1, got {workers}")
    if threads < 1:
        raise CDIError(f"--ray-threads must be at least 1, got {threads}")
    if str(device).startswith("cuda:"):
        raise CDIError(
            f"--device {device} with --ray: each Ray worker uses the GPU Ray gives it; pass --device cuda or auto"
        )
    if str(dtype).strip().lower() in ("float16", "fp16"):
        raise CDIError(
            "--dtype float16 with --ray: the driver keeps a CPU copy of the model (for the store key and the "
            "feature layout) and the CPU has no float16; use --dtype bfloat16, or run without --ray"
        )
    import_ray()


class ExtractionWorker:
    """What one Ray actor holds: a model replica, and the batch computation of the engine.

    Parameters
    ----------
    loader : callable
        Returns the adapter (e.g. ``functools.partial(load_model, ...)``);
        called once per actor process (again after a restart).
    threads : int or None
        torch intra-op threads of this process (None: leave torch's default).
    """

    def __init__(self, loader: Callable[[], Any], threads: int | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.adapter = loader()
        self.chunk: int | None = None  # the batch after any out-of-memory halving, kept between batches

    def info(self) -> dict:
        """Where this worker runs and which model it loaded (its store key)."""
        from cdi.data.preprocess import Preprocess
        from cdi.features.extract import model_key

        adapter = self.adapter
        return {
            "model_key": model_key(adapter, Preprocess(adapter.resolution, adapter.image_channels)),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(adapter.device),
            "threads": torch.get_num_threads(),
        }

    def auto_batch_size(self, families: Sequence, caption: str | None) -> int:
        """``cdi.engine.batching.auto_batch_size`` on this worker's device."""
        from cdi.engine.batching import auto_batch_size

        return auto_batch_size(self.adapter, list(families), caption)

    def compute(self, families: Sequence, columns: dict, seed: int, chunk: int, preprocess, max_pixels: int,
                items: Sequence[tuple]) -> dict[str, np.ndarray]:
        """Values of one batch: ``{family name: (B, n_columns) float64}``.

        ``items`` are ``(ImageRecord, file bytes, name for errors)``; each
        file's SHA-256 is checked against its record before it is decoded.
        """
        from cdi.data.image_loader import decode_checked
        from cdi.features.extract import BatchComputer

        records = [record for record, _, _ in items]
        pixels = torch.from_numpy(np.stack([
            decode_checked(data, record.sha256, preprocess, max_pixels, where).numpy()
            for record, data, where in items
        ]))
        computer = BatchComputer(self.adapter, columns, seed, min(chunk, self.chunk or chunk))
        parts = list(computer.compute(pixels, records, families))
        self.chunk = computer.chunk
        return {f.name: np.concatenate([values[f.name] for _, _, values in parts]) for f in families}


class RayRunner:
    """Runs the extraction engine's batches on Ray actors (see the module docstring).

    Parameters
    ----------
    loader : callable
        Builds the model on a worker (picklable: ``functools.partial(load_model, name, ...)``).
    address : str
        ``"local"``: start a Ray instance on this machine (shut down by
        ``close``); ``"auto"``: the running cluster this machine belongs to;
        ``"HOST:PORT"`` or ``"ray://HOST:PORT"``: that cluster. When Ray is
        already initialised in this process it is used as it is.
    workers : int or None
        Number of actors. Default: one per GPU of the cluster when it has
        GPUs (and ``device`` allows them), else cluster CPUs // ``threads``.
    threads : int
        torch threads (and Ray CPUs) per CPU worker.
    device : str
        The workers' ``--device``: ``"auto"`` (GPUs when the cluster has
        them), ``"cuda"`` (GPUs, required) or ``"cpu"``.
    max_restarts : int
        Restarts of a dead worker process before the run fails.
    """

    kind = "ray"

    def __init__(self, loader: Callable[[], Any], *, address: str = "local", workers: int | None = None,
                 threads: int = 1, device: str = "auto", max_restarts: int = MAX_RESTARTS) -> None:
        self.loader, self.address, self.threads, self.device = loader, address, int(threads), device
        self.requested_workers = workers
        self.max_restarts = int(max_restarts)
        self.actors: list = []
        self.infos: list[dict] = []
        self.use_gpu = False
        self._owns_ray = False
        self._ray = None

    # ------------------------------------------------------------ lifecycle
    def start(self, adapter) -> None:
        """Connect to Ray, start the workers and check they loaded the driver's model (once)."""
        if self.actors:
            return
        ray = self._ray = import_ray()
        if not ray.is_initialized():
            try:
                if self.address == "local":
                    ray.init(include_dashboard=False, log_to_driver=False)
                    self._owns_ray = True
                else:
                    ray.init(address=self.address, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise CDIError(f"cannot connect to the Ray cluster at {self.address!r}: {exc}; start it with "
                               f"`ray start --head` (see the README) or use --ray local") from None
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        self.use_gpu = self.device != "cpu" and gpus > 0
        if self.device == "cuda" and not gpus:
            raise CDIError("--device cuda with --ray, but the Ray cluster has no GPU; use --device cpu or auto")
        count = self.requested_workers or (gpus if self.use_gpu else max(1, cpus // self.threads))
        options = dict(max_restarts=self.max_restarts, max_task_retries=-1)
        if self.use_gpu:
            options.update(num_gpus=1, num_cpus=1)
        else:
            options.update(num_gpus=0, num_cpus=self.threads)
        actor_class = ray.remote(ExtractionWorker)
        threads = None if self.use_gpu else self.threads
        self.actors = [actor_class.options(**options).remote(self.loader, threads) for _ in range(count)]
        try:
            self.infos = ray.get([a.info.remote() for a in self.actors])
        except ray.exceptions.RayError as exc:
            self.close()
            raise CDIError(f"a Ray worker could not load the model: {_cause(exc)}") from None
        self._check_models(adapter)

    def _check_models(self, adapter) -> None:
        from cdi.data.preprocess import Preprocess
        from cdi.features.extract import model_key

        expected = model_key(adapter, Preprocess(adapter.resolution, adapter.image_channels))
        for info in self.infos:
            if info["model_key"] != expected:
                self.close()
                raise CDIError(
                    f"the Ray worker on {info['host']} loaded another model (store key {info['model_key']}) "
                    f"than this driver ({expected}): every node must see the same model files, revision and dtype"
                )

    def close(self) -> None:
        """Stop the workers, and the Ray instance if this runner started it."""
        ray = self._ray
        if ray is None:
            return
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 (already gone)
                pass
        self.actors = []
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> "RayRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def compute_device(self) -> str:
        """The device type the workers compute on (``"cuda"`` or ``"cpu"``), for the batch-size record."""
        return "cuda" if self.use_gpu else "cpu"

    def describe(self) -> dict:
        """What ``meta["extraction"]["distributed"]`` records."""
        return {
            "kind": self.kind,
            "address": self.address,
            "workers": len(self.actors),
            "device": "gpu" if self.use_gpu else "cpu",
            "threads_per_worker": None if self.use_gpu else self.threads,
            "hosts": sorted({info["host"] for info in self.infos}),
        }

    # ------------------------------------------------------------------ use
    def auto_batch_size(self, adapter, families, caption) -> int:
        """``--batch-size auto`` measured on a worker, whose device is the one that computes."""
        self.start(adapter)
        return self._get(self.actors[0].auto_batch_size.remote(list(families), caption))

    def run(self, extraction, plan, advance: Callable[[int], None]) -> None:
        """Compute every batch of ``plan`` on the workers; save each batch's values as it arrives.

        ``extraction`` is the engine's ``_Extraction`` (its ``_save`` writes
        the values and the store), ``plan`` its ``[(families, rows)]``,
        ``advance(n)`` moves the progress bar by n images.
        """
        from cdi.data.image_loader import CollectionDataset

        self.start(extraction.adapter)
        ray = self._ray
        size = extraction.batch_size
        batches = [(families, rows[k : k + size]) for families, rows in plan for k in range(0, len(rows), size)]
        batches.reverse()  # popped from the end: plan order
        dataset = CollectionDataset(extraction.collection, extraction.preprocess)
        max_pixels = extraction.collection.max_pixels
        pending: dict = {}

        def submit(worker: int) -> None:
            if not batches:
                return
            families, positions = batches.pop()
            items = []
            for i in positions:
                data, where = dataset.read(i)
                items.append((extraction.records[i], data, where))
            ref = self.actors[worker].compute.remote(
                families, extraction.columns, extraction.seed, size, extraction.preprocess, max_pixels, items
            )
            pending[ref] = (worker, families, positions)

        for _ in range(IN_FLIGHT_PER_WORKER):
            for worker in range(len(self.actors)):
                submit(worker)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            worker, families, positions = pending.pop(ref)
            results = self._get(ref)
            extraction._save(positions, families, results)
            advance(len(positions))
            submit(worker)

    def _get(self, ref):
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = _cause(exc)
            if isinstance(cause, CDIError):
                raise CDIError(str(cause)) from None
            raise
        except ray.exceptions.RayActorError as exc:
            raise CDIError(
                f"a Ray worker died more than {self.max_restarts} times ({_cause(exc)}); the values computed "
                f"so far are in the store: run the same command again to resume"
            ) from None


def _cause(exc: BaseException) -> Any:
    """The exception a Ray error wraps, when it says."""
    return getattr(exc, "cause", None) or exc


def ray_runner(address: str | None, *, workers: int | None, threads: int, device: str,
               **load_options: Any) -> RayRunner | None:
    """The runner for ``--ray ADDRESS`` (None without ``--ray``): workers load ``load_model(**load_options)``.

    ``load_options`` are ``load_model``'s (``name``, ``revision``, ``dtype``,
    ...); the workers load on ``device`` (``auto``: the GPU Ray gives them).
    """
    if address is None:
        return None
    import functools

    from cdi.models import load_model

    name = load_options.pop("name")
    loader = functools.partial(load_model, name, device=device, **load_options)
    return RayRunner(loader, address=address, workers=workers, threads=threads, device=device)

