"""The shell's commands. Each handler takes (ctx, parsed args) and returns (or
yields) result objects from `results.py`; none of them prints. Progress bars
and confirmations go through `ctx`.
"""

from __future__ import annotations

import json
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from vaultsh import tokens as dec
from vaultsh.errors import FormatError, NotFoundError, UserError
from vaultsh.fmt import binary_size
from vaultsh.run import CFG, INTERNAL, METADATA, Run, megabatch_format
from vaultsh.shell.context import ShellContext
from vaultsh.shell.registry import REGISTRY, Arg, command
from vaultsh.shell.results import (
    Entry,
    GetResult,
    HelpResult,
    InspectHeader,
    InspectPreview,
    InspectScan,
    JsonDoc,
    LsResult,
    Message,
    Preview,
    Result,
    RmResult,
    SequenceView,
    StatsResult,
    TextDoc,
    TokensResult,
)
from vaultsh.shell.values import value_flags

if TYPE_CHECKING:
    from vaultsh.explore.text import Pieces
    from vaultsh.explore.values import ValueFn

PREVIEW_SEQUENCES = 4
PREVIEW_CHARS = 250
CAT_LIMIT = 1 << 20  # bytes `cat`/`meta` will print


class ExitShell(Exception):
    """`exit` / `quit`."""


# ---------------------------------------------------------------------------
# navigation
# ---------------------------------------------------------------------------


def _need_dir(ctx: ShellContext, key: str, arg: str | None) -> None:
    if ctx.is_dir(key):
        return
    shown = arg if arg else ctx.display(key)
    if ctx.is_file(key):
        raise UserError(f"{shown}: not a directory ({ctx.display(key)} is a file)")
    raise NotFoundError(f"{shown}: no such directory: {ctx.display(key)}")


def _dir_key(ctx: ShellContext, arg: str | None) -> str:
    """The key of a directory argument (None: the current directory), refused when it names a file or nothing."""
    key = ctx.resolve(arg)
    _need_dir(ctx, key, arg)
    return key


@command(
    "ls",
    help="list a directory: directories first (DIR name/), then files with size and date",
    args=[Arg("path", "path", optional=True)],
    flags={"-l": "exact byte counts, and in a hook directory each megabatch's inspect index (#N) or 'uncommitted'"},
    details="In a run directory a summary line follows: hooks, committed megabatches, tokens. "
    "In a hook directory: committed and uncommitted megabatches.",
)
def ls(ctx: ShellContext, a) -> LsResult:
    key = ctx.resolve(a.path)
    listing = ctx.list_dir(key, fresh=True)
    if not listing.prefixes and not listing.objects:
        if ctx.is_file(key):
            info = ctx.store.head(key)
            entry = Entry(key.rsplit("/", 1)[-1], key, False, info.size, info.mtime)
            return LsResult(ctx.display(key), [entry], a.l, kind="file")
        if key:
            raise NotFoundError(f"{a.path or key}: no such file or directory: {ctx.display(key)}")
    base = key + "/" if key else ""
    entries = [Entry(p[len(base) :], p.rstrip("/"), True) for p in listing.prefixes]
    entries += [Entry(o.key[len(base) :], o.key, False, o.size, o.mtime) for o in listing.objects]
    kind = ctx.dir_kind(key, listing)
    result = LsResult(ctx.display(key, directory=bool(key)), entries, a.l, kind=kind)
    try:
        if kind == "run":
            result.summary = _run_summary(ctx, key, listing)
        elif kind == "hook":
            result.summary = _hook_summary(ctx, key, entries)
    except UserError as exc:  # a corrupt commit record must not hide the listing
        result.summary_error = str(exc)
    return result


def _run_summary(ctx: ShellContext, key: str, listing) -> dict:
    commits = ctx.run_commits(key)
    base = key + "/"
    hooks = {p[len(base) :].strip("/") for p in listing.prefixes} - {INTERNAL}
    hooks |= {h for c in commits for h in c.files}
    if commits:
        tokens = sum(c.tokens for c in commits)
        if not tokens:
            first = next(iter(commits[0].files), None)
            tokens = sum(c.files[first].n_tokens for c in commits if first in c.files) if first else 0
        return {
            "run": key,
            "hooks": len(hooks),
            "megabatches": len(commits),
            "tokens": tokens,
            "workers": len({c.worker for c in commits}),
            "commit_records": True,
        }
    summary = Run(ctx.store, key).summary()  # no records (Activault): every file counts
    return {
        "run": key,
        "hooks": len(summary.hooks),
        "megabatches": summary.megabatches,
        "tokens": summary.tokens,
        "workers": len(summary.workers),
        "commit_records": False,
    }


