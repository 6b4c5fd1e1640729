"""The headless run supervisor (no textual here): local worker processes and their state.

- `state`: `WorkerStatus` and how events update it
- `process`: one worker subprocess (own session, log file, events pipe)
- `supervisor`: `Supervisor` (start, pause, resume, stop, restart, tick, snapshot)
- `spawn`: local worker processes for `vaultsh collect`: argv, `--machines` parsing, default concurrency, log dir
- `watcher`: `StoreWatcher`, the same view of a run read from its commit records
- `fake`, `fakeworker`: stand-ins for tests and benchmarks
"""

from vaultsh.supervise.state import LogLine, WorkerStatus
from vaultsh.supervise.supervisor import RunInfo, Supervisor, Totals

__all__ = ["LogLine", "RunInfo", "Supervisor", "Totals", "WorkerStatus"]
