"""The Python API: an audit from a notebook or a script.

``cdi.api.audit(published, unpublished, model)`` runs the same analysis as
``cdi audit`` and returns the :class:`~cdi.audit.result.AuditResult`; it writes
nothing unless ``out`` is given (then ``result.json``, ``features.csv`` and
``report.html``, as the command line does). Its inputs may already be in
memory:

* ``published`` / ``unpublished``: an image folder (path), an
  :class:`~cdi.data.collection.ImageCollection`, or a :class:`~cdi.engine.table.FeatureTable`
  of features already extracted (then no model is run, and no shift guard
  either: it needs the images);
* ``model``: a loaded adapter (``cdi.models.load_model``), a model alias,
  hub id or pipeline folder, or a diffusers pipeline object. A pipeline
  object is saved to a temporary folder (deleted afterwards) and loaded
  from there: the result records the SHA-256 fingerprint of the weight
  files, and only serialised weights have one.

Example::

    import cdi
    result = cdi.api.audit("my_photos/published", "my_photos/unpublished", "sd15")
    print(result.verdict, result.p_value)
    cdi.write_report("audit-folder", result)   # optional: the HTML report

``examples/audit_in_python.py`` runs an audit on the toy world this way.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from cdi.audit.config import AuditConfig

from cdi.audit.analysis import analyse_tables, build_result

from cdi.audit.run import extraction_record
from cdi.utils.errors import CDIError
from cdi.audit.result import AuditResult

__all__ = ["audit", "load_adapter"]


def load_adapter(model: Any, **load_kwargs: Any):
    """A ``DiffusionAdapter`` for ``model``: an adapter (returned as is), a name or folder, or a diffusers pipeline.

    ``load_kwargs`` go to ``cdi.models.load_model`` (device, dtype, revision,
    variant, allow_pickle, local_files_only, cache_dir, token, compile).
    """
    from cdi.models import load_model
    from cdi.models.base import DiffusionAdapter
    from cdi.utils.progress import quiet_library_progress

    if isinstance(model, DiffusionAdapter):
        return model
    quiet_library_progress()
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, **load_kwargs)
    if hasattr(model, "save_pretrained") and hasattr(model, "components"):
        with tempfile.TemporaryDirectory(prefix="cdi-pipeline-") as folder:
            model.save_pretrained(folder, safe_serialization=True)
            adapter = load_model(folder, **load_kwargs)
        adapter.model_id = f"in-memory {type(model).__name__}"
        return adapter
    raise CDIError(f"model must be a DiffusionAdapter, a model name or folder, or a diffusers pipeline, "
                   f"got {type(model).__name__}")


def audit(
    published: Any,
    unpublished: Any,
    model: Any = None,
    *,
    out: str | os.PathLike | None = None,
    features: str | None = None,
    directions: list[int] | None = None,
    alpha: float = 0.01,
    seed: int = 0,
    folds: int = 5,
    permutations: int | None = None,
    scorer: str = "logistic",
    sample_size_resamples: int = 50,
    ignore_shift: bool = False,
    no_harmonise: bool = False,
    shift_alpha: float = 0.05,
    shift_encoder: str = "auto",
    batch_size: int | str = "auto",
    store: str | None = None,
    workers: int | None = 0,
    progress: bool = False,
    force: bool = False,
    **load_kwargs: Any,
) -> AuditResult:
    """Audit whether ``published`` was used to train ``model``; see the module docstring.

    Parameters are those of ``cdi audit`` (``cdi audit --help``). Besides:
    ``directions`` gives the member direction of every column of feature
    tables when ``features`` cannot give it (feature tables without a
    model); ``load_kwargs`` go to ``cdi.models.load_model``.

    Returns
    -------
    AuditResult
        What ``result.json`` would hold. Nothing is written unless ``out``
        is given.
    """
    from cdi.engine.table import FeatureTable

    tables = isinstance(published, FeatureTable), isinstance(unpublished, FeatureTable)
    if tables[0] != tables[1]:
        raise CDIError("published and unpublished must both be feature tables, or both images")
    config = AuditConfig(
        published=_describe(published), unpublished=_describe(unpublished),
        model=_describe(model), out="" if out is None else os.fspath(out), features=features, alpha=alpha,
        seed=seed, folds=folds, permutations=permutations, scorer=scorer,
        sample_size_resamples=sample_size_resamples, ignore_shift=ignore_shift, shift_alpha=shift_alpha,
        shift_encoder=shift_encoder, batch_size=batch_size, store=store, workers=workers, no_harmonise=no_harmonise,
        force=force or out is None,
        **{k: v for k, v in load_kwargs.items() if k in AuditConfig.__dataclass_fields__},
    )
    config.validate()
    if config.design is not None or config.allow_deviations:  # never record a design that was not checked
        raise CDIError("design= is not taken by cdi.api.audit: run `cdi audit --design` (or "
                       "cdi.audit.run.run_audit(AuditConfig(..., design=...))), which checks P, U and the options")
    if all(tables):
        result, pair = _audit_tables(published, unpublished, model, config, directions, load_kwargs)
    else:
        if model is None:
            raise CDIError("an audit of images needs a model (an adapter, a name or folder, or a pipeline)")
        result, pair = _audit_images(published, unpublished, model, config, progress, load_kwargs)
    if out is not None:
        _write(Path(out), result, pair)
    return result


# ------------------------------------------------------------------ helpers
def _describe(value: Any) -> str:
    """What the result records for an input: a path as given, else what kind of object it was."""
    if value is None:
        return "none"
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    root = getattr(value, "root", None)
    if root is not None:
        return str(root)
    model_id = getattr(value, "model_id", None)
    return str(model_id) if model_id else f"in-memory {type(value).__name__}"


def _collection(images: Any, name: str):
    from cdi.data.collection import ImageCollection

    if isinstance(images, ImageCollection):
        return images
    if isinstance(images, (str, os.PathLike)):
        return ImageCollection.from_folder(images, name=name)
    raise CDIError(f"{name} must be an image folder, an ImageCollection or a FeatureTable, "
                   f"got {type(images).__name__}")


def _audit_images(published, unpublished, model, config: AuditConfig, progress: bool, load_kwargs):
    from cdi.audit.run import _check_sizes
    from cdi.engine.batching import resolve_batch_size
    from cdi.data.duplicates import check_disjoint
    from cdi.data.shift_guard import image_embeddings
    from cdi.audit.analysis import harmonisation_record
    from cdi.data.harmonise import probe_collection
    from cdi.data.preprocess import harmonised_preprocess
    from cdi.features.extract import extract_features
    from cdi.features.registry import default_feature_set, directions_of, resolve_features

    collections = _collection(published, "published"), _collection(unpublished, "unpublished")
    check_disjoint(*collections)
    _check_sizes(*collections, config.folds)
    probes = [probe_collection(c) for c in collections]
    if config.features is not None:
        resolve_features(config.features)
    adapter = load_adapter(model, **load_kwargs)
    spec = config.features or default_feature_set(adapter)
    families = resolve_features(spec)
    for family in families:
        family.check_applicable(adapter)
    batch_size = resolve_batch_size(config.batch_size, adapter, families, collections[0].records[0].caption)
    plan, preprocess = harmonised_preprocess(*probes, adapter.resolution, adapter.image_channels,
                                             enabled=not config.no_harmonise)
    pair = [extract_features(adapter, c, families, seed=config.seed, batch_size=batch_size, store=config.store,
                             num_workers=config.workers, progress=progress, preprocess=preprocess)
            for c in collections]
    seen = preprocess if preprocess.harmonised else None  # the guard sees what the model saw
    emb_p, encoder = image_embeddings(collections[0], encoder=config.shift_encoder, harmonisation=seen)
    emb_u, _ = image_embeddings(collections[1], encoder=encoder, harmonisation=seen)
    directions = directions_of(families, adapter)
    analysis = analyse_tables(pair[0], pair[1], directions=directions, config=config,
                              shift_features=(emb_p, emb_u, encoder), encodings=(*probes, plan.enabled))
    model = {**adapter.describe(), "files": dict(getattr(adapter, "files", {}))}
    result = build_result(analysis, pair[0], pair[1], families=families, feature_spec=spec, directions=directions,
                          model=model, config=config, timings={})
    result.extraction = extraction_record(config.batch_size, batch_size, adapter.device, pair)
    result.harmonisation = harmonisation_record(plan.to_dict(), preprocess, analysis.encoding)
    return result, pair


def _audit_tables(published, unpublished, model, config: AuditConfig, directions, load_kwargs):
    from cdi.features.registry import directions_of, resolve_features

    if list(published.columns) != list(unpublished.columns):
        raise CDIError("the published and unpublished feature tables have different columns")
    meta_families = [f.get("name") for f in published.meta.get("families", []) if isinstance(f, dict)]
    spec = config.features or (",".join(meta_families) if meta_families else None)
    families = resolve_features(spec) if spec else []
    adapter = load_adapter(model, **load_kwargs) if model is not None else None
    if directions is None and families:
        try:
            found = directions_of(families, adapter)
        except (AttributeError, TypeError, CDIError):  # a family whose directions depend on the model
            found = None
        if found is not None and len(found) == len(published.columns):
            directions = found
    if directions is None:
        raise CDIError("feature tables need their member directions: pass features= (the families that made "
                       "the columns, as in the table's meta), model=, or directions= (one +1/-1/0 per column)")
    analysis = analyse_tables(published, unpublished, directions=directions, config=config, shift_features=None)
    described = adapter.describe() if adapter is not None else dict(published.meta.get("model") or
                                                                    {"model_id": "unknown (feature tables)"})
    result = build_result(analysis, published, unpublished, families=families, feature_spec=spec or "given tables",
                          directions=directions, model=described, config=config, timings={})
    return result, [published, unpublished]


def _write(out: Path, result: AuditResult, pair) -> None:
    """The evidence files ``cdi audit`` writes (``cdi.audit.evidence.write_evidence``)."""
    from cdi.audit.evidence import write_evidence

    write_evidence(out, result, pair)