def _hook_summary(ctx: ShellContext, key: str, entries: list[Entry]) -> dict:
    run, hook = posixpath.split(key)
    files = ctx.committed_files(run, hook)
    index = {f.key: i for i, f in enumerate(files)}
    uncommitted = 0
    for e in entries:
        if e.is_dir or not megabatch_format(e.name):
            continue
        if e.key in index:
            e.note = f"#{index[e.key]}"
        else:
            e.note = "uncommitted"
            uncommitted += 1
    return {
        "run": run,
        "hook": hook,
        "megabatches": len(files),
        "uncommitted": uncommitted,
        "tokens": sum(f.n_tokens for f in files),
    }


@command(
    "cd",
    help="change directory: cd DIR, cd .. (up), cd - (back), cd / or plain cd (the root)",
    args=[Arg("path", "dir", optional=True)],
)
def cd(ctx: ShellContext, a) -> None:
    if a.path == "-":
        if ctx.prev_cwd is None:
            raise UserError("cd -: no previous directory")
        target = ctx.prev_cwd
    else:
        target = ctx.resolve(a.path) if a.path else ""
    _need_dir(ctx, target, a.path)
    ctx.prev_cwd, ctx.cwd = ctx.cwd, target
    return None


@command("pwd", help="print the current location")
def pwd(ctx: ShellContext, a) -> Message:
    return Message(ctx.location(), data={"uri": ctx.location()})


# ---------------------------------------------------------------------------
# counting
# ---------------------------------------------------------------------------


def _tally(ctx: ShellContext, a, name: str):
    from rich.progress import SpinnerColumn, TextColumn

    from vaultsh.shell.tally import tally

    key = ctx.resolve(a.path)
    uri = ctx.display(key, directory=bool(key))
    with ctx.progress(SpinnerColumn(), TextColumn("{task.description}"), description=f"listing {uri}") as update:
        result = tally(
            ctx.store, key, name, uri, on_progress=lambda n: update(description=f"listing {uri}: {n:,} objects")
        )
    if key and not result.objects:  # checked after the fact: the listing itself is the check
        _need_dir(ctx, key, a.path)
    return result


# Two commands over the one listing (shell/tally.py), differing only in what they report.
for _name, _help in (
    (
        "filecount",
        "count files under the current directory, recursively: megabatches per hook (committed/uncommitted), metadata, other",
    ),
    ("sizecheck", "total bytes under the current directory (humanized and exact), per hook"),
):
    command(_name, help=_help, args=[Arg("path", "dir", optional=True)])(partial(_tally, name=_name))


# ---------------------------------------------------------------------------
# megabatches
# ---------------------------------------------------------------------------


@dataclass
class Target:
    key: str
    run: str | None
    hook: str | None
    index: int | None
    count: int | None


def megabatch_target(ctx: ShellContext, target: str) -> Target:
    """A megabatch named by its index in the current hook directory's committed list, or by a path."""
    if re.fullmatch(r"-?\d+", target):
        hk = ctx.hook_of(ctx.cwd)
        if hk is None:
            raise UserError(
                f"{target}: a megabatch index needs a hook directory: cd into RUN/HOOK first, or give a file name"
            )
        run, hook = hk
        files = ctx.committed_files(run, hook)
        if not files:
            raise UserError(f"no committed megabatches in {ctx.location()}")
        i = int(target)
        j = i + len(files) if i < 0 else i
        if not 0 <= j < len(files):
            raise UserError(f"index {i} out of range: {len(files)} committed megabatches here (0-{len(files) - 1})")
        return Target(files[j].key, run, hook, j, len(files))
    key = ctx.resolve(target)
    if not ctx.is_file(key):
        if ctx.is_dir(key):
            raise UserError(f"{target}: a directory, not a megabatch file (cd into a hook directory and `inspect 0`)")
        raise NotFoundError(f"{target}: no such file: {ctx.display(key)}")
    d = posixpath.dirname(key)
    hk = ctx.hook_of(d) if d else None
    if hk is None:
        return Target(key, None, None, None, None)
    run, hook = hk
    index = count = None
    try:
        files = ctx.committed_files(run, hook)
        count = len(files)
        index = next((i for i, f in enumerate(files) if f.key == key), None)
    except UserError:
        pass
    return Target(key, run, hook, index, count)


