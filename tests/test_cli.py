"""The real `vaultsh` command, run in subprocesses, on a local store and on S3 (moto on loopback).

Runs are written with the library (vaultsh.run / vaultsh.megabatch), then read
back only through the CLI. Most invocations are independent, so one
module-scoped fixture starts them all at once and the tests look at the
results; the two that cannot share the server (credentials switched on, an
unreachable endpoint) run on their own.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from vaultsh import cli
from vaultsh.testing.faultproxy import free_port

from .test_store import moto_auth

REPO = Path(__file__).resolve().parent.parent
HOOKS = ["residuals_0", "mlp_1"]
N, T, D = 4, 8, 16
N_COMMITTED = 3
NAN_INDEX, CLEAN_INDEX = 1, 2


@dataclass
class Result:
    args: tuple
    rc: int
    out: str
    err: str
    seconds: float

    def __str__(self) -> str:  # shown when an assertion fails
        return (
            f"vaultsh {' '.join(map(str, self.args))} -> rc={self.rc}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"
        )


def base_env(**extra: str) -> dict:
    env = dict(os.environ)  # the session's fake AWS credentials and config paths
    env.update(COLUMNS="200", PYTHONIOENCODING="utf-8", NO_COLOR="1")
    for name in ("VAULTSH_DEBUG", "S3_ENDPOINT_URL", "VAULTSH_S3_MAX_ATTEMPTS"):
        env.pop(name, None)
    env.update(extra)
    return env


def vaultsh(*args, env: dict | None = None, cmd: list[str] | None = None, timeout: float = 120) -> Result:
    cmd = cmd or [sys.executable, "-m", "vaultsh"]
    t0 = time.monotonic()
    proc = subprocess.run(
        [*cmd, *map(str, args)],
        cwd=REPO,
        env=env or base_env(),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
    )
    return Result(tuple(args), proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)


def assert_user_error(res: Result, *needles: str) -> str:
    """Exit 2, exactly one stderr line `vaultsh: error: ...` naming `needles`, no traceback."""
    assert res.rc == 2, res
    assert "Traceback" not in res.out + res.err, res
    lines = res.err.splitlines()
    assert len(lines) == 1, res
    line = lines[0]
    assert line.startswith("vaultsh: error: "), res
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert res.out.strip() == "", res
    return line


# ---------------------------------------------------------------------------
# a small run, written with the library
# ---------------------------------------------------------------------------


def build_run(store, run_name: str = "myrun") -> dict:
    """cfg.json, 2 hooks with metadata.json, 3 committed megabatches, 1 uncommitted stray.

    Megabatch NAN_INDEX of mlp_1 holds one NaN and one Inf; every other is finite.
    """
    import torch

    from vaultsh.megabatch import write_megabatch
    from vaultsh.run import CommitRecord, FileRecord, Run, metadata_for

    run = Run(store, run_name)
    cfg = {"run_name": run_name, "model": "tiny-llama", "hooks": HOOKS, "nested": {"seq_len": T, "ok": True}}
    run.write_cfg(cfg)
    for h in HOOKS:
        run.write_metadata(
            h, metadata_for(batch_size=2, sequence_length=T, d_in=D, batches_per_file=2, hook=h, model="tiny-llama")
        )
    g = torch.Generator().manual_seed(0)
    for i in range(N_COMMITTED):
        files = {}
        for h in HOOKS:
            states = torch.randn(N, T, D, generator=g)
            if i == NAN_INDEX and h == "mlp_1":
                states[0, 0, 0] = float("nan")
                states[1, 2, 3] = float("inf")
            key = run.megabatch_key(h, 0, i)
            size = write_megabatch(
                store,
                key,
                states,
                torch.randint(0, 100, (N, T), generator=g),
                metadata={"model": "tiny-llama", "hook": h, "run": run_name, "worker": 0, "index": i},
            )
            files[h] = FileRecord(hook=h, key=key, size=size, n_sequences=N, n_tokens=N * T, worker=0, index=i)
        run.commit(CommitRecord(worker=0, index=i, batch_start=2 * i, batch_end=2 * i + 2, files=files, tokens=N * T))
    # a megabatch whose commit never happened (a crash between upload and commit)
    stray = run.megabatch_key("mlp_1", 0, N_COMMITTED)
    write_megabatch(store, stray, torch.randn(N, T, D, generator=g), torch.zeros(N, T, dtype=torch.long))
    good = store.get_bytes(run.megabatch_key("residuals_0", 0, 0))
    store.put_bytes("junk/deeper/truncated.safetensors", good[: len(good) // 3])
    return {"run": run, "cfg": cfg, "stray": stray}


class Payload:
    """Unpickling this runs a shell command: the attack a `.saved.pt` in a bucket could carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def local_root(tmp_path_factory) -> Path:
    from vaultsh.store.local import LocalStore

    root = tmp_path_factory.mktemp("cli") / "vault"
    build_run(LocalStore(root))
    return root


