"""`vaultsh launch slurm`: sbatch scripts that pass `bash -n`, a fake sbatch that records its arguments."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vaultsh.launch.common import make_plan, parse_range, ranges
from vaultsh.launch.slurm import SlurmOptions, build_jobs


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


def write_cfg(path: Path, model: str = "tiny-model", num_runs: int = 4, store: str | None = None, n_batches: int = 8) -> Path:
    path.write_text(yaml.safe_dump({
        "run_name": "slurm.pydoc",
        "num_runs": num_runs,
        "transformer_config": {"model_name": model, "dtype": "float32"},
        "data_config": {"data_key": "pydoc", "n_batches": n_batches, "seq_length": 32, "batch_size": 2},
        "upload_config": {"batches_per_upload": 2, "hooks": ["residuals_1"]},
        "storage": {"uri": store or str(path.parent / "vault")},
    }))
    return path


def vaultsh(*args, cwd, path_prefix: Path | None = None, **env):
    e = dict(os.environ, **env)
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
    opts = SlurmOptions(partition="gpu", gpus=2, mem="200G", cpus=8, time="48:00:00", extra=["--qos=high"])
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
                         "#SBATCH --requeue", "#SBATCH --signal=B:TERM@120"):
                assert line in job.text.splitlines()
            assert f"'{cfg.resolve()}'" in job.text
    assert "#SBATCH --array=1-2" in jobs[0].text and '--machine "$SLURM_ARRAY_TASK_ID"' in jobs[0].text


def test_dry_run_prints_and_writes_nothing(tmp_path, fake_sbatch):
    bindir, log = fake_sbatch
    cfg = write_cfg(tmp_path / "cfg.yaml")
    proc = vaultsh("launch", "slurm", cfg, "--workers", 4, "--start", 0, "--end", 3, "--dry-run",
                   cwd=tmp_path, path_prefix=bindir, SBATCH_LOG=log)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("#!/bin/bash") == 4
    assert all(f"--machine {i} " in proc.stdout for i in range(4))
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
    if shutil.which("sbatch"):
        pytest.skip("Slurm is installed here")
    cfg = write_cfg(tmp_path / "cfg.yaml")
    proc = vaultsh("launch", "slurm", cfg, "--start", 2, "--end", 3, cwd=tmp_path)
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


@pytest.mark.slow
def test_generated_array_script_runs_a_real_worker(tmp_path, tiny_dir):
    """Run the array script the way Slurm would (bash, SLURM_ARRAY_TASK_ID set): worker 1 collects its share."""
    from vaultsh.run import Run
    from vaultsh.store import LocalStore

    cfg = write_cfg(tmp_path / "cfg.yaml", model=str(tiny_dir), num_runs=2, n_batches=4)
    jobs = build_jobs(make_plan(cfg), SlurmOptions(array=True, out_dir=tmp_path / "s"))
    script = tmp_path / "job.sbatch"
    script.write_text(jobs[0].text)
    proc = subprocess.run(["bash", str(script)], env=dict(os.environ, SLURM_ARRAY_TASK_ID="1", HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = Run(LocalStore(tmp_path / "vault"), "slurm.pydoc")
    assert [(c.worker, c.batch_start, c.batch_end) for c in run.iter_commits()] == [(1, 1, 4)]
