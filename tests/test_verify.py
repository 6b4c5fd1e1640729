"""`vaultsh verify` (vaultsh/verify.py): runs written by the real collector, then corrupted by hand.

Each corruption works on its own byte-for-byte copy of the collector's run
(commit records name files by hook and file name, so a copied run is a run),
on a LocalStore and on the loopback S3 server.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from vaultsh.errors import NotFoundError
from vaultsh.run import CommitRecord, Run
from vaultsh.verify import covered_batches, verify

from .test_shell_fixtures import HOOKS, RUN, collector_vault, copy_tree, s3_vault

REPO = Path(__file__).resolve().parent.parent
STORES = pytest.mark.parametrize("kind", ["local", "s3"])


@pytest.fixture(scope="module")
def vault(tmp_path_factory):
    return collector_vault(tmp_path_factory)


@pytest.fixture(scope="module")
def stores(vault, s3_server, s3_admin):
    return {
        "local": vault["store"],
        "s3": s3_vault(vault, s3_server, s3_admin, f"vaultsh-verify-{uuid.uuid4().hex[:8]}"),
    }


def fresh_copy(store, name: str | None = None) -> Run:
    name = name or f"copy-{uuid.uuid4().hex[:8]}"
    copy_tree(store, store, f"{RUN}/", f"{name}/")
    return Run(store, name)


def checks(report) -> list[str]:
    return sorted(p.check for p in report.problems)


@STORES
def test_clean_collector_run(stores, vault, kind):
    store = stores[kind]
    run = Run(store, RUN)
    commits = run.iter_commits()
    assert {c.worker for c in commits} == {0, 1}  # two workers shared the data stream
    report = verify(store, RUN)
    assert report.ok, report.problems
    assert report.records == len(commits) == sum(r["megabatches"] for r in vault["results"])
    assert report.files == report.hashed == len(commits) * len(HOOKS)
    assert report.bytes_hashed == sum(f.size for c in commits for f in c.files.values())
    # the workers' records together cover every global batch exactly once
    n_runs = run.read_cfg()["num_runs"]
    batches = sorted(b for c in commits for b in covered_batches(c, n_runs))
    assert batches == list(range(sum(r["batches"] for r in vault["results"])))
    scanned = verify(store, f"{RUN}/mlp_1", nan=True)
    assert scanned.ok and scanned.hooks == 1 and scanned.scanned == len(commits)


@STORES
def test_activault_run_without_records(stores, kind):
    report = verify(stores[kind], "act")
    assert report.ok and report.files == 3 and report.no_checksum == 3 and report.hashed == 0


@STORES
def test_wrong_size_and_flipped_byte(stores, kind):
    store = stores[kind]
    run = fresh_copy(store)
    files = run.committed_files("mlp_1")
    grown, flipped = files[0], files[1]
    store.put_bytes(grown.key, store.get_bytes(grown.key) + b"\0" * 16)
    data = bytearray(store.get_bytes(flipped.key))
    data[-5] ^= 0x40  # inside the data section: the header still parses
    store.put_bytes(flipped.key, bytes(data))
    report = verify(store, run.name)
    by_file = {}
    for p in report.problems:
        by_file.setdefault(p.uri.rsplit("/", 1)[1], []).append(p.check)
    assert sorted(by_file[flipped.name]) == ["sha256"]
    assert {"size", "sha256", "header"} <= set(by_file[grown.name])
    size = next(p for p in report.problems if p.check == "size")
    assert size.detail == f"{grown.size + 16:,} bytes stored, the commit record says {grown.size:,}"
    assert len(by_file) == 2 and report.exit_code == 1


@STORES
def test_shape_mismatch_with_metadata(stores, kind):
    store = stores[kind]
    run = fresh_copy(store)
    meta = run.read_metadata("residuals_0")
    meta["shape"] = [meta["shape"][0], meta["shape"][1], meta["shape"][2] * 2]
    run.write_metadata("residuals_0", meta)
    report = verify(store, run.name)
    assert set(checks(report)) == {"shape"}
    assert len(report.problems) == len(run.iter_commits())  # every residuals_0 file, no mlp_1 file
    assert all("/residuals_0/" in p.uri and "do not match metadata.json shape" in p.detail for p in report.problems)


@STORES
def test_missing_file_and_broken_record(stores, kind):
    store = stores[kind]
    run = fresh_copy(store)
    commits = run.iter_commits()
    gone = commits[0].files["mlp_1"]
    store.delete(gone.key)
    store.put_bytes(run.commit_key(commits[-1].worker, commits[-1].index), b'{"format": "vaultsh-commit", ')
    report = verify(store, run.name)
    assert checks(report) == ["missing", "records"]
    missing = next(p for p in report.problems if p.check == "missing")
    assert missing.uri == store.child_uri(gone.key)
    # the broken record hides its files, the others are still checked
    assert report.files == (len(commits) - 1) * len(HOOKS)


@STORES
def test_commit_chunks_that_differ_from_their_records(stores, kind):
    """Readers take a chunk's copy of a record when the sizes match: verify compares every copy."""
    store = stores[kind]
    run = fresh_copy(store)
    commits = [c for c in run.iter_commits() if c.worker == 0]
    key = run.write_commit_chunk(commits[:2])
    assert verify(store, run.name).problems == []
    doc = json.loads(store.get_bytes(key))
    doc["records"][1]["record"]["batch_end"] += 10 if doc["records"][1]["record"]["batch_end"] < 90 else -10
    store.put_bytes(key, json.dumps(doc).encode())  # the copy changed, its recorded size not: readers would take it
    report = verify(store, run.name)
    assert checks(report) == ["chunks"] and "differs from the record" in report.problems[0].detail
    assert report.problems[0].uri == store.child_uri(key)
    store.put_bytes(key, b"not json")
    assert checks(verify(store, run.name)) == ["chunks"]