class _OneObjectCache:
    """The store, with `get_bytes` results kept: a `.saved.pt` file has no random access,
    so header, scan and ids would each download it again."""

    def __init__(self, store):
        self._store = store
        self._bytes: dict[str, bytes] = {}

    def get_bytes(self, key: str) -> bytes:
        if key not in self._bytes:
            self._bytes[key] = self._store.get_bytes(key)
        return self._bytes[key]

    def __getattr__(self, name):
        return getattr(self._store, name)


def _named(exc: UserError, ctx: ShellContext, key: str) -> UserError:
    """The megabatch reader names files by key; show the URI the user sees."""
    msg = str(exc)
    if msg.startswith(key + ":"):
        msg = ctx.display(key) + msg[len(key) :]
    elif ctx.display(key) not in msg:
        msg = f"{ctx.display(key)}: {msg}"
    return type(exc)(msg) if isinstance(exc, FormatError) else UserError(msg)


def _read_cfg(ctx: ShellContext, run: str | None, key: str) -> dict | None:
    """The run's cfg.json (the run of the hook directory, else the directory above the file's), best effort."""
    candidates = [run] if run else []
    d = posixpath.dirname(posixpath.dirname(key))
    if d and d not in candidates:
        candidates.append(d)
    for r in candidates:
        try:
            cfg = Run(ctx.store, r).read_cfg()
        except UserError:
            continue
        if cfg is not None:
            return cfg
    return None


def _tokenizer(ctx: ShellContext, run: str | None, key: str, header_meta: dict) -> dec.TokenizerHandle:
    from rich.progress import SpinnerColumn, TextColumn

    name, opts = dec.tokenizer_spec(_read_cfg(ctx, run, key), header_meta)
    if not name:
        return dec.load_tokenizer(None)
    with ctx.progress(SpinnerColumn(), TextColumn("{task.description}"), description=f"loading tokenizer {name}"):
        return dec.load_tokenizer(name, opts.get("cache_dir"), opts.get("gguf_file"))


def _ids_and_mask(store, key: str) -> tuple[list[list[int]], list[list[bool]]]:
    from vaultsh.megabatch import read_megabatch

    mb = read_megabatch(store, key, names=["input_ids", "mask"])
    assert mb.input_ids is not None and mb.mask is not None  # asked for (the mask is all-true without one)
    return mb.input_ids.tolist(), mb.mask.tolist()


def _sources(ctx: ShellContext, store, t: Target, header) -> list[dict] | None:
    """Each sequence's provenance (source name from the hook's metadata.json), or None for files without it."""
    from vaultsh.megabatch import read_source
    from vaultsh.provenance import as_dict, source_names

    if not header.has_source:
        return None
    try:
        src, _segments = read_source(store, t.key, header)
    except UserError as exc:
        raise _named(exc, ctx, t.key) from None
    names = None
    if t.run and t.hook:
        try:
            names = source_names(Run(ctx.store, t.run).read_metadata(t.hook))
        except UserError:
            names = None
    assert src is not None  # the header has it (and pt files never do)
    return [as_dict(row, names) for row in src.tolist()]


def sequence_view(
    uri: str,
    batch: int,
    n: int,
    ids: list[int],
    mask: list[bool],
    handle: dec.TokenizerHandle,
    tokens: bool,
    source: dict | None = None,
) -> SequenceView:
    view = SequenceView(uri, batch, ids, mask, source, n_sequences=n, note=handle.note)
    if tokens:
        view.tokens = dec.token_pieces(handle, ids, mask)
    else:
        view.segments = dec.segments(handle, ids, mask)
    return view


