"""`norms`: the distribution of token norms, massive-activation dimensions and outlier tokens.

One pass over the states (real tokens only). Exact quantiles keep every
token's norm (4 bytes a token; `files=N` samples). A dimension is "massive"
when its largest |x| is at least `massive_ratio` times the median over
dimensions of that per-dimension maximum; a token is an outlier when its norm
is at least `factor` times the median norm. The result is written to
`RUN/_vaultsh/outliers/HOOK.json` (`Run.outliers_key`, `OUTLIERS_VERSION`), which
readers use to drop outlier tokens; it stays out of the hook directory, which
Activault's own RCache loads file by file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from vaultsh.errors import UserError
from vaultsh.explore.scope import one_hook
from vaultsh.explore.stream import Progress, megabatches
from vaultsh.explore.text import context, load_pieces
from vaultsh.run import Run

OUTLIERS_VERSION = 1
QUANTILES = ("0.5", "0.9", "0.99", "0.999")
HIST_BINS = 24


@dataclass
class NormsResult:
    run: str
    hook: str
    tokens: int
    files: int
    median_norm: float
    mean_norm: float
    quantiles: dict
    hist_edges: list[float]
    hist_counts: list[int]
    by_position: list[float | None]  # mean norm per position (None: no real token there)
    massive_dims: list[dict]
    outliers: list[dict]
    outliers_total: int
    factor: float
    massive_ratio: float
    written: str | None = None  # the URI of the outliers document
    contexts: list[dict] = field(default_factory=list)  # decoded, for the first outliers

    def outliers_doc(self) -> dict:
        """The outliers document (`Run.outliers_key`)."""
        return {
            "version": OUTLIERS_VERSION,
            "hook": self.hook,
            "tokens": self.tokens,
            "median_norm": self.median_norm,
            "mean_norm": self.mean_norm,
            "quantiles": self.quantiles,
            "massive_dims": self.massive_dims,
            "outliers": self.outliers,
            "factor": self.factor,
            "massive_ratio": self.massive_ratio,
            "outliers_total": self.outliers_total,
            "files": self.files,
            "run": self.run,
        }

    def to_json(self) -> dict:
        out = self.outliers_doc()
        out.update(
            histogram={"edges": self.hist_edges, "counts": self.hist_counts},
            mean_norm_by_position=self.by_position,
            written=self.written,
            contexts=self.contexts,
        )
        return out


def norms(
    store,
    key: str,
    hook: str | None,
    *,
    factor: float = 5.0,
    massive_ratio: float = 10.0,
    max_outliers: int = 1000,
    files: int | None = None,
    write: bool = True,
    context_tokens: int = 6,
    show: int = 10,
    progress: Progress | None = None,
) -> NormsResult:
    """Scan the hook's token norms; write `Run.outliers_key(hook)` unless `write` is False."""
    import torch

    if factor <= 1:
        raise UserError(f"norms: --factor {factor}: use a number > 1 (outlier = norm >= factor x median)")
    if massive_ratio <= 1:
        raise UserError(f"norms: --massive-ratio {massive_ratio}: use a number > 1")
    ref = one_hook(store, key, hook)
    all_norms: list[np.ndarray] = []
    pos_sum: np.ndarray | None = None
    pos_cnt: np.ndarray | None = None
    max_abs: torch.Tensor | None = None
    cands: list[tuple[float, str, int, int, int, list, list, int]] = []  # per-file largest norms
    n_files = 0
    for fkey, mb in megabatches(store, ref, files, progress=progress):
        states, ids, mask = mb["states"], mb["input_ids"], mb["mask"]
        n, t, d = states.shape
        n_files += 1
        nrm = states.to(torch.float32).norm(dim=-1)  # [N, T]
        if pos_sum is None or pos_cnt is None or max_abs is None:  # the first file
            pos_sum, pos_cnt = np.zeros(t), np.zeros(t, dtype=np.int64)
            max_abs = torch.zeros(d)
        m = mask.numpy()
        nn = nrm.numpy()
        pos_sum[:t] += np.where(m, nn, 0.0).sum(0)
        pos_cnt[:t] += m.sum(0)
        if not m.any():
            continue
        all_norms.append(nn[m].astype(np.float32))
        absx = torch.where(mask.unsqueeze(-1), states.abs().to(torch.float32), torch.zeros(())).amax(dim=(0, 1))
        max_abs = torch.maximum(max_abs, absx)
        flat = np.where(m, nn, -np.inf).reshape(-1)
        kk = min(max_outliers, int(m.sum()))
        top = np.argpartition(-flat, kk - 1)[:kk]
        for i in top:
            s, p = divmod(int(i), t)
            lo, hi = max(0, p - context_tokens), min(t, p + context_tokens + 1)
            cands.append(
                (float(flat[i]), fkey, s, p, int(ids[s, p]), ids[s, lo:hi].tolist(), mask[s, lo:hi].tolist(), p - lo)
            )
        cands.sort(key=lambda c: -c[0])
        del cands[max_outliers:]
    if not all_norms:
        raise UserError(f"{store.child_uri(ref.key)}: no real (unmasked) tokens to measure")
    assert pos_sum is not None and pos_cnt is not None and max_abs is not None  # made with the first file
    v = np.concatenate(all_norms)
    median = float(np.median(v))
    qs = {q: float(np.quantile(v, float(q))) for q in QUANTILES}
    qs["max"] = float(v.max())
    lo, hi = max(float(v.min()), 1e-12), max(float(v.max()), 1e-12)
    edges = np.geomspace(lo, hi * (1 + 1e-9), HIST_BINS + 1) if hi > lo else np.array([lo, hi + 1e-9])
    counts, _ = np.histogram(v, bins=edges)
    ma = max_abs.numpy().astype(np.float64)
    med_ma = float(np.median(ma)) or 1e-12
    order = np.argsort(-ma)
    massive = [
        {"dim": int(j), "max_abs": float(ma[j]), "ratio_to_median": float(ma[j] / med_ma)}
        for j in order
        if ma[j] / med_ma >= massive_ratio
    ]
    limit = factor * median
    total_out = int((v >= limit).sum())
    chosen = [c for c in cands if c[0] >= limit]
    outliers = [{"file": c[1], "sequence": c[2], "position": c[3], "token_id": c[4], "norm": c[0]} for c in chosen]
    result = NormsResult(
        ref.run,
        ref.hook,
        int(v.size),
        n_files,
        median,
        float(v.mean()),
        qs,
        [float(e) for e in edges],
        [int(c) for c in counts],
        [float(s / c) if c else None for s, c in zip(pos_sum, pos_cnt)],
        massive,
        outliers,
        total_out,
        float(factor),
        float(massive_ratio),
    )
    if chosen:
        pieces = load_pieces(store, ref.run)
        for c in chosen[:show]:
            ctx = context(pieces, c[5], c[6], c[7], c[7] + 1, context_tokens)
            result.contexts.append(
                {"file": c[1], "sequence": c[2], "position": c[3], "norm": c[0], "context": ctx.to_json()}
            )
    if write:
        run = Run(store, ref.run)
        okey, legacy = run.outliers_key(ref.hook), run.legacy_outliers_key(ref.hook)
        store.put_bytes(okey, (json.dumps(result.outliers_doc(), indent=1) + "\n").encode("utf-8"))
        result.written = store.child_uri(okey)
        if store.exists(legacy):  # moved out of the hook directory, where Activault's RCache would load it
            store.delete(legacy)
    return result
