"""A pre-registered randomised design: ``cdi design``, and its check by ``cdi audit --design``.

Why. A test on model features cannot tell training from every other reason
two collections differ (Zhang, Das, Kamath & Tramer, "Membership inference
attacks cannot prove that a model was trained on your data", SaTML 2025):
if the creator chose which works to publish, the published ones may differ
from the withheld ones in ways the model sees. Their remedy is a held-out
set drawn at random and fixed in advance. ``cdi design`` does that for a
creator's works that are not yet public; an audit that follows the design
compares two collections that are exchangeable by construction (which work
went where was decided by a coin the creator did not control), with an
analysis fixed before any data was seen.

How the split is made (rule ``cdi-design-v1``; anyone can re-derive it
without cdi, with nothing but SHA-256):

1. **Fix the list.** Every work (an image file of ``--works``, scanned like
   an audit's folder by ``cdi.data.collection``) is identified by the SHA-256 of its
   bytes; the list hash is the SHA-256 of those hex digests, sorted, each
   followed by a newline (``cdi.audit.ledger.list_sha256``).
2. **Draw the randomness after the list is fixed.** With ``--beacon VALUE
   --beacon-name NAME`` the randomness is a public random value published
   after the list hash was dated (a drand round's ``randomness``, a NIST
   Randomness Beacon pulse's ``outputValue``: at least 32 hex digits), so no
   one could choose it to steer the split. Without a beacon, 32 bytes of the
   operating system's randomness are used and recorded; anyone can then
   re-derive the split from them, but not that they were drawn once: that
   rests on the creator's word (recorded in ``randomness.statement``).
3. **Derive the split.** ``seed = SHA-256("cdi-design-v1\\n" + list hash +
   "\\n" + randomness + "\\n")`` (hex, lower case); each work's key is
   ``SHA-256(seed + work hash)`` (the two hex strings concatenated); the
   works sorted by key (then by hash), the first ``floor(N * fraction +
   0.5)`` are to be published, the rest withheld.

``design.json`` (``DESIGN_KIND``) holds the works folder, the list hash, the
randomness, the rule, the two lists (path and SHA-256 of each work), the
planned analysis (``ANALYSIS_FIELDS``: features, alpha, protocol, verdict
mode and seed) and ``commitment``: the SHA-256 of the canonical JSON of
everything else (keys sorted, no spaces, ASCII). Its date is fixed by the
creator outside cdi (a notary, an email to themselves, a public post of the
commitment, an OpenTimestamps proof), before any work is published.

``cdi audit --design design.json`` then checks, before the model loads,
that the audit's options are the planned analysis (else it stops, naming
the differences) and that P and U are exactly the design's two lists by
SHA-256: a missing or extra image stops the audit (exit 2, listing them)
unless ``--allow-deviations``, which lists them in ``result.json`` and the
report; a work found in the other collection than the design assigned stops
it always. ``result.json`` records the design and its checks (``design``).
"""

from __future__ import annotations

import json
import math
import re
import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from cdi.utils.errors import CDIError, listing
from cdi.utils.io import atomic_write_text, sha256_bytes, sha256_file
from cdi.audit.ledger import list_sha256

DESIGN_KIND = "cdi.design"
DESIGN_VERSION = 1
RULE = "cdi-design-v1"
RULE_TEXT = (
    "seed = SHA-256('cdi-design-v1\\n' + list_sha256 + '\\n' + randomness value + '\\n'); each work's key = "
    "SHA-256(seed + work sha256), hex strings concatenated; works sorted by key then sha256; the first "
    "floor(N * publish_fraction + 0.5) are published, the rest withheld"
)
LIST_RULE_TEXT = "SHA-256 of the works' SHA-256 hex digests, sorted, each followed by a newline"
#: The options of an audit the design fixes in advance (names of ``cdi.audit.config.AuditConfig`` fields).
ANALYSIS_FIELDS = ("features", "alpha", "protocol", "verdict", "seed")
MIN_BEACON_HEX = 32
OS_STATEMENT = ("the randomness is 32 bytes of the operating system's random generator, recorded here: anyone can "
                "re-derive the split from it, but that it was drawn once and not chosen among several draws "
                "rests on the creator's word")
BEACON_STATEMENT = ("the randomness is a public random value ({name}); the split is checkable if the list hash "
                    "was dated before that value was published (it is then the first value published after "
                    "the list was fixed)")


