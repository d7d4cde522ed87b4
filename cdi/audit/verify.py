"""``cdi verify``: check an audit folder the way an opposing expert would.

``verify_audit`` runs these checks and reports each as passed, failed or
skipped (with what to pass to run it):

1. **files**: the evidence files belong together. ``result.json`` reads as
   a cdi result; ``features.csv`` and ``features.csv.json`` have the SHA-256
   that ``result.json`` records for them (``evidence_files``);
   ``report.html`` names the SHA-256 of this very ``result.json``.
2. **features**: every row of ``features.csv`` is the image of the
   result's manifest at the same place: same collection, path, SHA-256 and
   caption, same number of images.
3. **statistics**: the test is run again from ``features.csv`` alone
   (``retest``), with the parameters recorded in ``result.json``, and every
   recorded number must come out exactly (bit for bit): the verdict, its
   p-value, the t-test and permutation p-values, the statistic, effect size,
   AUC, the protocol's details, every image's score and the feature weights,
   and the sample-size curve when one was computed. The shift guard needs
   the images, not the features, so its recorded outcome is taken as it is.
4. **images** (with ``--published`` / ``--unpublished``): every file of the
   manifest is hashed again; missing and changed files are reported, and so
   are extra files: with the result's record of every file the audit saw
   (``inputs``), any file it does not list; without it, image files that
   the manifest does not hold.
5. **model** (with ``--model``): the model is loaded as the audit loaded it
   and its fingerprint and per-file SHA-256 compared with the recorded ones.

The folder is only read. A folder whose last write was interrupted after its
commit point is read as the committed new audit (``cdi.audit.evidence.resolve``),
and the summary says so.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cdi.utils.errors import CDIError
from cdi.audit.reference import check_reference_name
from cdi.audit.evidence import COLLECTIONS, HASHED_FILES, resolve, split_table, swap_pending
from cdi.utils.io import sha256_file
from cdi.audit.result import FEATURES_FILE, REPORT_FILE, RESULT_FILE, AuditResult
from cdi.engine.table import FeatureTable

#: The fields of ``result.json`` that ``retest`` must reproduce exactly.
RETESTED_FIELDS = ("verdict", "p_value", "p_value_ttest", "p_value_permutation", "statistic", "df",
                   "effect_size", "auc", "protocol", "scores", "feature_weights", "sample_size_curve")
_REPORT_HASH = re.compile(r'<meta name="cdi-result-sha256" content="([0-9a-f]{64})">')
_LISTED = 20  # problems listed per check before "... and N more"


@dataclass
class Check:
    """One check of ``verify_audit``: ``status`` is ``"passed"``, ``"failed"`` or ``"skipped"``."""

    name: str
    status: str
    detail: str
    problems: list[str] = field(default_factory=list)


@dataclass
class Verification:
    """What ``verify_audit`` checked and found."""

    folder: str
    result_sha256: str | None
    swap_pending: bool
    checks: list[Check]

    @property
    def ok(self) -> bool:
        """True when no check failed (skipped checks are listed, not failures)."""
        return all(c.status != "failed" for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **asdict(self)}

    def summary(self) -> str:
        """Readable text: one line per check, its problems indented below it."""
        lines = [f"cdi verify {self.folder}"]
        if self.result_sha256:
            lines.append(f"  result.json SHA-256 {self.result_sha256}")
        if self.swap_pending:
            lines.append("  note: the last audit's write was interrupted after its commit point; its files are "
                         "complete (read from .cdi-commit) and the next audit or `cdi report` moves them into place")
        for check in self.checks:
            lines.append(f"  [{check.status.upper():7}] {check.name}: {check.detail}")
            lines.extend(f"            {p}" for p in check.problems[:_LISTED])
            if len(check.problems) > _LISTED:
                lines.append(f"            ... and {len(check.problems) - _LISTED} more")
        lines.append("verified: every check that ran passed" if self.ok else "NOT verified: a check failed")
        return "\n".join(lines)


# ----------------------------------------------------------------- retesting
def read_evidence_table(folder: str | Path) -> FeatureTable:
    """The audit's ``features.csv`` (from where ``resolve`` finds it), hash-checked against its sidecar."""
    path = resolve(folder)[FEATURES_FILE]
    if not path.is_file():
        raise CDIError(f"{Path(folder) / FEATURES_FILE} is missing; the statistics cannot be re-run without it")
    # During an interrupted swap the sidecar may already be in the folder while the CSV is not;
    # the CSV is then read without it (its hash is checked against result.json instead).
    logger = logging.getLogger("cdi")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return FeatureTable.from_csv(path)
    finally:
        logger.setLevel(level)


