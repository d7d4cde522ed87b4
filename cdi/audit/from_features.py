"""The audit from stored features: ``cdi audit --published-features P.csv --unpublished-features U.csv``.

The expensive stage of an audit (querying the model) can run elsewhere and
earlier: ``cdi extract`` on each collection (on a GPU, on a Ray cluster, in
shards). This module takes the two feature tables it wrote and runs the rest
of the audit exactly as ``cdi.audit.run.run_audit`` does: the same
``analyse_tables`` (tests, sample-size curve, shift guard, verdict), the same
``build_result`` and the same evidence writing (``cdi.audit.evidence.write_evidence``). On the same images, features,
seed and options the verdict and every p-value are the direct audit's.

Checks, before any statistic (``CDIError`` otherwise): both tables carry
their provenance sidecar and come from ``cdi extract``; they were made with
the same model key (weights fingerprint, dtype, schedule, preprocessing), the
same feature families (names, configurations, columns) and the same noise
seed; neither is a single shard; the families are the ones this cdi computes
under those names (same keys); the collections share no image.

The shift guard needs the images (it works on model-free image
descriptors): with ``--published``/``--unpublished`` it runs on those
folders, which must hold exactly the tables' images (by SHA-256), through
the tables' own preprocessing (with any harmonisation recorded in it), and
tests the files' encodings; without them it is recorded as not run. The
tables' harmonisation is the one they were extracted with (``cdi extract``
applies none), so a detected encoding difference stops such an audit as
``inconclusive`` unless the tables were harmonised.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from types import SimpleNamespace

from cdi.utils.errors import CDIError
from cdi.engine.table import FeatureTable

FEATURES_KIND = "cdi.features"


def load_feature_tables(published: str, unpublished: str):
    """Read and cross-check the two tables; return ``(P table, U table, families, directions)``."""
    from cdi.features.registry import directions_of, resolve_features

    tables = []
    for path, flag in ((published, "--published-features"), (unpublished, "--unpublished-features")):
        table = FeatureTable.from_csv(path)
        if table.meta.get("kind") != FEATURES_KIND or "model_key" not in table.meta:
            raise CDIError(f"{flag} {path} has no provenance from `cdi extract` (its sidecar {path}.json is "
                           f"missing or is not an extraction's); extract the features with `cdi extract`")
        if table.meta.get("shard"):
            i, n = table.meta["shard"]
            raise CDIError(f"{flag} {path} holds shard {i}/{n} only; merge the shard stores (`cdi store merge`) "
                           f"and run `cdi extract` once without --shard against the merged store")
        tables.append(table)
    p, u = tables
    for key, what in (("model_key", "model (weights, dtype, schedule or preprocessing)"),
                      ("families", "feature families or their configuration"), ("seed", "noise seed")):
        if p.meta.get(key) != u.meta.get(key):
            raise CDIError(
                f"the two feature tables were made with a different {what}: {key} {_short(p.meta.get(key))} "
                f"in {published}, {_short(u.meta.get(key))} in {unpublished}; extract both collections with "
                f"the same --model, --features, --dtype and --seed"
            )
    if p.columns != u.columns:
        raise CDIError(f"the feature tables {published} and {unpublished} have different columns")
    recorded = p.meta["families"]
    families = resolve_features(",".join(f["name"] for f in recorded))
    for family, entry in zip(families, recorded):
        if family.key() != entry["key"]:
            raise CDIError(
                f"feature family {family.name!r} of the tables has key {entry['key']}, this cdi computes "
                f"{family.key()} under that name (another version or configuration); re-extract the features"
            )
    model = SimpleNamespace(conditioning=p.meta["model"].get("conditioning", "none"))  # CLiD's layout needs it
    model.is_conditional = model.conditioning != "none"
    columns = [c for f in families for c in f.columns(model)]
    if columns != p.columns:
        raise CDIError(f"the columns of {published} are not those of its families {[f.name for f in families]}")
    shared = set(p.hashes) & set(u.hashes)
    if shared:
        path = p.paths[p.hashes.index(sorted(shared)[0])]
        raise CDIError(f"{len(shared)} image(s) are in both feature tables (e.g. {path!r}); the published and "
                       f"unpublished collections must not share images")
    return p, u, families, directions_of(families, model)


def run_audit_from_features(config):
    """``cdi.audit.run.run_audit`` for a config with ``published_features``/``unpublished_features``."""
    from cdi.audit.analysis import analyse_tables, build_result, harmonisation_record
    from cdi.audit.design import design_for_audit, design_record
    from cdi.data.collection import load_audit_collections
    from cdi.audit.evidence import write_evidence
    from cdi.stats.blocks import minimum_images

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    config.validate()
    design = design_for_audit(config)
    p, u, families, directions = load_feature_tables(config.published_features, config.unpublished_features)
    if design is not None:
        from cdi.audit.design import check_table_features

        check_table_features(design, families, p.meta["model"].get("conditioning", "none"), p.meta["seed"])
    design_checks = design_record(design, config, list(zip(p.paths, p.hashes)), list(zip(u.paths, u.hashes)))
    feature_spec = ",".join(f.name for f in families)
    if config.features is not None:
        from cdi.features.registry import resolve_features

        wanted = [f.key() for f in resolve_features(config.features)]
        if wanted != [f.key() for f in families]:
            raise CDIError(f"--features {config.features} is not the feature set of the tables ({feature_spec}); "
                           f"drop --features or extract those features")
        feature_spec = config.features
    need = minimum_images(config.folds)
    for table, name in ((p, "published"), (u, "unpublished")):
        if len(table) < need:
            raise CDIError(f"the {name} feature table has {len(table)} images, but an audit with --folds "
                           f"{config.folds} needs at least {need} per collection")
    shift_features = encodings = None
    t_loaded = time.perf_counter()
    if config.published is not None:
        from cdi.data.shift_guard import image_embeddings

        collections = load_audit_collections(config.published, config.unpublished, skip_bad=config.skip_bad,
                                             max_pixels=config.max_pixels)
        for collection, table, flag in zip(collections, (p, u), ("--published", "--unpublished")):
            if sorted(collection.hashes) != sorted(table.hashes):
                raise CDIError(f"{flag} {collection.root} does not hold exactly the images of its feature table "
                               f"({len(collection)} images in the folder, {len(table)} rows in the table, "
                               f"{len(set(collection.hashes) ^ set(table.hashes))} differing); give the folder "
                               f"the features were extracted from")
        from cdi.data.harmonise import plan_harmonisation, probe_collection
        from cdi.data.preprocess import Preprocess

        preprocess = Preprocess(**p.meta["preprocess"])
        seen = preprocess if preprocess.harmonised else None  # the guard sees what the model saw
        emb_p, encoder = image_embeddings(collections[0], encoder=config.shift_encoder, harmonisation=seen)
        emb_u, _ = image_embeddings(collections[1], encoder=encoder, harmonisation=seen)
        shift_features = (emb_p, emb_u, encoder)
        probes = [probe_collection(c) for c in collections]
        encodings = (*probes, preprocess.harmonised)
        plan = plan_harmonisation(*probes, preprocess.resolution, enabled=False, off_reason=(
            "an audit from feature tables uses the preprocessing the tables were extracted with (`cdi extract` "
            "harmonises nothing)"))
    t_embedded = time.perf_counter()
    analysis = analyse_tables(p, u, directions=directions, config=config, shift_features=shift_features,
                              encodings=encodings)
    timings = {"started_at": started, "load_s": t_loaded - t0, "extract_s": 0.0,
               "shift_embeddings_s": t_embedded - t_loaded}
    model = {**p.meta["model"], "model_key": p.meta["model_key"]}
    result = build_result(analysis, p, u, families=families, feature_spec=feature_spec, directions=directions,
                          model=model, config=config, timings=timings)
    result.features["noise_seed"] = p.meta["seed"]  # the extraction's; config.seed drives the tests
    result.design = design_checks
    if analysis.encoding is not None:
        result.harmonisation = harmonisation_record(plan.to_dict(), preprocess, analysis.encoding)
    result.timings["total_s"] = time.perf_counter() - t0
    write_evidence(config.out, result, [p, u])
    return result


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."