@pytest.fixture(scope="module")
def s3_root(s3_server, s3_admin) -> str:
    import uuid

    from vaultsh.store.s3 import S3Store

    bucket = f"vaultsh-cli-{uuid.uuid4().hex[:10]}"
    s3_admin.create_bucket(Bucket=bucket)
    build_run(S3Store(bucket, endpoint_url=s3_server))
    return f"s3://{bucket}"


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """Files that are not megabatches, and the marker a malicious pickle would create."""
    import torch

    d = tmp_path_factory.mktemp("foreign")
    rnd = d / "random.safetensors"
    rnd.write_bytes(os.urandom(4096))
    markers = {"pickle": d / "PWNED-pickle", "torch": d / "PWNED-torch"}
    (d / "evil.saved.pt").write_bytes(pickle.dumps({"states": Payload(markers["pickle"])}, protocol=2))
    torch.save({"states": Payload(markers["torch"]), "input_ids": torch.zeros(2, 2)}, d / "evil-zip.saved.pt")
    cfg = (REPO / "configs" / "default.yaml").read_text()
    assert "batch_size: 4" in cfg and "uri: ./vault" in cfg
    bad = cfg.replace("batch_size: 4", "batch_size: 0").replace("uri: ./vault", f"uri: {d / 'collect-vault'}")
    (d / "bad.yaml").write_text(bad)
    return {"dir": d, "markers": markers}


@pytest.fixture(scope="module")
def results(local_root, s3_root, s3_server, foreign) -> dict:
    """Every independent invocation, run concurrently; name -> Result."""
    s3_env = base_env(S3_ENDPOINT_URL=s3_server)
    mb = lambda hook, i: f"{hook}/w0000--{i:07d}.safetensors"  # noqa: E731
    jobs: dict[str, tuple] = {
        "help": (("--help",), None, None),
        "help-script": (("--help",), None, [sys.executable, "vaultsh.py"]),
    }
    for kind, root, env in (("local", str(local_root), base_env()), ("s3", s3_root, s3_env)):
        run = f"{root}/myrun"
        jobs.update(
            {
                f"{kind}-run": ((("inspect", run)), env, None),
                f"{kind}-run-json": (("inspect", "--json", run), env, None),
                f"{kind}-hook": (("inspect", f"{run}/mlp_1"), env, None),
                f"{kind}-mb": (("inspect", f"{run}/{mb('residuals_0', 0)}"), env, None),
                f"{kind}-scan-nan": (("inspect", "--scan", f"{run}/{mb('mlp_1', NAN_INDEX)}"), env, None),
                f"{kind}-scan-clean": (("inspect", "--scan", f"{run}/{mb('mlp_1', CLEAN_INDEX)}"), env, None),
                f"{kind}-cfg": (("inspect", f"{run}/cfg.json"), env, None),
                f"{kind}-truncated": (("inspect", f"{root}/junk/deeper/truncated.safetensors"), env, None),
                f"{kind}-missing": (("inspect", f"{run}/no-such-hook"), env, None),
                f"{kind}-root": (("inspect", "--json", root), env, None),
            }
        )
    d = foreign["dir"]
    jobs.update(
        {
            "no-bucket": (("inspect", "s3://vaultsh-no-such-bucket/run"), s3_env, None),
            "dotdot": (("inspect", f"{s3_root}/../etc/passwd"), s3_env, None),
            "random": (("inspect", d / "random.safetensors"), None, None),
            "pickle": (("inspect", d / "evil.saved.pt"), None, None),
            "torch-pickle": (("inspect", d / "evil-zip.saved.pt"), None, None),
            "missing-path": (("inspect", d / "does-not-exist"), None, None),
            "collect-bad": (("collect", "--headless", d / "bad.yaml"), None, None),
        }
    )
    with ThreadPoolExecutor(max_workers=max(4, 2 * (os.cpu_count() or 2))) as pool:
        futures = {name: pool.submit(vaultsh, *args, env=env, cmd=cmd) for name, (args, env, cmd) in jobs.items()}
        out = {name: f.result() for name, f in futures.items()}
    if os.environ.get("VAULTSH_TEST_TIMES"):
        for name, r in sorted(out.items(), key=lambda kv: -kv[1].seconds)[:8]:
            print(f"{r.seconds:6.2f}s {name}", file=sys.stderr)
    return out


