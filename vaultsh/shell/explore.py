"""The shell's explore commands: grep, top, sae-eval, norms (and `view --heat`, in commands.py).

Thin wrappers over `vaultsh.explore`: they resolve the location from the
current directory, show a progress bar on the error console, and return the
results, which `vaultsh.explore.render` prints.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from vaultsh.errors import UserError
from vaultsh.explore import render as xr
from vaultsh.explore.grep import GrepResult
from vaultsh.explore.heat import HeatResult
from vaultsh.explore.norms import NormsResult
from vaultsh.explore.saeeval import SaeEvalResult
from vaultsh.explore.stream import Progress
from vaultsh.explore.top import TopResult
from vaultsh.explore.values import parse_int
from vaultsh.shell.context import ShellContext
from vaultsh.shell.registry import Arg, command
from vaultsh.shell.render import render
from vaultsh.shell.values import value_flags, value_options

for _cls in (GrepResult, TopResult, SaeEvalResult, HeatResult, NormsResult):
    render.register(_cls)(xr.render)


@contextmanager
def _progress(ctx: ShellContext, what: str) -> Iterator[Progress]:
    """A progress bar named `what` on the error console; yields the `(done, total)` callback explore functions take."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    with ctx.progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as update:
        yield lambda done, total: update(completed=done, total=total)


def parse_count(name: str, value, default: int, lo: int | None = 0) -> int:
    """An option's whole-number value, `default` when the option is not given."""
    v = parse_int(name, value, lo)
    return default if v is None else v


def parse_float(name: str, value, default: float) -> float:
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise UserError(f"{name} {value!r}: not a number") from None


def hook_location(ctx: ShellContext, hook: str | None) -> tuple[str, str | None]:
    """(location key, hook name) for a HOOK argument: a path to a hook directory, or a hook of the current run."""
    if hook is None:
        return ctx.cwd, None
    try:
        key = ctx.resolve(hook)
    except UserError:
        key = None
    if key and ctx.hook_of(key):
        return key, None
    if "/" in hook:
        raise UserError(f"{hook}: not a hook directory ({ctx.display(key) if key else hook})")
    return ctx.cwd, hook


@command(
    "grep",
    help="find text in the decoded tokens of a run (or the runs here); reads only input_ids and mask",
    args=[Arg("pattern")],
    flags={
        "--regex": "PATTERN is a regular expression",
        "-i": "ignore case",
        "--hook H": "search this hook's files",
        "-n N": "stop after N matches (default 50)",
        "--context K": "tokens of context either side (default 8)",
    },
    details="Matches may span token boundaries but never a masked token. The run is the current directory "
    "(a run or hook directory), or every run one level below it.",
)
def grep_cmd(ctx: ShellContext, a) -> GrepResult:
    from vaultsh.explore.grep import grep

    with _progress(ctx, "grep") as progress:
        return grep(
            ctx.store,
            ctx.cwd,
            a.pattern,
            regex=a.regex,
            hook=a.hook,
            limit=parse_count("-n", a.n, 50, lo=1),
            context_tokens=parse_count("--context", a.context, 8),
            ignore_case=a.i,
            progress=progress,
        )


@command(
    "top",
    help="the exact top-k tokens of a hook by a dimension, a direction or an SAE feature, with contexts",
    args=[Arg("hook", "dir", optional=True)],
    flags={
        **value_flags(),
        "-k K": "how many (default 20)",
        "--context K": "tokens of context either side (default 8)",
        "--files N": "a seeded random sample of N files instead of all",
    },
)
def top_cmd(ctx: ShellContext, a) -> TopResult:
    from vaultsh.explore.top import top

    key, hook = hook_location(ctx, a.hook)
    vf = value_options(a)
    with _progress(ctx, "top") as progress:
        return top(
            ctx.store,
            key,
            hook,
            vf,
            k=parse_count("-k", a.k, 20, lo=1),
            context_tokens=parse_count("--context", a.context, 8),
            files=parse_int("--files", a.files, 1),
            progress=progress,
        )


@command(
    "sae-eval",
    help="L0, fraction of variance unexplained, dead and dense latents of an SAE on a hook's tokens",
    args=[Arg("hook", "dir"), Arg("ckpt")],
    flags={
        "--tokens N": "real tokens to evaluate on (default 100000)",
        "--dense F": "a latent active on more than this fraction of tokens is dense (default 0.1)",
    },
)
def sae_eval_cmd(ctx: ShellContext, a) -> SaeEvalResult:
    from vaultsh.explore.saeeval import sae_eval

    key, hook = hook_location(ctx, a.hook if a.hook != "." else None)
    n = parse_count("--tokens", a.tokens, 100_000, lo=1)
    dense = parse_float("--dense", a.dense, 0.1)
    with _progress(ctx, "sae-eval") as progress:
        return sae_eval(ctx.store, key, hook, a.ckpt, tokens=n, dense=dense, progress=progress)


@command(
    "norms",
    help="token-norm distribution, mean norm by position, massive dims and outlier tokens; writes RUN/_vaultsh/outliers/HOOK.json",
    args=[Arg("hook", "dir", optional=True)],
    flags={
        "--png FILE": "also draw the histogram and the by-position curve",
        "--factor F": "outlier: norm >= F x the median (default 5)",
        "--massive-ratio R": "massive dim: max|x| >= R x the median dim's (default 10)",
        "--files N": "a sample of N files",
        "--no-write": "do not write the outliers file",
    },
)
def norms_cmd(ctx: ShellContext, a) -> NormsResult:
    from vaultsh.explore.norms import norms

    key, hook = hook_location(ctx, a.hook)
    with _progress(ctx, "norms") as progress:
        r = norms(
            ctx.store,
            key,
            hook,
            factor=parse_float("--factor", a.factor, 5.0),
            massive_ratio=parse_float("--massive-ratio", a.massive_ratio, 10.0),
            files=parse_int("--files", a.files, 1),
            write=not a.no_write,
            progress=progress,
        )
    if a.png:
        from vaultsh.explore.png import histogram_png

        histogram_png(r.hist_edges, r.hist_counts, r.by_position, f"{r.run}/{r.hook}", a.png)
    ctx.invalidate()
    return r


def heat_view(ctx: ShellContext, key: str, batch: str, a) -> HeatResult:
    """`view TARGET BATCH --heat ...`: the sequence coloured by a value."""
    from vaultsh.explore.heat import heat

    sequence = parse_int("batch", batch, lo=None)
    assert sequence is not None  # BATCH is a required argument: a string, never None
    return heat(ctx.store, key, sequence, value_options(a), png=a.png)
