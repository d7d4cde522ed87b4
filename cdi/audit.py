"""The audit: were the published images used to train the model?

``run_audit`` is what ``cdi audit`` calls. In order:

1. validate every option and both image folders (nothing is written or
   loaded before the inputs are known to be usable): seed, workers, an
   output folder that can be written and holds no files of the user's,
   images (``cdi.data``: hostile names, FIFOs, duplicates within and
   across the folders; ``cdi.duplicates``: perceptual near-duplicates
   warned about), and the captions the model and features need
   (``cdi.captions.check_captions``);
2. with ``--captions auto``, caption every image (``cdi.captions``); load the
   model and resolve the feature families;
3. extract per-image features of P and U (one encode per image, cached in
   the feature store when one is given);
4. run the verdict test and the permutation test (``cdi.stats.audit_test``),
   the sample-size curve (``cdi.sample_size.sample_size_curve``, with the forward estimate) and the shift
   guard (``cdi.shift_guard``) on model-free image descriptors;
5. decide the verdict: ``inconclusive`` if the shift guard detects that P
   and U differ without the model (unless ``ignore_shift``), else ``used`` if
   the verdict test rejects at ``alpha``, else ``not_detected``;
6. write ``features.csv`` (+ sidecar), ``result.json`` and ``report.html``
   into the output folder as one (``cdi.evidence.write_evidence``: a crash
   leaves the complete old audit or the complete new one).

``analyse_tables`` is steps 4 and 5 on their own: it needs only the feature
tables, so stored features can be re-tested without the model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import special

from cdi.data import DEFAULT_MAX_PIXELS, ImageCollection, load_audit_collections
from cdi.duplicates import NEAR_DUPLICATE_BITS, near_duplicates
from cdi.environment import environment_report
from cdi.errors import CDIError
from cdi.result import (
    FEATURES_FILE,
    REPORT_FILE,
    RESULT_FILE,
    AuditResult,
    FeatureWeight,
    ImageScore,
    SampleSizeCurve,
    ShiftGuard,
)
from cdi.table import FeatureTable

SCORERS = ("logistic", "xgboost")

logger = logging.getLogger("cdi")


@dataclass
class AuditConfig:
    """Every parameter of an audit; recorded verbatim in ``result.json``."""

    published: str
    unpublished: str
    model: str
    out: str
    features: str | None = None  # None: cdi+clid+sima for conditional models, cdi+sima otherwise
    alpha: float = 0.01
    seed: int = 0
    folds: int = 5
    permutations: int = 1000
    scorer: str = "logistic"
    protocol: str = "pooled"
    verdict: str = "parametric"  # or "permutation": the exact permutation p-value is the verdict
    sample_size_resamples: int = 50
    ignore_shift: bool = False
    shift_alpha: float = 0.05  # the guard errs towards "inconclusive": a missed shift could accuse wrongly
    shift_encoder: str = "auto"
    batch_size: int | str = "auto"
    device: str = "auto"
    dtype: str = "float32"
    store: str | None = None
    revision: str | None = None
    variant: str | None = None
    allow_pickle: bool = False
    compile: bool = False
    local_files_only: bool | None = None  # None: follow HF_HUB_OFFLINE
    cache_dir: str | None = None  # None: HF_HUB_CACHE
    token: str | None = field(default=None, repr=False)  # never recorded in result.json
    skip_bad: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int | None = None
    captions: str | None = None  # None / "files": the folders' captions; "auto[:MODEL]": generated
    force: bool = False
    lora: list[str] = field(default_factory=list)  # LoRA files fused into --model (cdi.models.finetune)
    lora_scale: list[float] = field(default_factory=list)
    unet: str | None = None
    component: list[str] = field(default_factory=list)  # NAME=FOLDER replacements
    config: str | None = None  # configuration of a single-file --model
    reference_model: str | None = None  # test target minus reference features (cdi.reference)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. how the demo drew P and U
    published_features: str | None = None  # audit from `cdi extract` tables instead of a model
    unpublished_features: str | None = None
    ray: str | None = None  # compute on Ray: "local", "auto" or a cluster address
    ray_workers: int | None = None
    ray_threads: int = 1

    @property
    def from_features(self) -> bool:
        """Whether this audit reads stored feature tables instead of running a model."""
        return self.published_features is not None or self.unpublished_features is not None

    def validate(self) -> None:
        """Check the options that need no file access; raise ``CDIError``."""
        self._validate_sources()
        if not 0.0 < self.alpha < 0.5:
            raise CDIError(f"--alpha must be between 0 and 0.5 (got {self.alpha}); 0.01 is the usual choice")
        if not 0.0 < self.shift_alpha < 1.0:
            raise CDIError(f"--shift-alpha must be between 0 and 1 (got {self.shift_alpha})")
        if self.folds < 2:
            raise CDIError(f"--folds must be at least 2 (got {self.folds})")
        if self.permutations < 0:
            raise CDIError(f"--permutations must be 0 (off) or positive (got {self.permutations})")
        if self.scorer not in SCORERS:
            raise CDIError(f"--scorer must be one of {', '.join(SCORERS)} (got {self.scorer!r})")
        _validate_verdict_options(self)
        if self.scorer == "xgboost":
            from cdi.optional import require_xgboost

            require_xgboost("--scorer xgboost")
        from cdi.batching import parse_batch_size

        parse_batch_size(self.batch_size)
        if self.sample_size_resamples < 0:
            raise CDIError("--sample-size-resamples must be 0 (off) or positive")
        check_seed(self.seed)
        check_workers(self.workers)
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise CDIError(f"--max-pixels must be a positive whole number of pixels, got {self.max_pixels!r}")
        from cdi.captions import parse_captions_option

        parse_captions_option(self.captions)
        self.loading_options()
        from cdi.reference import check_reference_name

        check_reference_name(self.reference_model)
        from cdi.evidence import check_out_folder

        check_out_folder(self.out, force=self.force)
        if self.out:  # the Python API without out= writes nothing (cdi.api)
            check_writable(self.out, "--out")

    def _validate_sources(self) -> None:
        """Images and a model, or two feature tables (images then optional, for the shift guard)."""
        from cdi.distributed import check_ray_options

        if not self.from_features:
            if not (self.published and self.unpublished and self.model):
                raise CDIError(
                    "an audit needs --published, --unpublished and --model (or --published-features and "
                    "--unpublished-features: the feature tables of both collections made by `cdi extract`)"
                )
            check_ray_options(self.ray, self.ray_workers, self.ray_threads, self.device, self.dtype)
            return
        if not (self.published_features and self.unpublished_features):
            raise CDIError("--published-features and --unpublished-features go together: give the `cdi extract` "
                           "CSV of each collection")
        if self.model:
            raise CDIError("--model with --published-features: the model is the one the feature tables were "
                           "extracted with (recorded in them); drop --model")
        if self.ray:
            raise CDIError("--ray with --published-features: an audit from feature tables computes no feature")
        if (self.published is None) != (self.unpublished is None):
            raise CDIError("with --published-features, give both image folders (--published and --unpublished, "
                           "for the shift guard) or neither (the shift guard is then recorded as not run)")

    def loading_options(self) -> dict[str, Any]:
        """The ``load_model`` keywords for the LoRAs, replaced components and single-file config (checked)."""
        from cdi.models.finetune import loading_options

        return loading_options(self.lora, self.lora_scale, self.unet, self.component, self.config,
                               allow_pickle=self.allow_pickle)


def check_seed(seed: int) -> None:
    """A seed must be a whole number in 0 .. 2**63 - 1 (what every random generator cdi uses accepts)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise CDIError(f"--seed must be a whole number between 0 and 2**63 - 1, got {seed!r}")


