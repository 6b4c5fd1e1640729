"""`vaultsh bench`: run benchmarks/ and print a table of ratios against baselines."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from vaultsh.errors import UserError


def _import_harness():
    repo = Path(__file__).resolve().parents[2]
    if not (repo / "benchmarks" / "harness.py").is_file():
        raise UserError("benchmarks/ not found: run `vaultsh bench` from a source checkout (pip install -e .)")
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from benchmarks import harness

    return harness, repo


def run_bench(args) -> int:
    from rich.console import Console
    from rich.table import Table

    harness, repo = _import_harness()
    registry = harness.discover()
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    if args.list:
        for b in registry.values():
            console.print(f"{b.name:32} {b.description}")
        return 0
    unknown = [n for n in args.names if n not in registry]
    if unknown:
        raise UserError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(registry)}")
    selected = [registry[n] for n in (args.names or registry)]
    results = []
    for b in selected:
        console.print(f"[dim]running {b.name}: {b.description}[/]")
        try:
            results.append(b.func(args.quick))
        except UserError:
            raise
        except Exception as exc:  # a broken benchmark should not hide the others
            results.append(harness.BenchResult(b.name, "-", None, float("nan"), None, "-", False, f"error: {exc!r}"))
    table = Table(title="vaultsh benchmarks" + (" (quick)" if args.quick else ""))
    for col in ("benchmark", "metric", "baseline", "ours", "ratio", "target", "ok", "notes"):
        table.add_column(col)
    for r in results:
        table.add_row(
            r.name,
            r.metric,
            "-" if r.baseline is None else f"{r.baseline:,}",
            f"{r.ours:,}",
            "-" if r.ratio is None else f"{r.ratio:.3f}",
            r.target,
            "✅" if r.passed else "❌",
            r.notes,
        )
    console.print(table)
    out = Path(args.json) if args.json else repo / "bench-results" / time.strftime("%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"quick": args.quick, "results": [r.to_dict() for r in results]}, indent=2))
    console.print(f"results written to {out}")
    return 0 if all(r.passed for r in results) else 1


def add_arguments(p) -> None:
    """This subcommand's arguments (vaultsh/cli.py builds the parser from it)."""
    p.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    p.add_argument("--list", action="store_true", help="list benchmarks and exit")
    p.add_argument(
        "--json", default=None, metavar="PATH", help="write results as JSON (default bench-results/<time>.json)"
    )
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")


def run(args) -> int:
    return run_bench(args)
