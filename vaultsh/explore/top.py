"""`top`: the exact top-k tokens of a hook by a value (a dimension, a direction, an SAE feature).

One pass over the states through the reader; per megabatch the k best real
tokens are merged into the running top k, so the result equals a full sort.
Each token's quantile is exact: every token above it is in the top k.
The provenance of the k tokens (source, document, offset) comes from small
ranged reads of their files' `source` tensors after the scan.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from vaultsh.errors import UserError
from vaultsh.explore.scope import one_hook
from vaultsh.explore.stream import Progress, megabatches, token_values
from vaultsh.explore.text import Context, context, load_pieces
from vaultsh.explore.values import ValueFn


@dataclass
class TopToken:
    value: float
    file: str
    sequence: int
    position: int
    token_id: int
    quantile: float = 1.0
    context: Context | None = None
    source: dict | None = None  # provenance: source, document, the token's offset in it (None: none recorded)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class TopResult:
    run: str
    hook: str
    value: str
    k: int
    tokens: int = 0  # real tokens scanned
    files: int = 0
    top: list[TopToken] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def top(
    store,
    key: str,
    hook: str | None,
    vf: ValueFn,
    *,
    k: int = 20,
    context_tokens: int = 8,
    files: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> TopResult:
    """The k tokens with the largest value over the hook's committed files (or a sample of `files`)."""
    import torch

    if k < 1:
        raise UserError(f"top: -k {k}: use a whole number >= 1")
    if files is not None and files < 1:
        raise UserError(f"top: --files {files}: use a whole number >= 1")
    ref = one_hook(store, key, hook)
    result = TopResult(ref.run, ref.hook, vf.name, k)
    best: list[tuple[TopToken, tuple]] = []  # the running top k, each with its window: (ids, mask, its offset there)
    first_meta = None
    for fkey, mb in megabatches(store, ref, files, seed, progress):
        states, ids, mask = mb["states"], mb["input_ids"], mb["mask"]
        n, t, d = states.shape
        if result.files == 0:
            vf.check(d, ref.key)
        result.files += 1
        vals = token_values(vf, states)
        vals = vals.masked_fill_(~mask, float("-inf")).reshape(-1)
        real = int(torch.count_nonzero(mask))
        result.tokens += real
        if not real:
            continue
        tv, ti = vals.topk(min(k, real))
        floor = best[-1][0].value if len(best) >= k else float("-inf")  # best is sorted: its k-th value
        for v, i in zip(tv.tolist(), ti.tolist()):
            if v <= floor:
                break
            s, p = divmod(i, t)
            lo, hi = max(0, p - context_tokens), min(t, p + context_tokens + 1)
            window = (ids[s, lo:hi].tolist(), mask[s, lo:hi].tolist(), p - lo)
            best.append((TopToken(float(v), fkey, s, p, int(ids[s, p])), window))
        best.sort(key=lambda x: -x[0].value)  # stable: earlier files first among equal values
        del best[k:]
        if first_meta is None:
            first_meta = fkey
    if result.tokens == 0:
        raise UserError(f"{store.child_uri(ref.key)}: no real (unmasked) tokens to rank")
    from vaultsh.megabatch import read_header

    pieces = load_pieces(store, ref.run, read_header(store, first_meta).metadata if first_meta else None)
    result.top = [t for t, _ in best]
    _add_sources(store, ref, result.top)
    for t_, (wids, wmask, off) in best:
        above = sum(1 for o in result.top if o.value > t_.value)
        t_.quantile = (result.tokens - above) / result.tokens
        t_.context = context(pieces, wids, wmask, off, off + 1, context_tokens)
    return result


def _add_sources(store, ref, best: list[TopToken]) -> None:
    """Each token's provenance, from its file's `source` / `source_segments` (one small read each)."""
    from vaultsh.explore.context import ByteCounter, read_small_header, read_sources
    from vaultsh.explore.source import token_source
    from vaultsh.provenance import source_names
    from vaultsh.run import Run

    io = ByteCounter(store)
    names = source_names(Run(store, ref.run).read_metadata(ref.hook))
    for fkey in dict.fromkeys(t.file for t in best):
        header = read_small_header(io, fkey)
        if header is None or not header.has_source:
            continue
        src, seg = read_sources(io, fkey, header)
        for t in best:
            if t.file == fkey:
                t.source = token_source(src, seg, t.sequence, t.position, names)
