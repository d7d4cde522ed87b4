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
   p-value and its sentence, the t-test and permutation p-values, the
   statistic, effect size, AUC, the protocol's details, every image's score
   and the feature weights, the forward sample-size estimate, and the
   sample-size curve when one was computed. The shift guard needs
   the images, not the features, so its recorded outcome is taken as it is.
4. **images** (with ``--published`` / ``--unpublished``): every file of the
   manifest is hashed again; missing and changed files are reported, and so
   are extra files: with the result's record of every file the audit saw
   (``inputs``), any file it does not list; without it, image files that
   the manifest does not hold.
5. **model** (with ``--model``): the model is loaded as the audit loaded it
   and its fingerprint and per-file SHA-256 compared with the recorded ones.
6. **recompute** (with ``--recompute K`` and ``--model``): the features of
   K images are extracted again and compared with the recorded values
   (``recompute_check``). The images are chosen by a generator seeded with
   ``result.json``'s SHA-256 (``choose_rows``), so anyone re-running the
   check recomputes the same images, and nobody can pick them before the
   result is fixed. A value agrees when it is within ``RECOMPUTE_TOLERANCE``
   (1%) of its column's spread (standard deviation over the audit's images);
   see ``RECOMPUTE_TOLERANCE`` for why.
7. **design** and **ledger**: the pre-registered design the audit followed
   (``cdi.audit.design.verify_design``) and the audit's line in the ledger
   (``cdi.audit.ledger.verify_ledger``), where their files are at their
   recorded places.
8. **shift guard** (with ``--images``): the shift guard is run again on the
   images of both folders (``shift_guard_check``) with the recorded encoder,
   significance level and seed, and must give the recorded decision and
   p-value.

Each ``Verification`` also says, in ``scope``, what was checked, what was
recomputed and what was taken as recorded (nothing is silently trusted).

The folder is only read. A folder whose last write was interrupted after its
commit point is read as the committed new audit (``cdi.audit.evidence.resolve``),
and the summary says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cdi.utils.errors import CDIError
from cdi.audit.design import verify_design
from cdi.audit.ledger import verify_ledger
from cdi.audit.reference import check_reference_name
from cdi.audit.evidence import COLLECTIONS, HASHED_FILES, resolve, split_table, swap_pending
from cdi.utils.io import sha256_file
from cdi.audit.result import FEATURES_FILE, REPORT_FILE, RESULT_FILE, AuditResult
from cdi.engine.table import FeatureTable

#: The fields of ``result.json`` that ``retest`` must reproduce exactly.
RETESTED_FIELDS = ("verdict", "verdict_text", "p_value", "p_value_ttest", "p_value_permutation", "statistic", "df",
                   "effect_size", "auc", "protocol", "scores", "feature_weights", "sample_size_curve",
                   "sample_size_estimate")
_REPORT_HASH = re.compile(r'<meta name="cdi-result-sha256" content="([0-9a-f]{64})">')
_LISTED = 20  # problems listed per check before "... and N more"


@dataclass
class Check:
    """One check of ``verify_audit``: ``status`` is ``"passed"``, ``"failed"`` or ``"skipped"``."""

    name: str
    status: str
    detail: str
    problems: list[str] = field(default_factory=list)
    #: What the check covered, by name, where it is a sample (the images ``recompute`` re-extracted).
    covered: list[str] = field(default_factory=list)


