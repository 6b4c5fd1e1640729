"""The `vaultsh s3` shell's commands, run through injected output streams (aws-shell style).

Both stores: a LocalStore and an S3Store on the loopback moto server, holding
a run written by the real collector (2 workers, tiny random Llama, real
tokenizer) and an Activault-layout `.saved.pt` run. Expected values come from
the library (commit records, headers, the tokenizer), never typed in.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from vaultsh.errors import StoreError, UserError
from vaultsh.megabatch import read_header, read_megabatch
from vaultsh.run import Run
from vaultsh.shell.app import Shell
from vaultsh.shell.render import preview_text

from .test_shell_fixtures import ACT_HOOK, ACT_UUID, HOOKS, RUN, collector_vault, s3_vault

REPO = Path(__file__).resolve().parent.parent
STORES = pytest.mark.parametrize("kind", ["local", "s3"])


@pytest.fixture(scope="module")
def vault(tmp_path_factory):
    v = collector_vault(tmp_path_factory)
    store = v["store"]
    # junk next to the runs: not megabatches, or broken ones
    good = store.get_bytes(Run(store, RUN).committed_files("mlp_1")[0].key)
    store.put_bytes("junk/notes.txt", b"plain text notes\nsecond line\n")
    store.put_bytes("junk/bad.json", b'{"a": 1,')
    store.put_bytes("junk/random.safetensors", os.urandom(2048))
    store.put_bytes("junk/truncated.safetensors", good[: len(good) // 2])
    # a megabatch that was uploaded but never committed (a crash before the commit record)
    store.put_bytes(f"{RUN}/mlp_1/w0000--0000009.safetensors", good)
    return v


@pytest.fixture(scope="module")
def stores(vault, s3_server, s3_admin):
    return {
        "local": vault["store"],
        "s3": s3_vault(vault, s3_server, s3_admin, f"vaultsh-shell-{uuid.uuid4().hex[:8]}"),
    }


def sh(store, commands: str, cwd: str = "", json_mode: bool = False) -> tuple[int, str, str]:
    """Run `commands` (';'-separated) in batch mode; (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    shell = Shell(store=store, cwd=cwd, stdout=out, stderr=err, json_mode=json_mode, interactive=False)
    rc = shell.run_lines([commands])
    return rc, out.getvalue(), err.getvalue()


def sh_json(store, commands: str, cwd: str = ""):
    rc, out, err = sh(store, commands, cwd, json_mode=True)
    assert rc == 0, err
    return json.loads(out)


def one_error(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def tokenizer(vault):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(vault["model"], local_files_only=True)


# ---------------------------------------------------------------------------
# navigation and listing
# ---------------------------------------------------------------------------


@STORES
def test_ls_root_and_run_summary(stores, vault, kind):
    store = stores[kind]
    rc, out, err = sh(store, "ls")
    assert rc == 0 and err == ""
    assert re.search(rf"^\s+DIR\s+{RUN}/$", out, re.M) and re.search(r"^\s+DIR\s+junk/$", out, re.M), out
    rc, out, err = sh(store, f"cd {RUN}; ls")
    assert rc == 0, err
    tokens = sum(r["tokens"] for r in vault["results"])
    megabatches = sum(r["megabatches"] for r in vault["results"])
    lines = out.splitlines()
    assert [ln.split()[-1] for ln in lines if "DIR" in ln] == ["_vaultsh/", "mlp_1/", "residuals_0/"]  # dirs first
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s+[\d.]+ KiB\s+cfg\.json", out), out
    assert lines[-1] == f"run {RUN}: 2 hooks, {megabatches} megabatches, {tokens:,} tokens (commit records)"
    data = sh_json(store, "ls", cwd=RUN)
    assert data["kind"] == "run" and data["summary"]["megabatches"] == megabatches
    assert data["summary"]["tokens"] == tokens and data["summary"]["workers"] == 2
    cfg = next(e for e in data["entries"] if e["name"] == "cfg.json")
    assert cfg["size"] == store.head(f"{RUN}/cfg.json").size


@STORES
def test_ls_long_numbers_committed_files_and_marks_the_stray(stores, kind):
    store = stores[kind]
    committed = [f.key for f in Run(store, RUN).committed_files("mlp_1")]
    data = sh_json(store, "ls -l", cwd=f"{RUN}/mlp_1")
    notes = {e["key"]: e.get("note") for e in data["entries"]}
    for i, key in enumerate(committed):
        assert notes[key] == f"#{i}"
    assert notes[f"{RUN}/mlp_1/w0000--0000009.safetensors"] == "uncommitted"
    assert data["summary"] == {
        "run": RUN,
        "hook": "mlp_1",
        "megabatches": len(committed),
        "uncommitted": 1,
        "tokens": sum(f.n_tokens for f in Run(store, RUN).committed_files("mlp_1")),
    }
    rc, out, _ = sh(store, "ls -l", cwd=f"{RUN}/mlp_1")
    size = store.head(committed[1]).size
    assert re.search(rf"\s{size:,}\s+{re.escape(committed[1].rsplit('/', 1)[1])}\s+#1$", out, re.M), out


@STORES
def test_cd_pwd_back_and_up(stores, kind):
    store = stores[kind]
    rc, out, err = sh(store, f"cd {RUN}/mlp_1; pwd; cd ..; pwd; cd -; pwd; cd /; pwd; cd {RUN}; cd residuals_0; pwd")
    assert rc == 0, err
    root = store.uri.rstrip("/")
    assert out.splitlines() == [
        f"{root}/{RUN}/mlp_1",
        f"{root}/{RUN}",
        f"{root}/{RUN}/mlp_1",
        f"{root}/",
        f"{root}/{RUN}/residuals_0",
    ]


@STORES
def test_filecount_and_sizecheck_group_by_kind(stores, kind):
    store = stores[kind]
    objects = list(store.iter_objects(f"{RUN}/"))
    run = Run(store, RUN)
    fc = sh_json(store, "filecount", cwd=RUN)
    assert fc["objects"] == len(objects)
    assert fc["hooks"]["mlp_1"]["committed"] == len(run.committed_files("mlp_1"))
    assert fc["hooks"]["mlp_1"]["uncommitted"] == 1 and fc["hooks"]["residuals_0"]["uncommitted"] == 0
    assert fc["metadata"]["files"] == 1 + 2 * len(HOOKS)  # cfg.json + metadata.json, statistics.json per hook
    assert fc["internal"]["files"] == sum(1 for o in objects if "/_vaultsh/" in o.key)
    assert fc["other"]["files"] == 0
    sc = sh_json(store, "sizecheck", cwd=RUN)
    assert sc["bytes"] == sum(o.size for o in objects)
    hook_bytes = sum(o.size for o in objects if o.key.startswith(f"{RUN}/residuals_0/w"))
    assert sc["hooks"]["residuals_0"]["bytes"] == hook_bytes
    rc, out, _ = sh(store, "sizecheck", cwd=RUN)
    assert f"({sc['bytes']:,} bytes) in {len(objects):,} objects" in out.splitlines()[0]
    rc, out, _ = sh(store, "filecount", cwd=RUN)
    assert out.splitlines()[0].endswith(f": {len(objects):,} files")
    assert re.search(r"^\s+mlp_1\s+\d+\s+\+1 uncommitted$", out, re.M), out


# ---------------------------------------------------------------------------
# inspect and friends
# ---------------------------------------------------------------------------


@STORES
def test_inspect_collector_megabatch(stores, vault, kind):
    store = stores[kind]
    files = Run(store, RUN).committed_files("residuals_0")
    key = files[1].key
    header = read_header(store, key)
    mb = read_megabatch(store, key)
    rc, out, err = sh(store, "inspect 1", cwd=f"{RUN}/residuals_0")
    assert rc == 0, err
    n, t, d = mb.states.shape
    assert f"Inspecting file: {store.uri.rstrip('/')}/{key} (#1 of {len(files)} committed)" in out
    assert f"Model: {vault['model']}" in out and "Hook: residuals_0" in out
    assert f"  states: [{n}, {t}, {d}] F32" in out and f"  input_ids: [{n}, {t}] I64" in out
    assert "No NaNs: ✅" in out and "No Infs: ✅" in out
    lo, hi = float(mb.states.min()), float(mb.states.max())
    assert f"Value range: [{lo:.4g}, {hi:.4g}]" in out
    tok = tokenizer(vault)
    first = tok.decode([i for i, m in zip(mb.input_ids[0].tolist(), mb.mask[0].tolist()) if m])
    shown = preview_text(first[:250])
    assert f"Batch 0: {shown}" in out, out
    data = sh_json(store, "inspect 1", cwd=f"{RUN}/residuals_0")
    assert data["header"]["tensors"]["states"]["shape"] == list(header.tensors["states"].shape)
    assert data["scan"]["nan_count"] == 0 and data["scan"]["real_tokens"] == int(mb.mask.sum())
    assert data["preview"][0]["text"] == first[:250]
    assert len(data["preview"]) == min(4, n)


@STORES
def test_inspect_activault_pt_file(stores, kind):
    store = stores[kind]
    key = f"act/{ACT_HOOK}/{ACT_UUID}--2_0.saved.pt"
    mb = read_megabatch(store, key)
    rc, out, err = sh(store, "inspect 2", cwd=f"act/{ACT_HOOK}")
    assert rc == 0, err
    assert "PT File Inspection:" in out and f"Inspecting file: {store.uri.rstrip('/')}/{key} (#2 of 3" in out
    assert "  states: [4, 16, 8] BF16" in out and "  input_ids: [4, 16] I64" in out
    from transformers import AutoTokenizer

    from .modelfixtures import TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    text = preview_text(tok.decode(mb.input_ids[3].tolist())[:250])
    assert f"Batch 3: {text}" in out
    # the same file by name, from elsewhere
    rc2, out2, _ = sh(store, f"inspect /{key} --no-scan", cwd="junk")
    assert rc2 == 0 and "PT File Inspection:" in out2 and "States Tensor Check" not in out2


@STORES
def test_inspect_without_tokenizer_shows_ids(stores, kind):
    store = stores[kind]
    store.put_bytes(
        "notok/cfg.json", json.dumps({"transformer_config": {"model_name": "/nonexistent/tokenizer"}}).encode()
    )
    src = f"act/{ACT_HOOK}/{ACT_UUID}--0_0.saved.pt"
    store.put_bytes(f"notok/{ACT_HOOK}/{ACT_UUID}--0_0.saved.pt", store.get_bytes(src))
    rc, out, err = sh(store, "inspect 0 --no-scan", cwd=f"notok/{ACT_HOOK}")
    assert rc == 0, err
    note = [ln for ln in out.splitlines() if "showing token ids" in ln]
    assert len(note) == 1 and "'/nonexistent/tokenizer'" in note[0] and "showing token ids" in note[0]
    ids = read_megabatch(store, src).input_ids[0].tolist()
    assert f"Batch 0: {' '.join(map(str, ids))}" in out


@STORES
def test_tokens_view_stats_meta_cat(stores, vault, kind):
    store = stores[kind]
    run = Run(store, RUN)
    key = run.committed_files("mlp_1")[0].key
    mb = read_megabatch(store, key)
    data = sh_json(store, "tokens 0 2", cwd=f"{RUN}/mlp_1")
    assert data["input_ids"] == mb.input_ids[2].tolist() and data["mask"] == mb.mask[2].tolist()
    view = sh_json(store, "view 0 2", cwd=f"{RUN}/mlp_1")
    tok = tokenizer(vault)
    assert view["text"] == tok.decode([i for i, m in zip(mb.input_ids[2].tolist(), mb.mask[2].tolist()) if m])
    st = run.read_statistics("mlp_1")
    stats = sh_json(store, "stats mlp_1", cwd=RUN)
    assert stats["count"] == st.count and stats["d_model"] == st.d
    assert stats["std"]["max"] == pytest.approx(float(st.std.max()))
    assert sum(stats["std_histogram"]["counts"]) == st.d
    rc, out, _ = sh(store, "stats", cwd=f"{RUN}/mlp_1")
    assert f"tokens (count): {st.count:,}" in out and "█" in out
    assert sh_json(store, "meta", cwd=f"{RUN}/mlp_1") == run.read_metadata("mlp_1")
    assert sh_json(store, "cat cfg.json", cwd=RUN) == run.read_cfg()
    rc, out, _ = sh(store, "cat junk/notes.txt")
    assert out == "plain text notes\nsecond line\n\n"


@STORES
def test_verify_in_the_shell(stores, kind):
    store = stores[kind]
    data = sh_json(store, "verify", cwd=RUN)
    assert data["ok"] and data["files"] == len(HOOKS) * len(Run(store, RUN).iter_commits())
    assert data["uncommitted"] == 1
    rc, out, _ = sh(store, "verify mlp_1", cwd=RUN)
    assert rc == 0 and out.splitlines()[-1] == f"✅ no problems in {store.uri.rstrip('/')}/{RUN}/mlp_1/"


# ---------------------------------------------------------------------------
# get and rm (batch side; confirmations are in test_shell_prompt.py)
# ---------------------------------------------------------------------------


@STORES
def test_get_file_and_directory(stores, kind, tmp_path):
    store = stores[kind]
    key = Run(store, RUN).committed_files("mlp_1")[0].key
    rc, out, err = sh(store, f"get /{key} {tmp_path}/")
    assert rc == 0, err
    assert (tmp_path / key.rsplit("/", 1)[1]).read_bytes() == store.get_bytes(key)
    rc, out, err = sh(store, f"get -r {RUN}/residuals_0 {tmp_path}/hook")
    assert rc == 0, err
    want = {o.key[len(f"{RUN}/residuals_0/") :]: o for o in store.iter_objects(f"{RUN}/residuals_0/")}
    got = {p.name for p in (tmp_path / "hook").iterdir()}
    assert got == set(want)
    rc, out, err = sh(store, f"get /{key} {tmp_path}/")  # exists now
    one_error(err, "already exists", "get -f")
    assert rc == 2


class ShortReads:
    """A store whose ranged reads come back short: a download cut off mid-transfer."""

    def __init__(self, store):
        self._store = store

    def get_range(self, key, start, length):
        return self._store.get_range(key, start, length)[: max(0, length - 100)]

    def __getattr__(self, name):
        return getattr(self._store, name)


@STORES
def test_truncated_download_leaves_no_file(stores, kind, tmp_path):
    store = stores[kind]
    key = Run(store, RUN).committed_files("mlp_1")[0].key
    rc, out, err = sh(ShortReads(store), f"get /{key} {tmp_path}/")
    assert rc == 2
    one_error(err, "truncated download", key)
    assert list(tmp_path.iterdir()) == []  # no partial file under any name


def test_dotdot_keys_never_escape(stores, tmp_path, s3_admin):
    store = stores["s3"]
    s3_admin.put_object(Bucket=store.bucket, Key="evil/../../escape.txt", Body=b"x")
    target = tmp_path / "dl"
    rc, out, err = sh(store, f"get -r evil {target}")
    assert rc == 2
    one_error(err, "refusing key", "'..'")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path.parent / "escape.txt").exists()
    for kind in ("local", "s3"):
        rc, out, err = sh(stores[kind], "cd ../../..", cwd=RUN)
        one_error(err, "outside the store root")


# ---------------------------------------------------------------------------
# bad input: one clear line, and the shell goes on
# ---------------------------------------------------------------------------


@STORES
def test_bad_input_one_line_and_the_shell_goes_on(stores, kind):
    store = stores[kind]
    out, err = io.StringIO(), io.StringIO()
    shell = Shell(store=store, stdout=out, stderr=err, interactive=False)
    root = store.uri.rstrip("/")
    cases = [
        ("inspcet 0", ["unknown command 'inspcet'", "did you mean 'inspect'"]),
        ("cd nowhere", ["nowhere", "no such directory", f"{root}/nowhere"]),
        (f"cd {RUN}/cfg.json", ["not a directory"]),
        ("inspect 0", ["needs a hook directory"]),
        (f"inspect {RUN}/cfg.json", [f"{root}/{RUN}/cfg.json", "not a safetensors megabatch"]),
        ("inspect junk/random.safetensors", [f"{root}/junk/random.safetensors", "not a"]),
        ("inspect junk/truncated.safetensors", [f"{root}/junk/truncated.safetensors", "truncated"]),
        ("cat junk/bad.json", ["junk/bad.json", "not valid JSON"]),
        ("ls -x", ["unknown option '-x'", "usage: ls"]),
        ("tokens", ["missing <target>"]),
        ('cd "unclosed', ["cannot parse"]),
        (f"rm {RUN}/cfg.json", ["confirmation"]),
    ]
    for line, needles in cases:
        err.seek(0)
        err.truncate()
        cwd = shell.ctx.cwd
        assert shell.execute(line) == 2, line
        one_error(err.getvalue(), *needles)
        assert shell.ctx.cwd == cwd
        out.seek(0)
        out.truncate()
        assert shell.execute("pwd") == 0  # still alive
        assert out.getvalue().strip() == shell.ctx.location()
    assert store.exists(f"{RUN}/cfg.json")  # batch mode never deletes without a typed confirmation


@STORES
def test_index_out_of_range(stores, kind):
    rc, out, err = sh(stores[kind], "inspect 99", cwd=f"{RUN}/mlp_1")
    assert rc == 2
    one_error(err, "index 99 out of range", "0-3")


def test_missing_bucket_and_store_errors(s3_server, monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_server)
    with pytest.raises(StoreError, match="bucket 'vaultsh-no-such-bucket' does not exist"):
        Shell("s3://vaultsh-no-such-bucket/run", stdout=io.StringIO(), stderr=io.StringIO(), interactive=False)
    with pytest.raises(UserError, match=r"'\.\.' is not allowed"):
        Shell("s3://bucket/run/../../x", stdout=io.StringIO(), stderr=io.StringIO(), interactive=False)


# ---------------------------------------------------------------------------
# batch mode through the real command
# ---------------------------------------------------------------------------


def vaultsh(*args, env_extra: dict | None = None, drop: tuple = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1", PYTHONIOENCODING="utf-8")
    for name in ("VAULTSH_DEBUG", "S3_ENDPOINT_URL", *drop):
        env.pop(name, None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "vaultsh", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_batch_mode_exit_codes_and_json(stores, vault, s3_server):
    root = vault["root"]
    s3 = stores["s3"]
    res = vaultsh("s3", root, "-c", f"cd {RUN}/mlp_1; ls; pwd")
    assert res.returncode == 0 and res.stderr == "", res
    assert res.stdout.splitlines()[-1] == f"{root}/{RUN}/mlp_1"
    res = vaultsh("s3", root, "-c", "cd nowhere; pwd")
    assert res.returncode == 2 and res.stdout == ""  # stopped at the first error
    assert res.stderr.splitlines() == [f"error: nowhere: no such directory: {root}/nowhere"]
    res = vaultsh(
        "s3",
        f"s3://{s3.bucket}/{RUN}",
        "--json",
        "-c",
        "filecount; sizecheck",
        env_extra={"S3_ENDPOINT_URL": s3_server},
    )
    assert res.returncode == 0, res
    docs = [json.loads(line) for line in res.stdout.splitlines()]  # one JSON document per command
    objects = list(s3.iter_objects(f"{RUN}/"))
    assert [d["objects"] for d in docs] == [len(objects)] * 2
    assert docs[1]["bytes"] == sum(o.size for o in objects)
    assert docs[0]["uri"] == f"s3://{s3.bucket}/{RUN}/"
    # a hook directory given on the command line opens there; a run's stray problem makes verify exit 1
    bad = root / RUN / "residuals_0"
    victim = sorted(bad.glob("w*.safetensors"))[0]
    saved = victim.read_bytes()
    try:
        victim.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
        res = vaultsh("s3", bad, "-c", "verify")
        assert res.returncode == 1, res
        assert "sha256" in res.stdout and victim.name in res.stdout
    finally:
        victim.write_bytes(saved)


def test_no_credentials_and_missing_bucket_batch(stores, s3_server):
    bucket = stores["s3"].bucket
    creds = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE")
    res = vaultsh(
        "s3",
        f"s3://{bucket}",
        "-c",
        "ls",
        env_extra={"S3_ENDPOINT_URL": s3_server, "VAULTSH_S3_MAX_ATTEMPTS": "1"},
        drop=creds,
    )
    assert res.returncode == 2 and res.stdout == ""
    assert len(res.stderr.splitlines()) == 1 and "no usable AWS credentials" in res.stderr, res.stderr
    res = vaultsh("s3", "s3://vaultsh-no-such-bucket", "-c", "ls", env_extra={"S3_ENDPOINT_URL": s3_server})
    assert res.returncode == 2
    assert (
        res.stderr.strip() == f"vaultsh: error: bucket 'vaultsh-no-such-bucket' does not exist (endpoint {s3_server})"
    )


def test_plain_inspect_is_the_shell_inspect(stores, vault, capsys):
    from vaultsh import cli

    store = stores["local"]
    key = Run(store, RUN).committed_files("mlp_1")[2].key
    res = vaultsh("inspect", vault["root"] / key)
    assert res.returncode == 0, res
    rc, out, _ = sh(store, "inspect 2", cwd=f"{RUN}/mlp_1")
    assert res.stdout == out  # the same text, line for line
    assert cli.main(["inspect", "--json", "--no-scan", str(vault["root"] / key)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "scan" not in doc and doc["header"]["hook"] == "mlp_1" and len(doc["preview"]) == 4
    assert doc["uri"] == f"{vault['root']}/{key}"


def test_torch_is_not_imported_by_ls(vault):
    code = (
        "import sys; from vaultsh.subcommands.s3 import main; "
        f"rc = main([{str(vault['root'])!r}, '-c', 'ls; filecount']); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules)); sys.exit(rc)"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "[]"


def test_a_refreshed_run_summary_reads_only_new_commit_records(tmp_path, monkeypatch):
    """`ls` in a big run that keeps growing: after the cache expires, only new records are read."""
    from vaultsh.run import CommitRecord, FileRecord
    from vaultsh.store import LocalStore

    store = LocalStore(tmp_path / "vault")
    run = Run(store, "grow")
    run.write_metadata("h", {"hook": "h"})

    def commit(i: int) -> None:
        key = run.megabatch_key("h", 0, i)
        store.put_bytes(key, b"x" * 10)
        run.commit(CommitRecord(0, i, i, i + 1, {"h": FileRecord("h", key, 10, None, 1, 4, 0, i)}, tokens=4))

    for i in range(5):
        commit(i)
    reads: list[str] = []
    real = Run.read_commit
    monkeypatch.setattr(Run, "read_commit", lambda self, t: (reads.append(t[2]), real(self, t))[1])
    out, err = io.StringIO(), io.StringIO()
    shell = Shell(store=store, cwd="grow", stdout=out, stderr=err, interactive=False)
    assert shell.run_lines(["ls"]) == 0 and "5 megabatches" in out.getvalue().replace(",", "")
    assert len(reads) == 5
    reads.clear()
    commit(5)
    shell.ctx.run_commits("grow", fresh=True)  # what an expired cache does
    assert reads == [run.commit_key(0, 5)]
    assert shell.run_lines(["ls"]) == 0 and "6 megabatches" in out.getvalue().replace(",", "")
