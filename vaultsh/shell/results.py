"""What command handlers return: plain data, each with `to_json()`.

`render.py` turns each into text for a person; `--json` prints `to_json()`.
A result whose `failed` is true (verify found problems) makes batch mode exit 1.
A result with an `interact(ctx)` method (the batch viewer) is given the
terminal after it is rendered, in the interactive shell only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from vaultsh.verify import Problem, VerifyReport  # noqa: F401 - verify's results, shared with `vaultsh verify`


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


class Result:
    failed = False

    def to_json(self) -> Any:
        raise NotImplementedError


@dataclass
class Message(Result):
    text: str
    data: dict | None = None
    style: str | None = None

    def to_json(self):
        return self.data if self.data is not None else {"message": self.text}


@dataclass
class Entry:
    name: str  # relative to the listed directory; directories end in '/'
    key: str
    is_dir: bool
    size: int | None = None
    mtime: datetime | None = None
    note: str = ""  # ls -l: "#3" (committed index), "uncommitted"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "key": self.key, "type": "dir" if self.is_dir else "file"}
        if not self.is_dir:
            out.update(size=self.size, mtime=_iso(self.mtime))
            if self.note:
                out["note"] = self.note
        return out


@dataclass
class LsResult(Result):
    uri: str
    entries: list[Entry]
    long: bool = False
    kind: str = "dir"  # "run", "hook", "dir", "file"
    summary: dict | None = None  # run: hooks, megabatches, tokens; hook: committed, uncommitted, tokens
    summary_error: str | None = None

    def to_json(self):
        return {
            "uri": self.uri,
            "kind": self.kind,
            "entries": [e.to_json() for e in self.entries],
            "summary": self.summary,
            **({"summary_error": self.summary_error} if self.summary_error else {}),
        }


@dataclass
class Group:
    label: str
    files: int = 0
    bytes: int = 0
    committed: int | None = None  # megabatch groups only
    committed_bytes: int | None = None

    def to_json(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {"files": self.files, "bytes": self.bytes}
        if self.committed is not None:
            out.update(
                committed=self.committed, uncommitted=self.files - self.committed, committed_bytes=self.committed_bytes
            )
        return out


@dataclass
class Tally(Result):
    """filecount / sizecheck: objects under a prefix grouped by kind."""

    command: str  # "filecount" or "sizecheck"
    uri: str
    objects: int = 0
    bytes: int = 0
    hooks: dict[str, Group] = field(default_factory=dict)  # hook dir (relative to the prefix) -> megabatch files
    metadata: Group = field(default_factory=lambda: Group("metadata"))
    internal: Group = field(default_factory=lambda: Group("internal"))
    other: Group = field(default_factory=lambda: Group("other"))

    @property
    def megabatches(self) -> Group:
        hooks = self.hooks.values()
        return Group(
            "megabatches",
            files=sum(h.files for h in hooks),
            bytes=sum(h.bytes for h in hooks),
            committed=sum(h.committed or 0 for h in hooks),
            committed_bytes=sum(h.committed_bytes or 0 for h in hooks),
        )

    def to_json(self):
        return {
            "uri": self.uri,
            "objects": self.objects,
            "bytes": self.bytes,
            "megabatches": self.megabatches.to_json(),
            "hooks": {k: g.to_json() for k, g in self.hooks.items()},
            "metadata": self.metadata.to_json(),
            "internal": self.internal.to_json(),
            "other": self.other.to_json(),
        }


@dataclass
class InspectHeader(Result):
    uri: str
    key: str
    header: Any  # MegabatchHeader
    index: int | None = None
    count: int | None = None  # committed megabatches in the hook directory
    hook: str | None = None
    model: str | None = None

    def to_json(self):
        return {
            "uri": self.uri,
            "index": self.index,
            "hook": self.hook,
            "model": self.model,
            "header": self.header.to_dict(),
        }


@dataclass
class InspectScan(Result):
    scan: dict

    @property
    def clean(self) -> bool:
        return self.scan["nan_count"] == 0 and self.scan["inf_count"] == 0

    def to_json(self):
        return {"scan": self.scan}


@dataclass
class Preview:
    batch: int
    text: str
    truncated: bool
    real_tokens: int
    tokens: int
    source: dict | None = None  # provenance (vaultsh.provenance.as_dict), None for files without it


@dataclass
class InspectPreview(Result):
    previews: list[Preview]
    n_sequences: int
    tokenizer: str | None
    note: str | None = None  # why token ids are shown instead of text
    limit: int = 250

    def to_json(self):
        return {
            "tokenizer": self.tokenizer,
            "tokenizer_note": self.note,
            "preview": [
                {
                    "batch": p.batch,
                    "text": p.text,
                    "truncated": p.truncated,
                    "real_tokens": p.real_tokens,
                    "tokens": p.tokens,
                    **({"source": p.source} if p.source is not None else {}),
                }
                for p in self.previews
            ],
        }


@dataclass
class _Sequence(Result):
    """One sequence of a megabatch: where it is, its token ids and mask, and its provenance when the file records one."""

    uri: str
    batch: int
    ids: list[int]
    mask: list[bool]
    source: dict | None = None  # provenance (vaultsh.provenance.as_dict)

    def to_json(self):
        out: dict = {"uri": self.uri, "batch": self.batch, "input_ids": self.ids, "mask": self.mask}
        if self.source is not None:
            out["source"] = self.source
        return out


@dataclass(kw_only=True)
class SequenceView(_Sequence):
    """One sequence's full text (masked runs marked), or its tokens with ids."""

    n_sequences: int
    segments: list[tuple[str, bool]] | None = None  # (text, real)
    tokens: list[tuple[int, str, bool]] | None = None  # (id, piece, real) in token mode
    note: str | None = None

    def to_json(self):
        out = super().to_json()
        if self.segments is not None:
            out["text"] = "".join(t for t, real in self.segments if real)
            out["segments"] = [{"text": t, "masked": not real} for t, real in self.segments]
        if self.tokens is not None:
            out["tokens"] = [{"id": i, "piece": p, "masked": not real} for i, p, real in self.tokens]
        if self.note:
            out["tokenizer_note"] = self.note
        return out