@dataclass
class Verification:
    """What ``verify_audit`` checked and found."""

    folder: str
    result_sha256: str | None
    swap_pending: bool
    checks: list[Check]
    #: "checked", "recomputed", "taken_as_recorded": one sentence per item (``_scope``).
    scope: dict[str, list[str]] = field(default_factory=dict)

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
        for key, title in (("checked", "checked"), ("recomputed", "recomputed"),
                           ("taken_as_recorded", "taken as recorded (not checked)")):
            if self.scope.get(key):
                lines.append(f"  {title}:")
                lines.extend(f"    - {item}" for item in self.scope[key])
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
    ``cdi.audit.analysis.analyse_tables`` and ``build_result`` again. The recorded
    shift guard outcome enters the verdict unchanged (recomputing it needs
    the images). ``curve=False`` leaves out the sample-size curve (the
    slowest part: many resampled tests); the recomputed result then has
    none. Compare the two with ``retest_differences``.
    """
    from cdi.audit.config import AuditConfig
    from cdi.audit.analysis import analyse_tables, build_result, decide_verdict

    from cdi.audit.noise_draws import draw_values, split_draw_columns

    recorded = AuditResult.load(folder)
    table, draw_tables = split_draw_columns(read_evidence_table(folder))
    published, unpublished = split_table(table)
    draws = [split_table(t) for t in draw_tables]
    known = {f.name for f in fields(AuditConfig)}
    params = {k: v for k, v in recorded.parameters.items() if k in known}
    config = AuditConfig(**params)
    if recorded.sample_size_curve is None or not curve:
        config.sample_size_resamples = 0
    directions = recorded.features.get("directions")
    analysis = analyse_tables(published, unpublished, directions=directions, config=config,
                              draws=draw_values((published, unpublished), draws))
    analysis.shift = recorded.shift_guard
    encoding = (recorded.harmonisation or {}).get("encoding_guard") or {}
    analysis.encoding_blocks = bool(encoding.get("blocks_verdict"))
    analysis.verdict = decide_verdict(analysis.test.verdict, recorded.shift_guard,
                                      ignore_shift=config.ignore_shift, encoding_blocks=analysis.encoding_blocks)
    families = [_RecordedFamily(f) for f in recorded.features.get("families", [])]
    recomputed = build_result(analysis, published, unpublished, families=families,
                              feature_spec=recorded.features.get("set", ""), directions=directions,
                              model=recorded.model, config=config, timings={}, draws=1 + len(draws))
    # The question the audit answered is set by the run that chose it (a reference-model audit), not by the
    # test: taken from the record, so the verdict text is compared on the same question.
    recomputed.question, recomputed.reference_model = recorded.question, recorded.reference_model
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

    @property
    def draws_noise(self) -> bool:
        """The family's ``FeatureFamily.draws_noise`` (True for a family this cdi does not know: the cautious
        reading, since its values may then depend on the seed)."""
        from cdi.features.registry import FAMILIES

        family = FAMILIES.get(self.name)
        return True if family is None else family.draws_noise


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
    recompute: int = 0,
    images: bool = False,
    device: str = "auto",
    progress: bool = False,
) -> Verification:
    """Run the checks of the module docstring on an audit folder.

    ``curve=False`` does not re-run the sample-size curve (said in the
    summary). ``recompute=K`` re-extracts the features of K images (needs
    ``model``) on ``device``; ``images=True`` re-hashes every image and
    re-runs the shift guard. Both read the images from ``published`` and
    ``unpublished`` where given, else from the folders ``result.json``
    records. ``progress``: progress lines of the re-extraction on stderr.

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
    if isinstance(recompute, bool) or not isinstance(recompute, int) or recompute < 0:
        raise CDIError(f"--recompute must be a whole number of images (0: off), got {recompute!r}")
    if recompute and model is None:
        raise CDIError("--recompute needs --model: the features are re-extracted with the audited model")
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
    given = {"published": published, "unpublished": unpublished}
    folders = _image_folders(result, given, needed=images or recompute > 0)
    if recompute and result.reference_model and reference_model is None:
        raise CDIError("this audit's features are differences from a reference model: --recompute needs "
                       "--reference-model too")
    checks.append(_check_files(files, result, result_sha))
    try:
        table = read_evidence_table(folder)
    except CDIError as exc:
        table = None
        checks.append(Check("features", "failed", f"{FEATURES_FILE} cannot be read", [str(exc)]))
        checks.append(Check("statistics", "failed", f"not re-run: {FEATURES_FILE} cannot be read"))
    else:
        checks.append(_check_rows(table, result))
        checks.append(_check_statistics(folder, checks[-1], curve))
    rehashed = folders if images else {name: f for name, f in folders.items() if given[name] is not None}
    checks.append(_check_images(result, rehashed))
    adapter = None
    if model is not None:
        # one load for both checks: the fingerprint does not depend on device or dtype
        adapter = _load_audited_model(result, model, device=device if recompute else "cpu",
                                      dtype=_recorded_dtype(result) if recompute else "float32")
    checks.append(_check_model(result, model, adapter))
    checks.append(_check_reference(result, reference_model))
    checks.append(Check("design", *verify_design(result)))  # cdi.audit.design: file, commitment, split, lists
    checks.append(Check("ledger", *verify_ledger(result)))  # cdi.audit.ledger: this audit's line, the chain
    if recompute:
        from cdi.audit.noise_draws import split_draw_columns

        first_draw = None if table is None else split_draw_columns(table)[0]  # --recompute re-extracts draw 1
        checks.append(recompute_check(result, result_sha, first_draw, folders, adapter, recompute,
                                      reference_model=reference_model, device=device, progress=progress))
    if images:
        checks.append(shift_guard_check(result, folders))
    verification.scope = _scope(result, {c.name: c for c in checks}, curve=curve, recompute=recompute)
    return verification


