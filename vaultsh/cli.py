"""The `vaultsh` command: one entry point, one subcommand per job.

Heavy imports (torch, transformers, boto3, textual, prompt_toolkit) happen
inside the subcommand that needs them, so `vaultsh --help` and
`vaultsh s3 -c ls` start fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from vaultsh import __version__
from vaultsh.errors import UserError

# name -> (one-line help, issue that builds it) for subcommands not built yet.
_PLANNED = {
    "export": ("export a hook to sharded Parquet / HF datasets", 10),
    "launch": ("run workers on a Ray or Slurm cluster", 8),
    "verify": ("check every committed megabatch of a run", 8),
    "finalize": ("merge per-worker statistics of a run", 8),
    "plan": ("estimate storage, memory, time and cost of a config", 11),
    "s3": ("interactive shell over a store: ls, cd, filecount, sizecheck, inspect", 5),
}


def _not_built(name: str) -> Callable[[argparse.Namespace], int]:
    help_text, issue = _PLANNED[name]

    def run(args: argparse.Namespace) -> int:
        print(f"vaultsh {name}: not built yet ({help_text}; tracked in issue #{issue}).", file=sys.stderr)
        return 2

    return run


def _cmd_collect(args: argparse.Namespace) -> int:
    from vaultsh.commands.collect import run_collect

    return run_collect(args)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from vaultsh.commands.inspect import run_inspect

    return run_inspect(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from vaultsh.commands.bench import run_bench

    return run_bench(args)


def _add_planned(sub, name: str) -> None:
    help_text, _issue = _PLANNED[name]
    p = sub.add_parser(name, help=f"{help_text} (not built yet)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_not_built(name))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vaultsh",
        description="Collect, store and inspect transformer activations (S3 or a local directory).",
    )
    parser.add_argument("--version", action="version", version=f"vaultsh {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("collect", help="collect activations from a config (dashboard, or --headless)")
    p.add_argument("config", help="YAML config (Activault schema or ours)")
    p.add_argument("--headless", action="store_true", help="print progress instead of opening the dashboard")
    p.add_argument("--machine", type=int, default=None, metavar="I", help="run only worker I of num_runs")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="local workers to start (default: 1)")
    p.add_argument("--store", default=None, metavar="URI", help="override the config's storage URI")
    p.add_argument("--force", action="store_true", help="continue a run even if its config changed")
    p.add_argument("--events-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_collect)

    _add_planned(sub, "s3")

    p = sub.add_parser("inspect", help="show a run (committed megabatches per hook) or one megabatch's header")
    p.add_argument("uri", help="run, hook directory or megabatch file (s3://... or a path)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--scan", action="store_true", help="also scan states for NaN/Inf and value range")
    p.set_defaults(func=_cmd_inspect)

    for name in ("export", "launch", "verify", "finalize", "plan"):
        _add_planned(sub, name)

    p = sub.add_parser("bench", help="run benchmarks and print ratios against in-run baselines")
    p.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    p.add_argument("--list", action="store_true", help="list benchmarks and exit")
    p.add_argument("--json", default=None, metavar="PATH", help="write results as JSON (default bench-results/<time>.json)")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.set_defaults(func=_cmd_bench)
    return parser


def _one_line(text: str) -> str:
    """A message as one printable line: whitespace runs collapsed, control characters escaped."""
    text = " ".join(str(text).split())
    if not text.isprintable():
        text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text


def _error(message: str) -> None:
    print(f"vaultsh: error: {_one_line(message)}", file=sys.stderr)


def _os_error_message(exc: OSError) -> str:
    reason = exc.strerror or type(exc).__name__
    names = [n for n in (exc.filename, exc.filename2) if n is not None]
    return f"{' -> '.join(map(str, names))}: {reason}" if names else f"{reason}: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    debug = bool(os.environ.get("VAULTSH_DEBUG"))  # show tracebacks for user errors too
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if debug:
            raise
        _error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        print("vaultsh: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `vaultsh inspect --json ... | head`: the reader left; don't complain at exit either
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except OSError as exc:  # a local file or directory the command could not use
        if debug:
            raise
        _error(_os_error_message(exc))
        return UserError.exit_code


if __name__ == "__main__":
    sys.exit(main())
