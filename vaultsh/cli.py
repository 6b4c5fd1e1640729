"""The `vaultsh` command: one entry point, one subcommand per job.

Heavy imports (torch, transformers, boto3, textual, prompt_toolkit) happen
inside the subcommand that needs them, so `vaultsh --help` and
`vaultsh s3 -c ls` start fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from types import ModuleType

from vaultsh import __version__
from vaultsh.errors import UserError
from vaultsh.terminal import one_line

# Every subcommand, in the order `vaultsh --help` lists them: name -> one-line help.
# A subcommand lives in `vaultsh/subcommands/<name>.py` (dashes become underscores), which defines
# `add_arguments(parser)` and `run(args) -> int` and imports only the standard library at module
# level, so `--help` stays fast and torch-free.
COMMANDS: dict[str, str] = {
    "collect": "collect activations from a config (dashboard, or --headless)",
    "s3": "interactive shell over a store: ls, cd, filecount, sizecheck, inspect",
    "inspect": "show a run (committed megabatches per hook) or one megabatch's header",
    "watch": "follow a run written elsewhere (Slurm, Ray) on the dashboard",
    "export": "export a hook to sharded Parquet / HF datasets",
    "launch": "run workers on a Ray or Slurm cluster",
    "verify": "check every committed megabatch of a run",
    "finalize": "merge per-worker statistics of a run",
    "plan": "estimate storage, memory, time and cost of a config",
    "hooks": "list a model's hook points: shape, dtype, bytes per token (offline, no weights)",
    "bench": "run benchmarks and print ratios against in-run baselines",
    "grep": "find text in a run's decoded tokens (reads only input_ids and mask)",
    "top": "exact top-k tokens of a hook by a dimension, direction or SAE feature",
    "sae-eval": "L0, FVU, dead and dense latents of an SAE on a hook's tokens",
    "view": "one sequence with each token coloured by a value (--heat, --png)",
    "norms": "token-norm distribution, massive dims, outliers; writes RUN/_vaultsh/outliers/HOOK.json",
}


def command_module(name: str) -> ModuleType:
    """The module that implements subcommand `name`."""
    return importlib.import_module(f"vaultsh.subcommands.{name.replace('-', '_')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vaultsh", description="Collect, store and inspect transformer activations (S3 or a local directory)."
    )
    parser.add_argument("--version", action="version", version=f"vaultsh {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = command_module(name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def _error(message: str) -> None:
    print(f"vaultsh: error: {one_line(message)}", file=sys.stderr)


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
    from vaultsh.store import apply_no_sign_request

    apply_no_sign_request(args)
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
