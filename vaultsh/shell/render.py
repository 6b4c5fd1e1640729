"""Text for people: one function per result type (`--json` prints `to_json()` instead).

Everything that came from the store (keys, header fields, decoded text) goes
through `safe_text`, and is printed without rich markup, so a crafted key or
token cannot inject terminal escapes or markup.
"""

from __future__ import annotations

import textwrap
from datetime import timezone
from functools import singledispatch

from rich.console import Console
from rich.text import Text

from vaultsh.explore.render import MASK_CLOSE, MASK_OPEN, segments_text
from vaultsh.fmt import binary_size
from vaultsh.shell import results
from vaultsh.terminal import json_text, safe_text

RULE = "-" * 40


def _p(console: Console, text: str | Text = "", style: str | None = None) -> None:
    console.print(text, style=style, markup=False, highlight=False, soft_wrap=True, emoji=False)


def _ok(n: int) -> str:
    return "✅" if n == 0 else f"❌ ({n:,})"


@singledispatch
def render(result, console: Console) -> None:
    """Print `result` for a person. Unknown results (the batch viewer) print nothing."""
    return None


@render.register
def _(r: results.Message, console: Console) -> None:
    _p(console, safe_text(r.text), style=r.style)


def ls_line(e, long: bool) -> str:
    name = safe_text(e.name)
    if e.is_dir:
        size_col = f"{'DIR':>10}"
        if long:
            size_col += " " * 17
        return f"{'':19}  {size_col}  {name}"
    when = e.mtime.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if e.mtime else "?" * 19
    line = f"{when}  {binary_size(e.size or 0):>10}"
    if long:
        line += f"  {e.size or 0:>15,}"
    line += f"  {name}"
    if long and e.note:
        line += f"  {e.note}"
    return line


@render.register
def _(r: results.LsResult, console: Console) -> None:
    for e in r.entries:
        _p(console, ls_line(e, r.long))
    s = r.summary
    if s and r.kind == "run":
        src = "commit records" if s.get("commit_records") else "no commit records: every file counts"
        _p(
            console,
            f"run {safe_text(s['run'])}: {s['hooks']} hook{'s' if s['hooks'] != 1 else ''}, "
            f"{s['megabatches']:,} megabatches, {s['tokens']:,} tokens ({src})",
            style="bold",
        )
    elif s and r.kind == "hook":
        extra = f", {s['uncommitted']:,} uncommitted (ignored by readers)" if s["uncommitted"] else ""
        _p(
            console,
            f"hook {safe_text(s['hook'])}: {s['megabatches']:,} committed megabatches, {s['tokens']:,} tokens{extra}",
            style="bold",
        )
    if r.summary_error:
        _p(console, f"summary unavailable: {safe_text(r.summary_error)}", style="yellow")


@render.register
def _(t: results.Tally, console: Console) -> None:
    mb = t.megabatches
    rows: list[tuple[str, str, str]] = []
    if t.command == "filecount":
        _p(console, f"{safe_text(t.uri)}: {t.objects:,} files", style="bold")
        unc = mb.files - (mb.committed or 0)
        rows.append(
            ("megabatches", f"{mb.files:,}", f"{mb.committed:,} committed" + (f", {unc:,} uncommitted" if unc else ""))
        )
        for label, g in t.hooks.items():
            u = g.files - (g.committed or 0)
            rows.append((f"  {safe_text(label)}", f"{g.committed:,}", f"+{u:,} uncommitted" if u else ""))
        rows.append(("metadata", f"{t.metadata.files:,}", "cfg.json, metadata.json, statistics.json"))
        rows.append(("internal", f"{t.internal.files:,}", "_vaultsh/: commit records, statistics snapshots"))
        rows.append(("other", f"{t.other.files:,}", ""))
    else:
        _p(
            console,
            f"{safe_text(t.uri)}: {binary_size(t.bytes)} ({t.bytes:,} bytes) in {t.objects:,} objects",
            style="bold",
        )
        rows.append(("megabatches", binary_size(mb.bytes), f"{mb.bytes:,} bytes in {mb.files:,} files"))
        for label, g in t.hooks.items():
            rows.append((f"  {safe_text(label)}", binary_size(g.bytes), f"{g.bytes:,} bytes in {g.files:,} files"))
        for g in (t.metadata, t.internal, t.other):
            rows.append((g.label, binary_size(g.bytes), f"{g.bytes:,} bytes in {g.files:,} files"))
    w0 = max(len(a) for a, _, _ in rows)
    w1 = max(len(b) for _, b, _ in rows)
    for a, b, c in rows:
        _p(console, f"  {a:<{w0}}  {b:>{w1}}  {c}".rstrip())


