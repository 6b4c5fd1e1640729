"""`vaultsh launch slurm`: generated scripts, a fake sbatch for what one node cannot show, and a real cluster.

Tests marked `slurm` submit real jobs to a one-node cluster on this machine
(scripts/slurm-up.sh brings it up; .ci/run installs Slurm first) and are
skipped with the script's reason when it cannot start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vaultsh.errors import UserError
from vaultsh.launch.common import make_plan, parse_range, ranges
from vaultsh.launch.slurm import SlurmOptions, build_jobs, options_from
from vaultsh.launch.slurmstate import DONE, FAILED, PENDING, RUNNING, classify, parse_sacct, parse_scontrol

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


def write_cfg(
    path: Path, model: str = "tiny-model", num_runs: int = 4, store: str | None = None, n_batches: int = 8, **extra
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump(
            {
                "run_name": "slurm.pydoc",
                "num_runs": num_runs,
                "transformer_config": {"model_name": model, "dtype": "float32"},
                "data_config": {"data_key": "pydoc", "n_batches": n_batches, "seq_length": 32, "batch_size": 2},
                "upload_config": {"batches_per_upload": 2, "hooks": ["residuals_1"]},
                "storage": {"uri": store or str(path.parent / "vault")},
                **extra,
            }
        )
    )
    return path


def worker_env(**env) -> dict:
    """This checkout's code for the launcher and for the jobs it submits (sbatch exports the environment)."""
    # COLUMNS: rich wraps the headless log at 80 columns otherwise, splitting the lines the tests look for
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", COLUMNS="400", **env)


def vaultsh(*args, cwd, path_prefix: Path | None = None, **env):
    e = worker_env(**env)
    if path_prefix is not None:
        e["PATH"] = f"{path_prefix}{os.pathsep}{e['PATH']}"
    return subprocess.run(
        [sys.executable, "-m", "vaultsh", *map(str, args)], cwd=cwd, env=e, capture_output=True, text=True, timeout=120
    )


class FakeSbatch:
    """FAKE_SBATCH in a folder of its own (`bindir`), recording its calls in `log`."""

    def __init__(self, tmp_path: Path):
        self.cwd = tmp_path
        self.bindir = tmp_path / "bin"
        self.bindir.mkdir()
        (self.bindir / "sbatch").write_text(FAKE_SBATCH)
        (self.bindir / "sbatch").chmod(0o755)
        self.log = tmp_path / "sbatch.log"

    def launch(self, *args, **env):
        """`vaultsh launch slurm ARGS` in tmp_path, with this sbatch first on the PATH."""
        return vaultsh("launch", "slurm", *args, cwd=self.cwd, path_prefix=self.bindir, SBATCH_LOG=self.log, **env)


@pytest.fixture
def fake_sbatch(tmp_path):
    return FakeSbatch(tmp_path)


def test_scripts_pass_bash_n_and_carry_the_resources(tmp_path):
    cfg = write_cfg(tmp_path / "my cfg.yaml")  # a space in the path must survive quoting
    plan = make_plan(cfg, workers=4, start=1, end=2)
    opts = SlurmOptions(
        partition="gpu",
        gpus=2,
        mem="200G",
        cpus=8,
        time="48:00:00",
        qos="high",
        account="lab",
        constraint="a100&ib",
        setup="module load cuda/12 && source '/opt/my venv/bin/activate'",
        extra=["--exclusive"],
    )
    for array in (False, True):
        opts.array = array
        jobs = build_jobs(plan, opts)
        assert len(jobs) == (1 if array else 2)
        for job in jobs:
            path = tmp_path / f"check-{array}.sh"
            path.write_text(job.text)
            proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr
            for line in (
                "#SBATCH --gres=gpu:2",
                "#SBATCH --mem=200G",
                "#SBATCH --cpus-per-task=8",
                "#SBATCH --partition=gpu",
                "#SBATCH --time=48:00:00",
                "#SBATCH --qos=high",
                "#SBATCH --account=lab",
                "#SBATCH --constraint=a100&ib",
                "#SBATCH --exclusive",
                "#SBATCH --requeue",
                "#SBATCH --signal=B:USR1@120",
                "#SBATCH --open-mode=append",
                opts.setup,
            ):
                assert line in job.text.splitlines()
            assert f"'{cfg.resolve()}'" in job.text and "--events-fd 3" in job.text
    assert "#SBATCH --array=1-2" in jobs[0].text and 'INDEX="$SLURM_ARRAY_TASK_ID"' in jobs[0].text


