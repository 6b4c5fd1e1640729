"""Starting `vaultsh collect` workers locally: which indices, how many at once, the argv."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from vaultsh.errors import UserError
from vaultsh.supervise.process import EVENTS_FD_PLACEHOLDER, WorkerProcess

LOG_ROOT = ".vaultsh/logs"


def parse_machines(text: str, num_runs: int) -> list[int]:
    """'0-3', '1,4', '0-1,5' -> sorted worker indices, each checked against num_runs."""
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise UserError(f"--machines: {text!r} is not allowed (use indices and ranges such as 0-3 or 0,2,5)")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise UserError(f"--machines: range {part!r} is empty (write the lower index first)")
        if b >= num_runs:
            raise UserError(f"--machines: {b} is out of range for num_runs {num_runs} (0-{num_runs - 1})")
        out.update(range(a, b + 1))
    return sorted(out)


def gpu_count() -> int:
    """GPUs this machine shows (CUDA_VISIBLE_DEVICES, else nvidia-smi); 0 without torch imports."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def default_concurrency(n_machines: int, gpus: int | None = None, cpus: int | None = None) -> int:
    """One worker per GPU; on CPU one per 8 cores (a forward pass already uses every core it gets)."""
    gpus = gpu_count() if gpus is None else gpus
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    slots = gpus if gpus > 0 else max(1, cpus // 8)
    return max(1, min(n_machines, slots))


def log_dir_for(run_name: str, root: str | Path | None = None) -> Path:
    """The run's local log directory: ./.vaultsh/logs/<run_name>/ (one file per worker)."""
    return Path(root if root is not None else LOG_ROOT) / run_name


def collect_launcher(
    config: str,
    log_dir: Path,
    store: str | None = None,
    force: bool = False,
    gpus: int = 0,
    python: str = sys.executable,
) -> Callable[[int], WorkerProcess]:
    """A launcher for the supervisor: worker i is `vaultsh collect CONFIG --machine i --events-fd N`.

    With GPUs, worker i sees only GPU i % gpus (CUDA_VISIBLE_DEVICES).
    """
    config = str(Path(config).resolve())

    def launch(i: int) -> WorkerProcess:
        argv = [python, "-m", "vaultsh", "collect", config, "--machine", str(i), "--events-fd", EVENTS_FD_PLACEHOLDER]
        if store:
            argv += ["--store", store]
        if force:
            argv.append("--force")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpus > 0:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        return WorkerProcess(argv, log_dir / f"worker-{i}.log", env=env)

    return launch
