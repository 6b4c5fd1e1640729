"""`vaultsh launch slurm`: generated scripts, a fake sbatch for what one node cannot show, and a real cluster.

Tests marked `slurm` submit real jobs to a one-node cluster on this machine
(scripts/slurm-up.sh brings it up; .ci/run installs Slurm first) and are
skipped with the script's reason when it cannot start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vaultsh.errors import UserError
from vaultsh.launch.common import make_plan, parse_range, ranges
from vaultsh.launch.slurm import SlurmOptions, build_jobs, options_from
from vaultsh.launch.slurmstate import FAILED, PENDING, RUNNING, DONE, classify, parse_sacct, parse_scontrol

ROOT = Path(__file__).resolve().parents[1]


FAKE_SBATCH = """#!/bin/bash
# Records its arguments, one call per line, and answers like `sbatch --parsable`.
echo "$@" >> "$SBATCH_LOG"
n=$(wc -l < "$SBATCH_LOG")
if [ -n "$SBATCH_FAIL_AT" ] && [ "$n" -ge "$SBATCH_FAIL_AT" ]; then
  echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2
  exit 1
fi
echo "$((4100 + n));cluster0"
"""


def write_cfg(path: Path, model: str = "tiny-model", num_runs: int = 4, store: str | None = None, n_batches: int = 8,
              **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({
        "run_name": "slurm.pydoc",
        "num_runs": num_runs,
        "transformer_config": {"model_name": model, "dtype": "float32"},
        "data_config": {"data_key": "pydoc", "n_batches": n_batches, "seq_length": 32, "batch_size": 2},
        "upload_config": {"batches_per_upload": 2, "hooks": ["residuals_1"]},
        "storage": {"uri": store or str(path.parent / "vault")},
        **extra,
    }))
    return path


def worker_env(**env) -> dict:
    """This checkout's code for the launcher and for the jobs it submits (sbatch exports the environment)."""
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **env)


