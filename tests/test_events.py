"""The worker event protocol as typed records (vaultsh/events.py): encode/parse round trips, lines that are not
events (counted and shown, never raised), and the one fold every view uses."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from vaultsh import events as ev
from vaultsh.events import EVENT_TYPES, EventSink, Invalid, WorkerState, decode, encode, fold, make_event, parse
from vaultsh.progress import HeadlessPrinter
from vaultsh.supervise import RunInfo, Supervisor
from vaultsh.supervise.fake import FakeLauncher, event
from vaultsh.supervise.state import PAUSED, EventLog, WorkerStatus, apply_event

REPO = Path(__file__).resolve().parents[1]

# One event of every type with every field of the protocol table set (as a worker writes them).
EVERY = {
    "start": dict(
        run="r",
        model="m",
        hooks=["residuals_1", "attn_2"],
        store="s3://b/r",
        n_batches=8,
        batches_per_upload=2,
        pid=4242,
        format="safetensors",
    ),
    "loading": dict(
        what="data", detail="pydoc", model_params=135_000_000, model_bytes=540_000_000, dtype="float32", device="cuda:0"
    ),
    "resume": dict(from_megabatch=3, from_batch=6),
    "progress": dict(batches=7, total_batches=8, tokens=7000, tokens_per_s=1234.5, megabatch=3),
    "memory": dict(
        rss=1 << 30,
        children_rss=1 << 20,
        gpu_allocated=2 << 30,
        gpu_reserved=3 << 30,
        system_used=10 << 30,
        system_total=64 << 30,
    ),
    "upload": dict(queued=2, in_flight_bytes=4_000_000, done_bytes=8_000_000, mb_per_s=12.5, retries=1, failed=0),
    "committed": dict(megabatch=3, batch_start=6, batch_end=8, tokens=2000, bytes=4_000_000),
    "warning": dict(message="retrying upload of x (attempt 2): SlowDown"),
    "error": dict(message="RuntimeError: boom"),
    "stopping": dict(megabatch=3, filled=1, batches_per_upload=2),
    "done": dict(status="complete", batches=8, tokens=8000, megabatches=4, elapsed=12.5, already_complete=False),
}


def test_every_type_is_covered_and_every_table_field_is_typed():
    assert set(EVERY) == EVENT_TYPES
    for kind, fields in EVERY.items():
        cls = type(parse(encode(make_event(kind, 0, **fields))))
        assert cls.type == kind
        assert set(cls._fields) == {"worker", "time", *fields}, kind  # no field of the table ends up in `extra`


@pytest.mark.parametrize("kind", sorted(EVENT_TYPES))
def test_round_trip_of_every_event_type(kind):
    wire = make_event(kind, 5, **EVERY[kind])
    line = encode(wire)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    e = parse(line)
    assert not isinstance(e, Invalid) and e.type == kind and e.worker == 5 and e.time == wire["time"]
    assert e.extra == {}
    assert e.to_dict() == wire  # typed -> wire: the same dict, field for field
    assert parse(encode(e)) == e  # typed -> line -> typed
    assert decode(line) == wire
    for name, value in EVERY[kind].items():  # attributes, and the dict-style reads older callers use
        assert getattr(e, name) == value and e[name] == value and e.get(name) == value
    assert e["type"] == kind and e.get("nope", 7) == 7 and "nope" not in e


def test_the_sink_writes_lines_that_parse(tmp_path):
    seen: list[dict] = []
    path = tmp_path / "events.ndjson"
    with open(path, "wb") as f:
        sink = EventSink(2, fd=f.fileno(), callback=seen.append)
        for kind in sorted(EVENT_TYPES):
            sink.emit(kind, **EVERY[kind])
    parsed = [parse(line) for line in path.read_bytes().splitlines()]
    assert [e.type for e in parsed] == sorted(EVENT_TYPES) == [d["type"] for d in seen]
    assert all(e.worker == 2 for e in parsed) and [e.to_dict() for e in parsed] == seen
    with pytest.raises(ValueError):
        make_event("bogus", 0)


def test_an_old_log_still_reads_extra_fields_kept():
    """Lines as collector/events.py wrote them (before the typed records), and one field no table names."""
    log = (
        b'{"type":"start","time":1.5,"worker":0,"run":"r","model":"m","hooks":["h"],"store":"/v/r",'
        b'"n_batches":4,"batches_per_upload":2,"pid":7,"format":"pt"}\n'
        b'{"type":"memory","time":2.0,"worker":0,"rss":5,"children_rss":0,"gpu_allocated":null,'
        b'"gpu_reserved":null,"system_used":1,"system_total":2}\n'
        b'{"type":"progress","time":3,"worker":0,"batches":1,"total_batches":4,"tokens":10,"tokens_per_s":5,'
        b'"megabatch":0,"attempt":2}\n'
    )
    start, memory, progress = (parse(line) for line in log.splitlines())
    assert isinstance(start, ev.Start) and start.hooks == ["h"] and start.format == "pt" and start.pid == 7
    assert isinstance(memory, ev.Memory) and memory.gpu_allocated is None and memory.rss == 5
    assert isinstance(progress, ev.Progress) and progress.time == 3.0 and isinstance(progress.time, float)
    assert progress.tokens_per_s == 5.0 and progress.extra == {"attempt": 2} and progress["attempt"] == 2
    assert parse(encode(progress)) == progress


BAD_LINES = [
    (b"not json", "not JSON"),
    (b'{"type": "progress", "batches": 1', "not JSON"),  # cut off mid-line
    (b"\xff\xfe\x00garbage", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'"progress"', "not a JSON object"),
    (b"null", "not a JSON object"),
    (b'{"worker": 0, "batches": 3}', "no event type"),
    (b'{"type": "bogus", "worker": 0}', "unknown event type 'bogus'"),
    (b'{"type": 7}', "unknown event type '7'"),
    (b'{"type": "invalid"}', "unknown event type 'invalid'"),  # the reader's own record is not a wire type
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
]


@pytest.mark.parametrize("line,why", BAD_LINES, ids=[w for _, w in BAD_LINES])
def test_a_line_that_is_not_an_event_parses_to_invalid_and_never_raises(line, why):
    e = parse(line)
    assert isinstance(e, Invalid) and why in e.reason
    assert decode(line) is None
    w = WorkerState(0)
    assert [n.level for n in fold(w, e, 0.0)] == ["warning"]
    assert w.invalid == 1 and why in w.last_invalid and w.state == "queued"


def test_blank_lines_are_not_counted():
    assert parse(b"") is None and parse(b"  \r") is None and parse("\n") is None


def test_wrong_field_types_read_as_absent_and_the_fold_keeps_what_it_knew():
    e = parse(
        b'{"type":"progress","worker":"zero","time":"now","batches":"many","total_batches":true,'
        b'"tokens":12.0,"tokens_per_s":1e999,"megabatch":[1]}'
    )
    assert isinstance(e, ev.Progress)
    assert (e.worker, e.time, e.batches, e.total_batches, e.tokens, e.megabatch) == (None, None, None, None, 12, None)
    assert math.isinf(e.tokens_per_s)
    w = WorkerState(0, batches=3, total_batches=9)
    assert fold(w, parse(b'{"type":"progress","batches":"many","total_batches":null,"tokens":1e999}'), 0.0)
    assert (w.batches, w.total_batches, w.tokens, w.invalid) == (3, 9, 0, 0)
    s = parse(b'{"type":"start","hooks":["a",1],"pid":true,"n_batches":4.0,"run":5}')
    assert (s.hooks, s.pid, s.n_batches, s.run) == (["a", "1"], None, 4, "5")


def test_a_flood_of_bad_lines_is_all_counted_but_not_all_shown():
    w = WorkerState(0)
    shown = sum(len(fold(w, parse(b"garbage"), 0.0)) for _ in range(2500))
    assert w.invalid == 2500
    assert shown == 3 + 2  # the first three, then the 1000th and the 2000th (with the count so far)


# -- the fold gives the state the dashboard showed before (captured from vaultsh/supervise/state.py at 752d007) ---
def _seq(*items):
    return [event(kind, worker, t, **fields) for kind, worker, t, fields in items]


# The status fields of a worker that sent no upload, memory, warning or error events (the last three cases below).
_NOTHING_REPORTED = {
    "committed_tokens": 0,
    "committed_bytes": 0,
    "queued": 0,
    "in_flight_bytes": 0,
    "done_bytes": 0,
    "mb_per_s": 0.0,
    "retries": 0,
    "upload_failed": 0,
    "rss": None,
    "children_rss": None,
    "gpu_allocated": None,
    "gpu_reserved": None,
    "warnings": 0,
    "errors": 0,
    "last_error": None,
}

GOLDEN = [
    (
        _seq(
            (
                "start",
                0,
                100.0,
                dict(
                    run="r",
                    model="m",
                    hooks=["h"],
                    store="s",
                    n_batches=4,
                    batches_per_upload=2,
                    pid=4000,
                    format="safetensors",
                ),
            ),
            ("loading", 0, 101.0, dict(what="model", detail="tiny/llama")),
            ("loading", 0, 104.0, EVERY["loading"]),
            (
                "memory",
                0,
                104.5,
                dict(rss=1000, children_rss=10, gpu_allocated=5, gpu_reserved=6, system_used=1, system_total=2),
            ),
            ("progress", 0, 106.0, dict(batches=1, total_batches=4, tokens=100, tokens_per_s=50.0, megabatch=0)),
            (
                "upload",
                0,
                106.5,
                dict(queued=2, in_flight_bytes=300, done_bytes=100, mb_per_s=1.5, retries=1, failed=0),
            ),
            ("progress", 0, 107.0, dict(batches=2, total_batches=4, tokens=200, tokens_per_s=50.0, megabatch=1)),
            ("committed", 0, 107.5, dict(megabatch=0, batch_start=0, batch_end=2, tokens=200, bytes=2_000_000)),
            ("warning", 0, 108.0, dict(message="retrying upload\nof x \x1b[31m")),
            ("memory", 0, 108.5, dict(rss=2000, children_rss=20, gpu_allocated=None, gpu_reserved=None)),
            ("progress", 0, 109.0, dict(batches="many", total_batches=4, tokens=300.0, tokens_per_s=True, megabatch=2)),
            ("progress", 0, 110.0, dict(batches=4, total_batches=4, tokens=400, tokens_per_s=40.0, megabatch=2)),
            ("committed", 0, 111.0, dict(megabatch=1, batch_start=2, batch_end=4, tokens=200, bytes=2_000_000)),
            ("error", 0, 111.5, dict(message="boom: disk full")),
            ("done", 0, 112.0, dict(status="complete", batches=4, tokens=400, megabatches=2, elapsed=12.0)),
        ),
        {
            "index": 0,
            "state": "done",
            "detail": "",
            "pid": 4000,
            "ended_at": 1014.0,
            "batches": 4,
            "total_batches": 4,
            "tokens": 400,
            "tokens_per_s": 0.0,
            "megabatch": 2,
            "last_progress_time": 110.0,
            "committed": 2,
            "committed_tokens": 400,
            "committed_bytes": 4000000,
            "queued": 2,
            "in_flight_bytes": 300,
            "done_bytes": 100,
            "mb_per_s": 1.5,
            "retries": 1,
            "upload_failed": 0,
            "rss": 1000,
            "children_rss": 10,
            "gpu_allocated": None,
            "gpu_reserved": None,
            "warnings": 1,
            "errors": 1,
            "last_error": "boom: disk full",
            "done_status": "complete",
            "_before_pause": None,
            "_started_event": 100.0,
            "_loading_model_since": 101.0,
            "_first_batch_seen": True,
        },
        [
            ("info", "started (pid 4000): 4 batches to collect"),
            ("info", "loading model tiny/llama"),
            ("info", "model loaded: 135M parameters, 540.0 MB float32 on cuda:0 in 3.0s"),
            ("info", "first batch done (100 tokens so far), 6.0s after start"),
            ("info", "megabatch 0 committed: 2.0 MB, 200 tokens (batches 0-1)"),
            ("warning", "retrying upload of x \\x1b[31m"),
            ("info", "megabatch 1 committed: 2.0 MB, 200 tokens (batches 2-3)"),
            ("error", "boom: disk full"),
            ("info", "finished: 4 batches, 400 tokens, 2 megabatches in 12s; statistics written"),
        ],
    ),
    (
        _seq(
            ("resume", 1, 1.0, dict(from_megabatch=3, from_batch=6)),
            ("progress", 1, 2.0, dict(batches=7, total_batches=20, tokens=70, tokens_per_s=7.0, megabatch=3)),
            ("stopping", 1, 3.0, dict(megabatch=3, filled=1, batches_per_upload=2)),
            ("progress", 1, 4.0, dict(batches=8, total_batches=20, tokens=80, tokens_per_s=7.0, megabatch=4)),
            ("done", 1, 5.0, dict(status="stopped", batches=8, tokens=80, megabatches=4, elapsed=4000.0)),
        ),
        {
            **_NOTHING_REPORTED,
            "index": 1,
            "state": "stopped",
            "detail": "",
            "pid": None,
            "ended_at": 1004.0,
            "batches": 8,
            "total_batches": 20,
            "tokens": 80,
            "tokens_per_s": 0.0,
            "megabatch": 4,
            "last_progress_time": 4.0,
            "committed": 3,
            "done_status": "stopped",
            "_before_pause": None,
            "_started_event": None,
            "_loading_model_since": None,
            "_first_batch_seen": True,
        },
        [
            ("info", "resuming at megabatch 3 (batch 6)"),
            ("info", "first batch done (70 tokens so far)"),
            ("info", "stopping: finishing megabatch 3 (1/2 batches), then exit"),
            ("info", "stopped: 8 batches, 80 tokens, 4 megabatches committed in 1h06m; statistics written"),
        ],
    ),
    (
        _seq(
            ("start", 2, 1.0, dict(n_batches=3)),
            (
                "done",
                2,
                2.0,
                dict(status="complete", batches=3, tokens=30, megabatches=1, elapsed=0.0, already_complete=True),
            ),
        ),
        {
            **_NOTHING_REPORTED,
            "index": 2,
            "state": "done",
            "detail": "",
            "pid": None,
            "ended_at": 1001.0,
            "batches": 3,
            "total_batches": 3,
            "tokens": 30,
            "tokens_per_s": 0.0,
            "megabatch": 0,
            "last_progress_time": None,
            "committed": 0,
            "done_status": "complete",
            "_before_pause": None,
            "_started_event": 1.0,
            "_loading_model_since": None,
            "_first_batch_seen": False,
        },
        [
            ("info", "started (pid ?): 3 batches to collect"),
            ("info", "already complete: 3 batches, 30 tokens, 1 megabatches; nothing to do"),
        ],
    ),
    (
        _seq(
            ("start", 3, 1.0, dict(pid=9)),
            ("loading", 3, 2.0, dict(what="tokenizer")),
            ("done", 3, 3.0, dict(status="failed", batches=0, tokens=0, megabatches=0)),
        ),
        {
            **_NOTHING_REPORTED,
            "index": 3,
            "state": "failed",
            "detail": "tokenizer",
            "pid": 9,
            "ended_at": 1002.0,
            "batches": 0,
            "total_batches": None,
            "tokens": 0,
            "tokens_per_s": 0.0,
            "megabatch": 0,
            "last_progress_time": None,
            "committed": 0,
            "done_status": "failed",
            "_before_pause": None,
            "_started_event": 1.0,
            "_loading_model_since": None,
            "_first_batch_seen": False,
        },
        [
            ("info", "started (pid 9): ? batches to collect"),
            ("info", "ended (failed): 0 batches, 0 tokens, 0 megabatches committed"),
        ],
    ),
]


@pytest.mark.parametrize("seq,fields,lines", GOLDEN, ids=["healthy", "resumed-stopped", "already-complete", "failed"])
def test_the_fold_gives_the_state_and_lines_the_dashboard_showed_before(seq, fields, lines):
    w, log = WorkerStatus(seq[0]["worker"]), EventLog()
    for k, e in enumerate(seq):
        apply_event(w, e, log, 1000.0 + k)  # wire dicts, as the supervisor got them before
    assert {name: getattr(w, name) for name in fields} == fields
    assert [(line.level, line.message) for line in log.lines] == lines
    assert all(line.origin == "event" for line in log.lines) and list(w.log) == list(log.lines)
    # the typed path (what a reader thread feeds) gives the same
    t = WorkerState(seq[0]["worker"])
    notes = [n for k, e in enumerate(seq) for n in fold(t, parse(encode(e)), 1000.0 + k)]
    assert {name: getattr(t, name) for name in fields} == fields
    assert [(n.level, n.message) for n in notes] == lines


def test_a_paused_worker_stays_paused_and_remembers_where_it_was():
    w = WorkerState(0, state=PAUSED)
    fold(w, parse(encode(event("progress", 0, batches=1, total_batches=4, tokens=1, tokens_per_s=1.0, megabatch=0))), 0)
    assert (w.state, w._before_pause, w.batches) == (PAUSED, "running", 1)
    fold(w, parse(encode(event("stopping", 0, megabatch=0, filled=1, batches_per_upload=2))), 0)
    assert (w.state, w._before_pause) == ("stopping", None)


def test_every_consumer_folds_the_same_state():
    """The supervisor (dashboard, watch), the headless printer and the Ray forwarder all keep the same state."""
    from vaultsh.launch.ray import _Forwarder

    seq = GOLDEN[0][0]
    lines = [encode(e) for e in seq] + [b"oops, a stray print\n"]
    sup = Supervisor(FakeLauncher(), [0], clock=lambda: 5.0, sample_memory=False, info=RunInfo())
    sup.start()
    sup._on_lines(0, [line.rstrip(b"\n") for line in lines])
    printer = HeadlessPrinter(Console(file=io.StringIO(), width=200))
    for line in lines:
        printer(parse(line))
    forward = _Forwarder(None, 0, attempt=2)
    forward.lines([line.rstrip(b"\n") for line in lines])
    compare = [k for k in GOLDEN[0][1] if k != "ended_at"] + ["invalid", "last_invalid", "started", "done"]
    sup_state = {k: getattr(sup.snapshot()[0], k) for k in compare}
    assert sup_state == {k: getattr(printer.workers[0], k) for k in compare}
    forwarded_done = forward.state.done
    assert forwarded_done is not None and forwarded_done.extra == {"attempt": 2}  # the forwarder tags its attempt
    forwarded_done.extra.clear()
    assert sup_state == {k: getattr(forward.state, k) for k in compare}
    assert sup_state["invalid"] == 1 and sup_state["started"] and sup_state["done"].status == "complete"


def test_supervisor_counts_and_shows_bad_lines_and_passes_them_on():
    got: list[ev.Event] = []
    sup = Supervisor(FakeLauncher(), [0, 1], clock=lambda: 5.0, sample_memory=False, on_event=got.append)
    sup.start()
    good = encode(event("warning", 1, message="slow store")).rstrip(b"\n")
    sup._on_lines(1, [b"Traceback (most recent call last):", b"", b'{"type":"bogus"}', good])
    w1 = next(w for w in sup.snapshot() if w.index == 1)
    assert (w1.invalid, w1.warnings) == (2, 1) and "unknown event type 'bogus'" in w1.last_invalid
    messages = [(line.worker, line.level, line.message) for line in sup.logs_since(0)]
    assert (
        1,
        "warning",
        "ignored a line that is not an event (not JSON): Traceback (most recent call last):",
    ) in messages
    assert (1, "warning", "slow store") in messages
    assert [(type(e).__name__, e.worker) for e in got] == [("Invalid", 1), ("Invalid", 1), ("WorkerWarning", 1)]
    sup.feed({"type": "progress", "worker": 0, "batches": 1, "total_batches": 2})  # the wire dict form still works
    assert next(w for w in sup.snapshot() if w.index == 0).batches == 1 and isinstance(got[-1], ev.Progress)


def test_headless_printer_warns_about_bad_lines_and_escapes_markup():
    out = io.StringIO()
    with HeadlessPrinter(Console(file=out, width=200)) as printer:
        printer(parse(b"[worker crashed] not an event"))
        printer(Invalid(worker=2, reason="not JSON", line="x"))
        printer(event("warning", 0, message="disk [red]full[/red]"))
        printer(event("resume", 0, from_megabatch=2, from_batch=4))
    text = out.getvalue()
    assert "worker 0: warning: ignored a line that is not an event (not JSON): [worker crashed] not an event" in text
    assert "worker 2: warning: ignored a line that is not an event (not JSON): x" in text
    assert "disk [red]full[/red]" in text  # shown as written, not taken as markup
    assert "worker 0: resuming at megabatch 2 (batch 4)" in text
    assert printer.workers[0].invalid == 1 and printer.workers[2].invalid == 1


def test_note_durations_show_tenths_under_ten_seconds():
    assert ev._duration(3.04) == "3.0s" and ev._duration(9.96) == "10.0s"
    assert ev._duration(10) == "10s" and ev._duration(185) == "3m05s" and ev._duration(-1) == "-"


def test_importing_the_protocol_is_standard_library_only():
    code = (
        "import sys; before = set(sys.modules); import vaultsh.events\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(sorted(m for m in new if m not in sys.stdlib_module_names and m != 'vaultsh'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().replace("'", '"')) == []
