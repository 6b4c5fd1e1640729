"""Shared fixtures: a real S3 endpoint on loopback (moto's ThreadedMotoServer) and stores.

No test ever reaches real AWS: fake credentials are put in the environment for
the whole session, AWS config files point to a path that does not exist, the
instance-metadata lookup is disabled, and every S3 client gets an explicit
loopback endpoint (or S3_ENDPOINT_URL through the `s3_env` fixture).
"""

from __future__ import annotations

import itertools
import logging
import uuid

import pytest

from vaultsh.testing.faultproxy import free_port
from vaultsh.testing.s3server import AWS_ENV_TO_UNSET, FAKE_CREDS, speed_up_moto_dispatch


@pytest.fixture(scope="session", autouse=True)
def aws_test_env(tmp_path_factory):
    """Fake AWS credentials for the whole session; no real AWS config is ever read."""
    missing = tmp_path_factory.mktemp("aws") / "does-not-exist"
    with pytest.MonkeyPatch.context() as mp:
        for name in AWS_ENV_TO_UNSET:
            mp.delenv(name, raising=False)
        for name, value in FAKE_CREDS.items():
            mp.setenv(name, value)
        mp.setenv("AWS_CONFIG_FILE", str(missing / "config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(missing / "credentials"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield dict(FAKE_CREDS)


@pytest.fixture(scope="session")
def s3_server(aws_test_env):
    """The endpoint URL of a moto S3 server on 127.0.0.1 (one per session)."""
    from moto.server import ThreadedMotoServer

    speed_up_moto_dispatch()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access-log line per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_client(endpoint_url: str):
    """A plain boto3 S3 client on the test endpoint (for setup and inspection)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"}),
    )


@pytest.fixture(scope="session")
def s3_admin(s3_server):
    return s3_client(s3_server)


_bucket_seq = itertools.count()


@pytest.fixture
def s3_bucket(s3_admin):
    """A fresh, uniquely named, empty bucket on the test server."""
    name = f"vaultsh-test-{next(_bucket_seq)}-{uuid.uuid4().hex[:10]}"
    s3_admin.create_bucket(Bucket=name)
    yield name


@pytest.fixture
def s3_store(s3_server, s3_bucket):
    from vaultsh.store.s3 import S3Store

    return S3Store(s3_bucket, prefix="", endpoint_url=s3_server)


@pytest.fixture
def local_store(tmp_path):
    from vaultsh.store.local import LocalStore

    return LocalStore(tmp_path / "vault")


@pytest.fixture(params=["local", "s3"], ids=["local", "s3"])
def store(request):
    """The same test against both implementations of the Store protocol."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """S3_ENDPOINT_URL points at the test server, so open_store("s3://...") reaches it."""
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_server)
    return s3_server


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny random Llama with the real SmolLM2 tokenizer, built once per session.

    Test modules that need a model of their own (one they change, or built
    differently) define a module-level `tiny_dir`, which takes precedence.
    """
    from .modelfixtures import make_tiny_llama_dir

    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny-shared") / "model")