def _image_folders(result: AuditResult, given: dict[str, str | Path | None], *,
                   needed: bool) -> dict[str, Path | None]:
    """Where each collection's images are: the folder given, else (when ``needed``) the one ``result.json`` records.

    Raises ``CDIError`` (before any model loads) when the images are needed and neither exists.
    """
    folders: dict[str, Path | None] = {}
    for name in COLLECTIONS:
        if given.get(name) is not None:
            folders[name] = Path(given[name])
            continue
        recorded = result.parameters.get(name)
        if not needed:
            folders[name] = None
        elif not recorded or not Path(recorded).is_dir():
            where = f"the folder it records ({recorded}) is not there" if recorded else "it records no folder"
            raise CDIError(f"--images and --recompute read the {name} images, but {where}: pass "
                           f"--{name} FOLDER (the {name} folder the audit read)")
        else:
            folders[name] = Path(recorded)
    return folders


def _recorded_dtype(result: AuditResult) -> str:
    """The dtype the audit computed in (the model record's, which resolves ``auto``), as a ``--dtype`` name."""
    dtype = str(result.model.get("dtype") or result.parameters.get("dtype") or "float32")
    return dtype.removeprefix("torch.")


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
                 f"reproduced exactly")


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


def _load_audited_model(result: AuditResult, model: str, *, device: str, dtype: str):
    """``model`` loaded as the audit loaded it: its revision, variant and recorded fine-tune parts.

    Returns the adapter, or the ``CDIError`` raised when the recorded fine-tune parts cannot be loaded.
    """
    from cdi.models import load_model
    from cdi.models.finetune import loading_options
    from cdi.utils.progress import quiet_library_progress

    params = result.parameters
    try:  # the audit's own fine-tune parts (LoRAs, replaced components, single-file config) on top of --model
        finetune = loading_options(params.get("lora"), params.get("lora_scale"), params.get("unet"),
                                   params.get("component"), params.get("config"),
                                   allow_pickle=bool(params.get("allow_pickle")))
    except CDIError as exc:
        return exc
    quiet_library_progress()
    return load_model(model, revision=result.model.get("revision") or params.get("revision"),
                      variant=params.get("variant"), device=device, dtype=dtype,
                      allow_pickle=bool(params.get("allow_pickle")), **finetune)


def _check_model(result: AuditResult, model: str | None, adapter) -> Check:
    if model is None:
        return Check("model", "skipped", "not checked: pass --model (the model the audit used)")
    if isinstance(adapter, CDIError):
        return Check("model", "failed", "the fine-tune parts the audit recorded cannot be loaded", [str(adapter)])
    recorded_files = result.model.get("files") or {}
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


# ---------------------------------------------------------------- recompute
#: Largest accepted difference between a recomputed and a recorded feature value, as a share of the
#: column's spread (its standard deviation over all images of the audit).
#:
#: Every noise draw is a function of (seed, image hash, family, timestep, repetition), so a recomputed
#: value differs from the recorded one only by floating-point rounding, which depends on the batch
#: (kernels sum in another order), the device and the dtype. Measured on the toy SD model, CPU,
#: float32, re-extracting 3-4 images in batches of 1, 3 and 4 against an audit extracted in batches of
#: 32: at most 1.9e-5 of the spread (docs/notes/issue-22-verify.md). bfloat16 on a GPU rounds far more
#: coarsely (8 bits of mantissa against 24); the extraction engine is held to batch-size stability
#: within 1% of the spread, and 1% is the tolerance here, so a verify on another machine or batch does
#: not fail an honest audit. A value altered by less than 1% of its column's spread in one image moves
#: that column's standardised mean difference by less than 0.01 / (number of images of its
#: collection), far below anything that changes a verdict.
RECOMPUTE_TOLERANCE = 0.01