# ------------------------------------------------------------------ the rule
def assignment_seed(list_hash: str, randomness: str) -> str:
    """The hex seed of the split: SHA-256 of the rule name, the list hash and the randomness, one per line."""
    return sha256_bytes(f"{RULE}\n{list_hash}\n{randomness}\n".encode("utf-8"))


def publish_count(n: int, fraction: float) -> int:
    """How many of ``n`` works are published: ``floor(n * fraction + 0.5)``."""
    return int(math.floor(n * fraction + 0.5))


def derive_split(hashes: Sequence[str], randomness: str, fraction: float) -> tuple[list[str], list[str]]:
    """The published and withheld work hashes under rule ``cdi-design-v1`` (module docstring), in key order."""
    seed = assignment_seed(list_sha256(hashes), randomness)
    ordered = sorted(set(hashes), key=lambda h: (sha256_bytes((seed + h).encode("utf-8")), h))
    k = publish_count(len(ordered), fraction)
    return ordered[:k], ordered[k:]


# ------------------------------------------------------------ checked inputs
def check_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise CDIError(f"--publish-fraction must be strictly between 0 and 1 (got {fraction!r}); 0.5 publishes "
                       f"half the works, which gives the audit the most power")
    return float(fraction)


def check_beacon(value: str | None, name: str | None) -> tuple[str | None, str | None]:
    """Normalise ``--beacon`` (lower-case hex, at least ``MIN_BEACON_HEX`` digits) and require its name."""
    if value is None:
        if name is not None:
            raise CDIError("--beacon-name without --beacon: give the beacon's random value too")
        return None, None
    text = value.strip().lower()
    if text.startswith("0x"):
        text = text[2:]
    if not re.fullmatch(r"[0-9a-f]+", text or "-"):
        raise CDIError(f"--beacon must be the beacon's random value in hexadecimal (e.g. a drand round's "
                       f"'randomness' or a NIST beacon pulse's 'outputValue'), got {value!r}")
    if len(text) < MIN_BEACON_HEX:
        raise CDIError(f"--beacon has {len(text)} hex digits; a public beacon's value has at least "
                       f"{MIN_BEACON_HEX} (drand: 64, NIST: 128): paste the whole value")
    if not name or not name.strip():
        raise CDIError("--beacon needs --beacon-name: which beacon and round the value is from (e.g. "
                       "'drand quicknet round 12345678'), so that anyone can look it up")
    return text, name.strip()


def planned_analysis(features: str | None = None, alpha: float = 0.01, protocol: str = "pooled",
                     verdict: str = "parametric", seed: int = 0) -> dict[str, Any]:
    """The analysis a design fixes (``ANALYSIS_FIELDS``), checked as ``cdi audit`` checks them."""
    from cdi.audit.config import check_seed
    from cdi.stats.verdict import PROTOCOLS, VERDICTS

    if features is not None:
        from cdi.features.registry import resolve_features

        resolve_features(features)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 0.5:
        raise CDIError(f"--alpha must be between 0 and 0.5 (got {alpha!r}); 0.01 is the usual choice")
    if protocol not in PROTOCOLS:
        raise CDIError(f"--protocol must be one of {', '.join(PROTOCOLS)} (got {protocol!r})")
    if verdict not in VERDICTS:
        raise CDIError(f"--verdict must be one of {', '.join(VERDICTS)} (got {verdict!r})")
    check_seed(seed)
    return {"features": features, "alpha": float(alpha), "protocol": protocol, "verdict": verdict, "seed": seed}


