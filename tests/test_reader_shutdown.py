"""Abandoning a reader mid-iteration and letting the interpreter exit prints nothing.

The generator of an abandoned iteration is finalized while the interpreter
tears down, after the standard library's module globals are gone; its
`finally` used to shut the prefetch thread pools down there and printed
`AttributeError: 'NoneType' object has no attribute 'Empty'` (issue #23). Each
case runs in a child interpreter that takes one batch, keeps the iterator
alive in a global, and exits; its stderr must be empty.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SETUP = """
import sys
sys.path.insert(0, {root!r})
from vaultsh.store import LocalStore
from tests import explorefixtures as fx
store = LocalStore({vault!r})
fx.build(store)
src = fx.RUN + "/" + fx.HOOK
"""

CASES = {
    "token-mode": """
from vaultsh.reader import ActivationReader
r = ActivationReader(src, store=store, tokens=True, batch_size=16, shuffle_buffer=2)
it = iter(r)
next(it)
""",
    "megabatch-mode": """
from vaultsh.reader import ActivationReader
it = iter(ActivationReader(src, store=store, prefetch=3))
batch = next(it)  # holds views of a download buffer
""",
    "local-path-and-generator-only": """
from vaultsh.reader import ActivationReader
it = iter(ActivationReader({vault!r} + "/" + src, tokens=True, batch_size=8))
next(it)
del sys.modules["tests"]  # nothing but the suspended generator is left to finalize
""",
    "data-provider": """
from vaultsh.reader import ActivationReader
data = ActivationReader(src, store=store, tokens=True, batch_size=32).as_data_provider()
x = next(data)
""",
    "s3rcache": """
from vaultsh.reader import S3RCache
cache = S3RCache(s3_prefix={vault!r} + "/" + src, return_ids=True)
next(iter(cache))
""",
    "explore-scan": """
from vaultsh.explore.scope import HookRef
from vaultsh.explore.stream import megabatches
it = megabatches(store, HookRef(fx.RUN, fx.HOOK))
next(it)
""",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_abandoned_iteration_at_interpreter_exit_prints_nothing(case, tmp_path):
    vault = str(tmp_path / "vault")
    code = (
        textwrap.dedent(SETUP.format(root=str(ROOT), vault=vault))
        + textwrap.dedent(CASES[case].format(vault=vault))
        + "print('abandoned', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "abandoned"
    assert proc.stderr == "", proc.stderr[-3000:]