def vaultsh(*args, cwd, path_prefix: Path | None = None, **env):
    e = worker_env(**env)
    if path_prefix is not None:
        e["PATH"] = f"{path_prefix}{os.pathsep}{e['PATH']}"
    return subprocess.run([sys.executable, "-m", "vaultsh", *map(str, args)], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def fake_sbatch(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text(FAKE_SBATCH)
    (bindir / "sbatch").chmod(0o755)
    return bindir, tmp_path / "sbatch.log"


def test_scripts_pass_bash_n_and_carry_the_resources(tmp_path):
    cfg = write_cfg(tmp_path / "my cfg.yaml")  # a space in the path must survive quoting
    plan = make_plan(cfg, workers=4, start=1, end=2)
    opts = SlurmOptions(partition="gpu", gpus=2, mem="200G", cpus=8, time="48:00:00", qos="high", account="lab",
                        constraint="a100&ib", setup="module load cuda/12 && source '/opt/my venv/bin/activate'",
                        extra=["--exclusive"])
    for array in (False, True):
        opts.array = array
        jobs = build_jobs(plan, opts)
        assert len(jobs) == (1 if array else 2)
        for job in jobs:
            path = tmp_path / f"check-{array}.sh"
            path.write_text(job.text)
            proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr
            for line in ("#SBATCH --gres=gpu:2", "#SBATCH --mem=200G", "#SBATCH --cpus-per-task=8",
                         "#SBATCH --partition=gpu", "#SBATCH --time=48:00:00", "#SBATCH --qos=high",
                         "#SBATCH --account=lab", "#SBATCH --constraint=a100&ib", "#SBATCH --exclusive",
                         "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120", "#SBATCH --open-mode=append",
                         opts.setup):
                assert line in job.text.splitlines()
            assert f"'{cfg.resolve()}'" in job.text and "--events-fd 3" in job.text
    assert "#SBATCH --array=1-2" in jobs[0].text and 'INDEX="$SLURM_ARRAY_TASK_ID"' in jobs[0].text


def test_config_slurm_block_gives_defaults_that_flags_override(tmp_path):
    cfg = write_cfg(tmp_path / "cfg.yaml", slurm={"partition": "a100", "gpus": 4, "mem": "64G", "qos": "low",
                                                   "sbatch": ["--exclusive"], "setup": "source venv/bin/activate"})
    plan = make_plan(cfg)
    opts = options_from(plan.config.slurm, plan.config.source, partition="h100", extra=["--nice=5"])
    assert (opts.partition, opts.gpus, opts.mem, opts.qos, opts.cpus) == ("h100", 4, "64G", "low", 16)
    assert opts.extra == ["--exclusive", "--nice=5"] and opts.setup == "source venv/bin/activate"
    bad = write_cfg(tmp_path / "bad.yaml", slurm={"mem": "lots"})
    plan = make_plan(bad)
    with pytest.raises(UserError, match=r"bad.yaml: slurm.mem: 'lots'"):
        build_jobs(plan, options_from(plan.config.slurm, plan.config.source))


def test_scontrol_and_sacct_output_parse_into_tasks():
    text = ("JobId=7 ArrayJobId=6 ArrayTaskId=1 JobName=vaultsh-x JobState=FAILED Reason=NonZeroExitCode "
            "Restarts=0 ExitCode=2:0 StdOut=/tmp/my logs/x-1-6.out\n"
            "JobId=6 ArrayJobId=6 ArrayTaskId=2-3,5%2 JobState=PENDING Reason=Resources Restarts=1 ExitCode=0:0\n"
            "JobId=9 JobName=single JobState=RUNNING Reason=None Restarts=2 ExitCode=0:0\n")
    tasks = parse_scontrol(text)
    assert sorted(tasks) == ["6_1", "6_2", "6_3", "6_5", "9"]
    assert (tasks["6_1"].state, tasks["6_1"].exit_code, tasks["6_1"].reason) == ("FAILED", "2:0", "NonZeroExitCode")
    assert (tasks["6_3"].state, tasks["6_3"].restarts, tasks["9"].restarts) == ("PENDING", 1, 2)
    acct = parse_sacct("6_1|COMPLETED|0:0\n6_[2-3]|PENDING|0:0\n8|CANCELLED by 0|0:15\n")
    assert {k: (v.state, v.exit_code) for k, v in acct.items()} == {
        "6_1": ("COMPLETED", "0:0"), "6_2": ("PENDING", "0:0"), "6_3": ("PENDING", "0:0"), "8": ("CANCELLED", "0:15")}


def test_state_of_an_index_combines_slurm_and_commits():
    from vaultsh.launch.slurmstate import SlurmTask

    def state(slurm, batches=0, total=10, job="5"):
        return classify(0, job, SlurmTask(job, slurm, "2:0") if slurm else None, batches, total)[0]

    assert state("PENDING") == state("REQUEUED") == PENDING
    assert state("RUNNING", 10) == state("COMPLETING") == RUNNING  # still finishing: not done until it exits
    assert state("COMPLETED", 10) == state(None, 10) == DONE
    assert state("COMPLETED", 3) == state("FAILED") == state("TIMEOUT", 9) == state("PREEMPTED") == FAILED
    assert state("COMPLETED", 0, None) == DONE  # an open-ended share: Slurm's exit status decides
    assert state(None, 3) == state(None, job=None) == FAILED  # forgotten by Slurm, or never submitted
    assert "exit status 2:0" in classify(0, "5", SlurmTask("5", "FAILED", "2:0"), 0, 10)[1]


def test_dry_run_prints_and_writes_nothing(tmp_path, fake_sbatch):
    bindir, log = fake_sbatch
    cfg = write_cfg(tmp_path / "cfg.yaml")
    proc = vaultsh("launch", "slurm", cfg, "--workers", 4, "--start", 0, "--end", 3, "--dry-run",
                   cwd=tmp_path, path_prefix=bindir, SBATCH_LOG=log)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("#!/bin/bash") == 4
    assert all(f"INDEX={i}\n" in proc.stdout for i in range(4)) and proc.stdout.count("--machine \"$INDEX\"") == 4
    assert not (tmp_path / "slurm").exists() and not log.exists()


def test_fake_sbatch_records_submissions_and_job_map(tmp_path, fake_sbatch):
    bindir, log = fake_sbatch
    cfg = write_cfg(tmp_path / "cfg.yaml")
    proc = vaultsh("launch", "slurm", cfg, "--workers", 4, "--start", 1, "--end", 3, "--partition", "gpu",
                   cwd=tmp_path, path_prefix=bindir, SBATCH_LOG=log)
    assert proc.returncode == 0, proc.stderr
    out_dir = tmp_path / "slurm" / "slurm.pydoc"
    calls = log.read_text().splitlines()
    assert calls == [f"--parsable {out_dir / f'slurm.pydoc-{i}.sbatch'}" for i in (1, 2, 3)]
    jobs = json.loads((out_dir / "jobs.json").read_text())
    assert jobs["jobs"] == {"1": "4101", "2": "4102", "3": "4103"}
    assert jobs["num_runs"] == 4 and jobs["store"] == str((tmp_path / "vault").resolve())
    assert "worker 2: job 4102" in proc.stdout
    # A second launch of index 0 adds to the map.
    log.unlink()
    proc = vaultsh("launch", "slurm", cfg, "--start", 0, "--end", 0, cwd=tmp_path, path_prefix=bindir, SBATCH_LOG=log)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out_dir / "jobs.json").read_text())["jobs"] == {"0": "4101", "1": "4101", "2": "4102", "3": "4103"}