def test_config_slurm_block_gives_defaults_that_flags_override(tmp_path):
    cfg = write_cfg(
        tmp_path / "cfg.yaml",
        slurm={
            "partition": "a100",
            "gpus": 4,
            "mem": "64G",
            "qos": "low",
            "sbatch": ["--exclusive"],
            "setup": "source venv/bin/activate",
        },
    )
    plan = make_plan(cfg)
    opts = options_from(plan.config.slurm, plan.config.source, partition="h100", extra=["--nice=5"])
    assert (opts.partition, opts.gpus, opts.mem, opts.qos, opts.cpus) == ("h100", 4, "64G", "low", 16)
    assert opts.extra == ["--exclusive", "--nice=5"] and opts.setup == "source venv/bin/activate"
    bad = write_cfg(tmp_path / "bad.yaml", slurm={"mem": "lots"})
    plan = make_plan(bad)
    with pytest.raises(UserError, match=r"bad.yaml: slurm.mem: 'lots'"):
        build_jobs(plan, options_from(plan.config.slurm, plan.config.source))


def test_scontrol_and_sacct_output_parse_into_tasks():
    text = (
        "JobId=7 ArrayJobId=6 ArrayTaskId=1 JobName=vaultsh-x JobState=FAILED Reason=NonZeroExitCode "
        "Restarts=0 ExitCode=2:0 StdOut=/tmp/my logs/x-1-6.out\n"
        "JobId=6 ArrayJobId=6 ArrayTaskId=2-3,5%2 JobState=PENDING Reason=Resources Restarts=1 ExitCode=0:0\n"
        "JobId=9 JobName=single JobState=RUNNING Reason=None Restarts=2 ExitCode=0:0\n"
    )
    tasks = parse_scontrol(text)
    assert sorted(tasks) == ["6_1", "6_2", "6_3", "6_5", "9"]
    assert (tasks["6_1"].state, tasks["6_1"].exit_code, tasks["6_1"].reason) == ("FAILED", "2:0", "NonZeroExitCode")
    assert (tasks["6_3"].state, tasks["6_3"].restarts, tasks["9"].restarts) == ("PENDING", 1, 2)
    acct = parse_sacct("6_1|COMPLETED|0:0\n6_[2-3]|PENDING|0:0\n8|CANCELLED by 0|0:15\n")
    assert {k: (v.state, v.exit_code) for k, v in acct.items()} == {
        "6_1": ("COMPLETED", "0:0"),
        "6_2": ("PENDING", "0:0"),
        "6_3": ("PENDING", "0:0"),
        "8": ("CANCELLED", "0:15"),
    }


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
    cfg = write_cfg(tmp_path / "cfg.yaml")
    proc = fake_sbatch.launch(cfg, "--workers", 4, "--start", 0, "--end", 3, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("#!/bin/bash") == 4
    assert all(f"INDEX={i}\n" in proc.stdout for i in range(4)) and proc.stdout.count('--machine "$INDEX"') == 4
    assert not (tmp_path / "slurm").exists() and not fake_sbatch.log.exists()


def test_fake_sbatch_records_submissions_and_job_map(tmp_path, fake_sbatch):
    log = fake_sbatch.log
    cfg = write_cfg(tmp_path / "cfg.yaml")
    proc = fake_sbatch.launch(cfg, "--workers", 4, "--start", 1, "--end", 3, "--partition", "gpu")
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
    proc = fake_sbatch.launch(cfg, "--start", 0, "--end", 0)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out_dir / "jobs.json").read_text())["jobs"] == {
        "0": "4101",
        "1": "4101",
        "2": "4102",
        "3": "4103",
    }
    # --status where Slurm cannot be asked: from the commit records alone (none yet), said plainly
    proc = vaultsh("launch", "slurm", "--status", out_dir, cwd=tmp_path, PATH=str(fake_sbatch.bindir))
    assert proc.returncode == 0, proc.stderr
    assert (
        "unknown: 4 (0-3)" in proc.stdout
        and "0/? batches committed; scontrol show job 4101: not available" in proc.stdout
    )


