"""The audit ledger: every audit that wrote evidence, appended to one file, so forking paths stay visible.

An expert for the other side will ask how many audits were run on the same
collections with other options (protocol, verdict mode, features, alpha,
seed, ``--ignore-shift``, another unpublished collection) before the one
shown. The evidence folder alone cannot answer: each audit replaces the
last. The ledger can. Every audit that writes its evidence
(``cdi.audit.evidence.write_evidence``) appends one line to ``cdi-ledger.jsonl``:

* in the folder that holds the feature store (``--store``), when one is
  given: audits that share a store share a ledger;
* else in the parent folder of ``--out`` (audits written side by side share
  one);
* or wherever ``--ledger PATH`` says.

Each line is one JSON object (``LEDGER_KIND``): the time, the cdi version,
the output folder, each collection's **list hash** (``list_sha256``: the
SHA-256 of its images' SHA-256 digests, sorted, each followed by a newline;
the same rule ``cdi design`` fixes a creator's works with) and image count,
the model, every option of the run, the verdict and its p-values, the
design's commitment when the audit followed one, and ``previous_sha256``,
the SHA-256 of the line before it (None for the first). The chain makes a
line removed or edited in the middle of the file visible (``read_ledger``
reports ``chain_intact``); the lines after the last one an evidence folder
names can be removed without trace, which is why ``result.json`` records
the SHA-256 of its own line (``entry_sha256``) and the count it saw.

Appending is crash-safe and never loses an earlier entry: the file is
opened with ``O_APPEND`` (never truncated or rewritten), locked with
``flock`` where the platform has it (two audits appending at once), the
line is written with one ``write`` and fsynced, and a new file's folder is
fsynced too. A crash mid-write can leave at most a partial last line; the
next append starts on a fresh line after it, and ``read_ledger`` counts
such lines as damaged instead of failing.

The ledger is a record kept by the tool on the auditor's machine, not a
proof: whoever controls the machine can delete it. It makes forking paths
visible to an honest auditor's reader; a court that must be sure no audit
was hidden needs the ledger (or its last line's hash) timestamped or handed
to a third party as the audits happen.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from cdi.utils.errors import CDIError
from cdi.utils.io import fsync_folder, sha256_bytes
from cdi.audit.result import _finite_or_none

LEDGER_FILE = "cdi-ledger.jsonl"
LEDGER_KIND = "cdi.ledger_entry"
LEDGER_VERSION = 1
#: The options a reader compares between audits of the same collections (shown in the report).
KEY_OPTIONS = ("features", "alpha", "protocol", "verdict", "seed", "ignore_shift", "reference_model", "design")


def list_sha256(hashes: Iterable[str]) -> str:
    """SHA-256 of a collection's image hashes: the hex digests sorted, each followed by ``"\\n"``.

    The same collection gives the same value whatever its folder, file names
    or order; ``sha256sum`` reproduces it: ``sha256sum * | cut -c1-64 | sort
    | sha256sum`` in a folder that holds only the images.
    """
    return sha256_bytes("".join(f"{h}\n" for h in sorted(hashes)).encode("ascii"))


def ledger_path(parameters: dict[str, Any], out: str | Path) -> Path:
    """Where an audit's ledger is: ``--ledger``, else beside ``--store``, else in the parent of ``out``."""
    if parameters.get("ledger"):
        return Path(parameters["ledger"]).expanduser().absolute()
    store = parameters.get("store")
    if store:
        return Path(store).expanduser().absolute().parent / LEDGER_FILE
    return Path(out).expanduser().absolute().parent / LEDGER_FILE


def check_ledger_path(path: str | Path | None) -> None:
    """A ``--ledger`` must not be a folder (``CDIError``); its folder must be writable (checked by the audit)."""
    if path is not None and Path(path).expanduser().is_dir():
        raise CDIError(f"--ledger {path} is a folder; give a file path, e.g. {Path(path) / LEDGER_FILE}")


# ------------------------------------------------------------------ reading
def read_ledger(path: str | Path) -> dict[str, Any]:
    """The entries of a ledger and the state of its chain.

    Returns ``{"entries": [...], "line_sha256": [...], "damaged_lines": [line numbers],
    "chain_intact": bool}``; a missing file is an empty ledger. A line that
    is not a JSON object of ``LEDGER_KIND`` (a partial line after a crash,
    an edit) is counted as damaged and breaks the chain.
    """
    path = Path(path)
    entries: list[dict[str, Any]] = []
    line_hashes: list[str] = []
    damaged: list[int] = []
    intact = True
    previous = None
    if not path.exists():
        return {"entries": entries, "line_sha256": line_hashes, "damaged_lines": damaged, "chain_intact": True}
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CDIError(f"cannot read the audit ledger {path}: {exc.strerror or exc}") from None
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            entry = None
        if not isinstance(entry, dict) or entry.get("kind") != LEDGER_KIND:
            damaged.append(number)
            intact = False
            previous = None
            continue
        if entry.get("previous_sha256") != previous:
            intact = False
        previous = sha256_bytes(line)
        entries.append(entry)
        line_hashes.append(previous)
    return {"entries": entries, "line_sha256": line_hashes, "damaged_lines": damaged, "chain_intact": intact}