# ---------------------------------------------------------------------------
# help and the subcommand registry
# ---------------------------------------------------------------------------


def test_help_lists_every_subcommand(results):
    res = results["help"]
    assert res.rc == 0 and res.err == "", res
    listed = re.findall(r"^    (\w+)\s", res.out, re.M)
    for name in ("collect", "s3", "inspect", "export", "launch", "verify", "bench", "plan", "finalize", "watch"):
        assert name in listed, res
    assert listed.index("collect") < listed.index("s3") < listed.index("inspect")


def test_vaultsh_py_behaves_like_the_command(results):
    a, b = results["help"], results["help-script"]
    assert b.rc == a.rc == 0
    assert b.out == a.out and b.err == a.err


def test_every_listed_subcommand_has_its_module():
    for name in cli.COMMANDS:
        module = cli.command_module(name)
        assert callable(module.add_arguments) and callable(module.run), name


# ---------------------------------------------------------------------------
# inspect, on both stores
# ---------------------------------------------------------------------------

STORES = pytest.mark.parametrize("kind", ["local", "s3"])


def _table_row(out: str, first_cell: str) -> list[str]:
    for line in out.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r} in:\n{out}")


@STORES
def test_inspect_run_human(results, kind):
    res = results[f"{kind}-run"]
    assert res.rc == 0 and "Traceback" not in res.err, res
    assert "myrun" in res.out
    for hook in HOOKS:
        row = _table_row(res.out, hook)
        assert row[1] == str(N_COMMITTED), row
        assert row[3] == str(N_COMMITTED * N * T), row
    assert _table_row(res.out, "mlp_1")[4] == "1"  # the stray megabatch
    assert _table_row(res.out, "residuals_0")[4] == ""


@STORES
def test_inspect_run_json(results, kind, local_root, s3_root):
    res = results[f"{kind}-run-json"]
    assert res.rc == 0, res
    data = json.loads(res.out)
    root = str(local_root) if kind == "local" else s3_root
    assert data["uri"] == f"{root}/myrun"
    assert sorted(data["hooks"]) == sorted(HOOKS)
    assert data["megabatches"] == N_COMMITTED
    assert data["files"] == N_COMMITTED * len(HOOKS)
    assert data["tokens"] == N_COMMITTED * N * T
    assert data["has_commit_records"] is True and data["workers"] == [0]
    for hook in HOOKS:
        h = data["hooks"][hook]
        assert h["megabatches"] == N_COMMITTED and h["tokens"] == N_COMMITTED * N * T
    assert data["hooks"]["mlp_1"]["uncommitted"] == 1
    assert data["hooks"]["mlp_1"]["uncommitted_files"] == [f"{root}/myrun/mlp_1/w0000--{N_COMMITTED:07d}.safetensors"]
    assert data["hooks"]["residuals_0"]["uncommitted"] == 0


@STORES
def test_inspect_hook_lists_committed_files(results, kind):
    res = results[f"{kind}-hook"]
    assert res.rc == 0, res
    assert f"{N_COMMITTED} committed megabatches" in res.out
    for i in range(N_COMMITTED):
        row = _table_row(res.out, str(i))
        assert row[1] == f"w0000--{i:07d}.safetensors" and row[3] == str(N * T) and row[4] == "0"
    stray = f"w0000--{N_COMMITTED:07d}.safetensors"
    assert "1 uncommitted" in res.out and stray in res.out
    with pytest.raises(AssertionError):
        _table_row(res.out, str(N_COMMITTED))  # the stray is no row of the committed table