def scan_works(folder: str | Path, *, max_pixels: int | None = None):
    """The works of ``folder`` as an ``ImageCollection``; refuses duplicates (each work must be listed once)."""
    from cdi.data.collection import DEFAULT_MAX_PIXELS, ImageCollection

    works = ImageCollection.from_folder(folder, name="works", max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    if works.duplicates:
        raise CDIError(
            f"the works folder {works.root} holds {len(works.duplicates)} duplicate image(s) (same file or same "
            f"pixels as another):\n{listing([f'{d}  =  {k}' for d, k in works.duplicates])}\n"
            "Remove the copies so that each work is listed once, then run cdi design again."
        )
    return works


# ---------------------------------------------------------------- the design
def canonical_bytes(data: Any) -> bytes:
    """The canonical JSON the commitment is taken of: keys sorted, no spaces, ASCII."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def commitment_of(design: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``design`` without its ``commitment``."""
    return sha256_bytes(canonical_bytes({k: v for k, v in design.items() if k != "commitment"}))


def make_design(works_folder: str | Path, *, publish_fraction: float = 0.5, beacon: str | None = None,
                beacon_name: str | None = None, analysis: dict[str, Any] | None = None,
                max_pixels: int | None = None) -> dict[str, Any]:
    """Scan the works, draw the split (module docstring) and return the design (``commitment`` included)."""
    fraction = check_fraction(publish_fraction)
    beacon, beacon_name = check_beacon(beacon, beacon_name)
    works = scan_works(works_folder, max_pixels=max_pixels)
    return build_design(works.root, [(r.path, r.sha256) for r in works.records], publish_fraction=fraction,
                        beacon=beacon, beacon_name=beacon_name, analysis=analysis)


def build_design(folder: str | Path, works: Sequence[tuple[str, str]], *, publish_fraction: float = 0.5,
                 beacon: str | None = None, beacon_name: str | None = None,
                 analysis: dict[str, Any] | None = None, stand_in: str | None = None) -> dict[str, Any]:
    """The design of ``works``, ``(path, sha256)`` of each (distinct) work of ``folder``; see ``make_design``.

    ``stand_in``: the ``beacon`` is not a public random value but stands in for one (``cdi demo --design``);
    the text says what it is, and the record's source is ``"stand-in"``.
    """
    from cdi import __version__
    from cdi.stats.blocks import minimum_images

    fraction = check_fraction(publish_fraction)
    beacon, beacon_name = check_beacon(beacon, beacon_name)
    analysis = analysis if analysis is not None else planned_analysis()
    path_of = {h: p for p, h in works}
    if len(path_of) != len(works):
        raise CDIError("a work is listed twice (same SHA-256); list each work once")
    n = len(path_of)
    k = publish_count(n, fraction)
    need = minimum_images(2)
    if min(k, n - k) < need:
        raise CDIError(
            f"{n} works with --publish-fraction {fraction} give {k} to publish and {n - k} to withhold; an audit "
            f"needs at least {need} images in each (with --folds 2; {minimum_images(5)} with the default 5 folds). "
            "Add works or choose a fraction nearer 0.5"
        )
    if beacon is None:
        randomness = {"source": "os", "value": secrets.token_hex(32), "name": "operating system random generator",
                      "statement": OS_STATEMENT}
    elif stand_in is not None:
        randomness = {"source": "stand-in", "value": beacon, "name": beacon_name, "statement": stand_in}
    else:
        randomness = {"source": "beacon", "value": beacon, "name": beacon_name,
                      "statement": BEACON_STATEMENT.format(name=beacon_name)}
    hashes = list(path_of)
    publish, withhold = derive_split(hashes, randomness["value"], fraction)
    design: dict[str, Any] = {
        "kind": DESIGN_KIND,
        "version": DESIGN_VERSION,
        "cdi_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "works": {"folder": str(folder), "count": n, "list_sha256": list_sha256(hashes),
                  "list_rule": LIST_RULE_TEXT},
        "randomness": randomness,
        "assignment": {"rule": RULE, "rule_text": RULE_TEXT, "publish_fraction": fraction,
                       "seed_sha256": assignment_seed(list_sha256(hashes), randomness["value"]),
                       "publish_count": len(publish), "withhold_count": len(withhold)},
        "publish": sorted(({"path": path_of[h], "sha256": h} for h in publish), key=lambda w: w["path"]),
        "withhold": sorted(({"path": path_of[h], "sha256": h} for h in withhold), key=lambda w: w["path"]),
        "analysis": analysis,
    }
    design["commitment"] = commitment_of(design)
    return design


def check_design_out(out: str | Path, *, force: bool = False) -> Path:
    """Refuse (``CDIError``) a ``--out`` that is a folder, or an existing file without ``force``."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise CDIError(f"--out {out} is a folder; give a file path such as {out / 'design.json'}")
    if out.exists() and not force:
        raise CDIError(f"--out {out} exists; a design is fixed once: choose another path, or pass --force to "
                       f"replace it (only before its date was fixed and any work was published)")
    return out


def write_design(design: dict[str, Any], out: str | Path, *, force: bool = False) -> Path:
    """Write ``design.json`` atomically; an existing file is replaced only with ``force``."""
    out = check_design_out(out, force=force)
    try:
        atomic_write_text(out, json.dumps(design, indent=2) + "\n")
    except OSError as exc:
        raise CDIError(f"cannot write {out}: {exc.strerror or exc}; choose another --out") from None
    return out


def list_only(works_folder: str | Path, *, max_pixels: int | None = None) -> dict[str, Any]:
    """Step 1 of a beacon design: the works' count and list hash, to date before the beacon round."""
    works = scan_works(works_folder, max_pixels=max_pixels)
    return {"folder": str(works.root), "count": len(works), "list_sha256": list_sha256(works.hashes)}