@STORES
def test_overlapping_shards(stores, kind):
    store = stores[kind]
    run = fresh_copy(store)
    commits = run.iter_commits()
    a = next(c for c in commits if c.worker == 0 and c.index == 1)
    # worker 0 stored the same batches again as megabatch 7 (a resumed run that forgot its records)
    files = {}
    for hook, f in a.files.items():
        key = run.megabatch_key(hook, 0, 7)
        store.put_bytes(key, store.get_bytes(f.key))
        files[hook] = replace(f, key=key, worker=0, index=7)
    run.commit(
        CommitRecord(worker=0, index=7, batch_start=a.batch_start, batch_end=a.batch_end, files=files, tokens=a.tokens)
    )
    report = verify(store, run.name)
    assert checks(report) == ["overlap"] * len(HOOKS)
    n_runs = run.read_cfg()["num_runs"]
    shared = list(covered_batches(a, n_runs))
    p = next(p for p in report.problems if p.uri.endswith("/mlp_1"))
    assert "w0000--0000001.safetensors and w0000--0000007.safetensors" in p.detail
    assert (
        f"global batches {shared[0]}, {shared[1]}" in p.detail or f"global batches {shared[0]}-{shared[1]}" in p.detail
    )
    # a hook directory alone reports only its own overlap
    assert checks(verify(store, f"{run.name}/mlp_1")) == ["overlap"]


@STORES
def test_record_on_another_workers_batches(stores, kind):
    store = stores[kind]
    run = fresh_copy(store)
    c = next(c for c in run.iter_commits() if c.worker == 1 and c.index == 0)
    store.put_bytes(
        run.commit_key(1, 0),
        json.dumps({**c.to_dict(), "batch_start": c.batch_start - 1, "batch_end": c.batch_end - 1}).encode(),
    )
    report = verify(store, run.name)
    assert set(checks(report)) == {"records"}
    first = report.problems[0]
    assert first.uri == store.child_uri(run.commit_key(1, 0))
    assert (
        first.detail
        == f"batch range [{c.batch_start - 1}, {c.batch_end - 1}) does not start and end on batches of worker 1 (of 2 workers)"
    )
    # each of its files: the header's batch range and the sequence count disagree with the record
    per_file = [p for p in report.problems[1:] if "w0001--0000000" in p.uri]
    assert len(per_file) == 2 * len(HOOKS)
    assert any("the header holds batches" in p.detail for p in per_file)