@render.register
def _(h: results.InspectHeader, console: Console) -> None:
    hd = h.header
    where = f" (#{h.index} of {h.count} committed)" if h.index is not None and h.count else ""
    _p(console, f"Inspecting file: {safe_text(h.uri)}{where}")
    _p(console)
    _p(console, "PT File Inspection:" if hd.format == "pt" else "Megabatch Inspection:")
    _p(console, RULE)
    _p(console, f"Model: {safe_text(h.model or '?')}")
    _p(console, f"Hook: {safe_text(h.hook or '?')}")
    from vaultsh.dtypes import BY_CODE

    dtype = hd.dtype if "states" in hd.tensors else "?"
    torch_name = BY_CODE[dtype].name if dtype in BY_CODE else "?"
    size = f"   size: {binary_size(hd.file_size)} ({hd.file_size:,} bytes)" if hd.file_size is not None else ""
    _p(console, f"Format: {hd.format}   dtype: {dtype} (torch.{torch_name}){size}")
    _p(console)
    _p(console, "Tensor Shapes:")
    order = {"states": 0, "input_ids": 1, "mask": 2}
    for name, t in sorted(hd.tensors.items(), key=lambda kv: (order.get(kv[0], 3), kv[0])):
        _p(console, f"  {safe_text(name)}: {list(t.shape)} {t.dtype}")
    extra = {k: v for k, v in hd.metadata.items() if k not in ("model", "hook")}
    if extra:
        text = "Header: " + ", ".join(f"{safe_text(k)}={safe_text(v)}" for k, v in sorted(extra.items()))
        for line in textwrap.wrap(text, max(40, console.width - 1), subsequent_indent="  ", break_on_hyphens=False):
            _p(console, line)


@render.register
def _(s: results.InspectScan, console: Console) -> None:
    d = s.scan
    _p(console)
    _p(console, "States Tensor Check:")
    _p(console, f"  No NaNs: {_ok(d['nan_count'])}")
    _p(console, f"  No Infs: {_ok(d['inf_count'])}")
    if d["min"] is None:
        _p(console, "  Value range: no finite values")
    else:
        _p(console, f"  Value range: [{d['min']:.4g}, {d['max']:.4g}]")
        _p(console, f"  Mean / std: {d['mean']:.4g} / {d['std']:.4g}")
    _p(console, f"  Masked tokens: {d['masked_fraction']:.1%} ({d['tokens'] - d['real_tokens']:,} of {d['tokens']:,})")


def preview_text(text: str) -> str:
    """One line per preview: newlines shown as ⏎, control characters escaped."""
    return safe_text(text.replace("\r\n", "\n").replace("\n", "⏎"))


@render.register
def _(p: results.InspectPreview, console: Console) -> None:
    _p(console)
    if p.note:
        _p(console, f"{safe_text(p.note)}; showing token ids", style="yellow")
    shown = min(len(p.previews), p.n_sequences)
    _p(console, f"First {shown} batches (first {p.limit} chars each):")
    _p(console, RULE)
    for pv in p.previews:
        tail = "... (truncated)" if pv.truncated else ""
        masked = pv.tokens - pv.real_tokens
        _p(console, f"Batch {pv.batch}: {preview_text(pv.text)}{tail}")
        if masked and not pv.real_tokens:
            _p(console, f"  (all {pv.tokens} tokens masked)", style="dim")
        if pv.source is not None:
            _p(console, f"  source: {_source_line(pv.source)}", style="dim")
    _p(console)


@render.register
def _(v: results.SequenceView, console: Console) -> None:
    real = sum(1 for m in v.mask if m)
    masked = len(v.mask) - real
    _p(
        console,
        f"Batch {v.batch} of {v.n_sequences}: {len(v.ids):,} tokens, {real:,} real, {masked:,} masked"
        + (f" (shown {MASK_OPEN}like this{MASK_CLOSE})" if masked else ""),
        style="bold",
    )
    if v.source is not None:
        _p(console, f"Source: {_source_line(v.source)}")
    if v.note:
        _p(console, f"{safe_text(v.note)}; showing token ids", style="yellow")
    _p(console, RULE)
    text = Text()
    if v.tokens is not None:
        for i, piece, is_real in v.tokens:
            text.append(f"[{i}]", style="cyan")
            shown = safe_text(piece.replace("\n", "⏎"))
            if is_real:
                text.append(shown)
            else:
                text.append(f"{MASK_OPEN}{shown}{MASK_CLOSE}", style="dim")
            text.append(" " if not v.note else "")
    else:
        text = segments_text(v.segments or [])
    _p(console, text)
    _p(console, RULE)