VIEWER_HELP = (
    "enter a batch number {last}, 't N' for its tokens, 't' to toggle token view, 'h' to toggle heat "
    "(colour by value), 'h N' for batch N's heat, 'n' heat by token norm, 'd D' heat by dimension D, "
    "'x FILE' by a direction, 'x CKPT F' by SAE latent F, or 'q'"
)


class BatchViewer(Result):
    """Asks for a batch number and shows its full text until 'q' (interactive shell only).

    With the megabatch's store, key and header it also shows a sequence's heat (`view --heat`'s picture,
    `vaultsh.explore.heat`): one ranged read of that sequence's states per sequence shown.
    """

    def __init__(
        self,
        uri: str,
        ids: list[list[int]],
        mask: list[list[bool]],
        handle: dec.TokenizerHandle,
        sources: list[dict] | None = None,
        *,
        store=None,
        key: str | None = None,
        header=None,
    ):
        self.uri, self.ids, self.mask, self.handle, self.sources = uri, ids, mask, handle, sources
        self.store, self.key, self.header = store, key, header
        self._pieces: Pieces | None = None

    def to_json(self):
        return None

    def _say(self, ctx: ShellContext, text: str, style: str | None = None) -> None:
        ctx.out.print(text, style=style, markup=False, highlight=False, soft_wrap=True)

    def _heat(self, ctx: ShellContext, b: int, value: ValueFn | None) -> None:
        """Batch `b` coloured by its token norms (`value` None) or by `value` (a dimension, direction, SAE latent)."""
        from vaultsh.explore.heat import heat
        from vaultsh.explore.text import Pieces
        from vaultsh.explore.values import value_fn
        from vaultsh.shell.render import render

        if self.store is None or self.key is None:
            self._say(ctx, "heat needs the megabatch's states (not available here)", "yellow")
            return
        if self._pieces is None:
            self._pieces = Pieces(self.handle)
        vf = value_fn(norm=True) if value is None else value
        try:
            r = heat(self.store, self.key, b, vf, header=self.header, pieces=self._pieces)
        except UserError as exc:
            ctx.error(str(exc))
            return
        r.file = self.uri
        render(r, ctx.out)

    def interact(self, ctx: ShellContext) -> None:
        from vaultsh.explore.values import value_fn, value_spec
        from vaultsh.shell.render import render

        n = len(self.ids)
        if n == 0:
            return
        tokens_mode = False
        heat_mode = False
        heat_value: ValueFn | None = None  # None: by token norm
        current: int | None = None  # the sequence shown last
        while True:
            answer = ctx.ask(f"Enter batch number (0-{n - 1}) to view full text, or 'q' to quit: ")
            if answer is None:
                return
            m_x = re.fullmatch(r"[xX]\s+(\S+(?:\s+\d+)?)", answer.strip())  # a path keeps its case
            answer = answer.strip().lower()
            if answer in ("q", "quit", "exit"):
                return
            if answer == "t":
                tokens_mode = not tokens_mode
                self._say(ctx, f"token view {'on: token ids and boundaries' if tokens_mode else 'off: plain text'}")
                continue
            m_value = re.fullmatch(r"(h|n|d\s+(\d+))", answer)
            if m_value or m_x:
                if answer == "h":
                    heat_mode = not heat_mode
                elif m_x:
                    try:
                        heat_value = value_fn(**value_spec(m_x.group(1)))
                    except UserError as exc:
                        ctx.error(str(exc))
                        continue
                    heat_mode = True
                else:
                    assert m_value is not None
                    heat_mode, heat_value = True, value_fn(dim=int(m_value.group(2))) if m_value.group(2) else None
                what = "token norm" if heat_value is None else heat_value.name.replace("dim ", "dimension ", 1)
                self._say(ctx, f"heat view {'on: colour by ' + what if heat_mode else 'off: plain text'}")
                if current is None:
                    continue
                b, as_tokens, as_heat = current, tokens_mode, heat_mode
            else:
                m = re.fullmatch(r"([th]\s+)?(-?\d+)", answer)
                if not m:
                    self._say(ctx, VIEWER_HELP.format(last=f"0-{n - 1}"))
                    continue
                b = int(m.group(2))
                if not 0 <= b < n:
                    self._say(ctx, f"batch {b} out of range (0-{n - 1})")
                    continue
                cmd = (m.group(1) or "").strip()
                as_tokens, as_heat = tokens_mode or cmd == "t", (heat_mode and cmd != "t") or cmd == "h"
            current = b
            if as_heat:
                self._heat(ctx, b, heat_value)
                continue
            source = self.sources[b] if self.sources else None
            render(sequence_view(self.uri, b, n, self.ids[b], self.mask[b], self.handle, as_tokens, source), ctx.out)