def check_workers(workers: int | None) -> None:
    """``None`` (the default count) or a whole number of decoding processes, 0 or more."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise CDIError(f"--workers must be 0 (decode in the main process) or more, got {workers!r}")


def check_writable(path: str | Path, option: str) -> None:
    """Raise ``CDIError`` unless files can be created in folder ``path`` (or, if it does not exist yet,
    in its nearest existing parent, where it would be created).

    Tried for real, with a temporary file removed at once, because permission
    bits do not tell (root, ACLs, read-only mounts); nothing is left behind.
    """
    import tempfile

    path = Path(path).expanduser().absolute()
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise CDIError(f"{option} {path}: {folder} is a file, not a folder; choose a folder path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".cdi-write-test-", dir=folder)
    except OSError as exc:
        raise CDIError(f"{option} {path}: cannot write into {folder} ({exc.strerror or exc}); choose a folder you "
                       "can write to") from None
    os.close(fd)
    os.unlink(tmp)


def reproduce_command(config: AuditConfig) -> str:
    """The ``cdi audit`` command line that repeats this audit."""
    defaults = AuditConfig(config.published, config.unpublished, config.model, config.out)
    sources = ("published", "unpublished", "published_features", "unpublished_features", "model")
    parts = ["cdi", "audit"]
    for name in sources:
        if getattr(config, name) is not None:
            parts += ["--" + name.replace("_", "-"), str(getattr(config, name))]
    parts += ["--out", config.out]
    for name, value in asdict(config).items():
        if name in {*sources, "out", "extra", "force", "token"}:
            continue
        if value == getattr(defaults, name) or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag)
        elif isinstance(value, list):
            for item in value:
                parts += [flag, str(item)]
        else:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


@dataclass
class Analysis:
    """What ``analyse_tables`` concluded (the model-dependent part of a result)."""

    verdict: str
    test: Any  # cdi.stats.TestResult
    curve: SampleSizeCurve | None
    shift: ShiftGuard | None
    seconds: dict[str, float]
    estimate: dict[str, Any] | None = None  # cdi.sample_size.ForwardSampleSize.to_dict()


def _validate_verdict_options(config: "AuditConfig") -> None:
    """The protocol, verdict, scorer and permutation options fit together (``CDIError`` if not)."""
    from cdi.stats import PROTOCOLS, VERDICTS

    if config.protocol not in PROTOCOLS:
        raise CDIError(f"protocol must be one of {', '.join(PROTOCOLS)} (got {config.protocol!r})")
    if config.verdict not in VERDICTS:
        raise CDIError(f"--verdict must be one of {', '.join(VERDICTS)} (got {config.verdict!r})")
    if (config.verdict == "permutation" or config.protocol == "crossfit") and config.permutations == 0:
        raise CDIError("--verdict permutation needs permutations: pass --permutations (e.g. 10000), not 0")
    if config.protocol == "pooled" and config.scorer != "logistic":
        raise CDIError(f"--scorer {config.scorer} applies to the sequential and crossfit protocols only; "
                       "the default pooled protocol learns no scorer")


def analyse_tables(
    published: FeatureTable,
    unpublished: FeatureTable,
    *,
    directions: Sequence[int] | None,
    config: AuditConfig,
    shift_features: tuple[np.ndarray, np.ndarray, str] | None = None,
) -> Analysis:
    """Tests, sample-size curve, shift guard and verdict from feature tables alone.

    ``shift_features`` is ``(descriptors of P, descriptors of U, encoder name)``
    for the shift guard; None skips the guard (recorded as not run).
    """
    from cdi.shift_guard import shift_guard
    from cdi.sample_size import forward_sample_size, sample_size_curve
    from cdi.stats import audit_test

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    test = audit_test(
        published.values, unpublished.values, directions=directions, scorer=config.scorer,
        folds=config.folds, permutations=config.permutations, alpha=config.alpha, seed=config.seed,
        protocol=config.protocol, columns=published.columns, verdict=config.verdict,
    )
    seconds["test_s"] = time.perf_counter() - start
    estimate = forward_sample_size(
        float(-special.ndtri_exp(min(test.ttest_log10_p * math.log(10.0), 0.0))), test.n_published,
        test.n_unpublished, alpha=config.alpha).to_dict()

    curve = None
    if config.sample_size_resamples > 0:
        start = time.perf_counter()
        raw = sample_size_curve(
            published.values, unpublished.values, directions=directions, alpha=config.alpha,
            resamples=config.sample_size_resamples, seed=config.seed, scorer=config.scorer,
            folds=config.folds, columns=published.columns,
            protocol="sequential" if config.protocol == "sequential" else "pooled",
        )
        curve = SampleSizeCurve(
            sizes=list(raw.sizes), median_p=list(raw.median_p), share_significant=list(raw.share_significant),
            n_needed=raw.n_needed, target_share=raw.power, resamples=raw.resamples, alpha=raw.alpha,
        )
        seconds["sample_size_curve_s"] = time.perf_counter() - start

    shift = None
    if shift_features is not None:
        start = time.perf_counter()
        feats_p, feats_u, encoder = shift_features
        guard = shift_guard(feats_p, feats_u, alpha=config.shift_alpha, seed=config.seed, encoder=encoder)
        shift = ShiftGuard(
            encoder=guard.encoder, p_value=guard.p_value, auc=guard.auc, detected=guard.detected,
            ignored=config.ignore_shift, alpha=config.shift_alpha, note=guard.note,
        )
        seconds["shift_guard_s"] = time.perf_counter() - start

    verdict = decide_verdict(bool(test.rejected), shift, ignore_shift=config.ignore_shift)
    return Analysis(verdict=verdict, test=test, curve=curve, shift=shift, seconds=seconds, estimate=estimate)


def decide_verdict(rejected: bool, shift: ShiftGuard | None, *, ignore_shift: bool) -> str:
    """``inconclusive`` if the shift guard detected a shift (unless ignored), else ``used`` if the test rejected."""
    if shift is not None and shift.detected and not ignore_shift:
        return "inconclusive"
    return "used" if rejected else "not_detected"


def _family_of_columns(families) -> dict[str, str]:
    from cdi.reference import difference_column

    named = {column: family.name for family in families for column in family.columns()}
    return {**named, **{difference_column(c): name for c, name in named.items()}}


def build_result(
    analysis: Analysis,
    published: FeatureTable,
    unpublished: FeatureTable,
    *,
    families,
    feature_spec: str,
    directions: Sequence[int] | None,
    model: dict[str, Any],
    config: AuditConfig,
    timings: dict[str, Any],
) -> AuditResult:
    """Assemble the ``AuditResult`` of an analysis."""
    test = analysis.test
    scoring = test.scoring
    n_p = len(published)
    scores, tested = scoring.scores, scoring.tested
    rows = []
    for i, table in enumerate([published, unpublished]):
        offset = 0 if i == 0 else n_p
        name = "published" if i == 0 else "unpublished"
        for j in range(len(table)):
            rows.append(ImageScore(
                path=table.paths[j], sha256=table.hashes[j], collection=name, caption=table.captions[j],
                score=float(scores[offset + j]), in_test=bool(tested[offset + j]),
            ))
    family_of = _family_of_columns(families)
    weights = [FeatureWeight(column=c, family=family_of.get(c, c), weight=float(w))
               for c, w in scoring.coefficients.items()]
    protocol = test.to_dict()
    for key in ("scores_published", "scores_unpublished", "scoring"):
        protocol.pop(key, None)
    protocol.update(name=test.protocol, description=_protocol_description(test.protocol),
                    coefficient_kind=scoring.coefficient_kind)
    return AuditResult(
        verdict=analysis.verdict,
        p_value=float(test.verdict_p),
        p_value_ttest=float(test.ttest_p),
        p_value_permutation=None if test.permutation_p is None else float(test.permutation_p),
        alpha=config.alpha,
        n_published=n_p,
        n_unpublished=len(unpublished),
        statistic=float(test.statistic),
        df=None if test.df is None else float(test.df),
        effect_size=float(test.effect_size),
        auc=float(test.auc),
        protocol=protocol,
        scores=rows,
        feature_weights=weights,
        sample_size_curve=analysis.curve,
        sample_size_estimate=analysis.estimate,
        shift_guard=analysis.shift,
        model=model,
        features={
            "set": feature_spec,
            "families": [{"name": f.name, "key": f.key(), "config": f.config_dict(), "columns": f.columns()}
                         for f in families],
            "columns": list(published.columns),
            "directions": None if directions is None else [int(d) for d in directions],
        },
        parameters={k: v for k, v in asdict(config).items() if k not in ("force", "token")},
        seed=config.seed,
        command=reproduce_command(config),
        environment=environment_report(),
        timings={**timings, **analysis.seconds},
    )


def _protocol_description(name: str) -> str:
    from cdi import stats

    text = stats.PROTOCOL_DESCRIPTIONS.get(name) if hasattr(stats, "PROTOCOL_DESCRIPTIONS") else None
    return text or (stats.__doc__ or "").strip()


def run_audit(config: AuditConfig, *, progress: bool = True) -> AuditResult:
    """Run a whole audit and write its files into ``config.out``; see the module docstring."""
    from cdi.batching import parse_batch_size, resolve_batch_size
    from cdi.models import load_model
    from cdi.shift_guard import image_embeddings
    from cdi.features.extract import extract_features
    from cdi.features.registry import default_feature_set, directions_of, resolve_features

    from cdi.distributed import ray_runner
    from cdi.evidence import write_evidence

    if config.from_features:
        from cdi.audit_features import run_audit_from_features

        return run_audit_from_features(config)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    config.validate()
    published, unpublished = load_audit_collections(
        config.published, config.unpublished, skip_bad=config.skip_bad, max_pixels=config.max_pixels
    )
    _check_sizes(published, unpublished, config.folds)
    inputs = input_record(published, unpublished)
    published, unpublished, caption_record = prepare_captions(
        [published, unpublished], model=config.model, revision=config.revision, features=config.features,
        captions=config.captions, store=config.store, device=config.device, dtype=config.dtype,
    )

    options = dict(name=config.model, revision=config.revision, variant=config.variant, dtype=config.dtype,
                   allow_pickle=config.allow_pickle, compile=config.compile, **config.loading_options())
    hub = dict(local_files_only=config.local_files_only, cache_dir=config.cache_dir, token=config.token)
    with contextlib.ExitStack() as stack:
        runner = ray_runner(config.ray, workers=config.ray_workers, threads=config.ray_threads,
                            device=config.device, **options)
        if runner is not None:  # Ray workers compute; this process keeps a CPU copy for keys and columns
            stack.enter_context(runner)
            options.update(compile=False)
        adapter = load_model(**options, device="cpu" if runner is not None else config.device, **hub)
        reference = None
        if config.reference_model:
            from cdi.reference import check_reference

            reference = load_model(config.reference_model, dtype=config.dtype, device=config.device,
                                   allow_pickle=config.allow_pickle, compile=config.compile, **hub)
            check_reference(adapter, reference)
        feature_spec = config.features or default_feature_set(adapter)
        families = resolve_features(feature_spec)
        for family in families:
            family.check_applicable(adapter)
        directions = directions_of(families, adapter)
        t_loaded = time.perf_counter()

        caption = published.records[0].caption
        if runner is None:
            batch_size = resolve_batch_size(config.batch_size, adapter, families, caption)
        else:
            batch_size = parse_batch_size(config.batch_size)
            batch_size = runner.auto_batch_size(adapter, families, caption) if batch_size == "auto" else batch_size
        extract_kwargs = dict(seed=config.seed, batch_size=batch_size, store=config.store,
                              num_workers=config.workers, progress=progress)
        tables = [extract_features(adapter, collection, families, runner=runner, **extract_kwargs)
                  for collection in (published, unpublished)]
        if reference is not None:  # the reference runs in this process (not on the Ray workers)
            from cdi.reference import calibrate, reference_tables

            tables = calibrate(tables, reference_tables(reference, (published, unpublished), families,
                                                        extract_kwargs=extract_kwargs))
    t_extracted = time.perf_counter()

    emb_p, encoder = image_embeddings(published, encoder=config.shift_encoder)
    emb_u, _ = image_embeddings(unpublished, encoder=encoder)
    t_embedded = time.perf_counter()

    analysis = analyse_tables(tables[0], tables[1], directions=directions, config=config,
                              shift_features=(emb_p, emb_u, encoder))
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
                          directions=directions, model=model, config=config, timings=timings)
    # the batch size was chosen for the device that computed: the Ray workers' when --ray
    compute_device = adapter.device if runner is None else runner.compute_device
    result.extraction = extraction_record(config.batch_size, batch_size, compute_device, tables)
    result.inputs, result.captions = inputs, caption_record
    if reference is not None:
        result.reference_model = reference.describe()
        result.question = "used_beyond_reference"
    result.timings["total_s"] = time.perf_counter() - t0
    write_evidence(config.out, result, tables)
    return result


def extraction_record(requested: int | str, batch_size: int, device, tables: Sequence[FeatureTable]) -> dict:
    """How the features were computed, for ``result.json``: the batch size used and how it was chosen.

    ``final_batch_size`` is the smallest batch any collection ended at (below
    ``batch_size`` only when CUDA ran out of memory and the batch was halved).
    """
    from cdi.batching import auto_batch_rule, parse_batch_size

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
    (``cdi.duplicates.near_duplicates``), each also logged as a warning. Exact
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
    ``captions="auto[:MODEL]"`` caption every image (``cdi.captions``).

    Returns the collections (captioned when asked) followed by the
    ``captions`` record of the result.
    """
    from cdi.captions import (
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
    from cdi.blocks import minimum_images

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
