"""The real `vaultsh s3` in a pseudo-terminal (pexpect), as a person uses it.

The prompt shows the location; ls, cd, inspect with its batch viewer (then
`q`); Ctrl-C during a long states scan cancels that command, not the shell;
Ctrl-D leaves with status 0.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pexpect
import pytest
import torch

from vaultsh.megabatch import write_megabatch
from vaultsh.store import LocalStore

from .modelfixtures import TOKENIZER_DIR

REPO = Path(__file__).resolve().parent.parent


def sparse_megabatch(path: Path, n: int, t: int, d: int) -> int:
    """A safetensors megabatch of n*t*d float32 zeros, written as a sparse file (no disk used)."""
    s, ids, mask = n * t * d * 4, n * t * 8, n * t
    header = {
        "__metadata__": {"format": "vaultsh.megabatch", "format_version": "1", "hook": "hook", "model": "big"},
        "states": {"dtype": "F32", "shape": [n, t, d], "data_offsets": [0, s]},
        "input_ids": {"dtype": "I64", "shape": [n, t], "data_offsets": [s, s + ids]},
        "mask": {"dtype": "BOOL", "shape": [n, t], "data_offsets": [s + ids, s + ids + mask]},
    }
    js = json.dumps(header).encode()
    js += b" " * (-len(js) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(js)) + js)
        f.truncate(8 + len(js) + s + ids + mask)
    return s


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tty") / "vault"
    store = LocalStore(root)
    store.put_bytes("run1/cfg.json", json.dumps({"tokenizer": {"source": str(TOKENIZER_DIR)}}).encode())
    store.put_bytes("run1/hook_a/metadata.json", b"{}")
    g = torch.Generator().manual_seed(0)
    write_megabatch(
        store,
        "run1/hook_a/w0000--0000000.safetensors",
        torch.randn(4, 16, 8, generator=g),
        torch.randint(200, 5000, (4, 16), generator=g),
        metadata={"hook": "hook_a", "model": "m"},
    )
    sparse_megabatch(root / "big" / "hook" / "w0000--0000000.safetensors", 256, 4096, 8192)  # 32 GiB of zeros
    return root


def test_the_real_shell_in_a_terminal(root, tmp_path):
    env = dict(
        os.environ,
        TERM="xterm",
        COLUMNS="120",
        LINES="40",
        VAULTSH_HISTORY=str(tmp_path / "history"),
        PYTHONIOENCODING="utf-8",
    )
    env.pop("VAULTSH_DEBUG", None)
    child = pexpect.spawn(
        sys.executable,
        ["-m", "vaultsh", "s3", str(root)],
        cwd=str(REPO),
        env=env,
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 120),
    )
    try:
        top = f"{root}/>"  # prompt_toolkit draws the trailing space as a cursor move
        child.expect_exact(top)
        child.sendline("ls")
        child.expect_exact("run1/")
        child.expect_exact(top)
        child.sendline("cd run1/hook_a")
        here = f"{root}/run1/hook_a>"
        child.expect_exact(here)
        child.sendline("inspect 0")
        child.expect_exact("No NaNs: ✅")
        child.expect_exact("Enter batch number (0-3) to view full text, or 'q' to quit:")
        child.sendline("1")
        child.expect_exact("Batch 1 of 4: 16 tokens, 16 real, 0 masked")
        child.expect_exact("Enter batch number")
        child.sendline("q")
        child.expect_exact(here)
        # a 32 GiB states scan: the header shows at once, Ctrl-C stops the scan and the shell stays
        child.sendline("inspect /big/hook/w0000--0000000.safetensors")
        child.expect_exact("states: [256, 4096, 8192] F32")
        child.expect_exact("Header:")
        child.sendcontrol("c")
        child.expect_exact("error: interrupted")
        child.expect_exact(here)
        child.sendline("pwd")
        child.expect_exact(f"{root}/run1/hook_a\r\n")
        child.expect_exact(here)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    history = (tmp_path / "history").read_text()
    assert "+inspect 0" in history and "+cd run1/hook_a" in history