@command(
    "inspect",
    help="inspect a megabatch: header, NaN/Inf/range check, first sequences as text, then a batch viewer",
    args=[Arg("target", "file")],
    flags={"--no-scan": "skip the states check (it reads every byte of the states)"},
    details="TARGET is an index in the current hook directory's committed megabatches (`inspect 0`, as `ls -l` "
    "numbers them; negative counts from the end) or a file path. Works on safetensors megabatches and on "
    "Activault .saved.pt files. The viewer takes a batch number, 't N' for token ids and boundaries, "
    "'t' to toggle that view, 'h' to toggle heat (each token on its colour, as `view --heat`; 'h N' for one "
    "batch), 'n' heat by token norm (the default), 'd D' heat by dimension D, 'x FILE' by a direction (.npy or "
    ".safetensors), 'x CKPT F' by SAE latent F, 'q' to leave.",
)
def inspect(ctx: ShellContext, a):
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TransferSpeedColumn

    from vaultsh.megabatch import read_header, scan_states

    t = megabatch_target(ctx, a.target)
    uri = ctx.display(t.key)
    store = _OneObjectCache(ctx.store)
    try:
        header = read_header(store, t.key)
    except UserError as exc:
        raise _named(exc, ctx, t.key) from None
    cfg_model = None
    if not header.model:
        cfg = _read_cfg(ctx, t.run, t.key) or {}
        cfg_model = dec.tokenizer_spec(cfg, None)[0] if cfg else None
    yield InspectHeader(
        uri, t.key, header, t.index, t.count, hook=header.hook or t.hook, model=header.model or cfg_model
    )
    if not a.no_scan:
        with ctx.progress(
            TextColumn("checking states"), BarColumn(), DownloadColumn(), TransferSpeedColumn()
        ) as update:
            try:
                scan = scan_states(
                    store, t.key, header, progress=lambda done, total: update(completed=done, total=total)
                )
            except UserError as exc:
                raise _named(exc, ctx, t.key) from None
        yield InspectScan(scan)
    try:
        ids, mask = _ids_and_mask(store, t.key)
    except UserError as exc:
        raise _named(exc, ctx, t.key) from None
    handle = _tokenizer(ctx, t.run, t.key, header.metadata)
    sources = _sources(ctx, store, t, header)
    previews = []
    for b in range(min(PREVIEW_SEQUENCES, len(ids))):
        real = [i for i, m in zip(ids[b], mask[b]) if m]
        text = dec.decode(handle, real)
        previews.append(
            Preview(
                b,
                text[:PREVIEW_CHARS],
                len(text) > PREVIEW_CHARS,
                len(real),
                len(ids[b]),
                source=sources[b] if sources else None,
            )
        )
    yield InspectPreview(previews, len(ids), handle.source, handle.note, PREVIEW_CHARS)
    yield BatchViewer(uri, ids, mask, handle, sources, store=store, key=t.key, header=header)


def _batch_arg(batch: str, n: int) -> int:
    try:
        b = int(batch)
    except ValueError:
        raise UserError(f"batch {batch!r}: expected a number (0-{n - 1})") from None
    j = b + n if b < 0 else b
    if not 0 <= j < n:
        raise UserError(f"batch {b} out of range: the megabatch holds {n} sequences (0-{n - 1})")
    return j


