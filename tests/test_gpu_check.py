"""benchmarks/gpu_check.sh --smoke: the GPU check's own code path, run on CPU with a tiny Llama.

The full check needs a GPU machine; this keeps the script from rotting: the
real wrapper runs the real module end to end (model dir, config, `vaultsh
collect --headless`, reader), with boto3, textual, prompt_toolkit, datasets
and pyarrow made unimportable as they are on the GPU machine, and every
figure in the JSON must be there and sane.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import hook_layers
from benchmarks.gpu_probe import overlap_ms, union_ms

REPO = Path(__file__).resolve().parent.parent
ABSENT_ON_GPU_MACHINE = ["boto3", "botocore", "textual", "prompt_toolkit", "datasets", "pyarrow"]

BLOCKER = """
import sys
_ABSENT = set({names!r})
class _Hide:
    # wraps a meta path finder: the absent packages are found by no finder, as when not installed
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _ABSENT or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.finder, attr)
sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
"""


def test_union_and_overlap_of_intervals():
    assert union_ms([(0, 2), (1, 3), (5, 6)]) == 4
    assert union_ms([]) == 0
    assert overlap_ms([(0, 2), (4, 6)], [(1, 5)]) == 2
    assert overlap_ms([(0, 1)], [(2, 3)]) == 0


def test_hook_layers_spread_over_first_half():
    assert hook_layers(16) == [1, 3, 5, 7]
    assert hook_layers(8) == [0, 1, 2, 3]
    assert hook_layers(32) == [3, 7, 11, 15]


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    tmp = tmp_path_factory.mktemp("gpu-check")
    site = tmp / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER.format(names=ABSENT_ON_GPU_MACHINE))
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHON": sys.executable}
    out = tmp / "out"
    proc = subprocess.run(
        [
            str(REPO / "benchmarks" / "gpu_check.sh"),
            str(out),
            "--smoke",
            "--device",
            "cpu",
            "--work-dir",
            str(tmp / "work"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.txt").read_text()


def test_smoke_reports_every_figure_with_sane_values(smoke):
    r, _ = smoke
    s = r["setup"]
    assert r["complete"] is True and set(r["phase_s"]) == {"setup", "bare", "collect", "d2h", "reader"}
    assert r["bare"]["layers_run"] == max(s["hook_layers"]) + 1 < s["n_layers"]
    assert r["device"] == "cpu" and s["hooks"] == [f"blocks.{i}.hook_resid_post" for i in hook_layers(s["n_layers"])]
    for fig in (
        r["bare"]["tokens_per_s"],
        r["collect"]["tokens_per_s"],
        r["collect"]["tokens_per_s_whole_command"],
        r["collect"]["ratio"],
        r["collect"]["states_gb_per_s"],
        r["d2h"]["worker"]["bytes_per_s"],
        r["d2h"]["bare_pinned"]["bytes_per_s"],
        r["d2h"]["ratio"],
        r["reader"]["reader_gb_per_s"],
        r["reader"]["raw_gb_per_s"],
        r["reader"]["ratio"],
        r["memory"]["bare_peak_bytes"],
        r["memory"]["worker_peak_bytes"],
        r["memory"]["ratio"],
    ):
        assert _finite_positive(fig), fig
    for frac in (r["bare"]["busy_fraction"], r["collect"]["busy_fraction"]):
        assert 0 < frac <= 1 + 1e-9
    # on CPU the worker copies synchronously: nothing can overlap the forward
    assert r["d2h"]["side_stream"] is False and r["d2h"]["worker"]["overlap_fraction"] == 0
    assert r["d2h"]["overlaps_forward"] is False
    assert r["memory"]["kind"] == "process_rss_sampled" and r["definitions"]["memory"]


def test_smoke_byte_counts_match_the_shapes(smoke):
    r, _ = smoke
    s = r["setup"]
    per_batch_hook = s["batch"] * s["seq"] * s["d_model"] * s["itemsize"]
    states = s["collect_batches"] * per_batch_hook * len(s["hooks"])
    assert s["expected_copy_bytes"] == states
    assert r["collect"]["forwards"] == s["collect_batches"] and r["collect"]["rows_per_forward"] == [s["batch"]]
    assert r["d2h"]["worker"]["bytes"] == states
    assert r["d2h"]["worker"]["copies"] == s["collect_batches"] * len(s["hooks"])
    assert r["d2h"]["bare_pinned"]["bytes"] % per_batch_hook == 0
    assert r["reader"]["states_bytes"] == states
    assert r["reader"]["files"] == len(s["hooks"]) * s["collect_batches"] // s["batches_per_upload"]
    assert r["reader"]["file_bytes"] > states


def test_smoke_text_report_has_each_section(smoke):
    _, text = smoke
    for needle in ("bare forward", "vaultsh collect --headless", "D2H", "reader to cpu", "peak memory"):
        assert needle in text
