"""What every launcher needs: the config, which worker indices to start, each one's command line."""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaultsh.errors import ConfigError, UserError

# Environment variables a launcher passes on to remote workers when they are set
# here. None of them is a secret: credentials come from the nodes' own
# environment (instance roles, AWS_* set by the cluster), never from a launcher.
FORWARDED_ENV = (
    "S3_ENDPOINT_URL",
    "S3_BUCKET_NAME",
    "VAULTSH_S3_MAX_ATTEMPTS",
    "VAULTSH_TMPDIR",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "AWS_DEFAULT_REGION",
)


@dataclass
class LaunchPlan:
    """Which workers a launch starts and how each is run."""

    config_path: Path  # absolute
    run_name: str
    num_runs: int
    indices: list[int]
    store_uri: str  # resolved (absolute for a local directory)
    python: str = sys.executable
    force: bool = False
    cwd: str = field(default_factory=os.getcwd)
    config: Any = None  # the validated CollectConfig

    def worker_argv(
        self, index: int | str, events_fd: int | str | None = None, config_path: str | os.PathLike | None = None
    ) -> list[str]:
        """The command line that runs worker `index` (an int, or a shell expression such as $SLURM_ARRAY_TASK_ID)."""
        argv = [
            self.python,
            "-m",
            "vaultsh",
            "collect",
            str(config_path or self.config_path),
            "--machine",
            str(index),
            "--store",
            self.store_uri,
        ]
        argv += ["--events-fd", str(events_fd)] if events_fd is not None else ["--headless"]
        if self.force:
            argv.append("--force")
        return argv

    def worker_shell(self, index: int | str, events_fd: int | None = None) -> str:
        """`worker_argv` as one shell line; a `$VAR` index is left for the shell to expand."""
        parts = [shlex.quote(a) for a in self.worker_argv(0, events_fd=events_fd)]
        i = parts.index("--machine") + 1
        parts[i] = f'"{index}"' if isinstance(index, str) and index.startswith("$") else shlex.quote(str(index))
        return " ".join(parts)


def parse_range(num_runs: int, workers: int | None, start: int | None, end: int | None) -> list[int]:
    """Worker indices start..end (inclusive) after checking them against the config's num_runs."""
    if workers is not None:
        if workers < 1:
            raise UserError(f"--workers: {workers} is not allowed (must be >= 1)")
        if workers != num_runs:
            raise ConfigError(
                f"--workers {workers} but the config's num_runs is {num_runs}: set num_runs: {workers} in the config "
                "(every worker must know the total to take a disjoint share; otherwise workers collect the same data)"
            )
    start = 0 if start is None else start
    end = num_runs - 1 if end is None else end
    if not 0 <= start <= end < num_runs:
        raise UserError(
            f"--start {start} --end {end}: indices must satisfy 0 <= start <= end <= {num_runs - 1} (num_runs {num_runs})"
        )
    return list(range(start, end + 1))


def make_plan(
    config: str | os.PathLike,
    *,
    workers: int | None = None,
    start: int | None = None,
    end: int | None = None,
    store: str | None = None,
    force: bool = False,
    python: str | None = None,
) -> LaunchPlan:
    """Load and validate the config here (so a bad config fails before anything is launched)."""
    from collector.config import load_config

    path = Path(config).expanduser()
    if not path.is_file():
        raise UserError(f"{config}: no such config file")
    cfg = load_config(path)
    indices = parse_range(cfg.num_runs, workers, start, end)
    return LaunchPlan(
        config_path=path.resolve(),
        run_name=cfg.run_name,
        num_runs=cfg.num_runs,
        indices=indices,
        store_uri=absolute_uri(store or cfg.storage.uri),
        python=python or sys.executable,
        force=force,
        config=cfg,
    )


def absolute_uri(uri: str) -> str:
    """An s3:// URI as is; a local directory made absolute (workers may start elsewhere)."""
    if str(uri).startswith("s3://"):
        return str(uri)
    return str(Path(uri).expanduser().resolve())


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def ranges(items: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (also Slurm's --array syntax)."""
    out: list[list[int]] = []
    for v in sorted(items):
        if out and out[-1][1] == v - 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in out)