@command(
    "view",
    help="full text of one sequence of a megabatch, masked tokens marked «like this» (the batch viewer, as a command)",
    args=[Arg("target", "file"), Arg("batch")],
    flags={
        "--tokens": "show every token as [id]piece",
        "--heat": "colour each token by a value: --norm, --dim D, --direction FILE or --sae CKPT --feature F",
        **value_flags("heat: ", norm=True),
        "--png FILE": "heat: also write the picture as a PNG",
    },
)
def view(ctx: ShellContext, a):
    t = megabatch_target(ctx, a.target)
    if a.heat or a.png:
        from vaultsh.shell.explore import heat_view

        return heat_view(ctx, t.key, a.batch, a)
    store = _OneObjectCache(ctx.store)
    try:
        ids, mask = _ids_and_mask(store, t.key)
    except UserError as exc:
        raise _named(exc, ctx, t.key) from None
    b = _batch_arg(a.batch, len(ids))
    from vaultsh.megabatch import read_header

    header = read_header(store, t.key)
    handle = _tokenizer(ctx, t.run, t.key, header.metadata)
    sources = _sources(ctx, store, t, header)
    return sequence_view(
        ctx.display(t.key), b, len(ids), ids[b], mask[b], handle, a.tokens, sources[b] if sources else None
    )


@command(
    "tokens",
    help="the raw token ids (and mask) of one sequence of a megabatch",
    args=[Arg("target", "file"), Arg("batch")],
)
def tokens(ctx: ShellContext, a) -> TokensResult:
    from vaultsh.megabatch import read_header

    t = megabatch_target(ctx, a.target)
    store = _OneObjectCache(ctx.store)
    try:
        ids, mask = _ids_and_mask(store, t.key)
        header = read_header(store, t.key)
    except UserError as exc:
        raise _named(exc, ctx, t.key) from None
    b = _batch_arg(a.batch, len(ids))
    sources = _sources(ctx, store, t, header)
    return TokensResult(ctx.display(t.key), b, ids[b], mask[b], sources[b] if sources else None)


# ---------------------------------------------------------------------------
# statistics and JSON files
# ---------------------------------------------------------------------------


@command(
    "stats",
    help="a hook's statistics.json: token count, mean/std/norm ranges, histogram of per-feature std",
    args=[Arg("hook", "dir", optional=True)],
)
def stats(ctx: ShellContext, a) -> StatsResult:
    import numpy as np

    key = _dir_key(ctx, a.hook)
    hk = ctx.hook_of(key)
    if hk is None:
        if ctx.dir_kind(key) == "run":
            hooks = Run(ctx.store, key).hooks()
            raise UserError(f"stats needs a hook: stats HOOK (hooks here: {', '.join(hooks[:8]) or 'none'})")
        raise UserError(f"{ctx.display(key)}: not a hook directory (it holds no metadata.json or megabatches)")
    run, hook = hk
    st = Run(ctx.store, run).read_statistics(hook)
    if st is None:
        raise NotFoundError(f"no statistics.json in {ctx.display(key)}")
    std, mean = st.std, st.mean
    counts, edges = np.histogram(std, bins=10)
    return StatsResult(
        uri=ctx.display(key + "/statistics.json"),
        hook=hook,
        count=st.count,
        d=st.d,
        mean_range=(float(mean.min()), float(mean.max())),
        std_range=(float(std.min()), float(std.max())),
        mean_abs_mean=float(np.abs(mean).mean()),
        mean_std=float(std.mean()),
        mean_norm=float(st.mean_norm),
        hist_edges=[float(e) for e in edges],
        hist_counts=[int(c) for c in counts],
    )


def _read_small(ctx: ShellContext, key: str) -> bytes:
    info = ctx.store.head(key)
    if info.size > CAT_LIMIT:
        raise UserError(
            f"{ctx.display(key)}: {binary_size(info.size)} is too large to print (limit {binary_size(CAT_LIMIT)}); use get"
        )
    return ctx.store.get_range(key, 0, CAT_LIMIT + 1)[: CAT_LIMIT + 1]


def _json_doc(ctx: ShellContext, key: str, data: bytes) -> JsonDoc:
    try:
        return JsonDoc(ctx.display(key), json.loads(data.decode("utf-8")))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{ctx.display(key)}: not valid JSON ({str(exc).splitlines()[0][:120]})") from None