def retest(folder: str | Path, *, curve: bool = True) -> tuple[AuditResult, AuditResult]:
    """Re-run an audit's statistics from its saved files alone; returns ``(recorded, recomputed)``.

    Reads ``result.json`` and ``features.csv``, splits the table into its
    published and unpublished rows (``cdi.audit.evidence.split_table``), rebuilds
    the audit's parameters from ``result.json`` and runs
    ``cdi.audit.run.analyse_tables`` and ``build_result`` again. The recorded
    shift guard outcome enters the verdict unchanged (recomputing it needs
    the images). ``curve=False`` leaves out the sample-size curve (the
    slowest part: many resampled tests); the recomputed result then has
    none. Compare the two with ``retest_differences``.
    """
    from cdi.audit.run import AuditConfig, analyse_tables, build_result, decide_verdict

    recorded = AuditResult.load(folder)
    published, unpublished = split_table(read_evidence_table(folder))
    known = {f.name for f in fields(AuditConfig)}
    params = {k: v for k, v in recorded.parameters.items() if k in known}
    config = AuditConfig(**params)
    if recorded.sample_size_curve is None or not curve:
        config.sample_size_resamples = 0
    directions = recorded.features.get("directions")
    analysis = analyse_tables(published, unpublished, directions=directions, config=config)
    analysis.shift = recorded.shift_guard
    analysis.verdict = decide_verdict(analysis.test.verdict, recorded.shift_guard,
                                      ignore_shift=config.ignore_shift)
    families = [_RecordedFamily(f) for f in recorded.features.get("families", [])]
    recomputed = build_result(analysis, published, unpublished, families=families,
                              feature_spec=recorded.features.get("set", ""), directions=directions,
                              model=recorded.model, config=config, timings={})
    return recorded, recomputed


@dataclass
class _RecordedFamily:
    """A feature family as ``result.json`` records it (name, key, config, columns), for ``build_result``."""

    record: dict

    @property
    def name(self) -> str:
        return self.record["name"]

    def key(self) -> str:
        return self.record.get("key", "")

    def config_dict(self) -> dict:
        return self.record.get("config", {})

    def columns(self) -> list[str]:
        return list(self.record.get("columns", []))


def retest_differences(recorded: AuditResult, recomputed: AuditResult, *, curve: bool = True) -> list[str]:
    """The ``RETESTED_FIELDS`` (or per-image scores) where the two results differ; empty when all agree.

    ``curve=False``: the sample-size curve is not compared.
    """
    a, b = recorded.to_dict(), recomputed.to_dict()
    problems = []
    for name in RETESTED_FIELDS:
        if name == "sample_size_curve" and not curve:
            continue
        if a.get(name) == b.get(name):
            continue
        if name == "scores" and len(a["scores"]) == len(b["scores"]):
            for old, new in zip(a["scores"], b["scores"]):
                if old != new:
                    problems.append(f"score of {old['collection']}/{old['path']}: recorded {old['score']!r}, "
                                    f"re-run {new['score']!r}")
        elif isinstance(a.get(name), (dict, list)):
            problems.append(f"{name}: the re-run differs from the recorded one")
        else:
            problems.append(f"{name}: recorded {a.get(name)!r}, re-run {b.get(name)!r}")
    return problems