@STORES
def test_inspect_megabatch_header(results, kind):
    res = results[f"{kind}-mb"]
    assert res.rc == 0, res
    assert "Model: tiny-llama" in res.out and "Hook: residuals_0" in res.out
    assert re.search(rf"states: \[{N}, {T}, {D}\] F32", res.out), res
    assert re.search(rf"input_ids: \[{N}, {T}\] I64", res.out), res
    assert re.search(rf"mask: \[{N}, {T}\] BOOL", res.out), res
    assert "format=vaultsh.megabatch" in res.out and "run=myrun" in res.out


@STORES
def test_inspect_scan_reports_nan_and_inf(results, kind):
    dirty, clean = results[f"{kind}-scan-nan"], results[f"{kind}-scan-clean"]
    assert dirty.rc == 0 and clean.rc == 0, (dirty, clean)
    assert "No NaNs: ❌ (1)" in dirty.out and "No Infs: ❌ (1)" in dirty.out, dirty
    assert "No NaNs: ✅" in clean.out and "No Infs: ✅" in clean.out, clean
    assert "❌" not in clean.out
    for res in (dirty, clean):
        assert re.search(r"Value range: \[-?\d", res.out), res  # over the finite values only


@STORES
def test_inspect_json_file_pretty_prints(results, kind):
    res = results[f"{kind}-cfg"]
    assert res.rc == 0, res
    assert json.loads(res.out) == {
        "run_name": "myrun",
        "model": "tiny-llama",
        "hooks": HOOKS,
        "nested": {"seq_len": T, "ok": True},
    }
    assert len(res.out.splitlines()) > 5  # indented, not one line


@STORES
def test_inspect_store_root_lists_runs(results, kind, local_root, s3_root):
    res = results[f"{kind}-root"]
    assert res.rc == 0, res
    root = str(local_root) if kind == "local" else s3_root
    data = json.loads(res.out)
    assert data["uri"] == root
    assert data["prefixes"] == [f"{root}/junk/", f"{root}/myrun/"]


# ---------------------------------------------------------------------------
# bad input: one line, exit 2, no traceback
# ---------------------------------------------------------------------------


@STORES
def test_truncated_megabatch(results, kind, local_root, s3_root):
    root = str(local_root) if kind == "local" else s3_root
    line = assert_user_error(results[f"{kind}-truncated"], f"{root}/junk/deeper/truncated.safetensors")
    assert "truncated" in line


@STORES
def test_missing_object_in_a_run(results, kind, local_root, s3_root):
    res = results[f"{kind}-missing"]
    if kind == "local":
        assert_user_error(res, f"{local_root}/myrun/no-such-hook", "no such file or directory")
    else:
        assert_user_error(res, f"{s3_root}/myrun/no-such-hook", "nothing stored there")


def test_missing_bucket(results, s3_server):
    assert_user_error(results["no-bucket"], "bucket 'vaultsh-no-such-bucket' does not exist", s3_server)


def test_dotdot_key(results, s3_root):
    assert_user_error(results["dotdot"], f"{s3_root}/../etc/passwd", "'..' is not allowed")


def test_missing_local_path(results, foreign):
    assert_user_error(results["missing-path"], str(foreign["dir"] / "does-not-exist"), "no such file or directory")


def test_foreign_bytes_named_safetensors(results, foreign):
    path = str(foreign["dir"] / "random.safetensors")
    line = assert_user_error(results["random"], path)
    assert "not a safetensors megabatch" in line or "not a megabatch" in line, line


def test_malicious_pickle_is_refused_and_never_runs(results, foreign):
    for name, file in (("pickle", "evil.saved.pt"), ("torch-pickle", "evil-zip.saved.pt")):
        line = assert_user_error(results[name], str(foreign["dir"] / file))
        assert "refused" in line, line
    for marker in foreign["markers"].values():
        assert not marker.exists(), "the pickle's payload ran"
    # the payload is live: unpickling it for real does create the marker
    pickle.loads((foreign["dir"] / "evil.saved.pt").read_bytes())
    assert foreign["markers"]["pickle"].exists()


def test_collect_config_error_names_the_field(results, foreign):
    line = assert_user_error(results["collect-bad"], "data_config.batch_size", "bad.yaml")
    assert "0" in line
    assert not (foreign["dir"] / "collect-vault").exists()


