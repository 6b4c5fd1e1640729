"""The Store protocol, run on both LocalStore and S3Store (a real S3 endpoint on loopback)."""

from __future__ import annotations

import io
import os
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest

from vaultsh.errors import NotFoundError, StoreError, UserError
from vaultsh.store import LocalStore, Store, open_store
from vaultsh.store.s3 import S3Store
from vaultsh.testing.faultproxy import FaultProxy, free_port

MiB = 1 << 20


def payload(n: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-ish bytes (so misplaced ranges/parts are caught)."""
    block = bytes((i * 131 + seed * 7 + (i >> 8)) & 0xFF for i in range(65521))
    reps = n // len(block) + 1
    return (block * reps)[:n]


def keys(infos) -> list[str]:
    return [i.key for i in infos]


# ---------------------------------------------------------------------------
# The protocol, on both stores
# ---------------------------------------------------------------------------


def test_is_a_store(store):
    assert isinstance(store, Store)
    assert store.uri
    assert store.child_uri("a/b.bin").endswith("a/b.bin")
    assert store.child_uri("a/b.bin").startswith(store.uri)


def test_put_get_bytes(store):
    store.put_bytes("a/b/c.bin", b"hello")
    store.put_bytes("ba.bin", bytearray(b"\x00\x01\x02"))
    store.put_bytes("mv.bin", memoryview(b"0123456789")[2:5])
    store.put_bytes("empty.bin", b"")
    assert store.get_bytes("a/b/c.bin") == b"hello"
    assert store.get_bytes("ba.bin") == b"\x00\x01\x02"
    assert store.get_bytes("mv.bin") == b"234"
    assert store.get_bytes("empty.bin") == b""
    # keys are normalized: './' and doubled slashes address the same object
    assert store.get_bytes("./a//b/c.bin") == b"hello"


def test_put_file_get_file_roundtrip(store, tmp_path):
    data = payload(300_000, seed=1)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    store.put_file("files/src.bin", src)
    dest = tmp_path / "out" / "deeper" / "dest.bin"
    store.get_file("files/src.bin", dest)
    assert dest.read_bytes() == data
    assert store.get_bytes("files/src.bin") == data


def test_put_stream(store):
    def writer(f):
        for i in range(5):
            f.write(payload(10_000, seed=i))

    store.put_stream("s/stream.bin", writer)
    assert store.get_bytes("s/stream.bin") == b"".join(payload(10_000, seed=i) for i in range(5))


def test_put_stream_writer_error_stores_nothing(store):
    store.put_bytes("keep/old.bin", b"old")

    def bad(f):
        f.write(b"partial data")
        raise RuntimeError("writer crashed")

    with pytest.raises(RuntimeError, match="writer crashed"):
        store.put_stream("keep/new.bin", bad)
    with pytest.raises(RuntimeError):
        store.put_stream("keep/old.bin", bad)
    assert not store.exists("keep/new.bin")
    assert store.get_bytes("keep/old.bin") == b"old"  # a failed overwrite keeps the old object
    assert keys(store.iter_objects()) == ["keep/old.bin"]
    assert keys(store.list_dir("keep").objects) == ["keep/old.bin"]


def test_overwrite_replaces(store):
    store.put_bytes("x.bin", payload(5000))
    store.put_bytes("x.bin", b"short")
    assert store.get_bytes("x.bin") == b"short"
    assert store.head("x.bin").size == 5
    assert keys(store.iter_objects()) == ["x.bin"]


def test_get_range(store):
    data = payload(1000, seed=3)
    store.put_bytes("r.bin", data)
    assert store.get_range("r.bin", 0, 10) == data[:10]
    assert store.get_range("r.bin", 123, 456) == data[123:579]
    assert store.get_range("r.bin", 990, 50) == data[990:]  # fewer at the end
    assert store.get_range("r.bin", 999, 1) == data[999:]
    assert store.get_range("r.bin", 1000, 10) == b""  # starts at the end
    assert store.get_range("r.bin", 5000, 10) == b""  # starts past the end
    assert store.get_range("r.bin", 10, 0) == b""
    assert store.get_range("r.bin", 0, 1000) == data


def test_get_range_rejects_negative(store):
    store.put_bytes("r.bin", b"abc")
    with pytest.raises(StoreError):
        store.get_range("r.bin", -1, 2)
    with pytest.raises(StoreError):
        store.get_range("r.bin", 0, -2)


def test_open_read_streams(store):
    data = payload(200_000, seed=4)
    store.put_bytes("o.bin", data)
    f = store.open_read("o.bin")
    try:
        first = f.read(1000)
        rest = f.read()
    finally:
        f.close()
    assert first == data[:1000]
    assert first + rest == data


def test_head_and_exists(store):
    store.put_bytes("d/h.bin", b"12345")
    info = store.head("d/h.bin")
    assert info.key == "d/h.bin"
    assert info.size == 5
    assert info.name == "h.bin"
    assert isinstance(info.mtime, datetime) and info.mtime.tzinfo is not None
    assert abs(info.mtime.timestamp() - time.time()) < 300
    assert store.exists("d/h.bin")
    assert not store.exists("d/nope.bin")
    assert not store.exists("d")  # a "directory" is not an object
    assert not store.exists("../etc/passwd")  # an invalid key simply does not exist


def test_delete(store):
    store.put_bytes("del/a.bin", b"a")
    store.put_bytes("del/b.bin", b"b")
    store.delete("del/a.bin")
    assert not store.exists("del/a.bin")
    assert store.exists("del/b.bin")
    with pytest.raises(NotFoundError):
        store.get_bytes("del/a.bin")
    store.delete("del/a.bin")  # deleting a missing key is not an error
    store.delete("never/was.bin")
    assert keys(store.iter_objects()) == ["del/b.bin"]


def _populate(store):
    for key in ["z.bin", "a/1.bin", "a/2.bin", "a/sub/3.bin", "a/sub/deeper/4.bin", "ab/5.bin", "b/6.bin", "a.txt"]:
        store.put_bytes(key, key.encode())


def test_iter_objects(store):
    _populate(store)
    everything = list(store.iter_objects())
    assert keys(everything) == sorted(
        ["z.bin", "a/1.bin", "a/2.bin", "a/sub/3.bin", "a/sub/deeper/4.bin", "ab/5.bin", "b/6.bin", "a.txt"]
    )
    assert all(i.size == len(i.key) for i in everything)
    assert keys(store.iter_objects("a/")) == ["a/1.bin", "a/2.bin", "a/sub/3.bin", "a/sub/deeper/4.bin"]
    assert keys(store.iter_objects("a/sub/")) == ["a/sub/3.bin", "a/sub/deeper/4.bin"]
    # a prefix is a string prefix, not a directory name
    assert keys(store.iter_objects("a")) == [
        "a.txt",
        "a/1.bin",
        "a/2.bin",
        "a/sub/3.bin",
        "a/sub/deeper/4.bin",
        "ab/5.bin",
    ]
    assert keys(store.iter_objects("a/s")) == ["a/sub/3.bin", "a/sub/deeper/4.bin"]
    assert list(store.iter_objects("nothing/")) == []


def test_list_dir(store):
    _populate(store)
    top = store.list_dir()
    assert top.prefixes == ["a/", "ab/", "b/"]
    assert keys(top.objects) == ["a.txt", "z.bin"]
    a = store.list_dir("a/")
    assert a.prefixes == ["a/sub/"]
    assert keys(a.objects) == ["a/1.bin", "a/2.bin"]
    assert [o.size for o in a.objects] == [7, 7]
    assert store.list_dir("a") == a  # a missing trailing slash is added
    sub = store.list_dir("a/sub")
    assert sub.prefixes == ["a/sub/deeper/"]
    assert keys(sub.objects) == ["a/sub/3.bin"]
    empty = store.list_dir("nothing/")
    assert empty.prefixes == [] and empty.objects == []


def test_listing_beyond_1000_keys(store):
    names = [f"many/{i // 100:02d}/obj-{i:05d}" for i in range(1100)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: store.put_bytes(k, b"x"), names))
    listed = keys(store.iter_objects("many/"))
    assert listed == sorted(names)
    assert len(listed) == 1100
    assert store.list_dir("many/").prefixes == [f"many/{i:02d}/" for i in range(11)]
    assert len(store.list_dir("many/05/").objects) == 100


@pytest.mark.parametrize(
    "op",
    [
        lambda s, tmp: s.get_bytes("missing/key.bin"),
        lambda s, tmp: s.get_range("missing/key.bin", 0, 10),
        lambda s, tmp: s.get_range("missing/key.bin", 0, 0),
        lambda s, tmp: s.head("missing/key.bin"),
        lambda s, tmp: s.get_file("missing/key.bin", tmp / "out.bin"),
        lambda s, tmp: s.open_read("missing/key.bin"),
    ],
    ids=["get_bytes", "get_range", "get_range_zero", "head", "get_file", "open_read"],
)
def test_missing_key_is_not_found(store, tmp_path, op):
    store.put_bytes("missing/other.bin", b"x")  # the bucket/dir exists; only the key does not
    with pytest.raises(NotFoundError) as exc_info:
        op(store, tmp_path)
    msg = str(exc_info.value)
    assert "missing/key.bin" in msg
    assert "\n" not in msg


BAD_KEYS = ["../escape.bin", "a/../../escape.bin", "/abs/key.bin", "a\\b.bin", "nul\x00.bin"]


@pytest.mark.parametrize("bad", BAD_KEYS, ids=["dotdot", "inner-dotdot", "absolute", "backslash", "nul"])
def test_bad_keys_rejected(store, tmp_path, bad):
    src = tmp_path / "src.bin"
    src.write_bytes(b"data")
    attempts = [
        lambda: store.put_bytes(bad, b"data"),
        lambda: store.put_file(bad, src),
        lambda: store.put_stream(bad, lambda f: f.write(b"data")),
        lambda: store.get_bytes(bad),
        lambda: store.head(bad),
        lambda: store.delete(bad),
        lambda: list(store.iter_objects(bad)),
    ]
    for attempt in attempts:
        with pytest.raises(StoreError) as exc_info:
            attempt()
        assert not isinstance(exc_info.value, NotFoundError)
        assert "invalid key" in str(exc_info.value)
    assert list(store.iter_objects()) == []


def test_s3_location_is_read_once_for_stores_and_readers():
    from vaultsh.reader.fetch import resolve
    from vaultsh.store import open_location, s3_location

    assert s3_location("s3://bucket/run//hook/") == ("s3://bucket", "run/hook")
    assert s3_location("s3://bucket") == ("s3://bucket", "")
    said = "invalid S3 URI 's3://bucket/run/../../x': '..' is not allowed in keys"
    for opener in (s3_location, open_location, resolve):
        with pytest.raises(StoreError) as exc_info:
            opener("s3://bucket/run/../../x")
        assert str(exc_info.value) == said


# ---------------------------------------------------------------------------
# S3Store
# ---------------------------------------------------------------------------


def test_s3_prefix_and_uri(s3_server, s3_bucket, s3_admin):
    st = S3Store(s3_bucket, "runs/exp1/", endpoint_url=s3_server)
    assert st.uri == f"s3://{s3_bucket}/runs/exp1"
    assert st.child_uri("m/0.bin") == f"s3://{s3_bucket}/runs/exp1/m/0.bin"
    st.put_bytes("m/0.bin", b"zero")
    s3_admin.put_object(Bucket=s3_bucket, Key="runs/exp10/other.bin", Body=b"not ours")
    s3_admin.put_object(Bucket=s3_bucket, Key="outside.bin", Body=b"not ours")
    full = [o["Key"] for o in s3_admin.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert "runs/exp1/m/0.bin" in full
    assert keys(st.iter_objects()) == ["m/0.bin"]
    assert st.list_dir().prefixes == ["m/"]
    assert st.head("m/0.bin").key == "m/0.bin"
    assert S3Store(s3_bucket, endpoint_url=s3_server).uri == f"s3://{s3_bucket}"


def test_s3_open_store_uses_env_endpoint(s3_env, s3_bucket, s3_admin):
    st = open_store(f"s3://{s3_bucket}/pfx")
    assert isinstance(st, S3Store)
    assert st.endpoint_url == s3_env
    st.put_bytes("k.bin", b"via env")
    assert s3_admin.get_object(Bucket=s3_bucket, Key="pfx/k.bin")["Body"].read() == b"via env"


def test_s3_bad_bucket_name_rejected():
    with pytest.raises(StoreError):
        S3Store("")


def _etag(s3_admin, bucket, key) -> str:
    return s3_admin.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')


def _multipart_store(bucket: str, endpoint_url: str, **kw) -> S3Store:
    """An S3Store that sends anything over 5 MiB in 5 MiB parts: s3transfer never uses smaller parts (nor does S3
    accept them)."""
    return S3Store(bucket, endpoint_url=endpoint_url, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, **kw)


def _three_part_file(tmp_path, seed: int) -> tuple[bytes, Path]:
    """11 MiB of payload in tmp_path/big.bin: three parts for a _multipart_store."""
    data = payload(11 * MiB, seed=seed)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    return data, src


def test_s3_multipart_upload_and_parallel_download(s3_server, s3_bucket, s3_admin, tmp_path):
    data, src = _three_part_file(tmp_path, seed=5)
    with FaultProxy(s3_server) as proxy:
        st = _multipart_store(s3_bucket, proxy.url, max_concurrency=4)
        st.put_file("big/file.bin", src)
        assert proxy.count("PUT", "partNumber=") == 3
        assert proxy.count("POST", "uploads") == 1  # CreateMultipartUpload
        st.put_bytes("big/bytes.bin", data)
        st.put_stream("big/stream.bin", lambda f: f.write(data))
        st.put_bytes("small.bin", b"tiny")
        gets_before = proxy.count("GET")
        out = tmp_path / "back.bin"
        st.get_file("big/file.bin", out)
        ranged_gets = proxy.count("GET") - gets_before
    for key in ("big/file.bin", "big/bytes.bin", "big/stream.bin"):
        assert _etag(s3_admin, s3_bucket, key).endswith("-3"), key
    assert "-" not in _etag(s3_admin, s3_bucket, "small.bin")
    assert ranged_gets >= 3  # the download was split in ranged GETs
    assert out.read_bytes() == data
    direct = S3Store(s3_bucket, endpoint_url=s3_server)
    assert direct.get_bytes("big/bytes.bin") == data
    assert direct.get_bytes("big/stream.bin") == data


def test_s3_missing_bucket(s3_server):
    st = S3Store("vaultsh-no-such-bucket", endpoint_url=s3_server)
    attempts = [
        lambda: st.put_bytes("k.bin", b"x"),
        lambda: st.get_bytes("k.bin"),
        lambda: st.head("k.bin"),
        lambda: st.exists("k.bin"),
        lambda: list(st.iter_objects()),
        lambda: st.list_dir(),
    ]
    for attempt in attempts:
        with pytest.raises(StoreError) as exc_info:
            attempt()
        err = exc_info.value
        assert not isinstance(err, NotFoundError)
        assert "bucket 'vaultsh-no-such-bucket' does not exist" in str(err)
        assert s3_server in str(err)


@contextmanager
def moto_auth(server: str):
    """Switch on moto's signature/IAM checking (process-wide) for the duration of the block."""

    def set_count(value: bytes):
        req = urllib.request.Request(
            f"{server}/moto-api/reset-auth",
            data=value,
            method="POST",
            headers={"Content-Type": "text/plain"},  # not form-encoded: moto reads the raw body
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200

    set_count(b"0")
    try:
        yield
    finally:
        set_count(b"inf")


@pytest.mark.parametrize("case", ["unknown-key", "wrong-secret", "no-permission"])
def test_s3_rejected_credentials(s3_server, s3_bucket, monkeypatch, case):
    import boto3

    iam = boto3.client("iam", endpoint_url=s3_server, region_name="us-east-1")
    user = f"u-{s3_bucket}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    secret = "s3cr3t-" + key["SecretAccessKey"]
    if case == "unknown-key":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        expected = "InvalidAccessKeyId"
    elif case == "wrong-secret":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        expected = "SignatureDoesNotMatch"
    else:  # right credentials, but the user has no policy at all
        secret = key["SecretAccessKey"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        expected = "AccessDenied"
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    monkeypatch.delenv("AWS_SECURITY_TOKEN")
    st = S3Store(s3_bucket, endpoint_url=s3_server, max_attempts=2)
    with moto_auth(s3_server):
        with pytest.raises(StoreError) as put_err:
            st.put_bytes("k.bin", b"x")
        with pytest.raises(StoreError) as head_err:  # HEAD: a bare 403, no error body
            st.head("k.bin")
        with pytest.raises(StoreError) as list_err:
            list(st.iter_objects())
    for err in (put_err.value, head_err.value, list_err.value):
        msg = str(err)
        assert not isinstance(err, NotFoundError)
        assert "credentials" in msg and ("rejected" in msg)
        assert "AWS_ACCESS_KEY_ID" in msg and "AWS_SECRET_ACCESS_KEY" in msg
        assert secret not in msg
        assert "\n" not in msg
    assert expected in str(put_err.value)
    assert f"s3://{s3_bucket}/k.bin" in str(put_err.value)


def test_s3_no_credentials(s3_server, s3_bucket, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name)
    st = S3Store(s3_bucket, endpoint_url=s3_server, max_attempts=1)
    with pytest.raises(StoreError) as exc_info:
        st.get_bytes("k.bin")
    msg = str(exc_info.value)
    assert "credentials" in msg
    assert "AWS_ACCESS_KEY_ID" in msg and "AWS_SECRET_ACCESS_KEY" in msg


_CRED_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def public_bucket(s3_admin, s3_bucket) -> str:
    """`s3_bucket` made public-read, holding k.bin and run/cfg.json (written with credentials)."""
    s3_admin.put_bucket_acl(Bucket=s3_bucket, ACL="public-read")
    for key, body in (("k.bin", b"public bytes"), ("run/cfg.json", b'{"run_name": "run"}')):
        s3_admin.put_object(Bucket=s3_bucket, Key=key, Body=body, ACL="public-read")
    return s3_bucket


@pytest.mark.parametrize("how", ["argument", "env"])
def test_s3_unsigned_client_reads_a_public_bucket(s3_server, s3_bucket, s3_admin, monkeypatch, how):
    import botocore

    public_bucket(s3_admin, s3_bucket)
    for name in _CRED_VARS:
        monkeypatch.delenv(name, raising=False)
    if how == "env":
        monkeypatch.setenv("AWS_NO_SIGN_REQUEST", "1")
    st = S3Store(s3_bucket, endpoint_url=s3_server, max_attempts=1, **({"unsigned": True} if how == "argument" else {}))
    assert st.client.meta.config.signature_version is botocore.UNSIGNED
    assert st.get_bytes("k.bin") == b"public bytes"
    assert st.get_range("k.bin", 7, 5) == b"bytes"
    assert [o.key for o in st.iter_objects()] == ["k.bin", "run/cfg.json"]


def test_explicit_credentials_sign_instead_of_the_chain(s3_server, s3_bucket, monkeypatch):
    """S3Credentials (what S3RCache.from_credentials passes) sign every request, whatever the env says, also in a
    pickled copy (a DataLoader worker's); a wrong secret is rejected; the secret is never in a repr."""
    import json
    import pickle

    import boto3
    import botocore

    from vaultsh.store.s3 import S3Credentials

    iam = boto3.client("iam", endpoint_url=s3_server, region_name="us-east-1")
    user = f"creds-{s3_bucket}"
    iam.create_user(UserName=user)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName=user, PolicyName="all-s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")  # the chain's would be rejected
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-it")
    monkeypatch.setenv("AWS_NO_SIGN_REQUEST", "1")  # and would not sign at all
    creds = S3Credentials(key["AccessKeyId"], key["SecretAccessKey"])
    st = S3Store(s3_bucket, endpoint_url=s3_server, max_attempts=1, credentials=creds)
    assert st.client.meta.config.signature_version is not botocore.UNSIGNED
    with moto_auth(s3_server):
        st.put_bytes("signed.bin", b"by the given key")
        assert pickle.loads(pickle.dumps(st)).get_bytes("signed.bin") == b"by the given key"
        wrong = S3Store(
            s3_bucket, endpoint_url=s3_server, max_attempts=1, credentials=S3Credentials(key["AccessKeyId"], "x")
        )
        with pytest.raises(StoreError, match="rejected") as rejected:
            wrong.get_bytes("signed.bin")
        # the message sends the user to the keys passed in, not to the environment it did not use
        assert "passed in" in str(rejected.value) and "AWS_ACCESS_KEY_ID" not in str(rejected.value)
        chain = S3Store(s3_bucket, endpoint_url=s3_server, max_attempts=1, unsigned=False)
        with pytest.raises(StoreError, match="InvalidAccessKeyId"):
            chain.get_bytes("signed.bin")
    assert key["SecretAccessKey"] not in repr(st) + repr(creds) + repr(vars(st))


def test_s3_read_without_credentials_suggests_no_sign_request(s3_server, s3_bucket, monkeypatch):
    for name in _CRED_VARS:
        monkeypatch.delenv(name, raising=False)
    st = S3Store(s3_bucket, endpoint_url=s3_server, max_attempts=1)
    with pytest.raises(StoreError) as read_err:
        st.get_bytes("k.bin")
    assert "for a public bucket add --no-sign-request (or set AWS_NO_SIGN_REQUEST=1)" in str(read_err.value)
    assert "\n" not in str(read_err.value)
    with pytest.raises(StoreError) as write_err:  # unsigned writes would not help
        st.put_bytes("k.bin", b"x")
    assert "no-sign-request" not in str(write_err.value)


def test_cli_no_sign_request_reads_a_public_bucket(s3_env, s3_bucket, s3_admin, monkeypatch, capsys):
    from vaultsh.cli import main

    public_bucket(s3_admin, s3_bucket)
    for name in _CRED_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_NO_SIGN_REQUEST", "")  # recorded, so what --no-sign-request sets is undone after
    assert main(["s3", f"s3://{s3_bucket}", "-c", "ls"]) == 2
    assert "--no-sign-request" in capsys.readouterr().err
    assert main(["inspect", "--no-sign-request", f"s3://{s3_bucket}/run/cfg.json"]) == 0
    assert '"run_name": "run"' in capsys.readouterr().out
    assert main(["s3", "--no-sign-request", f"s3://{s3_bucket}", "-c", "ls"]) == 0
    assert "k.bin" in capsys.readouterr().out


@pytest.mark.timeout(60)  # bounded retries: a hang fails here
def test_s3_unreachable_endpoint():
    port = free_port()  # nothing listens there: connection refused
    endpoint = f"http://127.0.0.1:{port}"
    st = S3Store("some-bucket", endpoint_url=endpoint, max_attempts=2, connect_timeout=1, read_timeout=2)
    with pytest.raises(StoreError) as exc_info:
        st.put_bytes("k.bin", b"x")
    msg = str(exc_info.value)
    assert msg.startswith(f"cannot reach S3 endpoint {endpoint}")
    assert "\n" not in msg
    with pytest.raises(StoreError, match="cannot reach S3 endpoint"):
        list(st.iter_objects())


def test_s3_503_burst_is_retried(s3_server, s3_bucket, s3_store):
    data = payload(100_000, seed=6)
    with FaultProxy(s3_server) as proxy:
        st = S3Store(s3_bucket, endpoint_url=proxy.url, max_attempts=5)
        proxy.fail_next(n=2, method="PUT", mode="503")
        st.put_bytes("retry/503.bin", data)
        assert proxy.faults_injected == 2
        assert proxy.count("PUT") == 3
        proxy.fail_next(n=1, method="GET", mode="503", code="ServiceUnavailable")
        assert st.get_bytes("retry/503.bin") == data
        assert proxy.faults_injected == 3
    assert s3_store.get_bytes("retry/503.bin") == data  # read back directly, not through the proxy


def test_s3_503_without_retries_fails(s3_server, s3_bucket, s3_store):
    with FaultProxy(s3_server) as proxy:
        st = S3Store(s3_bucket, endpoint_url=proxy.url, max_attempts=1)
        proxy.fail_next(n=1, method="PUT", mode="503")
        with pytest.raises(StoreError) as exc_info:
            st.put_bytes("retry/fail.bin", b"data")
        assert proxy.count("PUT") == 1
    assert "SlowDown" in str(exc_info.value)
    assert f"s3://{s3_bucket}/retry/fail.bin" in str(exc_info.value)
    assert not s3_store.exists("retry/fail.bin")


def test_s3_connection_reset_mid_upload_is_retried(s3_server, s3_bucket, s3_store, s3_admin, tmp_path):
    data, src = _three_part_file(tmp_path, seed=7)
    with FaultProxy(s3_server) as proxy:
        st = _multipart_store(s3_bucket, proxy.url, max_concurrency=4, max_attempts=4)
        # a single PUT and the second part of a multipart upload each lose their connection once
        proxy.fail_next(n=1, method="PUT", mode="reset")
        st.put_bytes("reset/small.bin", b"small object")
        proxy.fail_next(n=1, method="PUT", mode="reset", path_contains="partNumber=2")
        st.put_file("reset/big.bin", src)
        assert proxy.faults_injected == 2
        assert proxy.count("PUT", "partNumber=2") == 2
    assert s3_store.get_bytes("reset/small.bin") == b"small object"
    assert s3_store.get_bytes("reset/big.bin") == data
    assert _etag(s3_admin, s3_bucket, "reset/big.bin").endswith("-3")


def _pending_uploads(s3_admin, bucket: str) -> list:
    return s3_admin.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def test_s3_put_stream_streams_parts_without_a_local_spool(s3_server, s3_bucket, s3_admin, monkeypatch, tmp_path):
    """Parts go out while the writer still writes; nothing is written to local disk."""
    import tempfile

    def no_disk(*a, **kw):
        raise AssertionError("put_stream must not spool to local disk")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_disk)
    monkeypatch.setattr(tempfile, "mkstemp", no_disk)
    data = payload(23 * MiB, seed=8)
    with FaultProxy(s3_server) as proxy:
        st = S3Store(
            s3_bucket,
            endpoint_url=proxy.url,
            multipart_threshold=8 * MiB,
            multipart_chunksize=5 * MiB,
            max_concurrency=2,
        )
        st.put_stream("stream/small.bin", lambda f: [f.write(payload(MiB, seed=k)) for k in range(7)])
        assert proxy.count("PUT") == 1 and proxy.count("POST", "uploads") == 0  # under the threshold: one PUT
        seen_parts = []

        def writer(f):
            view = memoryview(data)
            for a in range(0, len(data), 3 * MiB):  # writes that do not line up with parts
                f.write(view[a : a + 3 * MiB])
                seen_parts.append(proxy.count("PUT", "partNumber="))
            assert f.tell() == len(data)

        st.put_stream("stream/big.bin", writer)
        assert proxy.count("PUT", "partNumber=") == 5  # 5+5+5+5+3 MiB
        assert proxy.count("POST", "uploads") == 1
    assert S3Store(s3_bucket, endpoint_url=s3_server).get_bytes("stream/small.bin") == b"".join(
        payload(MiB, seed=k) for k in range(7)
    )
    assert seen_parts[-1] >= 2, "parts were uploaded while the writer was still writing"
    assert _etag(s3_admin, s3_bucket, "stream/big.bin").endswith("-5")
    assert S3Store(s3_bucket, endpoint_url=s3_server).get_bytes("stream/big.bin") == data
    assert _pending_uploads(s3_admin, s3_bucket) == []


def test_s3_put_stream_writer_error_after_parts_leaves_no_object_and_no_parts(s3_server, s3_bucket, s3_admin):
    st = _multipart_store(s3_bucket, s3_server)

    def crash(f):
        f.write(payload(12 * MiB, seed=9))  # two parts already uploaded
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        st.put_stream("stream/crash.bin", crash)
    assert not st.exists("stream/crash.bin")
    assert _pending_uploads(s3_admin, s3_bucket) == []


def test_s3_put_stream_part_lost_mid_upload(s3_server, s3_bucket, s3_admin):
    """A connection reset during a part is retried; a part that keeps failing is a one-line error, nothing stored."""
    data = payload(12 * MiB, seed=10)
    with FaultProxy(s3_server) as proxy:
        st = _multipart_store(s3_bucket, proxy.url, max_attempts=3)
        proxy.fail_next(n=1, method="PUT", mode="reset", path_contains="partNumber=2")
        st.put_stream("stream/reset.bin", lambda f: f.write(data))
        assert proxy.faults_injected == 1 and proxy.count("PUT", "partNumber=2") == 2
        proxy.fail_next(n=10, method="PUT", mode="503", path_contains="partNumber=1")
        with pytest.raises(StoreError) as exc_info:
            st.put_stream("stream/fail.bin", lambda f: f.write(data))
    assert S3Store(s3_bucket, endpoint_url=s3_server).get_bytes("stream/reset.bin") == data
    msg = str(exc_info.value)
    assert "\n" not in msg and "SlowDown" in msg and f"s3://{s3_bucket}/stream/fail.bin" in msg
    assert not S3Store(s3_bucket, endpoint_url=s3_server).exists("stream/fail.bin")
    assert _pending_uploads(s3_admin, s3_bucket) == []


# ---------------------------------------------------------------------------
# LocalStore
# ---------------------------------------------------------------------------


def test_local_symlink_refused(local_store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(b"secret")
    os.symlink(outside, local_store.root / "link")
    os.symlink(outside / "secret.bin", local_store.root / "file-link.bin")
    for attempt in (
        lambda: local_store.get_bytes("link/secret.bin"),
        lambda: local_store.put_bytes("link/new.bin", b"x"),
        lambda: local_store.get_bytes("file-link.bin"),
    ):
        with pytest.raises(StoreError, match="symlink"):
            attempt()
    assert not (outside / "new.bin").exists()
    assert not local_store.exists("link/secret.bin")
    assert list(local_store.iter_objects()) == []
    assert local_store.list_dir().prefixes == [] and local_store.list_dir().objects == []


def test_local_crash_mid_write_leaves_nothing(local_store):
    seen = {}

    def crashing(f):
        f.write(b"half of the data")
        f.flush()
        # while the write is in progress the temp file exists on disk but is invisible
        seen["on_disk"] = os.listdir(local_store.root / "run")
        seen["listed"] = keys(local_store.iter_objects())
        seen["dir"] = keys(local_store.list_dir("run").objects)
        seen["exists"] = local_store.exists("run/mb.bin")
        raise KeyboardInterrupt  # even a BaseException leaves nothing behind

    with pytest.raises(KeyboardInterrupt):
        local_store.put_stream("run/mb.bin", crashing)
    assert len(seen["on_disk"]) == 1 and seen["on_disk"][0] != "mb.bin"
    assert seen["listed"] == [] and seen["dir"] == [] and seen["exists"] is False
    assert not (local_store.root / "run" / "mb.bin").exists()
    assert os.listdir(local_store.root / "run") == []  # the temp file is gone too
    assert list(local_store.iter_objects()) == []


def test_local_open_missing_root(tmp_path):
    with pytest.raises(NotFoundError):
        LocalStore(tmp_path / "nope", create=False)
    assert isinstance(NotFoundError("x"), UserError)


def test_open_store_local(tmp_path):
    st = open_store(str(tmp_path / "v"))
    assert isinstance(st, LocalStore)
    st.put_bytes("k", io.BytesIO(b"abc").getvalue())
    assert (tmp_path / "v" / "k").read_bytes() == b"abc"


def test_prefix_keys_are_never_objects(store):
    """'x/' names a prefix on both stores: reads miss, exists is False, delete leaves 'x' alone."""
    store.put_bytes("x", b"object x")
    store.put_bytes("d/inner", b"inner")
    for key in ("x/", "d/"):
        assert not store.exists(key)
        with pytest.raises(NotFoundError):
            store.get_bytes(key)
        with pytest.raises(NotFoundError):
            store.head(key)
    store.delete("x/")
    assert store.get_bytes("x") == b"object x"


def test_writing_a_prefix_key_is_refused(store):
    with pytest.raises(StoreError, match="invalid key"):
        store.put_bytes("run/", b"x")


def test_multipart_sink_parts_grow_for_very_long_streams(monkeypatch):
    """S3 allows 10,000 parts: every PARTS_PER_DOUBLING parts the part size doubles (a fake client records them)."""
    import vaultsh.store.s3stream as s3stream

    class Client:
        def __init__(self):
            self.parts, self.completed = {}, None

        def create_multipart_upload(self, **kw):
            return {"UploadId": "u1"}

        def upload_part(self, PartNumber, Body, **kw):
            self.parts[PartNumber] = bytes(Body)
            return {"ETag": f'"{PartNumber}"'}

        def complete_multipart_upload(self, MultipartUpload, **kw):
            self.completed = [p["PartNumber"] for p in MultipartUpload["Parts"]]

    monkeypatch.setattr(s3stream, "MIN_PART", 10)
    monkeypatch.setattr(s3stream, "PARTS_PER_DOUBLING", 3)
    client = Client()
    sink = s3stream.MultipartSink(client, "b", "k", part_size=10, max_in_flight=2)
    data = payload(200, seed=11)
    for a in range(0, len(data), 7):
        sink.write(data[a : a + 7])
    sink.finish()
    sizes = [len(client.parts[i]) for i in sorted(client.parts)]
    assert sizes == [10, 10, 10, 20, 20, 20, 40, 40, 30]
    assert b"".join(client.parts[i] for i in sorted(client.parts)) == data
    assert client.completed == sorted(client.parts)


def test_read_into_fills_the_callers_buffer_in_place(store):
    import threading

    from vaultsh.errors import Cancelled

    data = bytes(range(256)) * 4096  # 1 MiB
    store.put_bytes("r/obj", data)
    buf = bytearray(300_000)
    mv = memoryview(buf)
    assert store.read_into("r/obj", 1000, mv) == len(buf)
    assert bytes(buf) == data[1000:301_000]
    tail = memoryview(bytearray(5000))
    assert store.read_into("r/obj", len(data) - 1234, tail) == 1234  # short at the end of the object
    assert bytes(tail[:1234]) == data[-1234:]
    assert store.read_into("r/obj", len(data) + 10, memoryview(bytearray(10))) == 0
    with pytest.raises(NotFoundError):
        store.read_into("r/missing", 0, memoryview(bytearray(10)))
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        store.read_into("r/obj", 0, mv, stop)


def test_head_etag_changes_when_an_object_is_replaced(store):
    store.put_bytes("r/e", b"one")
    first = store.head("r/e").etag
    time.sleep(0.01)
    store.put_bytes("r/e", b"two!")
    second = store.head("r/e").etag
    assert first and second and first != second


def test_s3_error_text_masks_the_explicit_secret_too(monkeypatch):
    """Error text from S3 goes through one masking step: the environment's secrets and the ones passed in."""
    from vaultsh.store.s3 import _one_line

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-1234")
    text = "denied for env-secret-1234 and\n given-secret-5678"
    assert _one_line(text, ("given-secret-5678",)) == "denied for *** and ***"  # one line
    assert _one_line("x" * 400, limit=200) == "x" * 197 + "..."