@dataclass
class TokensResult(_Sequence):
    """`tokens`: one sequence's raw token ids and mask."""


@dataclass
class StatsResult(Result):
    uri: str
    hook: str
    count: int
    d: int
    mean_range: tuple[float, float]
    std_range: tuple[float, float]
    mean_abs_mean: float
    mean_std: float
    mean_norm: float
    hist_edges: list[float]
    hist_counts: list[int]

    def to_json(self):
        return {
            "uri": self.uri,
            "hook": self.hook,
            "count": self.count,
            "d_model": self.d,
            "mean": {"min": self.mean_range[0], "max": self.mean_range[1], "mean_abs": self.mean_abs_mean},
            "std": {"min": self.std_range[0], "max": self.std_range[1], "mean": self.mean_std},
            "norm": self.mean_norm,
            "std_histogram": {"edges": self.hist_edges, "counts": self.hist_counts},
        }


@dataclass
class JsonDoc(Result):
    uri: str
    data: Any

    def to_json(self):
        return self.data


@dataclass
class TextDoc(Result):
    uri: str
    text: str
    size: int

    def to_json(self):
        return {"uri": self.uri, "size": self.size, "text": self.text}


@dataclass
class GetResult(Result):
    files: list[tuple[str, str, int]]  # (uri, local path, bytes)

    def to_json(self):
        return {
            "files": [{"uri": u, "path": p, "bytes": b} for u, p, b in self.files],
            "bytes": sum(b for _, _, b in self.files),
        }


@dataclass
class RmResult(Result):
    uri: str
    deleted: int
    bytes: int
    cancelled: bool = False

    def to_json(self):
        return {"uri": self.uri, "deleted": self.deleted, "bytes": self.bytes, "cancelled": self.cancelled}


@dataclass
class HelpResult(Result):
    commands: list  # registry.Command
    detail: Any = None  # one Command for `help CMD`

    def to_json(self):
        cmds = [self.detail] if self.detail is not None else self.commands
        return [
            {
                "name": c.name,
                "syntax": c.syntax,
                "aliases": list(c.aliases),
                "help": c.help,
                "flags": c.flags,
                "details": c.details,
            }
            for c in cmds
        ]
