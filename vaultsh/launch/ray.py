"""Ray: one collection worker per machine index as a Ray task, with retries and forwarded events.

Each task runs the real worker process (`python -m vaultsh collect ... --machine I
--events-fd W`) on whatever node Ray picks, reads its NDJSON events and
forwards them (progress coalesced to two a second per worker) through a Ray
queue to the launching process, which shows them with the headless printer.

A task that fails after its worker started (crash, OOM kill, lost node,
upload failure) is resubmitted up to `retries` times; the new worker resumes
after its last committed megabatch. A worker that fails before it starts (a
config the model rejects, a changed config under an existing run) is not
retried: it would fail the same way.

With `wait=False` the supervision loop runs in a detached actor, so the
launching process may exit; follow the run on the store (`vaultsh inspect`,
`vaultsh finalize`).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vaultsh.errors import UserError
from vaultsh.events import Done, Event, WorkerState, WorkerWarning, fold, parse
from vaultsh.launch.common import LaunchPlan, forwarded_env

NAMESPACE = "vaultsh"
_COALESCED = frozenset({"progress", "upload", "memory"})
_FLUSH_EVERY_S = 0.5


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("the Ray launcher needs Ray: pip install 'vaultsh[ray]' (or pip install ray)") from None
    return ray


def parse_resources(text: str | None) -> dict[str, float]:
    """`--resources '{"CPU": 32, "GPU": 2}'` -> {"CPU": 32.0, "GPU": 2.0}."""
    if not text:
        return {"CPU": 1.0}
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise UserError(f'--resources: not valid JSON ({exc}); write e.g. \'{{"CPU": 32, "GPU": 2}}\'') from None
    if not isinstance(raw, dict) or not raw:
        raise UserError('--resources: must be a JSON object of resource name -> amount, e.g. \'{"CPU": 32, "GPU": 2}\'')
    out = {}
    for k, v in raw.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise UserError(f"--resources: {k!r} must be a non-negative number, got {v!r}")
        out[str(k)] = float(v)
    return out


def task_options(resources: dict[str, float]) -> dict[str, Any]:
    """Ray task options from a resource dict: CPU/GPU/memory are Ray's own, the rest custom."""
    res = dict(resources)
    opts: dict[str, Any] = {"num_cpus": res.pop("CPU", 1.0), "num_gpus": res.pop("GPU", 0.0)}
    if "memory" in res:
        opts["memory"] = int(res.pop("memory"))
    if res:
        opts["resources"] = res
    return opts


@dataclass
class WorkerResult:
    """How one worker index ended."""

    index: int
    status: str  # complete | stopped | failed
    attempts: int
    returncode: int | None = None
    batches: int = 0
    tokens: int = 0
    megabatches: int = 0
    error: str | None = None
    node: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Payload:
    """What a task needs to run worker I anywhere: the validated config and how to start it."""

    config: dict
    store_uri: str
    force: bool
    cwd: str
    env: dict[str, str] = field(default_factory=dict)


def payload_from_plan(plan: LaunchPlan) -> Payload:
    cfg = plan.config.model_dump(mode="json")
    model = cfg.get("model", {})
    name = model.get("name")
    if isinstance(name, str) and os.path.isdir(name):  # a local model directory: absolute for other cwd's
        model["name"] = os.path.abspath(name)
    return Payload(config=cfg, store_uri=plan.store_uri, force=plan.force, cwd=plan.cwd, env=forwarded_env())


# -- inside a Ray task ---------------------------------------------------------


