"""`grep`: find text in a run's decoded tokens, reading only `input_ids` and `mask`.

Each sequence is split into runs of real (unmasked) tokens; each run's text is
searched, so a match may span token boundaries but never a masked token.
Character offsets map back to token positions through the pieces' offsets.
A file with matches also gets its small provenance tensors read (`source`,
`source_segments`: where each match came from; counted in `bytes_read`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from vaultsh.errors import UserError
from vaultsh.explore.context import ByteCounter, read_sources, read_tokens
from vaultsh.explore.scope import hooks_for
from vaultsh.explore.source import token_source
from vaultsh.explore.text import Context, Pieces, context, load_pieces, token_span
from vaultsh.provenance import source_names
from vaultsh.run import Run

Progress = Callable[[int, int], None]  # (files done, files in all)


@dataclass
class GrepMatch:
    run: str
    hook: str
    file: str
    sequence: int
    start: int  # first token of the match
    end: int  # one past its last token
    text: str  # the matched characters
    context: Context
    source: dict | None = None  # provenance of the match's first token (None: the file records none)

    def to_json(self) -> dict:
        return {
            "run": self.run,
            "hook": self.hook,
            "file": self.file,
            "sequence": self.sequence,
            "positions": [self.start, self.end],
            "text": self.text,
            "context": self.context.to_json(),
            "source": self.source,
        }


@dataclass
class GrepResult:
    pattern: str
    regex: bool
    matches: list[GrepMatch] = field(default_factory=list)
    files: int = 0
    sequences: int = 0
    bytes_read: int = 0
    ids_mask_bytes: int = 0
    truncated: bool = False  # stopped at -n matches
    notes: list[str] = field(default_factory=list)

    @property
    def read_ratio(self) -> float:
        return self.bytes_read / self.ids_mask_bytes if self.ids_mask_bytes else 0.0

    def to_json(self) -> dict:
        return {
            "pattern": self.pattern,
            "regex": self.regex,
            "matches": [m.to_json() for m in self.matches],
            "files": self.files,
            "sequences": self.sequences,
            "bytes_read": self.bytes_read,
            "ids_mask_bytes": self.ids_mask_bytes,
            "read_ratio": round(self.read_ratio, 4),
            "truncated": self.truncated,
            "notes": self.notes,
        }


def compile_pattern(pattern: str, regex: bool, ignore_case: bool = False) -> re.Pattern:
    """The pattern as a compiled regex; a bad regex is a UserError naming it."""
    if not pattern:
        raise UserError("grep: empty pattern")
    flags = re.IGNORECASE if ignore_case else 0
    try:
        return re.compile(pattern if regex else re.escape(pattern), flags)
    except re.error as exc:
        raise UserError(f"grep: bad regular expression {pattern!r}: {exc}") from None


def _real_runs(mask) -> list[tuple[int, int]]:
    out, start = [], None
    for i, m in enumerate(mask):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    if start is not None:
        out.append((start, len(mask)))
    return out


def search_sequence(rx: re.Pattern, pieces: Pieces, ids, mask) -> list[tuple[int, int, str]]:
    """(first token, end token, matched text) of every non-empty match in one sequence's real tokens."""
    out = []
    for a, b in _real_runs(mask):
        text, starts = pieces.text(ids[a:b])
        for m in rx.finditer(text):
            if m.end() == m.start():
                continue
            s, e = token_span(starts, len(text), m.start(), m.end())
            out.append((a + s, a + e, m.group(0)))
    return out


def grep(
    store,
    key: str,
    pattern: str,
    *,
    regex: bool = False,
    hook: str | None = None,
    limit: int = 50,
    context_tokens: int = 8,
    ignore_case: bool = False,
    progress: Progress | None = None,
) -> GrepResult:
    """Every match of `pattern` in the decoded tokens of the runs at `key` (at most `limit`)."""
    if limit < 1:
        raise UserError(f"grep: -n {limit}: use a whole number >= 1")
    if context_tokens < 0:
        raise UserError(f"grep: --context {context_tokens}: use a whole number >= 0")
    rx = compile_pattern(pattern, regex, ignore_case)
    refs = hooks_for(store, key, hook, one_per_run=hook is None)
    plan = [(ref, Run(store, ref.run).committed_files(ref.hook)) for ref in refs]
    total = sum(len(files) for _, files in plan)
    io = ByteCounter(store)
    result = GrepResult(pattern, regex)
    done = 0
    for ref, files in plan:
        pieces: Pieces | None = None
        names = source_names(Run(store, ref.run).read_metadata(ref.hook))
        for f in files:
            toks = read_tokens(io, f.key, f.size or None)
            result.files += 1
            result.ids_mask_bytes += toks.ids_mask_bytes
            if pieces is None:
                pieces = load_pieces(store, ref.run, toks.header.metadata)
                if not pieces.ok and pieces.handle.note:
                    result.notes.append(f"{ref.run}: {pieces.handle.note}; searching token ids as text")
            first = len(result.matches)
            for n in range(toks.input_ids.shape[0]):
                ids, mask = toks.input_ids[n].tolist(), toks.mask[n].tolist()
                result.sequences += 1
                for s, e, text in search_sequence(rx, pieces, ids, mask):
                    ctx = context(pieces, ids, mask, s, e, context_tokens)
                    result.matches.append(GrepMatch(ref.run, ref.hook, f.key, n, s, e, text, ctx))
                    if len(result.matches) >= limit:
                        result.truncated = True
                        break
                if result.truncated:
                    break
            if len(result.matches) > first and toks.header.has_source:
                src, seg = read_sources(io, f.key, toks.header)
                for m in result.matches[first:]:
                    m.source = token_source(src, seg, m.sequence, m.start, names)
            done += 1
            if progress:
                progress(done, total)
            if result.truncated:
                break
        if result.truncated:
            break
    result.bytes_read = io.bytes
    return result