# ------------------------------------------------------------ reading, checks
def read_design(path: str | Path, flag: str) -> dict[str, Any]:
    """The JSON of a design file, of ``DESIGN_KIND`` and a version this cdi reads (else ``CDIError``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CDIError(f"{flag} {path}: no such file; give the design.json that `cdi design` wrote")
    try:
        design = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CDIError(f"{flag} {path} is not readable JSON ({exc})") from None
    if not isinstance(design, dict) or design.get("kind") != DESIGN_KIND:
        raise CDIError(f"{flag} {path} is not a design written by `cdi design`")
    if not isinstance(design.get("version"), int) or design["version"] > DESIGN_VERSION:
        raise CDIError(f"{flag} {path} has version {design.get('version')!r}; this cdi reads up to "
                       f"{DESIGN_VERSION}: upgrade cdi")
    return design


def load_design(path: str | Path) -> dict[str, Any]:
    """Read ``design.json`` and check it is whole: kind, version, commitment and the split's re-derivation.

    Raises ``CDIError`` listing the problems (``design_problems``).
    """
    design = read_design(path, "--design")
    problems = design_problems(design)
    if problems:
        raise CDIError(f"--design {path} does not check out:\n{listing(problems)}\n"
                       "It was altered after it was made, or is damaged; use the design.json whose commitment was "
                       "dated (`cdi design --check` lists the problems)")
    return design


def design_problems(design: dict[str, Any]) -> list[str]:
    """Everything wrong with a design: commitment, list hash, and the split against the rule."""
    try:
        return _problems(design)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return [f"a field is missing or malformed ({type(exc).__name__}: {exc})"]


def _problems(design: dict[str, Any]) -> list[str]:
    try:
        publish = [w["sha256"] for w in design["publish"]]
        withhold = [w["sha256"] for w in design["withhold"]]
        fraction = float(design["assignment"]["publish_fraction"])
        randomness = design["randomness"]["value"]
        list_hash = design["works"]["list_sha256"]
        commitment = design["commitment"]
    except (KeyError, TypeError, ValueError) as exc:
        return [f"a field is missing or malformed ({exc})"]
    problems = []
    if commitment_of(design) != commitment:
        problems.append(f"the commitment {commitment} is not the SHA-256 of the design's contents "
                        f"({commitment_of(design)})")
    hashes = publish + withhold
    if len(set(hashes)) != len(hashes):
        problems.append("a work is listed twice")
    if list_sha256(hashes) != list_hash:
        problems.append(f"the works' list hash is {list_sha256(hashes)}, the design says {list_hash}")
    if design["assignment"].get("rule") != RULE:
        problems.append(f"unknown assignment rule {design['assignment'].get('rule')!r} (this cdi knows {RULE})")
        return problems
    want_p, want_w = derive_split(hashes, randomness, fraction)
    if sorted(want_p) != sorted(publish) or sorted(want_w) != sorted(withhold):
        moved = len(set(want_p) - set(publish)) + len(set(publish) - set(want_p))
        problems.append(f"the split is not the one the rule derives from the list hash and the randomness "
                        f"({moved} work(s) differ)")
    return problems


def check_design_file(path: str | Path, works: str | Path | None = None,
                      max_pixels: int | None = None) -> dict[str, Any]:
    """``cdi design --check``: re-derive the split of a design and, with ``works``, re-hash the works folder.

    Returns ``{"design": ..., "problems": [...]}`` (no problem: the design checks out).
    """
    design = read_design(path, "--check")
    problems = design_problems(design)
    if works is not None:
        found = scan_works(works, max_pixels=max_pixels)
        listed = {w["sha256"] for w in design.get("publish", []) + design.get("withhold", [])}
        missing = sorted(listed - set(found.hashes))
        extra = sorted(r.path for r in found.records if r.sha256 not in listed)
        if missing:
            problems.append(f"{len(missing)} listed work(s) are not in {found.root} (e.g. {missing[0]})")
        if extra:
            problems.append(f"{len(extra)} image(s) of {found.root} are not in the design (e.g. {extra[0]})")
    return {"design": design, "problems": problems}


def dating_advice(path: str | Path, commitment: str) -> list[str]:
    """How to fix the date of a design (printed by ``cdi design``)."""
    lines = [
        f"Fix the date of this design BEFORE publishing any work; its commitment is {commitment}. Any of:",
        f"  - email {path} to yourself and to your lawyer (the mail servers date it);",
        "  - have a notary certify the file or the commitment;",
        "  - post the commitment publicly (a social-media post, a commit pushed to a public repository);",
    ]
    if shutil.which("ots"):
        lines.append(f"  - OpenTimestamps (client found): ots stamp {path}   (keep {path}.ots beside it)")
    else:
        lines.append(f"  - OpenTimestamps, if you install its client: ots stamp {path}   (keep {path}.ots)")
    lines.append(f"Then publish exactly the 'publish' list, keep the 'withhold' list private, and audit later with "
                 f"`cdi audit --design {path}` (and the same options: the planned analysis).")
    return lines


def check_options(design: dict[str, Any], config) -> None:
    """Stop (``CDIError``) unless the audit's options are the design's planned analysis."""
    planned = design["analysis"]
    differences = []
    for name in ANALYSIS_FIELDS:
        want, got = planned.get(name), getattr(config, name)
        same = _same_features(want, got) if name == "features" else want == got
        if not same:
            flag = "--" + name.replace("_", "-")
            differences.append(f"{flag} {'(default)' if got is None else got}: the design fixed "
                               f"{'the default' if want is None else want}")
    if differences:
        raise CDIError("the audit's options differ from the analysis the design fixed in advance:\n"
                       f"{listing(differences)}\nRun the audit with the design's options, or without --design "
                       "(the report then claims no pre-registered analysis)")


def check_table_features(design: dict[str, Any], families, conditioning: str, noise_seed: Any) -> None:
    """For an audit from feature tables: the tables' families and noise seed are the planned ones (``CDIError``)."""
    from cdi.features.registry import default_set_for, resolve_features

    if noise_seed != design["analysis"]["seed"]:
        raise CDIError(f"the feature tables were extracted with --seed {noise_seed}, but the design fixed the seed "
                       f"{design['analysis']['seed']}; extract them with the planned seed")
    planned = design["analysis"].get("features") or default_set_for(conditioning)
    if [f.key() for f in resolve_features(planned)] != [f.key() for f in families]:
        raise CDIError(f"the feature tables hold {','.join(f.name for f in families)}, but the design fixed the "
                       f"features {planned}; extract the planned features")