@render.register
def _(t: results.TokensResult, console: Console) -> None:
    real = sum(1 for m in t.mask if m)
    _p(
        console,
        f"{safe_text(t.uri)} batch {t.batch}: {len(t.ids):,} tokens ({real:,} real, {len(t.ids) - real:,} masked)",
    )
    _p(console, "input_ids: " + " ".join(str(i) for i in t.ids))
    _p(console, "mask:      " + "".join("1" if m else "0" for m in t.mask))
    if t.source is not None:
        _p(console, f"source:    {_source_line(t.source)}")


def _source_line(d: dict) -> str:
    """A provenance dict (vaultsh.provenance.as_dict) as one safe line."""
    from vaultsh.provenance import describe

    names = [d["source"]] if d.get("source") is not None else None
    row = (0 if names else d["source_index"], d["document_index"], d["token_offset"])
    return safe_text(describe(row, names))


@render.register
def _(s: results.StatsResult, console: Console) -> None:
    _p(console, f"{safe_text(s.uri)}", style="bold")
    _p(console, f"  tokens (count): {s.count:,}   d_model: {s.d:,}")
    _p(console, f"  mean:  [{s.mean_range[0]:.4g}, {s.mean_range[1]:.4g}]   mean |mean| {s.mean_abs_mean:.4g}")
    _p(console, f"  std:   [{s.std_range[0]:.4g}, {s.std_range[1]:.4g}]   mean std {s.mean_std:.4g}")
    _p(console, f"  norm:  {s.mean_norm:.4g} (mean L2 norm per token)")
    _p(console, "  per-feature std histogram:")
    top = max(s.hist_counts) or 1
    for lo, hi, c in zip(s.hist_edges, s.hist_edges[1:], s.hist_counts):
        bar = "█" * max(1 if c else 0, round(30 * c / top))
        _p(console, f"    {lo:>10.4g} – {hi:<10.4g} {bar} {c}")


@render.register
def _(d: results.JsonDoc, console: Console) -> None:
    _p(console, json_text(d.data))


@render.register
def _(d: results.TextDoc, console: Console) -> None:
    _p(console, safe_text(d.text, keep_newlines=True))


@render.register
def _(g: results.GetResult, console: Console) -> None:
    for uri, path, n in g.files if len(g.files) <= 20 else g.files[:20]:
        _p(console, f"{safe_text(uri)} -> {safe_text(path)} ({binary_size(n)})")
    if len(g.files) > 20:
        _p(console, f"... and {len(g.files) - 20:,} more")
    total = sum(n for _, _, n in g.files)
    _p(
        console,
        f"downloaded {len(g.files):,} file{'s' if len(g.files) != 1 else ''}, {binary_size(total)} ({total:,} bytes)",
    )


@render.register
def _(r: results.RmResult, console: Console) -> None:
    if r.cancelled:
        _p(console, f"not deleted: {safe_text(r.uri)}")
    else:
        _p(
            console,
            f"deleted {r.deleted:,} object{'s' if r.deleted != 1 else ''} ({binary_size(r.bytes)}): {safe_text(r.uri)}",
        )


@render.register
def _(r: results.VerifyReport, console: Console) -> None:
    for style, line in r.lines():
        _p(console, safe_text(line), style=style or None)


@render.register
def _(h: results.HelpResult, console: Console) -> None:
    if h.detail is not None:
        c = h.detail
        _p(console, f"usage: {c.syntax}", style="bold")
        _p(console, f"  {c.help}")
        if c.aliases:
            _p(console, f"  aliases: {', '.join(c.aliases)}")
        for f, what in c.flags.items():
            _p(console, f"  {f:<12} {what}")
        if c.details:
            _p(console, f"  {c.details}")
        return
    width = max(len(c.syntax) for c in h.commands)
    room = max(30, console.width - width - 5)  # wrap the help column under itself
    for c in h.commands:
        lines = textwrap.wrap(c.help, room) or [""]
        _p(console, f"  {c.syntax:<{width}}  {lines[0]}")
        for more in lines[1:]:
            _p(console, f"  {'':<{width}}  {more}")
    _p(console, "`help CMD` for one command; commands can be chained with ';'; add --json to any command for JSON.")
