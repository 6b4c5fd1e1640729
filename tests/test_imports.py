"""Import hygiene: the core never pulls in the TUI toolkits, and nothing pulls in torch early.

Each check runs in a fresh interpreter, since this test process has long since
imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CORE = [
    "vaultsh.dtypes",
    "vaultsh.terminal",
    "vaultsh.fmt",
    "vaultsh.tokens",
    "vaultsh.store",
    "vaultsh.megabatch",
    "vaultsh.run",
    "vaultsh.stats",
    "vaultsh.cli",
    "vaultsh.events",
    "collector.config",
    "vaultsh.supervise",
]
HEAVY = ["textual", "prompt_toolkit", "torch", "transformers"]

_PROBE = """
import json, sys
for name in {modules!r}:
    __import__(name)
{extra}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})))
"""


def _loaded_heavy(modules: list[str], extra: str = "") -> list[str]:
    code = _PROBE.format(modules=modules, heavy=HEAVY, extra=extra)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_core_imports_no_tui_toolkit_and_no_torch():
    loaded = _loaded_heavy(CORE)
    assert loaded == [], f"importing the core pulled in {loaded}"


def test_building_the_parser_imports_no_torch():
    loaded = _loaded_heavy(["vaultsh.cli"], extra="import vaultsh.cli as c; c.build_parser().format_help()")
    assert loaded == []


def test_opening_a_store_imports_no_torch(tmp_path):
    extra = (
        "from vaultsh.store import open_store, open_location\n"
        f"open_store({str(tmp_path / 'v')!r}).put_bytes('k', b'x')\n"
        "open_store('s3://some-bucket/prefix')\n"
    )
    assert _loaded_heavy(["vaultsh.store"], extra=extra) == []


def test_help_is_fast_and_torch_free():
    code = (
        "import sys, runpy\n"
        "sys.argv = ['vaultsh', '--help']\n"
        "try:\n"
        "    runpy.run_module('vaultsh', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "finally:\n"
        "    sys.stdout.flush()\n"
        "    print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'textual', 'prompt_toolkit', 'boto3')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: vaultsh" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []"