# -------------------------------------------------------------------- checks
def verify_audit(
    folder: str | Path,
    *,
    published: str | Path | None = None,
    unpublished: str | Path | None = None,
    model: str | None = None,
    reference_model: str | None = None,
    curve: bool = True,
) -> Verification:
    """Run the checks of the module docstring on an audit folder.

    ``curve=False`` does not re-run the sample-size curve (said in the
    summary).

    Raises ``CDIError`` only when there is nothing to verify (no folder, no
    ``result.json``) or an image folder given does not exist; everything
    found wrong in the evidence is a failed check.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CDIError(f"{folder} is not a folder; pass the --out folder of an audit")
    files = resolve(folder)
    if not files[RESULT_FILE].is_file():
        raise CDIError(f"{folder} holds no {RESULT_FILE}: pass the --out folder of an audit")
    if model is not None and not str(model).strip():
        raise CDIError("--model is empty: give the model (alias, hub id or folder) to re-fingerprint, or leave it out")
    check_reference_name(reference_model)
    for name, given in (("published", published), ("unpublished", unpublished)):
        if given is not None and not Path(given).is_dir():
            raise CDIError(f"the {name} folder {given} does not exist or is not a folder")
    result_sha = sha256_file(files[RESULT_FILE])
    verification = Verification(str(folder), result_sha, swap_pending(folder), [])
    checks = verification.checks
    try:
        result = AuditResult.load(folder)
    except CDIError as exc:
        checks.append(Check("files", "failed", f"{RESULT_FILE} is not a readable cdi result", [str(exc)]))
        return verification
    checks.append(_check_files(files, result, result_sha))
    try:
        table = read_evidence_table(folder)
    except CDIError as exc:
        checks.append(Check("features", "failed", f"{FEATURES_FILE} cannot be read", [str(exc)]))
        checks.append(Check("statistics", "failed", f"not re-run: {FEATURES_FILE} cannot be read"))
    else:
        checks.append(_check_rows(table, result))
        checks.append(_check_statistics(folder, checks[-1], curve))
    checks.append(_check_images(result, {"published": published, "unpublished": unpublished}))
    checks.append(_check_model(result, model))
    checks.append(_check_reference(result, reference_model))
    return verification


def _check_files(files: dict[str, Path], result: AuditResult, result_sha: str) -> Check:
    problems = []
    recorded = result.evidence_files or {}
    if not recorded:
        problems.append(f"{RESULT_FILE} records no file hashes (written by a cdi before 0.2?): "
                        "the files cannot be shown to belong together")
    for name in HASHED_FILES:
        path = files[name]
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif name in recorded and sha256_file(path) != recorded[name]:
            problems.append(f"{name} has SHA-256 {sha256_file(path)}, but {RESULT_FILE} records {recorded[name]}: "
                            f"it is not the file written with this result")
    report = files[REPORT_FILE]
    if not report.is_file():
        problems.append(f"{REPORT_FILE} is missing")
    else:
        match = _REPORT_HASH.search(report.read_text(encoding="utf-8", errors="replace"))
        if match is None:
            problems.append(f"{REPORT_FILE} names no result.json hash (rendered by an older cdi?)")
        elif match.group(1) != result_sha:
            problems.append(f"{REPORT_FILE} was rendered from a result.json with SHA-256 {match.group(1)}, not "
                            f"from this one; re-render it with `cdi report`")
    if problems:
        return Check("files", "failed", "the evidence files do not belong together", problems)
    return Check("files", "passed", f"{RESULT_FILE}, {', '.join(HASHED_FILES)} and {REPORT_FILE} belong together")


def _check_rows(table: FeatureTable, result: AuditResult) -> Check:
    problems = []
    expected = [(s.collection, s.path, s.sha256, s.caption) for s in result.scores]
    rows = []
    for path, sha, caption in zip(table.paths, table.hashes, table.captions):
        collection, _, rest = path.partition("/")
        rows.append((collection, rest, sha, caption))
    if len(rows) != len(expected):
        problems.append(f"{FEATURES_FILE} has {len(rows)} rows, the manifest {len(expected)} images")
    for i, (row, want) in enumerate(zip(rows, expected)):
        if row != want:
            what = [name for name, a, b in zip(("collection", "path", "SHA-256", "caption"), row, want) if a != b]
            problems.append(f"row {i + 2} ({row[0]}/{row[1]}): {', '.join(what)} differ from the manifest")
    counts = {c: sum(r[0] == c for r in rows) for c in COLLECTIONS}
    if counts["published"] != result.n_published or counts["unpublished"] != result.n_unpublished:
        problems.append(f"{FEATURES_FILE} has {counts['published']} published and {counts['unpublished']} "
                        f"unpublished rows; the result {result.n_published} and {result.n_unpublished}")
    if problems:
        return Check("features", "failed", f"{FEATURES_FILE} does not match the manifest", problems)
    return Check("features", "passed", f"{counts['published']} published and {counts['unpublished']} unpublished "
                 f"rows, each with the path, SHA-256 and caption of its manifest entry")


def _check_statistics(folder: Path, rows: Check, curve: bool) -> Check:
    if rows.status == "failed":
        return Check("statistics", "failed", f"not re-run: {FEATURES_FILE} does not match the manifest")
    try:
        recorded, recomputed = retest(folder, curve=curve)
    except CDIError as exc:
        return Check("statistics", "failed", "the test could not be re-run", [str(exc)])
    problems = retest_differences(recorded, recomputed, curve=curve)
    if problems:
        return Check("statistics", "failed", f"re-running the test from {FEATURES_FILE} gives other numbers",
                     problems)
    perm = recorded.p_value_permutation
    what = f"verdict {recorded.verdict}, p = {recorded.p_value:.4g} (t-test {recorded.p_value_ttest:.4g}, " \
           f"permutation {'not run' if perm is None else format(perm, '.4g')})"
    if recorded.sample_size_curve is None:
        extra = ""
    elif curve:
        extra = ", sample-size curve"
    else:
        extra = " (sample-size curve not re-run: --quick)"
    return Check("statistics", "passed", f"re-run from {FEATURES_FILE}: {what}, scores, weights{extra} "
                 f"reproduced exactly; shift guard taken as recorded")


def _check_images(result: AuditResult, folders: dict[str, str | Path | None]) -> Check:
    given = {name: Path(f) for name, f in folders.items() if f is not None}
    if not given:
        return Check("images", "skipped", "not checked: pass --published and --unpublished (the audited folders)")
    from cdi.data.caption_files import METADATA_NAME
    from cdi.data.folder_walk import walk_folder
    from cdi.data.image_files import image_extensions

    image_ext = image_extensions()
    problems = []
    counted = 0
    for collection, root in given.items():
        manifest = {s.path: s.sha256 for s in result.scores if s.collection == collection}
        present = walk_folder(root.resolve()).files
        present_set = set(present)
        seen = _recorded_files(result, collection)  # None: a result without the record of every file
        by_hash = {sha: path for path, sha in manifest.items()}
        for path, sha in manifest.items():
            counted += 1
            if path not in present_set:
                problems.append(f"{collection}/{path}: missing")
            elif sha256_file(root / path) != sha:
                problems.append(f"{collection}/{path}: changed (SHA-256 differs from the audited file)")
        for path in present:
            if path in manifest or (seen is not None and path in seen):
                continue
            if seen is None and (posixpath.basename(path) == METADATA_NAME
                                 or posixpath.splitext(path)[1].lower() not in image_ext):
                continue  # without the record, only image files can be told to be extra
            same = by_hash.get(sha256_file(root / path))
            problems.append(f"{collection}/{path}: extra {'image' if seen is None else 'file'}, not in the "
                            f"{'manifest' if seen is None else 'record of the files the audit saw'}"
                            + (f" (same bytes as {same})" if same else ""))
    names = " and ".join(given)
    not_given = [c for c in COLLECTIONS if c not in given]
    tail = f"; {not_given[0]} not checked (not given)" if not_given else ""
    if problems:
        return Check("images", "failed", f"the {names} folder(s) differ from the manifest{tail}", problems)
    return Check("images", "passed", f"{counted} image files of the {names} folder(s) hashed: none missing, "
                 f"changed or extra{tail}")


def _recorded_files(result: AuditResult, collection: str) -> set[str] | None:
    """Every path the audit saw in a collection's folder, when the result records them (``inputs``), else None."""
    record = getattr(result, "inputs", None)
    if not isinstance(record, dict) or not isinstance(record.get(collection), dict):
        return None
    return {e["path"] for e in record[collection].get("files", []) if isinstance(e, dict) and "path" in e}


