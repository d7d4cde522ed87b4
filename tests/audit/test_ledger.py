"""The audit ledger (cdi.audit.ledger): every audit that writes evidence is appended, nothing earlier is lost.

Audits here run from synthetic `cdi extract`-like tables (no model, about a second each).
"""

from __future__ import annotations

import json
import threading

import pytest
from typer.testing import CliRunner

from cdi.cli import app
from cdi.audit.design import build_design
from cdi.audit.ledger import LEDGER_FILE, append_entry, ledger_path, list_sha256, read_ledger
from cdi.audit.result import AuditResult
from test_design import STATS, extract_tables, fake_hashes

runner = CliRunner()


def entry(i: int) -> dict:
    return {"kind": "cdi.ledger_entry", "version": 1, "n": i}


def test_appends_chain_and_survive_a_torn_last_line(tmp_path):
    path = tmp_path / LEDGER_FILE
    hashes = [append_entry(path, entry(i)) for i in range(3)]
    state = read_ledger(path)
    assert [e["n"] for e in state["entries"]] == [0, 1, 2] and state["chain_intact"]
    assert state["line_sha256"] == hashes and state["entries"][1]["previous_sha256"] == hashes[0]
    assert state["entries"][0]["previous_sha256"] is None
    # A crash in the middle of a write leaves a partial line: the next entry starts on a fresh line,
    # every earlier entry is kept, and the damaged line is counted.
    with open(path, "ab") as fh:
        fh.write(b'{"kind": "cdi.ledger_en')
    append_entry(path, entry(3))
    state = read_ledger(path)
    assert [e["n"] for e in state["entries"]] == [0, 1, 2, 3]
    assert state["damaged_lines"] == [4] and not state["chain_intact"]


def test_a_removed_line_breaks_the_chain(tmp_path):
    path = tmp_path / LEDGER_FILE
    for i in range(4):
        append_entry(path, entry(i))
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(lines[:1] + lines[2:]))
    state = read_ledger(path)
    assert [e["n"] for e in state["entries"]] == [0, 2, 3] and not state["chain_intact"]
    assert state["damaged_lines"] == []


def test_concurrent_appends_lose_nothing_and_keep_the_chain(tmp_path):
    path = tmp_path / LEDGER_FILE

    def writer(k: int) -> None:
        for i in range(20):
            append_entry(path, entry(100 * k + i))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = read_ledger(path)
    assert sorted(e["n"] for e in state["entries"]) == sorted(100 * k + i for k in range(4) for i in range(20))
    assert state["chain_intact"]


def test_where_the_ledger_is(tmp_path):
    assert ledger_path({}, tmp_path / "a" / "out") == tmp_path / "a" / LEDGER_FILE
    assert ledger_path({"store": str(tmp_path / "s" / "f.sqlite")}, tmp_path / "out") == tmp_path / "s" / LEDGER_FILE
    assert ledger_path({"store": str(tmp_path / "s"), "ledger": str(tmp_path / "L.jsonl")}, "o") == tmp_path / "L.jsonl"


def test_list_hash_ignores_order():
    hashes = fake_hashes(5)
    assert list_sha256(hashes) == list_sha256(hashes[::-1]) != list_sha256(hashes[:4])


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("ledger-tables")
    design = build_design("w", [(f"w{i:02d}.png", h) for i, h in enumerate(fake_hashes(60))])
    other = build_design("w", [(f"w{i:02d}.png", h) for i, h in enumerate(fake_hashes(60, "other"))])
    p_csv, u_csv = extract_tables(design, root / "a")
    _, u2_csv = extract_tables(other, root / "b")
    return p_csv, u_csv, u2_csv


def audit(p_csv, u_csv, out, *extra) -> AuditResult:
    done = runner.invoke(app, ["audit", "--published-features", str(p_csv), "--unpublished-features", str(u_csv),
                               "--out", str(out), *STATS, *extra])
    assert done.exit_code == 0, done.output
    return AuditResult.load(out)


def test_every_audit_of_the_same_collections_is_listed(tables, tmp_path):
    p_csv, u_csv, u2_csv = tables
    first = audit(p_csv, u_csv, tmp_path / "a1")
    assert len(first.ledger["same_collections"]) == 1 and first.ledger["file"] == str(tmp_path / LEDGER_FILE)
    second = audit(p_csv, u_csv, tmp_path / "a2", "--alpha", "0.05", "--protocol", "sequential")
    other_u = audit(p_csv, u2_csv, tmp_path / "a3")
    third = audit(p_csv, u_csv, tmp_path / "a4", "--seed", "7")
    listed = third.ledger["same_collections"]
    assert [e["out"] for e in listed] == [str(tmp_path / f"a{i}") for i in (1, 2, 4)]
    assert listed[1]["options"]["alpha"] == 0.05 and listed[1]["options"]["protocol"] == "sequential"
    assert listed[2]["options"]["seed"] == 7 and listed[0]["verdict"] == first.verdict
    assert third.ledger["same_published_other_unpublished"] == 1 and third.ledger["entries_total"] == 4
    assert third.ledger["chain_intact"] and len(other_u.ledger["same_collections"]) == 1
    assert second.ledger["entry_sha256"] == read_ledger(tmp_path / LEDGER_FILE)["line_sha256"][1]
    entry = read_ledger(tmp_path / LEDGER_FILE)["entries"][0]
    assert entry["p_value"] == first.p_value and entry["options"]["alpha"] == 0.01
    assert entry["collections"]["published"]["list_sha256"] == first.ledger["published_list_sha256"]
    report = (tmp_path / "a4" / "report.html").read_text()
    assert "3 of them audited these two collections" in report
    assert "1 other audit(s) compared these published images with other unpublished ones" in report
    # --ledger elsewhere; a refused audit appends nothing.
    audit(p_csv, u_csv, tmp_path / "a5", "--ledger", str(tmp_path / "mine.jsonl"))
    assert len(read_ledger(tmp_path / "mine.jsonl")["entries"]) == 1
    refused = runner.invoke(app, ["audit", "--published-features", str(p_csv), "--unpublished-features",
                                  str(u_csv), "--out", str(tmp_path / "a6"), "--alpha", "0.9"])
    assert refused.exit_code == 2 and len(read_ledger(tmp_path / LEDGER_FILE)["entries"]) == 4
    bad = runner.invoke(app, ["audit", "--published-features", str(p_csv), "--unpublished-features", str(u_csv),
                              "--out", str(tmp_path / "a7"), "--ledger", str(tmp_path)])
    assert bad.exit_code == 2 and "is a folder" in bad.output


def test_the_ledger_line_is_json_with_the_options(tables, tmp_path):
    p_csv, u_csv, _ = tables
    audit(p_csv, u_csv, tmp_path / "x")
    line = (tmp_path / LEDGER_FILE).read_text().splitlines()[0]
    data = json.loads(line)
    assert data["kind"] == "cdi.ledger_entry" and "token" not in data["options"]
    assert data["options"]["published_features"] == str(p_csv) and data["verdict"] in ("used", "not_detected")
