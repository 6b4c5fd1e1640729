"""A stand-in worker that speaks the event protocol without a model (tests, benchmarks, demos).

`python -m vaultsh.supervise.fakeworker --worker 0 --events-fd N --rate 200 --batches 1000`
emits start/loading, then `rate` events a second (mostly progress, with upload
and memory events mixed in, a commit every `--per-megabatch` batches), and a
`done` event. SIGTERM stops it after the current "megabatch" (like the real
worker); `--fail-after B` makes it report an error and exit 1 at batch B.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from vaultsh.events import EventSink


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fakeworker")
    p.add_argument("--worker", type=int, default=0)
    p.add_argument("--events-fd", type=int, required=True)
    p.add_argument("--rate", type=float, default=50.0, help="events per second")
    p.add_argument("--batches", type=int, default=1000)
    p.add_argument("--per-megabatch", type=int, default=20)
    p.add_argument("--tokens-per-batch", type=int, default=512)
    p.add_argument("--fail-after", type=int, default=None)
    args = p.parse_args(argv)

    sink = EventSink(args.worker, fd=args.events_fd)
    stopping = {"flag": False}

    def on_term(signum, frame):
        if stopping["flag"]:
            sys.exit(130)
        stopping["flag"] = True
        print("stopping after the megabatch in flight", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    sink.emit(
        "start",
        run="fake.run",
        model="fake-model",
        hooks=["residuals_1"],
        store="mem://fake/fake.run",
        n_batches=args.batches,
        batches_per_upload=args.per_megabatch,
        pid=os.getpid(),
        format="safetensors",
    )
    sink.emit("loading", what="model", detail="fake-model")
    period = 1.0 / args.rate if args.rate > 0 else 0.0
    next_at = time.monotonic()
    tokens = committed = 0
    status = "complete"
    announced = False
    for b in range(1, args.batches + 1):
        tokens += args.tokens_per_batch
        if stopping["flag"] and not announced:  # as the real worker: from the loop, not the signal handler
            announced = True
            sink.emit(
                "stopping",
                megabatch=committed,
                filled=(b - 1) % args.per_megabatch + 1,
                batches_per_upload=args.per_megabatch,
            )
        if args.fail_after is not None and b >= args.fail_after:
            sink.emit("error", message=f"RuntimeError: fake failure at batch {b}")
            sink.emit(
                "done", status="failed", batches=b, tokens=tokens, megabatches=committed, elapsed=time.monotonic() - t0
            )
            print(f"RuntimeError: fake failure at batch {b}", file=sys.stderr)
            return 1
        elapsed = max(1e-6, time.monotonic() - t0)
        kind = b % 10
        if kind == 7:
            sink.emit(
                "upload",
                queued=b % 3,
                in_flight_bytes=(b % 3) * 1_000_000,
                done_bytes=b * 100_000,
                mb_per_s=12.5,
                retries=0,
                failed=0,
            )
        elif kind == 9:
            sink.emit(
                "memory",
                rss=200_000_000,
                children_rss=0,
                gpu_allocated=None,
                gpu_reserved=None,
                system_used=1,
                system_total=2,
            )
        else:
            sink.emit(
                "progress",
                batches=b,
                total_batches=args.batches,
                tokens=tokens,
                tokens_per_s=tokens / elapsed,
                megabatch=committed,
            )
        if b % args.per_megabatch == 0:
            sink.emit(
                "committed",
                megabatch=committed,
                batch_start=b - args.per_megabatch,
                batch_end=b,
                tokens=args.per_megabatch * args.tokens_per_batch,
                bytes=4_000_000,
            )
            committed += 1
            if stopping["flag"]:
                status = "stopped"
                break
        next_at += period
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    sink.emit("done", status=status, batches=b, tokens=tokens, megabatches=committed, elapsed=time.monotonic() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