# ------------------------------------------------------------------ writing
def append_entry(path: str | Path, entry: dict[str, Any]) -> str:
    """Append ``entry`` (``previous_sha256`` filled in here) as one line; return that line's SHA-256.

    See the module docstring for why this cannot lose an earlier entry.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists()
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as exc:
        raise CDIError(f"cannot write the audit ledger {path}: {exc.strerror or exc}; give a writable "
                       f"--ledger") from None
    try:
        _lock(fd)
        state = read_ledger(path)  # under the lock: the last line is the one this entry follows
        entry = {**entry, "previous_sha256": state["line_sha256"][-1] if state["line_sha256"] else None}
        line = json.dumps(_finite_or_none(entry), sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
        size = os.fstat(fd).st_size
        prefix = b""
        if size:
            os.lseek(fd, size - 1, os.SEEK_SET)
            if os.read(fd, 1) != b"\n":  # a partial line left by a crash: start on a fresh line
                prefix = b"\n"
        data = prefix + line + b"\n"
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)  # closing releases the lock
    if new_file:
        fsync_folder(path.parent)
    return sha256_bytes(line)


def _lock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: appends of one write each, unlocked
        return
    fcntl.flock(fd, fcntl.LOCK_EX)


# ------------------------------------------------------------ an audit's line
def collection_hashes(result) -> dict[str, list[str]]:
    """The image SHA-256s of each collection of an ``AuditResult`` (from its manifest rows)."""
    hashes: dict[str, list[str]] = {"published": [], "unpublished": []}
    for row in result.scores:
        hashes[row.collection].append(row.sha256)
    return hashes


def audit_entry(result, out: str | Path) -> dict[str, Any]:
    """The ledger line of an audit (without ``previous_sha256``)."""
    from cdi import __version__

    hashes = collection_hashes(result)
    roots = result.inputs or {}
    collections = {
        name: {"list_sha256": list_sha256(hashes[name]), "images": len(hashes[name]),
               "root": (roots.get(name) or {}).get("root") or result.parameters.get(name)}
        for name in hashes
    }
    return {
        "kind": LEDGER_KIND,
        "version": LEDGER_VERSION,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cdi_version": __version__,
        "out": str(Path(out).expanduser().absolute()),
        "collections": collections,
        "model": {k: result.model.get(k) for k in ("model_id", "revision", "fingerprint", "model_key")
                  if result.model.get(k) is not None},
        "options": result.parameters,
        "verdict": result.verdict,
        "p_value": result.p_value,
        "p_value_ttest": result.p_value_ttest,
        "p_value_permutation": result.p_value_permutation,
        "design": (result.design or {}).get("commitment"),
    }


def summary(entry: dict[str, Any], line_sha256: str) -> dict[str, Any]:
    """What the report lists of one audit: time, where, verdict, p and the options that fork."""
    options = entry.get("options") or {}
    return {
        "time": entry.get("time"), "out": entry.get("out"), "verdict": entry.get("verdict"),
        "p_value": entry.get("p_value"), "model_id": (entry.get("model") or {}).get("model_id"),
        "options": {key: options.get(key) for key in KEY_OPTIONS},
        "design": entry.get("design"), "line_sha256": line_sha256,
    }


def record_audit(result, out: str | Path) -> dict[str, Any]:
    """Append ``result``'s line to its ledger and return the ``ledger`` section of ``result.json``.

    The section says where the ledger is, the SHA-256 of this audit's line,
    how many entries the ledger held with it, and lists every audit of the
    same pair of collections (this one last) and how many audits paired the
    same published collection with another unpublished one (another choice
    of comparison images is a forking path too).
    """
    path = ledger_path(result.parameters, out)
    entry = audit_entry(result, out)
    line_hash = append_entry(path, entry)
    state = read_ledger(path)
    pair = (entry["collections"]["published"]["list_sha256"], entry["collections"]["unpublished"]["list_sha256"])
    same, other_u = [], 0
    for item, item_hash in zip(state["entries"], state["line_sha256"]):
        cols = item.get("collections") or {}
        p_key = (cols.get("published") or {}).get("list_sha256")
        u_key = (cols.get("unpublished") or {}).get("list_sha256")
        if (p_key, u_key) == pair:
            same.append(summary(item, item_hash))
        elif p_key == pair[0]:
            other_u += 1
    return {
        "file": str(path),
        "entry_sha256": line_hash,
        "entries_total": len(state["entries"]),
        "published_list_sha256": pair[0],
        "unpublished_list_sha256": pair[1],
        "same_collections": same,
        "same_published_other_unpublished": other_u,
        "damaged_lines": state["damaged_lines"],
        "chain_intact": state["chain_intact"],
    }


def verify_ledger(result) -> tuple[str, str, list[str]]:
    """``cdi verify``'s ledger check of an ``AuditResult``: ``(status, detail, problems)``.

    This audit's line (``entry_sha256``) must still be in the ledger and the
    chain intact; the detail counts the audits of the same collections
    appended after it.
    """
    record = result.ledger
    if record is None:
        return "skipped", "the audit recorded no ledger", []
    path = Path(record["file"])
    if not path.exists():
        return "skipped", f"not checked: the ledger {path} is not at its recorded place", []
    state = read_ledger(path)
    if record["entry_sha256"] not in state["line_sha256"]:
        return "failed", "this audit's line is not in the ledger (removed or edited)", [f"{path}: no line with "
                                                                                         f"SHA-256 {record['entry_sha256']}"]
    if not state["chain_intact"]:
        return "failed", "the ledger's chain of hashes is broken (a line removed, edited or cut short)", [
            f"damaged line(s): {state['damaged_lines']}" if state["damaged_lines"] else "a previous_sha256 mismatch"]
    index = state["line_sha256"].index(record["entry_sha256"])
    pair = (record["published_list_sha256"], record["unpublished_list_sha256"])
    later = sum(1 for entry in state["entries"][index + 1:]
                if tuple((entry.get("collections") or {}).get(name, {}).get("list_sha256")
                         for name in ("published", "unpublished")) == pair)
    return "passed", (f"this audit's line is in {path} and the chain is intact; {later} later audit(s) of these "
                      f"collections"), []