def test_array_job_map(tmp_path, fake_sbatch):
    cfg = write_cfg(tmp_path / "cfg.yaml")
    proc = fake_sbatch.launch(cfg, "--array", "--out", tmp_path / "jobs")
    assert proc.returncode == 0, proc.stderr
    assert fake_sbatch.log.read_text().splitlines() == [f"--parsable {tmp_path / 'jobs' / 'slurm.pydoc-array.sbatch'}"]
    assert json.loads((tmp_path / "jobs" / "jobs.json").read_text())["jobs"] == {str(i): f"4101_{i}" for i in range(4)}


def test_sbatch_refusal_is_one_line_and_keeps_the_ids_it_got(tmp_path, fake_sbatch):
    cfg = write_cfg(tmp_path / "cfg.yaml")
    proc = fake_sbatch.launch(cfg, SBATCH_FAIL_AT="3")
    assert proc.returncode == 2
    assert (
        proc.stderr.count("\n") == 1
        and "Invalid partition name" in proc.stderr
        and "slurm.pydoc-2.sbatch" in proc.stderr
    )
    jobs = json.loads((tmp_path / "slurm" / "slurm.pydoc" / "jobs.json").read_text())["jobs"]
    assert jobs == {"0": "4101", "1": "4102"}


def test_without_sbatch_scripts_are_written_with_instructions(tmp_path):
    cfg = write_cfg(tmp_path / "cfg.yaml")
    no_slurm = str(Path(sys.executable).parent)  # python only: no sbatch on this PATH
    assert shutil.which("sbatch", path=no_slurm) is None
    proc = vaultsh("launch", "slurm", cfg, "--start", 2, "--end", 3, cwd=tmp_path, PATH=no_slurm)
    assert proc.returncode == 0, proc.stderr
    assert "sbatch not found" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "slurm" / "slurm.pydoc").glob("*.sbatch")) == [
        "slurm.pydoc-2.sbatch",
        "slurm.pydoc-3.sbatch",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", 8], "num_runs is 4"),
        (["--start", 3, "--end", 1], "0 <= start <= end <= 3"),
        (["--end", 4], "0 <= start <= end <= 3"),
        (["--mem", "lots"], "--mem: 'lots'"),
        (["--partition", "gpu\nrm -rf /"], "--partition"),
        (["--sbatch", "qos=high"], "--sbatch"),
        (["--constraint", "a100;reboot"], "--constraint"),
        (["--setup", "module load x\nrm -rf /"], "--setup: must be one shell line"),
        (["--gpus", "-1"], "--gpus: -1"),
    ],
)
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


# -- a real one-node cluster ---------------------------------------------------------------------

TINY_SLURM = {"gpus": 0, "cpus": 1, "mem": "1G"}


@pytest.fixture(scope="module")
def slurm_cluster():
    """A one-node Slurm cluster on this machine (scripts/slurm-up.sh), or a skip saying why not."""
    try:
        proc = subprocess.run(
            ["bash", str(ROOT / "scripts" / "slurm-up.sh"), "--no-install"], capture_output=True, text=True, timeout=180
        )
    except subprocess.TimeoutExpired:
        pytest.skip("no Slurm cluster: scripts/slurm-up.sh took over 180 s")
    if proc.returncode != 0:
        why = (proc.stdout.strip().splitlines() or ["scripts/slurm-up.sh failed"])[-1]
        pytest.skip(f"no Slurm cluster ({why}); .ci/run installs and starts one")


@pytest.fixture
def slurm_jobs_cancelled(slurm_cluster, tmp_path):
    """After the test, cancel every job its launches recorded (a failed test leaves no job on the node)."""
    yield
    ids = [j for path in tmp_path.glob("slurm/*/jobs.json") for j in json.loads(path.read_text())["jobs"].values()]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