class _Forwarder:
    """Worker events -> the Ray queue: lifecycle events at once, the frequent ones coalesced (latest
    of each kind, at most every _FLUSH_EVERY_S), so a busy worker never floods the driver. Each event is
    also folded into the worker's state, which says whether it started, how it ended and its last error."""

    def __init__(self, queue, index: int, attempt: int):
        self.queue, self.attempt = queue, attempt
        self.state = WorkerState(index)
        self.buffered: list[Event] = []
        self.latest: dict[str, Event] = {}
        self.last_flush = time.monotonic()
        self.lock = threading.Lock()

    def lines(self, raw: list[bytes]) -> None:
        """WorkerProcess's on_lines callback (its reader thread)."""
        with self.lock:
            for line in raw:
                event = parse(line)
                if event is None:
                    continue
                if event.worker is None:  # a line that was not an event: it came from this worker all the same
                    event.worker = self.state.index
                event.extra["attempt"] = self.attempt
                fold(self.state, event, time.monotonic())
                kind = event.type
                if kind in _COALESCED:
                    self.latest[kind] = event
                else:
                    self.buffered.append(event)
                if kind not in _COALESCED or time.monotonic() - self.last_flush >= _FLUSH_EVERY_S:
                    self._flush()

    def flush(self) -> None:
        with self.lock:
            self._flush()

    def _flush(self) -> None:
        batch = self.buffered + list(self.latest.values())
        self.buffered, self.latest = [], {}
        self.last_flush = time.monotonic()
        if self.queue is not None and batch:
            try:
                self.queue.put_nowait_batch(batch)
            except Exception:  # a full or gone queue never stops the worker
                pass


