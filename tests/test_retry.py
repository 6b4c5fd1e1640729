"""The one retry policy (vaultsh/store/retry.py) for what botocore does not retry itself."""

from __future__ import annotations

import pytest

from vaultsh.errors import Cancelled, StoreError, UserError
from vaultsh.store.retry import RetryPolicy, botocore_retries, s3_attempts_from_env


def flaky(failures: list[Exception], result="ok"):
    calls = []

    def fn():
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return result

    return fn, calls


def test_retries_until_success_with_doubling_delays():
    waits, heard = [], []
    fn, calls = flaky([OSError("a"), OSError("b")])
    policy = RetryPolicy(attempts=4, backoff=0.5)
    assert (
        policy.call(fn, retryable=lambda e: True, on_retry=lambda n, e: heard.append((n, str(e))), wait=waits.append)
        == "ok"
    )
    assert len(calls) == 3 and heard == [(1, "a"), (2, "b")] and waits == [0.5, 1.0]


def test_not_retryable_raises_at_once():
    fn, calls = flaky([UserError("bad bucket")])
    with pytest.raises(UserError, match="bad bucket"):
        RetryPolicy(attempts=5, backoff=0).call(fn, retryable=lambda e: False, wait=lambda s: None)
    assert len(calls) == 1


def test_exhausted_raises_the_last_error_or_what_exhausted_makes():
    fn, calls = flaky([OSError(str(i)) for i in range(5)])
    with pytest.raises(OSError, match="^2$"):
        RetryPolicy(attempts=3, backoff=0).call(fn, retryable=lambda e: True, wait=lambda s: None)
    assert len(calls) == 3
    fn, _ = flaky([OSError("x")] * 5)
    with pytest.raises(StoreError, match="after 2 attempts") as info:
        RetryPolicy(attempts=2, backoff=0).call(
            fn,
            retryable=lambda e: True,
            wait=lambda s: None,
            exhausted=lambda e, n: StoreError(f"after {n} attempts: {e}"),
        )
    assert isinstance(info.value.__cause__, OSError)


def test_delays_are_capped_and_jittered():
    p = RetryPolicy(attempts=10, backoff=1.0, max_delay=8.0, jitter=True)
    for n in range(1, 8):
        base = min(8.0, 2.0 ** (n - 1))
        assert 0.5 * base <= p.delay(n) < 1.5 * base


def test_a_wait_that_answers_true_cancels():
    fn, calls = flaky([OSError("x")] * 3)
    with pytest.raises(Cancelled):
        RetryPolicy(attempts=5, backoff=1).call(fn, retryable=lambda e: True, wait=lambda s: True)
    assert len(calls) == 1


def test_botocore_config_and_env(monkeypatch):
    assert botocore_retries() == {"total_max_attempts": 8, "mode": "standard"}
    assert botocore_retries(2)["total_max_attempts"] == 2
    monkeypatch.delenv("VAULTSH_S3_MAX_ATTEMPTS", raising=False)
    assert s3_attempts_from_env() is None
    monkeypatch.setenv("VAULTSH_S3_MAX_ATTEMPTS", " 3 ")
    assert s3_attempts_from_env() == 3
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv("VAULTSH_S3_MAX_ATTEMPTS", bad)
        with pytest.raises(UserError, match="VAULTSH_S3_MAX_ATTEMPTS"):
            s3_attempts_from_env()
