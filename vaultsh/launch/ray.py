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
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from vaultsh.errors import UserError
from vaultsh.launch.common import LaunchPlan, forwarded_env

NAMESPACE = "vaultsh"
_COALESCED = frozenset({"progress", "upload", "memory"})
_FLUSH_EVERY_S = 0.5
_STDERR_TAIL = 4000


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
        raise UserError(f"--resources: not valid JSON ({exc}); write e.g. '{{\"CPU\": 32, \"GPU\": 2}}'") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError("--resources: must be a JSON object of resource name -> amount, e.g. '{\"CPU\": 32, \"GPU\": 2}'")
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

def _die_with_parent():
    """Linux: a preexec function that SIGTERMs the worker if the Ray task process dies (no orphans).

    libc is loaded here, before the fork: the child only makes the one prctl call.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    sigterm = int(signal.SIGTERM)
    return lambda: prctl(1, sigterm)  # PR_SET_PDEATHSIG


def run_worker_process(payload: Payload, index: int, attempt: int, queue=None) -> dict:
    """Run worker `index` as a child process; forward its events to `queue`; return how it ended."""
    import signal
    import subprocess
    import tempfile

    import yaml

    from collector.events import decode

    tmp = tempfile.mkdtemp(prefix="vaultsh-ray-")
    cfg_path = os.path.join(tmp, "config.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(payload.config, f)
    argv = [sys.executable, "-m", "vaultsh", "collect", cfg_path, "--machine", str(index), "--store", payload.store_uri]
    if payload.force:
        argv.append("--force")
    r, w = os.pipe()
    argv += ["--events-fd", str(w)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **payload.env)
    log = tempfile.TemporaryFile(dir=tmp)
    proc = subprocess.Popen(argv, cwd=payload.cwd if os.path.isdir(payload.cwd) else tmp, env=env, pass_fds=(w,),
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent())
    os.close(w)
    started, done, error = False, None, None
    buffered: list[dict] = []
    latest: dict[str, dict] = {}
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal last_flush
        batch = buffered + list(latest.values())
        buffered.clear()
        latest.clear()
        last_flush = time.monotonic()
        if queue is not None and batch:
            try:
                queue.put_nowait_batch(batch)
            except Exception:  # a full or gone queue never stops the worker
                pass

    try:
        with os.fdopen(r, "rb") as channel:
            for line in channel:
                event = decode(line)
                if event is None:
                    continue
                event["attempt"] = attempt
                kind = event["type"]
                started = started or kind == "start"
                if kind == "done":
                    done = event
                elif kind == "error":
                    error = event.get("message")
                if kind in _COALESCED:
                    latest[kind] = event
                else:
                    buffered.append(event)
                if kind not in _COALESCED or time.monotonic() - last_flush >= _FLUSH_EVERY_S:
                    flush()
        rc = proc.wait()
    except KeyboardInterrupt:  # ray.cancel(): ask the worker to stop after its megabatch in flight
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise
    finally:
        flush()
    log.seek(0, os.SEEK_END)
    log.seek(max(0, log.tell() - _STDERR_TAIL))
    tail = log.read().decode("utf-8", "replace")
    log.close()
    if error is None and rc != 0:
        lines = [ln for ln in tail.splitlines() if ln.strip()]
        error = lines[-1] if lines else f"exit status {rc}"
    import shutil
    import socket

    shutil.rmtree(tmp, ignore_errors=True)
    return {"index": index, "returncode": rc, "started": started, "done": done, "error": error,
            "node": socket.gethostname()}


# -- supervision ---------------------------------------------------------------

def _remote_task(ray):
    return ray.remote(max_retries=0)(run_worker_process)


def supervise(payload: Payload, indices: list[int], options: dict[str, Any], retries: int,
              queue=None, on_event: Callable[[dict], None] | None = None, poll_s: float = 0.2) -> list[WorkerResult]:
    """Run every index as a Ray task; resubmit failures (they resume); return how each ended."""
    ray = _import_ray()
    from ray.exceptions import RayError

    remote = _remote_task(ray)

    def submit(i: int, attempt: int):
        return remote.options(**options, name=f"vaultsh-w{i}").remote(payload, i, attempt, queue)

    attempts = {i: 1 for i in indices}
    refs = {submit(i, 1): i for i in indices}
    results: dict[int, WorkerResult] = {}

    def emit(event: dict) -> None:
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
                res = {"returncode": None, "started": True, "done": None,
                       "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
            done = res.get("done") or {}
            ok = res.get("returncode") == 0 and done.get("status") in ("complete", "stopped")
            retryable = res.get("started") or res.get("returncode") not in (2,)
            if not ok and retryable and attempts[i] <= retries:
                attempts[i] += 1
                emit({"type": "warning", "time": time.time(), "worker": i,
                      "message": f"failed ({res.get('error')}); retrying, attempt {attempts[i]} of {retries + 1} "
                                 "(resumes after its last commit)"})
                refs[submit(i, attempts[i])] = i
                continue
            results[i] = WorkerResult(
                index=i, status=done["status"] if ok else "failed",
                attempts=attempts[i], returncode=res.get("returncode"), batches=done.get("batches", 0),
                tokens=done.get("tokens", 0), megabatches=done.get("megabatches", 0),
                error=None if ok else res.get("error"), node=res.get("node"),
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
            raise UserError(f"cannot connect to the Ray cluster at {address or os.environ.get('RAY_ADDRESS') or 'auto'}: {exc}") from None
    return ray


def launch(plan: LaunchPlan, *, resources: dict[str, float], address: str | None = None, wait: bool = True,
           retries: int = 2, on_event: Callable[[dict], None] | None = None) -> list[WorkerResult] | str:
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
        raise UserError(f"a launch of workers {plan.indices[0]}-{plan.indices[-1]} of {plan.run_name} is already running on this Ray cluster (actor {name!r})")
    actor = ray.remote(_Supervisor).options(name=name, namespace=NAMESPACE, lifetime="detached", num_cpus=0).remote()
    ray.get(actor.ping.remote())
    actor.run.remote(payload, plan.indices, options, retries)
    return name