def choose_rows(result_sha256: str, n_published: int, n_unpublished: int, k: int) -> list[int]:
    """The rows of ``features.csv`` (published first) whose features ``--recompute k`` re-extracts.

    A ``numpy`` generator seeded with the SHA-256 of ``result.json`` (read as one integer) draws,
    without replacement, ``ceil(k / 2)`` published and ``k // 2`` unpublished rows (what one
    collection lacks is taken from the other); all rows when ``k`` is at least their number. Sorted.
    """
    import numpy as np

    k = min(k, n_published + n_unpublished)
    k_p = min(n_published, max((k + 1) // 2, k - n_unpublished))
    k_u = k - k_p
    rng = np.random.default_rng(int(result_sha256, 16))
    rows = rng.choice(n_published, size=k_p, replace=False).tolist()
    rows += (n_published + rng.choice(n_unpublished, size=k_u, replace=False)).tolist()
    return sorted(int(r) for r in rows)


def recompute_check(result: AuditResult, result_sha256: str, table: FeatureTable | None,
                    folders: dict[str, Path | None], adapter, k: int, *, reference_model: str | None = None,
                    device: str = "auto", progress: bool = False) -> Check:
    """Re-extract the features of the ``choose_rows`` images and compare them with ``features.csv``.

    The images are read from ``folders`` and must have the SHA-256 of their manifest entry; they
    keep the caption recorded in ``features.csv`` (captions are inputs of the features). The feature
    families are resolved again from the recorded set and must have the recorded keys (same
    configuration); the noise seed is the extraction's. For an audit against a reference model the
    same images are extracted on the reference too and the differences compared.
    """
    import numpy as np

    from cdi.data.collection import ImageCollection
    from cdi.features.extract import extract_features
    from cdi.features.registry import resolve_features

    name = "recompute"
    if table is None:
        return Check(name, "failed", f"not run: {FEATURES_FILE} cannot be read")
    if isinstance(adapter, CDIError):
        return Check(name, "failed", "not run: the audited model cannot be loaded", [str(adapter)])
    n_p, n_u = result.n_published, result.n_unpublished
    if len(table) != n_p + n_u:
        return Check(name, "failed", f"not run: {FEATURES_FILE} does not match the manifest")
    rows = choose_rows(result_sha256, n_p, n_u, k)
    families = resolve_features(result.features.get("set") or ",".join(
        f["name"] for f in result.features.get("families", [])))
    recorded_keys = [f.get("key") for f in result.features.get("families", [])]
    if [f.key() for f in families] != recorded_keys:
        return Check(name, "failed", "not run: this cdi's feature families are configured otherwise than the "
                     "audit's", [f"recorded {recorded_keys}, here {[f.key() for f in families]}"])
    seed = int(result.features.get("noise_seed", result.seed))
    max_pixels = int(result.parameters.get("max_pixels") or 64_000_000)
    spread = np.nanstd(table.values, axis=0, ddof=1)
    problems: list[str] = []
    recomputed: list[int] = []
    largest = 0.0
    for collection, offset, count in (("published", 0, n_p), ("unpublished", n_p, n_u)):
        mine = [r for r in rows if offset <= r < offset + count]
        if not mine:
            continue
        found = ImageCollection.from_folder(folders[collection], name=collection, skip_bad=True,
                                            max_pixels=max_pixels)
        by_path = {rec.path: rec for rec in found.records}
        records = []
        for r in mine:
            path = table.paths[r].partition("/")[2]
            rec = by_path.get(path)
            if rec is None:
                problems.append(f"{collection}/{path}: not found in {folders[collection]}; not recomputed")
            elif rec.sha256 != table.hashes[r]:
                problems.append(f"{collection}/{path}: the file's SHA-256 differs from the manifest; not recomputed")
            else:
                records.append(dataclasses.replace(rec, caption=table.captions[r]))
                recomputed.append(r)
        if not records:
            continue
        subset = dataclasses.replace(found, records=records)
        kwargs = dict(seed=seed, batch_size=len(records), progress=progress)
        new = extract_features(adapter, subset, families, **kwargs)
        if result.reference_model:
            from cdi.models import load_model
            from cdi.audit.reference import calibrate

            reference = load_model(reference_model, revision=result.reference_model.get("revision"),
                                   device=device, dtype=_recorded_dtype(result),
                                   allow_pickle=bool(result.parameters.get("allow_pickle")))
            new = calibrate([new], [extract_features(reference, subset, families, **kwargs)])[0]
        if list(new.columns) != list(table.columns):
            return Check(name, "failed", "the re-extracted columns differ from the recorded ones",
                         [f"recorded {list(table.columns)}, re-extracted {list(new.columns)}"])
        if list(new.hashes) != [rec.sha256 for rec in records]:
            return Check(name, "failed", "the re-extraction returned other images than it was given")
        done = [r for r in mine if r in recomputed]
        for i, r in enumerate(done):
            for j, column in enumerate(table.columns):
                old, now = float(table.values[r, j]), float(new.values[i, j])
                if np.isnan(old) and np.isnan(now):
                    continue
                scale = spread[j] if spread[j] > 0 else max(abs(old), 1.0)
                deviation = abs(now - old) / scale
                largest = max(largest, deviation) if not np.isnan(deviation) else np.inf
                if not deviation <= RECOMPUTE_TOLERANCE:
                    problems.append(f"{table.paths[r]}, {column}: recorded {old!r}, recomputed {now!r} "
                                    f"(differs by {deviation:.3g} of the column's spread; tolerance "
                                    f"{RECOMPUTE_TOLERANCE:g})")
    what = (f"{len(recomputed)} of {n_p + n_u} images ({sum(r < n_p for r in recomputed)} published, "
            f"{sum(r >= n_p for r in recomputed)} unpublished; chosen by the SHA-256 of {RESULT_FILE}) "
            f"x {len(table.columns)} features re-extracted with seed {seed}")
    covered = [table.paths[r] for r in sorted(recomputed)]
    if problems:
        return Check(name, "failed", f"{what}: recomputed values differ from {FEATURES_FILE}", problems, covered)
    return Check(name, "passed", f"{what}: every value within {RECOMPUTE_TOLERANCE:g} of its column's spread "
                 f"(largest difference {largest:.2g} of the spread)", covered=covered)


# -------------------------------------------------------------- shift guard
def shift_guard_check(result: AuditResult, folders: dict[str, Path | None]) -> Check:
    """Run the shift guard again on both folders' images and compare it with the recorded one.

    The images must be the manifest's (same paths and SHA-256, in the same order), else the guard is
    not re-run (the images check says what differs). The recorded encoder, significance level and
    seed are used. The built-in descriptors are plain arithmetic on the pixels, so the p-value must
    agree to 1e-9; CLIP embeddings depend on the device, so with CLIP the decision must agree and the
    p-value within 1e-3 (a p-value is also shown both ways for the reader to compare).
    """
    from cdi.data.collection import load_audit_collections
    from cdi.data.shift_guard import clip_cached, image_embeddings, shift_guard

    name = "shift guard"
    recorded = result.shift_guard
    if recorded is None:
        return Check(name, "skipped", "the audit ran no shift guard")
    encoder = recorded.encoder
    if encoder == "clip" and not clip_cached():
        return Check(name, "skipped", "not re-run: the audit used CLIP, whose weights are not in the local cache "
                     "(download openai/clip-vit-large-patch14 with `hf download`)")
    params = result.parameters
    try:
        collections = load_audit_collections(folders["published"], folders["unpublished"],
                                             skip_bad=bool(params.get("skip_bad")),
                                             max_pixels=int(params.get("max_pixels") or 64_000_000))
    except CDIError as exc:
        return Check(name, "failed", "not re-run: the image folders cannot be read", [str(exc)])
    for collection in collections:
        manifest = [(s.path, s.sha256) for s in result.scores if s.collection == collection.name]
        if [(r.path, r.sha256) for r in collection.records] != manifest:
            return Check(name, "failed", f"not re-run: the {collection.name} folder's images are not the "
                         "manifest's (see the images check)")
    seed = int(params.get("seed", result.seed))
    emb_p, used = image_embeddings(collections[0], encoder=encoder)
    emb_u, _ = image_embeddings(collections[1], encoder=used)
    guard = shift_guard(emb_p, emb_u, alpha=recorded.alpha, seed=seed, encoder=used)
    tolerance = 1e-9 if used == "builtin" else 1e-3
    shown = (f"encoder {used}, p = {guard.p_value:.6g} (recorded {recorded.p_value:.6g}), "
             f"{'shift detected' if guard.detected else 'no shift detected'} "
             f"(recorded: {'detected' if recorded.detected else 'not detected'})")
    problems = []
    if used != encoder:
        problems.append(f"encoder {used}, recorded {encoder}")
    if bool(guard.detected) != bool(recorded.detected):
        problems.append("the decision differs from the recorded one")
    if not abs(guard.p_value - recorded.p_value) <= tolerance:
        problems.append(f"p-value {guard.p_value!r}, recorded {recorded.p_value!r} (tolerance {tolerance:g})")
    if problems:
        return Check(name, "failed", f"re-run on the images: {shown}", problems)
    return Check(name, "passed", f"re-run on the images: {shown}")


def _scope(result: AuditResult, checks: dict[str, Check], *, curve: bool, recompute: int) -> dict[str, list[str]]:
    """What a verification checked, recomputed and took as recorded, one sentence each."""
    ran = {name for name, c in checks.items() if c.status != "skipped"}
    checked = [f"{RESULT_FILE}, {FEATURES_FILE}, {FEATURES_FILE}.json and {REPORT_FILE} belong together "
               "(SHA-256)", f"every row of {FEATURES_FILE} is its manifest entry (path, SHA-256, caption)"]
    recomputed = ["the test, its p-values, statistic, effect size, AUC, scores, weights and sample-size estimate, from "
                  f"{FEATURES_FILE} (exactly)" + ("" if result.sample_size_curve is None else
                                                  ", with the sample-size curve" if curve else
                                                  "; the sample-size curve was not re-run (--quick)")]
    taken = []
    if "images" in ran:
        checked.append("the image files of the folders checked: SHA-256 of each against the manifest, none extra")
    else:
        taken.append("the images: their SHA-256 in the manifest (pass --images, or --published/--unpublished)")
    if "model" in ran:
        checked.append("the model: fingerprint and SHA-256 of each weight and config file")
    else:
        taken.append("the model's identity: its recorded fingerprint (pass --model)")
    if result.reference_model:
        if "reference" in ran:
            checked.append("the reference model's fingerprint")
        else:
            taken.append("the reference model's identity (pass --reference-model)")
    n = result.n_published + result.n_unpublished
    if "recompute" in ran:
        k = min(recompute, n)
        names = checks["recompute"].covered
        listed = ", ".join(names[:_LISTED]) + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")
        recomputed.append(f"the feature values of {k} of {n} images, re-extracted with the model"
                          + (f": {listed}" if names else ""))
        if k < n:
            taken.append(f"the feature values of the other {n - k} images")
    else:
        taken.append(f"the feature values of all {n} images (pass --recompute K with --model)")
    if "shift guard" in ran:
        recomputed.append("the shift guard, on the images")
    elif result.shift_guard is not None:
        taken.append("the shift guard's outcome (pass --images)")
    if result.captions and result.captions.get("source") not in (None, "files"):
        taken.append("the captions made by the captioning model (as recorded in features.csv)")
    checked += [checks[name].detail for name in ("design", "ledger") if name in ran]
    draws = int((result.features.get("noise_draws") or {}).get("draws", 1))
    if draws > 1:
        which = "noise draw 2" if draws == 2 else f"noise draws 2 to {draws}"
        taken.append(f"the feature values of {which} ({FEATURES_FILE}'s @draw columns; --recompute re-extracts the "
                     "first draw's)")
    if result.seed_check:
        seeds = ", ".join(str(s) for s in result.seed_check.get("seeds", [])[1:])
        taken.append(f"the seed check's p-values at seeds {seeds} (their features are not in features.csv; "
                     "re-run the audit with --seed S to reproduce one)")
    taken.append("the environment, timings and command line recorded in result.json")
    return {"checked": checked, "recomputed": recomputed, "taken_as_recorded": taken}


def verification_json(verification: Verification) -> str:
    return json.dumps(verification.to_dict(), indent=2)