@command(
    "meta",
    help="pretty-print the metadata here: a hook's metadata.json, a run's cfg.json",
    args=[Arg("path", "path", optional=True)],
)
def meta(ctx: ShellContext, a) -> JsonDoc:
    key = ctx.resolve(a.path)
    if ctx.is_file(key):
        return _json_doc(ctx, key, _read_small(ctx, key))
    _need_dir(ctx, key, a.path)
    kind = ctx.dir_kind(key)
    name = {"hook": METADATA, "run": CFG}.get(kind)
    if name is None:
        raise UserError(
            f"{ctx.display(key)}: no metadata here (meta works in a run directory, cfg.json, "
            "or a hook directory, metadata.json)"
        )
    f = f"{key}/{name}"
    if not ctx.is_file(f):
        raise NotFoundError(f"no {name} in {ctx.display(key)}")
    return _json_doc(ctx, f, _read_small(ctx, f))


@command(
    "cat",
    help=f"print a small file: JSON pretty-printed, text as is (up to {CAT_LIMIT >> 20} MiB)",
    args=[Arg("file", "file")],
)
def cat(ctx: ShellContext, a) -> Result:
    key = ctx.resolve(a.file)
    if not ctx.is_file(key):
        if ctx.is_dir(key):
            raise UserError(f"{a.file}: a directory (ls lists it)")
        raise NotFoundError(f"{a.file}: no such file: {ctx.display(key)}")
    data = _read_small(ctx, key)
    if key.endswith(".json") or data.lstrip()[:1] in (b"{", b"["):
        return _json_doc(ctx, key, data)
    if megabatch_format(key) or b"\x00" in data[:8192]:
        raise UserError(f"{ctx.display(key)}: a binary file (use inspect for a megabatch, get to download)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{ctx.display(key)}: not UTF-8 text (use get to download it)") from None
    return TextDoc(ctx.display(key), text, len(data))


# ---------------------------------------------------------------------------
# transfers and deletion
# ---------------------------------------------------------------------------


@command(
    "get",
    help="download a file (or with -r a directory) into a local directory, with a progress bar",
    args=[Arg("source", "file"), Arg("local", optional=True)],
    flags={"-r": "download every object under a directory", "-f": "overwrite existing local files"},
    details="LOCAL defaults to the current local directory. An existing directory (or a path ending in '/') "
    "receives the file under its own name; another path names the file. Nothing is ever written outside "
    "that directory: keys with '..', backslashes or control characters are refused.",
)
def get(ctx: ShellContext, a) -> GetResult:
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TransferSpeedColumn

    from vaultsh.shell.transfer import download, inside, local_path

    key = ctx.resolve(a.source)
    local = Path(a.local).expanduser() if a.local else Path(".")
    into_dir = a.local is None or a.local.endswith(("/", "\\")) or local.is_dir()
    plan: list[tuple[str, int, Path]] = []
    if a.r:
        _need_dir(ctx, key, a.source)
        if not into_dir and local.exists():
            raise UserError(f"{local}: not a directory")
        target = local
        base = key + "/" if key else ""
        for info in ctx.store.iter_objects(base):
            plan.append((info.key, info.size, local_path(target, info.key[len(base) :])))
        if not plan:
            raise NotFoundError(f"nothing stored under {ctx.display(key)}")
    else:
        if not ctx.is_file(key):
            if ctx.is_dir(key):
                raise UserError(f"{a.source}: a directory; use get -r to download everything under it")
            raise NotFoundError(f"{a.source}: no such file: {ctx.display(key)}")
        size = ctx.store.head(key).size
        if into_dir:
            target = local
            dest = local_path(target, key.rsplit("/", 1)[-1])
        else:
            target, dest = local.parent, local
            inside(target, dest)
        plan.append((key, size, dest))
    for _, _, dest in plan:
        if dest.exists() and not a.f:
            raise UserError(f"{dest}: already exists (get -f overwrites)")
    total = sum(s for _, s, _ in plan)
    done: list[tuple[str, str, int]] = []
    with ctx.progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        total=total,
        description=f"downloading {len(plan)} file{'s' if len(plan) != 1 else ''}",
    ) as update:
        for k, size, dest in plan:
            dest.parent.mkdir(parents=True, exist_ok=True)
            inside(target, dest)
            download(ctx.store, k, size, dest, lambda n: update(advance=n), ctx.display(k))
            done.append((ctx.display(k), str(dest), size))
    return GetResult(done)