@STORES
def test_nan_scan_is_optional(stores, kind):
    from vaultsh.megabatch import read_megabatch, write_megabatch

    store = stores[kind]
    run = fresh_copy(store)
    c = run.iter_commits()[0]
    f = c.files["mlp_1"]
    mb = read_megabatch(store, f.key)
    states = mb.states.clone()
    states[0, 1, 2] = float("nan")
    states[1, 0, 0] = float("inf")
    write_megabatch(store, f.key, states, mb.input_ids, mb.mask, metadata=mb.header.metadata)
    data = store.get_bytes(f.key)
    rec = c.to_dict()
    rec["files"]["mlp_1"].update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    store.put_bytes(run.commit_key(c.worker, c.index), json.dumps(rec).encode())
    assert verify(store, run.name).ok  # consistent records: only a scan can tell
    report = verify(store, run.name, nan=True)
    assert checks(report) == ["nan"]
    assert report.problems[0].detail == "1 NaN and 1 Inf values in states"


def test_one_screen_report_and_json(stores):
    store = stores["local"]
    run = fresh_copy(store)
    meta = run.read_metadata("mlp_1")
    meta["shape"][1] += 1
    run.write_metadata("mlp_1", meta)
    for f in run.committed_files("residuals_0"):
        store.put_bytes(f.key, store.get_bytes(f.key)[:-3] + b"xyz")
    report = verify(store, run.name)
    n = len(report.problems)
    assert n == 2 * len(run.iter_commits())
    lines = [text for _, text in report.lines(limit=3)]
    assert len(lines) == 3 + 3 and lines[3] == f"   ... and {n - 3:,} more (--json lists them all)"
    assert lines[-1].startswith(f"❌ {n} problems in ") and "shape mismatches" in lines[-1]
    doc = report.to_json()
    assert doc["ok"] is False and len(doc["problems"]) == n
    assert doc["problem_counts"] == {"shape": n // 2, "sha256": n // 2}
    counts = ["runs", "hooks", "files", "records", "hashed", "bytes_hashed", "no_checksum", "scanned", "uncommitted"]
    assert list(doc) == ["uri", "ok", *counts, "problem_counts", "problems"]


def test_nothing_to_verify(stores):
    with pytest.raises(NotFoundError, match="no run at or under"):
        verify(stores["local"], "junk-that-is-not-there")


def vaultsh(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vaultsh", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
    )


def test_verify_command_exit_codes(stores, vault):
    store = stores["local"]
    root = vault["root"]
    ok = vaultsh("verify", root / RUN)
    assert ok.returncode == 0, ok
    assert ok.stdout.splitlines()[-1] == f"✅ no problems in {root / RUN}/"
    run = fresh_copy(store)
    victim = run.committed_files("mlp_1")[0]
    store.delete(victim.key)
    bad = vaultsh("verify", "--json", root / run.name)
    assert bad.returncode == 1, bad
    doc = json.loads(bad.stdout)
    assert [(p["check"], p["uri"]) for p in doc["problems"]] == [("missing", str(root / victim.key))]
    text = vaultsh("verify", root / run.name)
    assert text.returncode == 1 and f"❌ missing  {root / victim.key}: named by a commit record" in text.stdout
    usage = vaultsh("verify", root / "no-such-run")
    assert usage.returncode == 2 and usage.stderr.startswith("vaultsh: error: ") and len(usage.stderr.splitlines()) == 1
    threads = vaultsh("verify", "--threads", "0", root / RUN)
    assert threads.returncode == 2 and "--threads 0" in threads.stderr


def test_verify_core_imports_no_shell_toolkit():
    code = (
        "import sys, vaultsh.verify; "
        "print(sorted(m for m in ('prompt_toolkit', 'textual', 'torch') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr
