"""The event protocol, the headless printer and the bounded uploader."""

from __future__ import annotations

import io
import os
import threading

import pytest
from rich.console import Console

from collector.uploader import Uploader, UploadFailed
from vaultsh.errors import StoreError
from vaultsh.events import EventSink, decode, encode, make_event
from vaultsh.progress import HeadlessPrinter

from .test_events import EVERY


def test_events_round_trip_through_a_pipe():
    r, w = os.pipe()
    sink = EventSink(3, fd=w)
    sink.emit("progress", batches=2, total_batches=10, tokens=100, tokens_per_s=50.0, megabatch=0)
    sink.emit("warning", message="slow store")
    os.close(w)
    lines = os.fdopen(r, "rb").read().splitlines()
    events = [decode(line) for line in lines]
    assert [e["type"] for e in events] == ["progress", "warning"]
    assert events[0]["worker"] == 3 and events[0]["batches"] == 2 and isinstance(events[0]["time"], float)


def test_decode_rejects_garbage_and_unknown_types():
    assert decode(b"not json") is None
    assert decode(b'{"type": "bogus", "worker": 0}') is None
    assert decode(b"[1, 2]") is None
    assert decode(encode(make_event("done", 0, status="complete")))["status"] == "complete"
    with pytest.raises(ValueError):
        make_event("bogus", 0)


def test_sink_survives_a_closed_channel():
    r, w = os.pipe()
    os.close(r)
    sink = EventSink(0, fd=w)
    sink.emit("warning", message="nobody listens")  # EPIPE is swallowed, the worker goes on
    sink.emit("warning", message="still fine")
    os.close(w)


def test_headless_printer_shows_progress_and_problems():
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False)
    with HeadlessPrinter(console) as printer:
        sink = EventSink(0, callback=printer)
        sink.emit("start", **EVERY["start"])
        sink.emit("progress", batches=4, total_batches=4, tokens=12345, tokens_per_s=2500.0, megabatch=2)
        sink.emit("committed", megabatch=1, batch_start=2, batch_end=4, tokens=6000, bytes=10)
        sink.emit("warning", message="retrying upload of x")
        sink.emit("done", status="complete", batches=4, tokens=12345, megabatches=2, elapsed=1.0)
    text = out.getvalue()
    assert "residuals_1" in text and "retrying upload of x" in text
    assert "12.3k tok" in text and "4/4" in text and "complete" in text
    assert printer.last_done[0]["status"] == "complete"


def test_submit_blocks_when_the_queue_is_full():
    release = threading.Event()
    up = Uploader(threads=4, max_pending=2)
    up.submit("a", 10, release.wait)
    up.submit("b", 10, release.wait)
    third_done = threading.Event()

    def third():
        up.submit("c", 10, lambda: None)
        third_done.set()

    t = threading.Thread(target=third)
    t.start()
    assert not third_done.wait(0.3), "submit did not wait for a free slot"
    assert up.stats.queued == 2 and up.stats.in_flight_bytes == 20
    release.set()
    assert third_done.wait(5)
    t.join()
    up.close()
    assert up.stats.done_jobs == 3 and up.stats.queued == 0 and up.stats.done_bytes == 30


def test_transient_errors_are_retried_and_final_ones_are_not():
    calls = {"flaky": 0, "final": 0}

    def flaky():
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise StoreError("connection reset", retryable=True)
        return "ok"

    def final():
        calls["final"] += 1
        raise StoreError("bucket 'x' does not exist")

    retries = []
    up = Uploader(threads=1, max_pending=4, attempts=4, backoff=0.01, on_retry=lambda *a: retries.append(a[0]))
    assert up.submit("flaky", 1, flaky).result() == "ok"
    fut = up.submit("final", 1, final)
    with pytest.raises(StoreError):
        fut.result()
    assert calls == {"flaky": 3, "final": 1}
    assert retries == ["flaky", "flaky"]
    with pytest.raises(UploadFailed, match="upload of final failed"):
        up.check()
    up.close(wait=False)


@pytest.mark.timeout(30)  # a hang fails here, not at the suite's 300 s
def test_failed_upload_never_hangs_close():
    up = Uploader(threads=2, max_pending=2, attempts=2, backoff=0.01)
    for i in range(2):
        up.submit(f"j{i}", 1, lambda: (_ for _ in ()).throw(StoreError("down", retryable=True)))
    with pytest.raises(UploadFailed):
        up.close(wait=True)