def run_worker_process(payload: Payload, index: int, attempt: int, queue=None) -> dict:
    """Run worker `index` as a child process; forward its events to `queue`; return how it ended.

    The child is a `WorkerProcess` (the same spawn as local collection) that
    also gets SIGTERM if this Ray task's process dies, so no worker outlives it.
    """
    import shutil
    import signal
    import socket
    import tempfile

    import yaml

    from vaultsh.supervise.process import EVENTS_FD_PLACEHOLDER, WorkerProcess, last_log_line

    tmp = tempfile.mkdtemp(prefix="vaultsh-ray-")
    try:
        cfg_path = os.path.join(tmp, "config.yaml")
        with open(cfg_path, "w") as f:
            yaml.safe_dump(payload.config, f)
        argv = [
            sys.executable,
            "-m",
            "vaultsh",
            "collect",
            cfg_path,
            "--machine",
            str(index),
            "--store",
            payload.store_uri,
            "--events-fd",
            EVENTS_FD_PLACEHOLDER,
        ]
        if payload.force:
            argv.append("--force")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **payload.env)
        proc = WorkerProcess(
            argv,
            os.path.join(tmp, "worker.log"),
            env=env,
            cwd=payload.cwd if os.path.isdir(payload.cwd) else tmp,
            die_with_parent=True,
        )
        forward = _Forwarder(queue, index, attempt)
        proc.start(forward.lines)
        try:
            rc = None
            while rc is None:  # short waits: a ray.cancel() interrupt is seen promptly
                rc = proc.wait(0.5)
        except KeyboardInterrupt:  # ray.cancel(): ask the worker to stop after its megabatch in flight
            proc.send(signal.SIGTERM)
            proc.wait()
            raise
        finally:
            proc.reader_done(timeout=10)
            forward.flush()
        state = forward.state
        error = state.last_error
        if error is None and rc != 0:
            error = last_log_line(proc.log_path) or f"exit status {rc}"
        return {
            "index": index,
            "returncode": rc,
            "started": state.started,
            "done": state.done,
            "error": error,
            "node": socket.gethostname(),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- supervision ---------------------------------------------------------------


def _remote_task(ray):
    return ray.remote(max_retries=0)(run_worker_process)


def supervise(
    payload: Payload,
    indices: list[int],
    options: dict[str, Any],
    retries: int,
    queue=None,
    on_event: Callable[[Event], None] | None = None,
    poll_s: float = 0.2,
) -> list[WorkerResult]:
    """Run every index as a Ray task; resubmit failures (they resume); return how each ended."""
    ray = _import_ray()
    from ray.exceptions import RayError

    remote = _remote_task(ray)

    def submit(i: int, attempt: int):
        return remote.options(**options, name=f"vaultsh-w{i}").remote(payload, i, attempt, queue)

    attempts = {i: 1 for i in indices}
    refs = {submit(i, 1): i for i in indices}
    results: dict[int, WorkerResult] = {}

    def emit(event: Event) -> None:
        if on_event is not None:
            on_event(event)

    def drain() -> None:
        if queue is None or on_event is None:
            return
        while True:
            try:
                items = queue.get_nowait_batch(queue.qsize()) if queue.qsize() else []
            except Exception:
                items = []
            if not items:
                return
            for e in items:
                emit(e)

    while refs:
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=poll_s)
        drain()
        for ref in ready:
            i = refs.pop(ref)
            try:
                res = ray.get(ref)
            except RayError as exc:  # the task process or its node died
                res = {
                    "returncode": None,
                    "started": True,
                    "done": None,
                    "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                }
            done: Done = res.get("done") or Done()
            ok = res.get("returncode") == 0 and done.status in ("complete", "stopped")
            retryable = res.get("started") or res.get("returncode") not in (2,)
            if not ok and retryable and attempts[i] <= retries:
                attempts[i] += 1
                emit(
                    WorkerWarning(
                        worker=i,
                        time=time.time(),
                        message=f"failed ({res.get('error')}); retrying, attempt {attempts[i]} of "
                        f"{retries + 1} (resumes after its last commit)",
                    )
                )
                refs[submit(i, attempts[i])] = i
                continue
            results[i] = WorkerResult(
                index=i,
                status=done.status if ok and done.status else "failed",
                attempts=attempts[i],
                returncode=res.get("returncode"),
                batches=done.batches or 0,
                tokens=done.tokens or 0,
                megabatches=done.megabatches or 0,
                error=None if ok else res.get("error"),
                node=res.get("node"),
            )
    drain()
    return [results[i] for i in indices]


class _Supervisor:
    """Runs `supervise` inside a detached actor (launch without --wait)."""

    def __init__(self) -> None:
        self.results: list[dict] | None = None

    def ping(self) -> bool:
        return True

    def run(self, payload: Payload, indices: list[int], options: dict, retries: int) -> None:
        import ray

        try:
            self.results = [r.to_dict() for r in supervise(payload, indices, options, retries)]
        finally:
            ray.actor.exit_actor()  # free the name: the same indices can be launched again

    def status(self) -> list[dict] | None:
        return self.results


def _connect(address: str | None):
    ray = _import_ray()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False}
        if address:
            kwargs["address"] = address
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            raise UserError(
                f"cannot connect to the Ray cluster at {address or os.environ.get('RAY_ADDRESS') or 'auto'}: {exc}"
            ) from None
    return ray


def launch(
    plan: LaunchPlan,
    *,
    resources: dict[str, float],
    address: str | None = None,
    wait: bool = True,
    retries: int = 2,
    on_event: Callable[[Event], None] | None = None,
) -> list[WorkerResult] | str:
    """Start plan.indices on Ray. With `wait`, block and return the results; else return the supervisor's name."""
    ray = _connect(address)
    payload = payload_from_plan(plan)
    options = task_options(resources)
    if wait:
        from ray.util.queue import Queue

        queue = Queue(actor_options={"num_cpus": 0})
        try:
            return supervise(payload, plan.indices, options, retries, queue=queue, on_event=on_event)
        finally:
            queue.shutdown()
    name = f"vaultsh-{plan.run_name}-{plan.indices[0]}-{plan.indices[-1]}"
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        pass
    else:
        raise UserError(
            f"a launch of workers {plan.indices[0]}-{plan.indices[-1]} of {plan.run_name} is already running on this Ray cluster (actor {name!r})"
        )
    actor = ray.remote(_Supervisor).options(name=name, namespace=NAMESPACE, lifetime="detached", num_cpus=0).remote()
    ray.get(actor.ping.remote())
    actor.run.remote(payload, plan.indices, options, retries)
    return name
