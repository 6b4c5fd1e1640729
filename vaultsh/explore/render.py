"""The explore results as text for people (rich); `--json` prints `to_json()` instead.

Decoded text and keys come from the store: they go through `safe_text` and are
printed without markup, so a crafted token cannot inject escapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import humanize
from rich.console import Console
from rich.text import Text

from vaultsh.explore.grep import GrepResult
from vaultsh.explore.heat import GREY, HeatResult
from vaultsh.explore.norms import NormsResult
from vaultsh.explore.saeeval import SaeEvalResult
from vaultsh.explore.source import source_text
from vaultsh.explore.text import Context
from vaultsh.explore.top import TopResult
from vaultsh.terminal import safe_text

HIGHLIGHT = "bold black on yellow"
OPEN, CLOSE = "⟦", "⟧"  # the highlight stays visible without colour (pipes, logs)
MASK_OPEN, MASK_CLOSE = "«", "»"  # masked (not real) text, as every batch viewer shows it
BAR = "█"


def segments_text(segments: list[tuple[str, bool]]) -> Text:
    """A sequence's decoded text (`vaultsh.tokens.segments`): masked runs dim and marked «like this»; the text is
    made inert for a terminal, newlines kept. The shell's and the dashboard's batch viewers both print it."""
    t = Text()
    for seg, real in segments:
        shown = safe_text(seg, keep_newlines=True)
        if real:
            t.append(shown)
        else:
            t.append(f"{MASK_OPEN}{shown}{MASK_CLOSE}", style="dim")
    return t


def _p(console: Console, text: str | Text = "", style: str | None = None) -> None:
    console.print(text, style=style, markup=False, highlight=False, soft_wrap=True, emoji=False)


def _ctx_text(c: Context) -> Text:
    t = Text()
    t.append(safe_text(c.before))
    t.append(f"{OPEN}{safe_text(c.match)}{CLOSE}", style=HIGHLIGHT)
    t.append(safe_text(c.after))
    return t


def _src(source: dict | None) -> str:
    """` [my_jsonl doc 17 @ token 5]`: where the token came from ("" when its file records no provenance)."""
    return f" [{safe_text(source_text(source))}]" if source else ""


def render_grep(r: GrepResult, console: Console) -> None:
    for n in r.notes:
        _p(console, f"note: {safe_text(n)}", "yellow")
    for m in r.matches:
        head = Text(
            f"{safe_text(m.run)}/{safe_text(m.hook)} {safe_text(m.file.rsplit('/', 1)[-1])} "
            f"seq {m.sequence} tok {m.start}-{m.end - 1}{_src(m.source)}: ",
            style="cyan",
        )
        _p(console, head + _ctx_text(m.context))
    more = " (stopped at -n; there may be more)" if r.truncated else ""
    _p(
        console,
        f"{len(r.matches):,} match(es) in {r.files:,} file(s), {r.sequences:,} sequences{more}; "
        f"read {humanize.naturalsize(r.bytes_read, binary=True)} = {r.read_ratio:.3f}x the bytes of "
        f"input_ids+mask",
        "dim",
    )


def render_top(r: TopResult, console: Console) -> None:
    _p(
        console,
        f"top {len(r.top)} by {r.value} in {safe_text(r.run)}/{safe_text(r.hook)} "
        f"({r.tokens:,} tokens, {r.files:,} files)",
        "bold",
    )
    for i, t in enumerate(r.top):
        head = Text(
            f"{i + 1:>3}. {t.value:>10.4g}  q={t.quantile:.6f}  "
            f"{safe_text(t.file.rsplit('/', 1)[-1])} seq {t.sequence} pos {t.position}{_src(t.source)}: ",
            style="cyan",
        )
        _p(console, head + (_ctx_text(t.context) if t.context else Text("")))


def render_sae_eval(r: SaeEvalResult, console: Console) -> None:
    s = r.sae
    _p(
        console,
        f"SAE {safe_text(s['source'])} ({s['layout']}, {s['architecture']}"
        f"{', k=' + str(s['k']) if s.get('k') else ''}, d_in {s['d_in']}, d_sae {s['d_sae']:,})",
        "bold",
    )
    _p(console, f"on {safe_text(r.run)}/{safe_text(r.hook)}: {r.tokens:,} tokens")
    _p(console, f"  L0                 {r.l0:.2f}")
    _p(console, f"  FVU                {r.fvu:.4f}  (explained variance {1 - r.fvu:.4f})")
    _p(console, f"  MSE                {r.mse:.4g}")
    _p(console, f"  dead latents       {r.dead:,} / {s['d_sae']:,} ({r.dead / s['d_sae']:.1%})")
    _p(console, f"  dense latents      {r.dense:,} (active on > {r.dense_threshold:.0%} of tokens)")
    q = r.freq_quantiles
    _p(console, "  firing frequency   " + "  ".join(f"{k}={v:.3g}" for k, v in q.items()))


def heat_text(r: HeatResult) -> Text:
    """Each token's piece on its colour (`HeatResult.colours`): the one heat picture of every view (the CLI's and
    the shell's `view --heat`, the shell's batch viewer, the dashboard's batch viewer)."""
    t = Text()
    for tok, (cr, cg, cb) in zip(r.tokens, r.colours()):
        piece = safe_text(tok.piece)
        style = f"black on rgb({cr},{cg},{cb})" if tok.real else f"rgb({GREY[0] - 80},{GREY[1] - 80},{GREY[2] - 80})"
        t.append(piece, style=style)
    return t


