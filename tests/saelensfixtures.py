"""SAELens in a child process, for the tests that check vaultsh against SAELens itself. SAELens needs
TransformerLens < 4, so it usually lives in an interpreter of its own: `$VAULTSH_SAELENS_PYTHON`, or
`.venv-saelens` (.ci/run makes it; see docs/export.md)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def saelens_python() -> str | None:
    """An interpreter that imports sae_lens: `$VAULTSH_SAELENS_PYTHON`, this one, or .venv-saelens's."""
    for cand in (
        os.environ.get("VAULTSH_SAELENS_PYTHON"),
        sys.executable,
        str(ROOT / ".venv-saelens" / "bin" / "python"),
    ):
        if cand and Path(cand).exists():
            if subprocess.run([cand, "-c", "import sae_lens"], capture_output=True, timeout=120).returncode == 0:
                return cand
    return None


def run_with_saelens(script: str, *args, marker: str) -> dict:
    """`python tests/SCRIPT ARGS` under `saelens_python()`, offline, and the JSON the script prints after
    `marker` on a line of its own. Skips the calling test where no interpreter has sae-lens."""
    python = saelens_python()
    if python is None:
        pytest.skip("sae-lens is not installed (.ci/run installs it in .venv-saelens)")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    proc = subprocess.run(
        [python, str(ROOT / "tests" / script), *map(str, args)], capture_output=True, text=True, timeout=280, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(f"{marker} "))
    return json.loads(line[len(marker) + 1 :])
