"""The audit: were the published images used to train the model?

``run_audit`` is what ``cdi audit`` calls. In order:

1. validate every option and both image folders (nothing is written or
   loaded before the inputs are known to be usable): seed, workers, an
   output folder that can be written and holds no files of the user's,
   images (``cdi.data.collection``: hostile names, FIFOs, duplicates within and
   across the folders; ``cdi.data.duplicates``: perceptual near-duplicates
   warned about), and the captions the model and features need
   (``cdi.models.captions.check_captions``);
2. with ``--captions auto``, caption every image (``cdi.models.captions``); read
   how every file is encoded (``cdi.data.harmonise.probe_collection``); load the
   model and resolve the feature families; decide the harmonisation of the
   two collections' encodings (``cdi.data.harmonise.plan_harmonisation``, off
   with ``no_harmonise``);
3. extract per-image features of P and U (one encode per image, cached in
   the feature store when one is given), both through the same
   (harmonised) preprocessing;
4. run the verdict test and the permutation test (``cdi.stats.verdict.audit_test``),
   the sample-size curve (``cdi.stats.sample_size.sample_size_curve``, with the forward estimate) and the shift
   guard (``cdi.data.shift_guard``) on model-free image descriptors of what the
   model saw, and on the files' encodings;
5. decide the verdict: ``inconclusive`` if the shift guard detects that P
   and U differ without the model, or that their encodings differ while
   harmonisation is off (unless ``ignore_shift``), else the test's
   own decision ``TestResult.verdict`` (``cdi.stats.verdict.direction_rule``:
   ``used`` only if the test rejects at ``alpha`` along the known member
   directions, ``inconclusive`` if the published images look less like
   training data yet differ, else ``not_detected``);
6. write ``features.csv`` (+ sidecar), ``result.json`` and ``report.html``
   into the output folder as one (``cdi.audit.evidence.write_evidence``: a crash
   leaves the complete old audit or the complete new one).

``analyse_tables`` is steps 4 and 5 on their own: it needs only the feature
tables, so stored features can be re-tested without the model.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence


from cdi.audit.design import design_for_audit, design_record
from cdi.data.collection import ImageCollection, load_audit_collections
from cdi.data.duplicates import NEAR_DUPLICATE_BITS, near_duplicates
from cdi.utils.errors import CDIError
from cdi.audit.result import FEATURES_FILE, REPORT_FILE, RESULT_FILE, AuditResult
from cdi.engine.table import FeatureTable
from cdi.audit.analysis import analyse_tables, build_result, harmonisation_record, verdict_test
from cdi.audit.noise_draws import draw_values, with_draw_columns
from cdi.audit.seed_check import other_seeds, run_seed_check
from cdi.audit.config import AuditConfig

logger = logging.getLogger("cdi")


def run_audit(config: AuditConfig, *, progress: bool = True) -> AuditResult:
    """Run a whole audit and write its files into ``config.out``; see the module docstring."""
    from cdi.engine.batching import parse_batch_size, resolve_batch_size
    from cdi.models import load_model
    from cdi.data.harmonise import probe_collection
    from cdi.data.preprocess import harmonised_preprocess
    from cdi.data.shift_guard import image_embeddings
    from cdi.features.extract import extract_features
    from cdi.features.base import draw_seed
    from cdi.features.registry import default_feature_set, directions_of, resolve_features, total_cost

    from cdi.engine.distributed import ray_runner
    from cdi.audit.evidence import write_evidence

    if config.from_features:
        from cdi.audit.from_features import run_audit_from_features

        return run_audit_from_features(config)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    config.validate()
    design = design_for_audit(config)
    published, unpublished = load_audit_collections(
        config.published, config.unpublished, skip_bad=config.skip_bad, max_pixels=config.max_pixels
    )
    design_checks = design_record(design, config, [(r.path, r.sha256) for r in published.records],
                                  [(r.path, r.sha256) for r in unpublished.records])
    _check_sizes(published, unpublished, config.folds)
    inputs = input_record(published, unpublished)
    probes = [probe_collection(c) for c in (published, unpublished)]
    memory_plan = _plan_memory(config, len(published) + len(unpublished), progress=progress)
    published, unpublished, caption_record = prepare_captions(
        [published, unpublished], model=config.model, revision=config.revision, features=config.features,
        captions=config.captions, store=config.store, device=config.device, dtype=config.dtype,
    )

    options = dict(name=config.model, revision=config.revision, variant=config.variant, dtype=config.dtype,
                   allow_pickle=config.allow_pickle, compile=config.compile, **config.loading_options())
    hub = dict(local_files_only=config.local_files_only, cache_dir=config.cache_dir, token=config.token)
    if config.ray:
        from cdi.models.loading import ray_dtype

        options["dtype"] = ray_dtype(config.dtype, config.device)
    with contextlib.ExitStack() as stack:
        runner = ray_runner(config.ray, workers=config.ray_workers, threads=config.ray_threads,
                            device=config.device, **options)
        if runner is not None:  # Ray workers compute; this process keeps a CPU copy for keys and columns
            stack.enter_context(runner)
            options.update(compile=False)
        adapter = load_model(**options, device="cpu" if runner is not None else config.device, **hub)
        if adapter.distillation and progress:
            from cdi.models.registry import distillation_text

            print(f"note: {distillation_text(adapter.distillation)}", file=sys.stderr)
        reference = None
        if config.reference_model:
            from cdi.audit.reference import check_reference, park, unpark

            park(adapter)  # one model on the GPU at a time
            flow = {k: options[k] for k in ("guidance_scale", "timestep_grid")}  # the same inputs as the target
            reference = load_model(config.reference_model, dtype=config.dtype, device=config.device,
                                   allow_pickle=config.allow_pickle, compile=config.compile, **flow, **hub)
            park(reference)
            unpark(adapter)
            check_reference(adapter, reference)
        feature_spec = config.features or default_feature_set(adapter)
        families = resolve_features(feature_spec)
        for family in families:
            family.check_applicable(adapter)
        directions = directions_of(families, adapter)
        plan, preprocess = harmonised_preprocess(*probes, adapter.resolution, adapter.image_channels,
                                                 enabled=not config.no_harmonise)
        t_loaded = time.perf_counter()

        # Every extraction of the audit, (seed of the draw, families): its own first, then its further noise
        # draws (cdi.audit.noise_draws), then the seed check's draws at the other seeds (cdi.audit.seed_check).
        noisy = [f for f in families if f.draws_noise]
        draws = config.draws if noisy else 1
        check_seeds = other_seeds(config.seed, config.seed_check) if noisy else []
        jobs = [(config.seed, families)] + [(draw_seed(config.seed, r), noisy) for r in range(1, draws)]
        jobs += [(draw_seed(s, r), noisy) for s in check_seeds for r in range(draws)]
        if runner is None:  # the text encoders visit the device once for every extraction (flow models)
            from cdi.features.extract import captions_to_encode

            records = published.records + unpublished.records
            adapter.prepare_captions([c for job_seed, job_families in jobs
                                      for c in captions_to_encode(adapter, records, job_families, job_seed)])
        caption = published.records[0].caption
        if runner is None:
            batch_size = resolve_batch_size(config.batch_size, adapter, families, caption)
        else:
            batch_size = parse_batch_size(config.batch_size)
            batch_size = runner.auto_batch_size(adapter, families, caption) if batch_size == "auto" else batch_size
        extract_kwargs = dict(seed=config.seed, batch_size=batch_size, store=config.store,
                              num_workers=config.workers, progress=progress, preprocess=preprocess)
        extracted = {job_seed: [extract_features(adapter, collection, job_families, runner=runner,
                                                 **{**extract_kwargs, "seed": job_seed})
                                for collection in (published, unpublished)]
                     for job_seed, job_families in jobs}
        if reference is not None:  # the reference runs in this process (not on the Ray workers)
            from cdi.audit.reference import calibrate, park, reference_tables

            park(adapter)
            for job_seed, job_families in jobs:
                extracted[job_seed] = calibrate(extracted[job_seed], reference_tables(
                    reference, (published, unpublished), job_families,
                    extract_kwargs={**extract_kwargs, "seed": job_seed}))
        tables = extracted[config.seed]
        own_draws = [extracted[draw_seed(config.seed, r)] for r in range(1, draws)]
        noisy_calls = total_cost(noisy, adapter) if noisy else None
    t_extracted = time.perf_counter()

    seen = preprocess if preprocess.harmonised else None  # the guard sees what the model saw
    emb_p, encoder = image_embeddings(published, encoder=config.shift_encoder, harmonisation=seen)
    emb_u, _ = image_embeddings(unpublished, encoder=encoder, harmonisation=seen)
    t_embedded = time.perf_counter()

    analysis = analyse_tables(tables[0], tables[1], directions=directions, config=config,
                              shift_features=(emb_p, emb_u, encoder), encodings=(*probes, plan.enabled),
                              draws=draw_values(tables, own_draws))
    check = None
    if check_seeds:
        def test(arrays):
            outcome = verdict_test(*arrays[0], directions=directions, config=config, columns=tables[0].columns,
                                   draws=arrays[1:])
            return outcome.verdict_p, outcome.verdict

        redrawn = {s: [extracted[draw_seed(s, r)] for r in range(draws)] for s in check_seeds}
        check = run_seed_check(tables, redrawn, seed=config.seed, families_redrawn=[f.name for f in noisy], test=test,
                               first=(analysis.test.verdict_p, analysis.test.verdict),
                               p_kind=analysis.test.verdict_choice,
                               calls_per_image={"forward": noisy_calls.forward, "backward": noisy_calls.backward})
    timings = {
        "started_at": started,
        "load_s": t_loaded - t0,
        "extract_s": t_extracted - t_loaded,
        "shift_embeddings_s": t_embedded - t_extracted,
        "extraction": {name: {k: t.meta["extraction"][k] for k in ("computed", "from_store", "seconds")}
                       for name, t in zip(("published", "unpublished"), tables)},
    }
    model = {**adapter.describe(), "files": dict(getattr(adapter, "files", {}))}
    result = build_result(analysis, tables[0], tables[1], families=families, feature_spec=feature_spec,
                          directions=directions, model=model, config=config, timings=timings, seed_check=check,
                          draws=draws, draw_calls=noisy_calls)
    # the batch size was chosen for the device that computed: the Ray workers' when --ray
    compute_device = adapter.device if runner is None else runner.compute_device
    result.extraction = extraction_record(config.batch_size, batch_size, compute_device, tables)
    if memory_plan is not None:
        result.extraction["memory_plan"] = memory_plan.as_dict()
    result.inputs, result.captions, result.design = inputs, caption_record, design_checks
    result.harmonisation = harmonisation_record(plan.to_dict(), preprocess, analysis.encoding)
    if reference is not None:
        result.reference_model = reference.describe()
        result.question = "used_beyond_reference"
    result.timings["total_s"] = time.perf_counter() - t0
    write_evidence(config.out, result, [with_draw_columns(table, [d[i] for d in own_draws])
                                        for i, table in enumerate(tables)])
    return result


def _plan_memory(config: AuditConfig, images: int, *, progress: bool):
    """The audit's memory plan (``cdi.engine.memory_plan``), printed as one line; stops an audit that cannot fit.

    Built from the model's configs before any weight loads (activations
    traced on CUDA only, where the plan decides whether the audit runs); None,
    and a line saying so, when the configs are not local (a hub id not yet
    downloaded, a single-file checkpoint).
    """
    from cdi.engine.memory_plan import check_fits, plan_for, planned_device

    device = planned_device("cpu" if config.ray else config.device)
    why = "the model's configs are not local yet"
    try:
        plan = plan_for(config.model, device=device, dtype=config.dtype, features=config.features,
                        batch_size=config.batch_size, images=images, trace=device.startswith("cuda"))
    except Exception as exc:  # noqa: BLE001 -- a plan that cannot be made must not stop the audit itself
        plan, why = None, f"{type(exc).__name__}: {exc}"
    if progress:
        print(plan.summary() if plan is not None else f"memory plan: not made ({why})", file=sys.stderr)
    if plan is not None:
        check_fits(plan)
    return plan


def extraction_record(requested: int | str, batch_size: int, device, tables: Sequence[FeatureTable]) -> dict:
    """How the features were computed, for ``result.json``: the batch size used and how it was chosen.

    ``final_batch_size`` is the smallest batch any collection ended at (below
    ``batch_size`` only when CUDA ran out of memory and the batch was halved).
    """
    from cdi.engine.batching import auto_batch_rule, parse_batch_size

    finals = [t.meta["extraction"].get("final_batch_size") for t in tables]
    finals = [f for f in finals if f is not None]
    return {
        "batch_size": batch_size,
        "batch_size_rule": auto_batch_rule(device) if parse_batch_size(requested) == "auto" else "given",
        "final_batch_size": min(finals) if finals else batch_size,
    }


def input_record(published: ImageCollection, unpublished: ImageCollection) -> dict[str, Any]:
    """The ``inputs`` section of ``result.json``: every file seen in P and U with what happened to it.

    Per collection: ``root``, ``counts`` (``ImageCollection.file_counts``) and
    ``files`` (``ImageCollection.file_log``); then ``near_duplicates``, the
    (published, unpublished) pairs whose perceptual hashes almost agree
    (``cdi.data.duplicates.near_duplicates``), each also logged as a warning. Exact
    duplicates across the folders never get here: they are refused.
    """
    near = near_duplicates(published, unpublished)
    if near:
        logger.warning(
            "%d published/unpublished pair(s) look nearly identical (perceptual hash within %d of 64 bits); "
            "check that no unpublished image is a copy of a published one: %s", len(near), NEAR_DUPLICATE_BITS,
            "; ".join(f"{d['published']} ~ {d['unpublished']}" for d in near[:10]))
    record: dict[str, Any] = {
        c.name: {"root": str(c.root), "counts": c.file_counts(), "files": c.file_log()}
        for c in (published, unpublished)
    }
    record["near_duplicates"] = near
    record["near_duplicate_bits"] = NEAR_DUPLICATE_BITS
    return record


def prepare_captions(
    collections: Sequence[ImageCollection], *, model: str, revision: str | None, features: str | None,
    captions: str | None, store: str | None, device: str, dtype: str,
) -> tuple[Any, ...]:
    """Check, before the diffusion model loads, that the features get the captions they need, and with
    ``captions="auto[:MODEL]"`` caption every image (``cdi.models.captions``).

    Returns the collections (captioned when asked) followed by the
    ``captions`` record of the result.
    """
    from cdi.models.captions import (
        CaptionCache,
        Captioner,
        cache_folder,
        caption_collections,
        check_captions,
        model_conditioning,
        parse_captions_option,
    )
    from cdi.features.registry import default_set_for, resolve_features

    option = parse_captions_option(captions)
    conditioning = model_conditioning(model, revision=revision)
    families = resolve_features(features or default_set_for(conditioning or "none"))
    record = check_captions(conditioning, families, collections, option)
    if option.source == "auto" and conditioning in ("class", "none"):
        raise CDIError(f"--captions auto writes text captions, but {model} is "
                       f"{'class-conditioned (its captions are class labels)' if conditioning == 'class' else 'unconditional'}; "
                       "drop --captions")
    if option.source == "auto":
        captioner = Captioner(option.captioner, device=device, dtype=dtype)
        collections, auto = caption_collections(collections, captioner, CaptionCache(cache_folder(store), captioner))
        record = {**record, **auto}
        del captioner
        _free_device_memory()
    return (*collections, record)


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_sizes(published: ImageCollection, unpublished: ImageCollection, folds: int) -> None:
    from cdi.stats.blocks import minimum_images

    need = minimum_images(folds)
    for collection in (published, unpublished):
        if len(collection) < need:
            raise CDIError(
                f"the {collection.name} folder has {len(collection)} usable images, but an audit with "
                f"--folds {folds} needs at least {need} per collection (more images give more power; "
                f"tens to hundreds are typical)"
            )


def output_files(folder: str | Path) -> list[Path]:
    """The files an audit writes into its output folder."""
    folder = Path(folder)
    return [folder / RESULT_FILE, folder / FEATURES_FILE, folder / REPORT_FILE]