def heat_scale(r: HeatResult) -> str:
    """`norm, scale 0 .. 300 (grey: masked)`: what the colours mean."""
    lo = f"{-r.scale:.4g}" if r.signed else "0"
    return f"{r.value}, scale {lo} .. {r.scale:.4g} (grey: masked)"


def render_heat(r: HeatResult, console: Console) -> None:
    _p(console, f"{safe_text(r.file)} #{r.sequence}: {heat_scale(r)}", "bold")
    _p(console, heat_text(r))
    if r.png and r.png_size:  # heat() sets both
        _p(console, f"wrote {safe_text(r.png)} ({r.png_size[0]}x{r.png_size[1]})", "dim")


def render_norms(r: NormsResult, console: Console) -> None:
    _p(
        console,
        f"token norms of {safe_text(r.run)}/{safe_text(r.hook)}: {r.tokens:,} tokens, {r.files:,} files",
        "bold",
    )
    _p(
        console,
        f"  mean {r.mean_norm:.4g}  median {r.median_norm:.4g}  "
        + "  ".join(f"q{k}={v:.4g}" for k, v in r.quantiles.items()),
    )
    peak = max(r.hist_counts) or 1
    for lo, hi, c in zip(r.hist_edges, r.hist_edges[1:], r.hist_counts):
        _p(console, f"  {lo:>10.4g} - {hi:<10.4g} {BAR * max(1 if c else 0, round(40 * c / peak)):<40} {c:,}")
    pos = [(i, v) for i, v in enumerate(r.by_position) if v is not None]
    if pos:
        first = ", ".join(f"{i}: {v:.3g}" for i, v in pos[:8])
        _p(console, f"  mean norm by position: {first}{', ...' if len(pos) > 8 else ''}")
    if r.massive_dims:
        _p(
            console,
            f"  massive dims (max|x| >= {r.massive_ratio:g}x the median dim's): "
            + ", ".join(f"{d['dim']} ({d['max_abs']:.4g}, {d['ratio_to_median']:.1f}x)" for d in r.massive_dims[:10]),
        )
    else:
        _p(console, f"  no massive dims (none >= {r.massive_ratio:g}x the median dim's max|x|)")
    _p(console, f"  outliers (norm >= {r.factor:g}x median = {r.factor * r.median_norm:.4g}): {r.outliers_total:,}")
    for hit in r.contexts:
        head = Text(
            f"    {hit['norm']:>10.4g}  {safe_text(hit['file'].rsplit('/', 1)[-1])} seq {hit['sequence']} "
            f"pos {hit['position']}: ",
            style="cyan",
        )
        _p(console, head + _ctx_text(Context(**hit["context"])))
    if r.written:
        _p(console, f"wrote {safe_text(r.written)}", "dim")


RENDERERS: dict[type, Callable[[Any, Console], None]] = {
    GrepResult: render_grep,
    TopResult: render_top,
    SaeEvalResult: render_sae_eval,
    HeatResult: render_heat,
    NormsResult: render_norms,
}


def render(result, console: Console) -> None:
    """Print one explore result for a person."""
    RENDERERS[type(result)](result, console)