def test_array_job_map(tmp_path, fake_sbatch):
    bindir, log = fake_sbatch
    cfg = write_cfg(tmp_path / "cfg.yaml")
    proc = vaultsh("launch", "slurm", cfg, "--array", "--out", tmp_path / "jobs", cwd=tmp_path, path_prefix=bindir,
                   SBATCH_LOG=log)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines() == [f"--parsable {tmp_path / 'jobs' / 'slurm.pydoc-array.sbatch'}"]
    assert json.loads((tmp_path / "jobs" / "jobs.json").read_text())["jobs"] == {str(i): f"4101_{i}" for i in range(4)}


def test_sbatch_refusal_is_one_line_and_keeps_the_ids_it_got(tmp_path, fake_sbatch):
    bindir, log = fake_sbatch
    cfg = write_cfg(tmp_path / "cfg.yaml")
    proc = vaultsh("launch", "slurm", cfg, cwd=tmp_path, path_prefix=bindir, SBATCH_LOG=log, SBATCH_FAIL_AT="3")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Invalid partition name" in proc.stderr and "slurm.pydoc-2.sbatch" in proc.stderr
    jobs = json.loads((tmp_path / "slurm" / "slurm.pydoc" / "jobs.json").read_text())["jobs"]
    assert jobs == {"0": "4101", "1": "4102"}


def test_without_sbatch_scripts_are_written_with_instructions(tmp_path):
    cfg = write_cfg(tmp_path / "cfg.yaml")
    no_slurm = str(Path(sys.executable).parent)  # python only: no sbatch on this PATH
    assert shutil.which("sbatch", path=no_slurm) is None
    proc = vaultsh("launch", "slurm", cfg, "--start", 2, "--end", 3, cwd=tmp_path, PATH=no_slurm)
    assert proc.returncode == 0, proc.stderr
    assert "sbatch not found" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "slurm" / "slurm.pydoc").glob("*.sbatch")) == \
        ["slurm.pydoc-2.sbatch", "slurm.pydoc-3.sbatch"]


@pytest.mark.parametrize("args, message", [
    (["--workers", 8], "num_runs is 4"),
    (["--start", 3, "--end", 1], "0 <= start <= end <= 3"),
    (["--end", 4], "0 <= start <= end <= 3"),
    (["--mem", "lots"], "--mem: 'lots'"),
    (["--partition", "gpu\nrm -rf /"], "--partition"),
    (["--sbatch", "qos=high"], "--sbatch"),
    (["--constraint", "a100;reboot"], "--constraint"),
    (["--setup", "module load x\nrm -rf /"], "--setup: must be one shell line"),
    (["--gpus", "-1"], "--gpus: -1"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, args, message):
    cfg = write_cfg(tmp_path / "cfg.yaml")
    proc = vaultsh("launch", "slurm", cfg, *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "slurm").exists()


def test_range_helpers():
    assert parse_range(4, None, None, None) == [0, 1, 2, 3]
    assert parse_range(8, 8, 2, 5) == [2, 3, 4, 5]
    assert ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