def _check_model(result: AuditResult, model: str | None) -> Check:
    if model is None:
        return Check("model", "skipped", "not checked: pass --model (the model the audit used)")
    from cdi.models import load_model
    from cdi.models.finetune import loading_options

    params = result.parameters
    recorded_files = result.model.get("files") or {}
    try:  # the audit's own fine-tune parts (LoRAs, replaced components, single-file config) on top of --model
        finetune = loading_options(params.get("lora"), params.get("lora_scale"), params.get("unet"),
                                   params.get("component"), params.get("config"),
                                   allow_pickle=bool(params.get("allow_pickle")))
    except CDIError as exc:
        return Check("model", "failed", "the fine-tune parts the audit recorded cannot be loaded", [str(exc)])
    adapter = load_model(model, revision=result.model.get("revision") or params.get("revision"),
                         variant=params.get("variant"), device="cpu", dtype="float32",
                         allow_pickle=bool(params.get("allow_pickle")), **finetune)
    files = dict(getattr(adapter, "files", {}))
    problems = []
    for rel in sorted(set(recorded_files) | set(files)):
        if rel not in files:
            problems.append(f"{rel}: recorded, but not loaded from this model")
        elif rel not in recorded_files:
            problems.append(f"{rel}: loaded from this model, but not recorded")
        elif files[rel] != recorded_files[rel]:
            problems.append(f"{rel}: SHA-256 {files[rel]}, recorded {recorded_files[rel]}")
    if adapter.fingerprint != result.model.get("fingerprint"):
        problems.insert(0, f"fingerprint {adapter.fingerprint}, recorded {result.model.get('fingerprint')}")
    if problems:
        return Check("model", "failed", "the model differs from the one audited", problems)
    return Check("model", "passed", f"fingerprint {adapter.fingerprint} and the SHA-256 of its "
                 f"{len(files)} files match the record")


def _check_reference(result: AuditResult, reference: str | None) -> Check:
    """The ``--reference-model`` of a reference-calibrated audit, re-fingerprinted against the record."""
    recorded = result.reference_model or {}
    if reference is None:
        if recorded:
            return Check("reference", "skipped", "not checked: pass --reference-model (the audit's reference model)")
        return Check("reference", "skipped", "the audit used no reference model")
    if not recorded:
        return Check("reference", "failed", "a reference model was given, but the audit recorded none")
    from cdi.models import load_model

    adapter = load_model(reference, revision=recorded.get("revision"), device="cpu", dtype="float32",
                         allow_pickle=bool(result.parameters.get("allow_pickle")))
    if adapter.fingerprint != recorded.get("fingerprint"):
        return Check("reference", "failed", "the reference model differs from the one audited",
                     [f"fingerprint {adapter.fingerprint}, recorded {recorded.get('fingerprint')}"])
    return Check("reference", "passed", f"fingerprint {adapter.fingerprint} matches the record")


def verification_json(verification: Verification) -> str:
    return json.dumps(verification.to_dict(), indent=2)