def _same_features(planned: str | None, given: str | None) -> bool:
    if planned is None or given is None:
        return planned is None and given is None
    from cdi.features.registry import resolve_features

    return [f.key() for f in resolve_features(planned)] == [f.key() for f in resolve_features(given)]


def check_collections(design: dict[str, Any], published: Sequence[tuple[str, str]],
                      unpublished: Sequence[tuple[str, str]], *, allow_deviations: bool) -> dict[str, Any]:
    """Compare the audit's collections, ``(path, sha256)`` per image, with the design's lists.

    A work found in the collection the design did not assign it to stops the
    audit always (keep it where the design put it: the test stays valid). A
    designed work missing, or an image the design does not list, stops it
    unless ``allow_deviations``. Returns the per-collection record for
    ``result.json`` (``missing`` and ``extra``: path and SHA-256 of each).
    """
    sides = {"published": ("publish", published), "unpublished": ("withhold", unpublished)}
    listed = {name: {w["sha256"]: w["path"] for w in design[key]} for name, (key, _) in sides.items()}
    record: dict[str, Any] = {}
    swapped, deviations = [], []
    for name, (key, found) in sides.items():
        other = "unpublished" if name == "published" else "published"
        found_hashes = {h for _, h in found}
        missing = [{"path": p, "sha256": h} for h, p in sorted(listed[name].items(), key=lambda i: i[1])
                   if h not in found_hashes]
        extra = [{"path": p, "sha256": h} for p, h in found if h not in listed[name]]
        for item in extra:
            if item["sha256"] in listed[other]:
                swapped.append(f"{name} {item['path']}: the design assigned it to {other} "
                               f"({listed[other][item['sha256']]})")
        record[name] = {"designed": len(listed[name]), "found": len(found),
                        "matched": len(listed[name]) - len(missing), "missing": missing, "extra": extra}
        deviations += [f"{name}: missing {m['path']} ({m['sha256'][:12]})" for m in missing]
        deviations += [f"{name}: not in the design {e['path']} ({e['sha256'][:12]})" for e in extra]
    if swapped:
        raise CDIError(
            f"{len(swapped)} image(s) are in the other collection than the design assigned:\n{listing(swapped)}\n"
            "Put each where the design assigned it, even a withheld work that was published by mistake "
            "(comparing as assigned keeps the test valid; moving works breaks the randomisation)"
        )
    if deviations and not allow_deviations:
        raise CDIError(
            f"the collections are not the design's lists ({len(deviations)} deviation(s)):\n{listing(deviations)}\n"
            "Give the folders exactly the designed works, or pass --allow-deviations to audit anyway; the "
            "deviations are then listed in the result and the report"
        )
    record["followed"] = not deviations
    record["allow_deviations"] = allow_deviations
    return record


