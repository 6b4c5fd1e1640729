"""`vaultsh s3 [URI] [-c "cmd; cmd"] [--json]`: the shell over a store.

URI is `s3://bucket[/prefix]` (default `s3://$S3_BUCKET_NAME`) or a local
store directory (a run or hook directory opens at its place in the store).
With `-c` the commands run in order and the shell exits (status 2 at the
first error, 1 when `verify` found problems); with commands piped on stdin
the same; otherwise an interactive prompt. See docs/shell.md.
"""

from __future__ import annotations

import argparse
import sys


def run_s3(args) -> int:
    from vaultsh.shell.app import Shell

    uri = getattr(args, "uri", None)
    json_mode = bool(getattr(args, "json", False))
    command = getattr(args, "command", None)
    if command is not None:
        return Shell(uri, json_mode=json_mode, interactive=False).run_lines([command])
    if not sys.stdin.isatty():
        return Shell(uri, json_mode=json_mode, interactive=False).run_lines(sys.stdin)
    return Shell(uri, json_mode=json_mode, interactive=True).run_interactive()


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `s3` subcommand's arguments (cli.py's subparser takes the same)."""
    p.add_argument(
        "uri",
        nargs="?",
        default=None,
        help="s3://bucket[/prefix] or a local store path (default: s3://$S3_BUCKET_NAME)",
    )
    p.add_argument(
        "-c",
        "--command",
        default=None,
        metavar="COMMANDS",
        help='run commands and exit, e.g. -c "cd run/hook; ls; inspect 0" (exit 2 on error)',
    )
    p.add_argument(
        "--json", action="store_true", help="machine-readable output (ls, filecount, sizecheck, inspect, stats, ...)"
    )
    from vaultsh.store import add_no_sign_request

    add_no_sign_request(p)
    return p


def run(args) -> int:
    return run_s3(args)


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(
        argparse.ArgumentParser(
            prog="vaultsh s3",
            description="Browse a store: ls, cd, filecount, sizecheck, inspect, stats, verify, get, rm.",
        )
    )


def main(argv: list[str] | None = None) -> int:
    from vaultsh.errors import UserError
    from vaultsh.store import apply_no_sign_request

    args = build_parser().parse_args(argv)
    apply_no_sign_request(args)
    try:
        return run_s3(args)
    except UserError as exc:
        print(f"vaultsh: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vaultsh: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
