"""`vaultsh export RUN_URI/HOOK OUT --format parquet`: sharded Parquet + a dataset card, resumable.

`vaultsh export RUN_URI OUT --format saelens --hooks H1,H2`: SAELens's cached-activations layout
(vaultsh/export/saelens.py).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import threading
from typing import TYPE_CHECKING

from vaultsh.subcommands import options

if TYPE_CHECKING:
    from rich.progress import TaskID


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This subcommand's arguments (vaultsh/cli.py builds the parser from it)."""
    p.add_argument(
        "source",
        metavar="RUN_URI/HOOK",
        help="hook directory of a run (s3://bucket/run/hook or a path); with --format saelens --hooks: the run",
    )
    p.add_argument(
        "out", metavar="OUT", help="output directory or s3:// prefix (created; resumed when it holds this export)"
    )
    from vaultsh.store import add_no_sign_request

    add_no_sign_request(p, "; every s3:// URI of the command, so OUT must then be a local path")
    p.add_argument(
        "--format",
        choices=["parquet", "saelens"],
        default="parquet",
        help="output format (default: parquet); saelens: SAELens's cached activations, see docs/training.md",
    )
    p.add_argument(
        "--hooks",
        default=None,
        metavar="H1[,H2...]",
        help="--format saelens: the hooks, one column each (default: the hook of RUN_URI/HOOK)",
    )
    rows = p.add_mutually_exclusive_group()
    rows.add_argument(
        "--sequences",
        dest="mode",
        action="store_const",
        const="sequences",
        help="one row per sequence: states [T, D], input_ids [T], mask [T] (default)",
    )
    rows.add_argument(
        "--tokens",
        dest="mode",
        action="store_const",
        const="tokens",
        help="one row per unmasked token: states [D], input_ids, position",
    )
    p.set_defaults(mode="sequences")
    p.add_argument(
        "--batches-per-shard", type=int, default=50, metavar="N", help="megabatches per Parquet shard (default 50)"
    )
    p.add_argument(
        "--max-shards",
        type=int,
        default=None,
        metavar="N",
        help="stop once the first N shards exist (run again without it to finish)",
    )
    p.add_argument(
        "--label-columns",
        nargs="*",
        default=None,
        metavar="NAME",
        help="labels to export (default: every label all megabatches carry; no names: none)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16", "float64"],
        help="states dtype (default auto: as stored, bf16/fp8 widened to float32; "
        "bfloat16 = raw bits in uint16, see docs/export.md)",
    )
    p.add_argument(
        "--shuffle", action="store_true", help="shuffle rows globally across all shards (a seeded permutation)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --shuffle (default 0)")
    p.add_argument(
        "--compression",
        default="none",
        choices=["none", "snappy", "zstd", "gzip", "brotli"],
        help="codec of the states column (default none: activations barely compress); other columns use zstd",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="shards written at once (default 2; memory: about 4 megabatches per worker)",
    )
    p.add_argument(
        "--fsync",
        action="store_true",
        help="make each local shard durable (fsync) before it counts as done; without it shards are still "
        "atomic and a rerun rewrites any that a power loss cut short",
    )
    p.add_argument(
        "--tmp-dir",
        default=None,
        metavar="DIR",
        help="local scratch space for --shuffle when its rows do not fit in half the available RAM "
        "(default: system temp)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


class _RichProgress:
    """Rows, bytes, speed and ETA on a rich progress bar, and the export's notes (stderr)."""

    def __init__(self, quiet: bool):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.console = Console(stderr=True)
        self.quiet = quiet
        self.bar = Progress(
            TextColumn("[bold]{task.description:<10}"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[rows]} rows"),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=quiet,
        )
        self.task: TaskID | None = None
        self.rows = 0
        self.total_rows = 0
        self.lock = threading.Lock()

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()

    def phase(self, name: str, total_bytes: int, total_rows: int) -> None:
        with self.lock:
            if self.task is not None:
                self.bar.update(self.task, completed=self.bar.tasks[self.task].total)
            self.rows, self.total_rows = 0, total_rows
            self.task = self.bar.add_task(name, total=max(1, total_bytes), rows=f"0/{total_rows:,}")

    def advance(self, src_bytes: int, rows: int) -> None:
        with self.lock:
            assert self.task is not None  # the export calls phase() first
            self.rows += rows
            self.bar.update(self.task, advance=src_bytes, rows=f"{self.rows:,}/{self.total_rows:,}")

    def note(self, message: str) -> None:
        from rich.markup import escape

        self.console.print(f"[yellow]note:[/] {escape(message)}")


def _wrote(result, rows: str, out: str, shards: str) -> str:
    """What this call wrote, one line: `[resumed: ]wrote N shard(s), ROWS, SIZE to OUT (SHARDS)`."""
    import humanize

    verb = "resumed: wrote" if result.resumed else "wrote"
    size = humanize.naturalsize(result.bytes_written, binary=True)
    return f"{verb} {result.shards_written} shard(s), {rows}, {size} to {out} ({shards})"


def _run_saelens(args) -> int:
    """--format saelens: refuse the Parquet-only options, export, print what to pass SAELens."""

    from vaultsh.errors import UserError
    from vaultsh.export.saelens import export_saelens, split_hook_uri

    parquet_only = {
        "--tokens": args.mode != "sequences",
        "--shuffle": args.shuffle,
        "--label-columns": args.label_columns is not None,
        "--compression": args.compression != "none",
        "--tmp-dir": args.tmp_dir is not None,
        "--workers": args.workers is not None,
    }
    bad = [k for k, given in parquet_only.items() if given]
    if bad:
        raise UserError(f"{bad[0]} is not allowed with --format saelens (SAELens's layout is one row per sequence)")
    if args.dtype == "bfloat16":
        raise UserError(
            "--dtype bfloat16 is not allowed with --format saelens (Arrow has no bfloat16): use auto, "
            "float32, float16 or float64"
        )
    if args.hooks:
        run_uri, hooks = args.source, [h.strip() for h in args.hooks.split(",") if h.strip()]
    else:
        run_uri, hook = split_hook_uri(args.source)
        hooks = [hook]
    command = (
        f"vaultsh export {shlex.quote(args.source)} {shlex.quote(args.out)} --format saelens "
        f"--hooks {shlex.quote(','.join(hooks))} --dtype {args.dtype} --batches-per-shard {args.batches_per_shard}"
    )
    with _RichProgress(args.quiet) as prog:
        res = export_saelens(
            run_uri,
            args.out,
            hooks,
            **options(args, "dtype", "batches_per_shard", "max_shards", "fsync"),
            progress=prog,
            command=command,
        )
    print(
        _wrote(res, f"{res.sequences_written:,} sequences", res.out, f"{res.shards_total} shard(s) in all"),
        file=sys.stdout,
    )
    if not res.complete:
        print("shards left: run the same command without --max-shards to finish", file=sys.stdout)
    else:
        print(
            f"SAELens: use_cached_activations=True, cached_activations_path={res.out}/activations, "
            f"override_dataset=load_from_disk({res.out}/tokens), exclude_special_tokens={res.exclude_token_ids}",
            file=sys.stdout,
        )
    return 0


def run(args) -> int:
    if args.format == "saelens":
        return _run_saelens(args)

    from vaultsh.errors import UserError
    from vaultsh.export import ExportOptions, export

    if args.hooks is not None:
        raise UserError("--hooks is for --format saelens; --format parquet exports the one hook of RUN_URI/HOOK")
    if args.batches_per_shard < 1:
        raise UserError(f"--batches-per-shard {args.batches_per_shard} is not allowed: use a whole number >= 1")
    if args.max_shards is not None and args.max_shards < 1:
        raise UserError(f"--max-shards {args.max_shards} is not allowed: use a whole number >= 1")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers} is not allowed: use a whole number >= 1")
    opts = ExportOptions(
        **options(args, "mode", "dtype", "batches_per_shard", "shuffle", "seed", "compression"),
        label_columns=None if args.label_columns is None else tuple(args.label_columns),
    )
    command = f"vaultsh export {shlex.quote(args.source)} {shlex.quote(args.out)} --format parquet {opts.flags()}"
    with _RichProgress(args.quiet) as prog:
        result = export(
            args.source,
            args.out,
            opts,
            **options(args, "max_shards", "workers", "tmp_dir", "fsync"),
            progress=prog,
            command=command,
        )
    done = f"{result.shards_done} of {result.shards_total} shards done"
    print(_wrote(result, f"{result.rows_written:,} rows", result.out_uri, done), file=sys.stdout)
    if not result.complete:
        left = result.shards_total - result.shards_done
        print(f"{left} shard(s) left: run the same command without --max-shards to finish", file=sys.stdout)
    return 0
