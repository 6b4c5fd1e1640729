"""The CLI's subcommands, one module each (`vaultsh.cli.COMMANDS` lists them).

Each module defines `add_arguments(parser)` and `run(args) -> exit code` and imports only the standard library at
module level, so `vaultsh --help` stays fast. The shell's own commands (`ls`, `cd`, `inspect`, ...) are a different
thing: `vaultsh/shell/commands.py`.
"""

from __future__ import annotations

import argparse
from typing import Any


def options(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """`{name: args.name}`: the options whose dest is the keyword they are passed on as, named once."""
    return {name: getattr(args, name) for name in names}
