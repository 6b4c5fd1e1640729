"""The CLI's subcommands, one module each (`vaultsh.cli.COMMANDS` lists them).

Each module defines `add_arguments(parser)` and `run(args) -> exit code` and imports only the standard library at
module level, so `vaultsh --help` stays fast. The shell's own commands (`ls`, `cd`, `inspect`, ...) are a different
thing: `vaultsh/shell/commands.py`.
"""