def test_rejected_credentials(s3_server, s3_root):
    import boto3

    iam = boto3.client("iam", endpoint_url=s3_server, region_name="us-east-1")
    user = f"cli-{s3_root[len('s3://') :]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    secret = "not-the-" + key["SecretAccessKey"]
    env = base_env(
        S3_ENDPOINT_URL=s3_server,
        AWS_ACCESS_KEY_ID=key["AccessKeyId"],
        AWS_SECRET_ACCESS_KEY=secret,
        VAULTSH_S3_MAX_ATTEMPTS="2",
    )
    env.pop("AWS_SESSION_TOKEN", None)
    env.pop("AWS_SECURITY_TOKEN", None)
    with moto_auth(s3_server):
        runs = [
            vaultsh("inspect", f"{s3_root}/myrun", env=env),
            vaultsh("inspect", f"{s3_root}/myrun/mlp_1/w0000--0000000.safetensors", env=env),
        ]
    for res in runs:
        line = assert_user_error(res, s3_root, "credentials", "AWS_ACCESS_KEY_ID")
        assert "rejected" in line, line
        assert secret not in res.out + res.err
        assert key["SecretAccessKey"] not in res.out + res.err


def test_unreachable_endpoint_fails_fast(s3_root):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = base_env(S3_ENDPOINT_URL=endpoint, VAULTSH_S3_MAX_ATTEMPTS="1")
    res = vaultsh("inspect", f"{s3_root}/myrun", env=env, timeout=60)  # no retry loop: a hang fails here
    assert_user_error(res, f"cannot reach S3 endpoint {endpoint}", f"{s3_root}/myrun")


def test_bad_max_attempts_setting(s3_root, s3_server):
    res = vaultsh(
        "inspect", f"{s3_root}/myrun", env=base_env(S3_ENDPOINT_URL=s3_server, VAULTSH_S3_MAX_ATTEMPTS="zero")
    )
    assert_user_error(res, "VAULTSH_S3_MAX_ATTEMPTS", "'zero'")


# ---------------------------------------------------------------------------
# environment helpers (in process)
# ---------------------------------------------------------------------------


def test_default_s3_uri(monkeypatch):
    from vaultsh.errors import UserError
    from vaultsh.store import default_s3_uri

    monkeypatch.delenv("S3_BUCKET_NAME", raising=False)
    with pytest.raises(UserError, match=r"^set S3_BUCKET_NAME or give an s3:// URI$"):
        default_s3_uri()
    monkeypatch.setenv("S3_BUCKET_NAME", "  ")
    with pytest.raises(UserError):
        default_s3_uri()
    for value in ("my-bucket", "s3://my-bucket", "s3://my-bucket/"):
        monkeypatch.setenv("S3_BUCKET_NAME", value)
        assert default_s3_uri() == "s3://my-bucket"


def test_max_attempts_from_env(monkeypatch):
    from vaultsh.errors import UserError
    from vaultsh.store import open_store

    monkeypatch.delenv("VAULTSH_S3_MAX_ATTEMPTS", raising=False)
    assert open_store("s3://some-bucket").max_attempts == 8  # S3Store's default
    monkeypatch.setenv("VAULTSH_S3_MAX_ATTEMPTS", "2")
    st = open_store("s3://some-bucket/pre")
    assert st.max_attempts == 2 and st.prefix == "pre"
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv("VAULTSH_S3_MAX_ATTEMPTS", bad)
        with pytest.raises(UserError, match="VAULTSH_S3_MAX_ATTEMPTS"):
            open_store("s3://some-bucket")


def test_error_lines_are_single_printable_lines(tmp_path, capsys, monkeypatch):
    from vaultsh import cli
    from vaultsh.errors import UserError

    def boom(args):
        raise UserError("key 'a\nb\x1b[31m' is bad")

    parser_func = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser_func(), boom))
    assert cli.main(["inspect", "x"]) == 2
    err = capsys.readouterr().err
    assert err == "vaultsh: error: key 'a b\\x1b[31m' is bad\n"

    def denied(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "f"))

    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser_func(), denied))
    assert cli.main(["inspect", "x"]) == 2
    assert capsys.readouterr().err == f"vaultsh: error: {tmp_path / 'f'}: Permission denied\n"


def _with_func(parser, func):
    parser.set_defaults(func=func)
    for action in parser._subparsers._group_actions:  # the subcommand parsers carry their own default
        for sub in action.choices.values():
            sub.set_defaults(func=func)
    return parser