def design_for_audit(config) -> dict[str, Any] | None:
    """``cdi audit --design``: load and check the design and the audit's options; None without a design."""
    if config.design is None:
        if config.allow_deviations:
            raise CDIError("--allow-deviations applies to an audit with --design only")
        return None
    design = load_design(config.design)
    check_options(design, config)
    return design


def design_record(design: dict[str, Any] | None, config, published: Sequence[tuple[str, str]],
                  unpublished: Sequence[tuple[str, str]]) -> dict[str, Any] | None:
    """The ``design`` section of an audit with ``--design``, from each collection's ``(path, sha256)`` pairs
    (``check_collections``: stops on deviations unless allowed); None without a design."""
    if design is None:
        return None
    checks = check_collections(design, published, unpublished, allow_deviations=config.allow_deviations)
    return audit_record(design, config.design, checks)


def audit_record(design: dict[str, Any], path: str | Path, checks: dict[str, Any]) -> dict[str, Any]:
    """The ``design`` section of ``result.json``: what the design fixed and how the audit matched it."""
    path = Path(path).expanduser().absolute()
    return {
        "file": str(path),
        "file_sha256": sha256_file(path),
        "commitment": design["commitment"],
        "created_at": design.get("created_at"),
        "works": design["works"],
        "randomness": design["randomness"],
        "assignment": {k: v for k, v in design["assignment"].items()},
        "analysis": design["analysis"],
        "options_match": True,
        "collections": {name: checks[name] for name in ("published", "unpublished")},
        "followed": checks["followed"],
        "allow_deviations": checks["allow_deviations"],
        "check_command": f"cdi design --check {path}",
    }


def verify_design(result) -> tuple[str, str, list[str]]:
    """``cdi verify``'s design check of an ``AuditResult``: ``(status, detail, problems)``.

    The design file at its recorded place must have the recorded SHA-256 and
    check out (``design_problems``), and the result's manifest must match its
    lists exactly as recorded (the same missing and extra images).
    """
    record = result.design
    if record is None:
        return "skipped", "the audit followed no design", []
    path = Path(record["file"])
    if not path.is_file():
        return "skipped", f"not checked: the design file {path} is not at its recorded place", []
    problems = []
    if sha256_file(path) != record["file_sha256"]:
        problems.append(f"{path} has another SHA-256 than the audit recorded ({record['file_sha256']})")
    try:
        design = read_design(path, "design")
    except CDIError as exc:
        return "failed", "the design file cannot be read", problems + [str(exc)]
    problems += design_problems(design)
    pairs: dict[str, list[tuple[str, str]]] = {"published": [], "unpublished": []}
    for row in result.scores:
        pairs[row.collection].append((row.path, row.sha256))
    try:
        checks = check_collections(design, pairs["published"], pairs["unpublished"], allow_deviations=True)
    except CDIError as exc:
        problems.append(str(exc))
    else:
        for name in ("published", "unpublished"):
            recorded = record["collections"][name]
            if (checks[name]["missing"], checks[name]["extra"]) != (recorded["missing"], recorded["extra"]):
                problems.append(f"the {name} images of the manifest do not match the design as the audit recorded")
    if problems:
        return "failed", "the design does not check out against the audit", problems
    how = "are exactly its two lists" if record["followed"] else "deviate from its lists as recorded"
    return "passed", (f"design {record['commitment'][:16]}... intact (file SHA-256, commitment, split re-derived); "
                      f"the manifest's images {how}"), []