def wait_for(predicate, timeout: float, what: str, step: float = 0.05):
    """Poll until predicate() is truthy; return its value."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def events_of(out: Path, index: int) -> list[dict]:
    path = out / "events" / f"slurm.pydoc-{index}.ndjson"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def scontrol_job(job_id: str) -> dict[str, str]:
    from vaultsh.launch.slurmstate import _fields

    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    return _fields(proc.stdout.splitlines()[0]) if proc.returncode == 0 and proc.stdout.strip() else {}


def release_when_requeued(job_id: str) -> None:
    """A requeued job waits 2 minutes (Slurm's BeginTime); start it as soon as it is pending again."""

    def requeued():
        f = scontrol_job(job_id)
        return f.get("JobState") == "PENDING" and f.get("Restarts", "0") != "0"

    import time

    wait_for(requeued, 90, f"job {job_id} back in the queue", step=0.2)
    # Released at once, the job may start before slurmd has cleaned up its previous run, and Slurm kills it
    # ("Job credential revoked"); a few seconds in the queue avoid that.
    time.sleep(5)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "starttime=now"], check=True, timeout=30)


@pytest.mark.slurm
def test_requeued_and_time_limited_array_tasks_resume_to_the_one_worker_run(slurm_jobs_cancelled, tiny_dir, tmp_path):
    """An array job of 2 workers, --wait: task 1 gets `scontrol requeue`, task 0 the time-limit USR1.

    Each worker is held (SIGSTOP) right after its first commit so the signal
    lands mid-run however fast the tiny model is; Slurm itself sends SIGCONT
    before SIGTERM on a requeue, and for USR1 the test resumes the worker once
    the job script has forwarded it. Both stop cleanly, are requeued, resume
    after their last commit; the union is the one-worker run, `verify` is clean.
    """
    import signal

    from collector.config import load_config
    from collector.worker import run_worker
    from vaultsh.events import EventSink
    from vaultsh.finalize import finalize
    from vaultsh.run import Run
    from vaultsh.store import LocalStore

    from .test_sharding import _by_batch

    n = 80
    cfg = write_cfg(tmp_path / "cfg.yaml", model=str(tiny_dir), num_runs=2, n_batches=n, slurm=TINY_SLURM)
    launch = subprocess.Popen(
        [sys.executable, "-m", "vaultsh", "launch", "slurm", str(cfg), "--array", "--wait", "--interval", "1"],
        cwd=tmp_path,
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out = tmp_path / "slurm" / "slurm.pydoc"
        held: dict[int, int] = {}

        def hold_after_first_commit():
            for i in (0, 1):
                evs = events_of(out, i)
                if i not in held and any(e["type"] == "committed" for e in evs):
                    held[i] = next(e["pid"] for e in evs if e["type"] == "start")
                    os.kill(held[i], signal.SIGSTOP)
            return len(held) == 2

        wait_for(hold_after_first_commit, 90, "both workers' first commit")
        jobs = json.loads((out / "jobs.json").read_text())["jobs"]
        committed = {i: sum(e["type"] == "committed" for e in events_of(out, i)) for i in (0, 1)}
        assert all(c < n // 2 // 2 for c in committed.values()), f"a worker finished before it was held: {committed}"

        subprocess.run(["scontrol", "requeue", jobs["1"]], check=True, timeout=30)
        subprocess.run(["scancel", "--batch", "--signal=USR1", jobs["0"]], check=True, timeout=30)
        log0 = out / "logs" / f"slurm.pydoc-0-{jobs['0'].split('_')[0]}.out"
        wait_for(lambda: "USR1" in log0.read_text(), 30, "the job script to forward USR1")
        os.kill(held[0], signal.SIGCONT)
        for i in (1, 0):
            release_when_requeued(jobs[str(i)])
        stdout, stderr = launch.communicate(timeout=180)
    finally:
        launch.kill()
    assert launch.returncode == 0, stdout + stderr[-3000:]
    for i in (0, 1):
        # the final table: done, COMPLETED, exit 0:0, one restart, the whole share committed
        assert re.search(rf"^\s+{i}\s+done\s+{jobs[str(i)]}\s+COMPLETED\s+0:0\s+1\s+{n // 2}/{n // 2}", stdout, re.M), (
            stdout
        )
        # attempt 1 stopped cleanly on the signal, attempt 2 resumed after its commits and completed
        types = [(e["type"], e.get("status")) for e in events_of(out, i) if e["type"] in ("done", "resume")]
        assert types == [("done", "stopped"), ("resume", None), ("done", "complete")], types
        resume = next(e for e in events_of(out, i) if e["type"] == "resume")
        assert resume["from_megabatch"] >= committed[i], resume
    assert f"worker 1: pending (job {jobs['1']} PENDING, restart 1" in " ".join(stderr.split())
    assert "requeueing job" in log0.read_text()

    single = load_config(
        yaml.safe_load(
            write_cfg(tmp_path / "one" / "cfg.yaml", model=str(tiny_dir), num_runs=1, n_batches=n).read_text()
        )
    )
    run_worker(single, 0, sink=EventSink(0))
    one, two = LocalStore(tmp_path / "one" / "vault"), LocalStore(tmp_path / "vault")
    run1, run2 = Run(one, "slurm.pydoc"), Run(two, "slurm.pydoc")
    a, b = _by_batch(one, run1, "residuals_1"), _by_batch(two, run2, "residuals_1")
    assert sorted(a) == sorted(b) == list(range(n))
    for k in range(n):
        assert torch_equal(a[k][0], b[k][0]) and torch_equal(a[k][1], b[k][1]), f"batch {k} differs"
        assert torch_close(a[k][2], b[k][2]), f"batch {k}: activations differ"
    finalize(run2)
    assert run2.read_statistics("residuals_1").count == run1.read_statistics("residuals_1").count
    proc = vaultsh("verify", tmp_path / "vault" / "slurm.pydoc", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))


def torch_close(x, y) -> bool:
    import torch

    return bool(torch.allclose(x, y, rtol=1e-5, atol=1e-5))


@pytest.mark.slurm
def test_failed_task_is_reported_and_only_it_is_resubmitted(slurm_jobs_cancelled, tiny_dir, tmp_path, monkeypatch):
    """Worker 1's script names a config that is not there: --wait reports its log tail and exit status;
    once the file exists, --resubmit-failed submits worker 1 alone and the run completes."""
    from vaultsh.launch import slurm
    from vaultsh.run import Run
    from vaultsh.store import LocalStore

    monkeypatch.chdir(tmp_path)
    cfg = write_cfg(tmp_path / "cfg.yaml", model=str(tiny_dir), num_runs=2, n_batches=8, slurm=TINY_SLURM)
    proc = vaultsh("launch", "slurm", cfg, "--start", 0, "--end", 0, cwd=tmp_path)
    assert proc.returncode == 0 and "worker 0: job " in proc.stdout, proc.stdout + proc.stderr
    plan = make_plan(cfg, start=1, end=1)
    plan.config_path = tmp_path / "moved" / "cfg.yaml"  # not there (yet)
    jobs = slurm.build_jobs(plan, options_from(plan.config.slurm, plan.config.source))
    slurm.write_jobs(jobs)
    slurm.submit(jobs, slurm.find_sbatch())
    slurm.write_job_map(plan, jobs)
    out = tmp_path / "slurm" / "slurm.pydoc"
    first = json.loads((out / "jobs.json").read_text())["jobs"]

    proc = vaultsh("launch", "slurm", "--status", out, "--wait", "--interval", "1", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = " ".join(proc.stderr.split())
    assert "worker 1 failed: FAILED, exit status 2:0" in err and "moved/cfg.yaml: no such file" in err, proc.stderr
    assert re.search(r"^\s+0\s+done\s.*\n\s+1\s+failed\s+\d+\s+FAILED\s+2:0", proc.stdout, re.M), proc.stdout
    proc = vaultsh("launch", "slurm", "--status", "slurm.pydoc", cwd=tmp_path)  # by run name, no waiting
    assert proc.returncode == 0 and "done: 1 (0)  failed: 1 (1)" in proc.stdout, proc.stdout + proc.stderr

    (tmp_path / "moved").mkdir()
    shutil.copy(cfg, tmp_path / "moved" / "cfg.yaml")
    proc = vaultsh("launch", "slurm", "--resubmit-failed", "slurm.pydoc", "--wait", "--interval", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("resubmitted as job") == 1 and "worker 1: resubmitted" in proc.stdout
    now = json.loads((out / "jobs.json").read_text())["jobs"]
    assert now["0"] == first["0"] and now["1"] != first["1"]
    run = Run(LocalStore(tmp_path / "vault"), "slurm.pydoc")
    assert sorted(b for c in run.iter_commits() for b in range(c.batch_start, c.batch_end, 2)) == list(range(8))
    for args in (("finalize",), ("verify",)):
        proc = vaultsh(*args, tmp_path / "vault" / "slurm.pydoc", cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