@command(
    "rm",
    help="delete a file after a confirmation; a directory only with -r and a second confirmation",
    args=[Arg("target", "path")],
    flags={"-r": "delete every object under a directory (asks twice)"},
)
def rm(ctx: ShellContext, a) -> RmResult:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    key = ctx.resolve(a.target)
    if not key:
        raise UserError("refusing to delete the whole store")
    uri = ctx.display(key)
    is_dir = ctx.is_dir(key)
    if ctx.is_file(key) and not (a.r and is_dir):
        size = ctx.store.head(key).size
        if not ctx.confirm(f"delete {uri} ({binary_size(size)})? [y/N] "):
            return RmResult(uri, 0, 0, cancelled=True)
        ctx.store.delete(key)
        ctx.invalidate()
        return RmResult(uri, 1, size)
    if not is_dir:
        raise NotFoundError(f"{a.target}: no such file or directory: {uri}")
    if not a.r:
        raise UserError(
            f"{a.target}: a directory (prefix) holding objects; `rm -r {a.target}` deletes it after two confirmations"
        )
    objects = [(o.key, o.size) for o in ctx.store.iter_objects(key + "/")]
    total = sum(s for _, s in objects)
    if not ctx.confirm(f"delete {len(objects):,} objects ({binary_size(total)}) under {uri}/? [y/N] "):
        return RmResult(uri + "/", 0, 0, cancelled=True)
    name = key.rsplit("/", 1)[-1]
    answer = ctx.ask(f"this cannot be undone: type the directory name '{name}' to delete it: ")
    if (answer or "").strip() != name:
        return RmResult(uri + "/", 0, 0, cancelled=True)
    with ctx.progress(TextColumn("deleting"), BarColumn(), MofNCompleteColumn(), total=len(objects)) as update:
        with ThreadPoolExecutor(max_workers=16) as ex:
            for _ in ex.map(lambda k: ctx.store.delete(k), [k for k, _ in objects]):
                update(advance=1)
    ctx.invalidate()
    if ctx.cwd == key or ctx.cwd.startswith(key + "/"):
        ctx.cwd = posixpath.dirname(key)
    return RmResult(uri + "/", len(objects), total)


@command(
    "verify",
    help="check every committed megabatch here: stored, size and sha256 as recorded, header and shapes as "
    "metadata.json says, no two records holding the same batches",
    args=[Arg("path", "dir", optional=True)],
    flags={"--nan": "also scan every file's states for NaN/Inf"},
    details="Works in a run, in one hook directory of a run, or above runs (each run below is checked). "
    "`vaultsh verify RUN_URI` runs the same checks outside the shell.",
)
def verify(ctx: ShellContext, a):
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TransferSpeedColumn

    from vaultsh.verify import verify as run_verify

    key = _dir_key(ctx, a.path)
    with ctx.progress(TextColumn("verifying"), BarColumn(), DownloadColumn(), TransferSpeedColumn()) as update:
        report = run_verify(
            ctx.store, key, nan=a.nan, uri=ctx.display, progress=lambda done, total: update(completed=done, total=total)
        )
    ctx.commits.clear()  # verify read the records afresh; later commands should too
    return report


# ---------------------------------------------------------------------------
# the shell itself
# ---------------------------------------------------------------------------


@command(
    "help",
    aliases=("?",),
    help="list commands, or show one command's syntax and options",
    args=[Arg("command", "command", optional=True)],
)
def help_(ctx: ShellContext, a) -> HelpResult:
    if a.command:
        cmd = REGISTRY.get(a.command)
        if cmd is None:
            near = REGISTRY.suggest(a.command)
            hint = f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else ""
            raise UserError(f"help: unknown command {a.command!r}{hint}")
        return HelpResult([], cmd)
    return HelpResult(REGISTRY.commands())


@command("clear", help="clear the screen")
def clear(ctx: ShellContext, a) -> None:
    if ctx.out.is_terminal:
        ctx.out.clear()
    return None


@command("exit", aliases=("quit",), help="leave the shell (Ctrl-D does too)")
def exit_(ctx: ShellContext, a):
    raise ExitShell()


from vaultsh.shell import explore as _explore  # noqa: E402,F401 - registers grep, top, sae-eval, norms
