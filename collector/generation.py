"""Generation mode, out-of-memory halving, and per-sequence labels as tensors.

Generation (``inference.max_new_tokens > 0``): each prompt row of a batch
(right-padded, at most ``seq_length - max_new_tokens`` tokens) is left-padded
for ``model.generate``; the continuation is cut after its first EOS; the
stored row is ``prompt + generated`` right-padded to ``seq_length``, and one
forward pass over these rows gives the activations. ``labels.generated``
([N, T] bool) is true on generated tokens, ``labels.prompt_length`` ([N])
counts the prompt's tokens. Greedy decoding by default (deterministic);
``do_sample`` draws with a generator seeded from the run's seed and the
batch index.

Out of memory (``inference.auto_find_batch_size``): :class:`ChunkRunner`
runs a batch in chunks; on CUDA out-of-memory it halves the chunk size,
retries the chunk and keeps the smaller size for the rest of the run. Only
the forward/generate batch shrinks: global batches, megabatch layout and
worker sharding do not change.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from collector.data import Batch


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is an accelerator out-of-memory error."""
    import torch

    oom_types = tuple(
        t
        for t in (
            getattr(torch, "OutOfMemoryError", None),
            getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None),
        )
        if t
    )
    if oom_types and isinstance(exc, oom_types):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ChunkRunner:
    """Runs ``fn(start, end)`` over ``range(n)`` in chunks of ``chunk`` rows, halving on OOM when ``auto``."""

    def __init__(self, chunk: int, auto: bool, on_halve: Callable[[int, int], None] | None = None):
        self.chunk = max(1, int(chunk))
        self.auto = auto
        self.on_halve = on_halve
        self.halvings = 0

    def map(self, n: int, fn: Callable[[int, int], Any]) -> list:
        out = []
        i = 0
        while i < n:
            size = min(self.chunk, n - i)
            try:
                out.append(fn(i, i + size))
            except Exception as e:
                if not (self.auto and is_oom(e)) or size == 1:
                    raise
                del e  # drop the traceback's references to the failed chunk's tensors
                _free_memory()
                old, self.chunk = self.chunk, max(1, size // 2)
                self.halvings += 1
                if self.on_halve:
                    self.on_halve(old, self.chunk)
                continue
            i += size
        return out


def forward_chunks(capture, runner: ChunkRunner, input_ids, attention_mask, device) -> dict:
    """Activations of every hook for the whole batch, run chunk by chunk."""
    import torch

    def fwd(s: int, e: int) -> dict:
        return capture.run(input_ids=input_ids[s:e].to(device), attention_mask=attention_mask[s:e].to(device))

    parts = runner.map(int(input_ids.shape[0]), fwd)
    if len(parts) == 1:
        return parts[0]
    return {h: torch.cat([p[h] for p in parts]) for h in parts[0]}


def generate_batch(
    model,
    tokenizer,
    batch: Batch,
    *,
    max_new_tokens: int,
    seq_length: int,
    pad_id: int,
    eos_id: int,
    special_ids: frozenset[int],
    clean_added_tokens: bool,
    runner: ChunkRunner,
    device,
    seed: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> tuple[Batch, list[dict]]:
    """Generate continuations of the batch's prompts; returns the prompt+generated batch and text records."""
    import torch

    B = batch.input_ids.shape[0]
    lens = batch.attention_mask.sum(1).tolist()
    L = max(1, max(lens))
    left = torch.full((B, L), pad_id, dtype=torch.long)
    att = torch.zeros((B, L), dtype=torch.long)
    for i, n in enumerate(lens):
        left[i, L - n :] = batch.input_ids[i, :n]
        att[i, L - n :] = 1
    kw: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id, do_sample=do_sample
    )
    if do_sample:
        kw.update(temperature=temperature, top_p=top_p)
    else:  # silence "temperature is set but do_sample is False" from a model's generation_config
        kw.update(temperature=None, top_p=None, top_k=None)

    def gen(s: int, e: int):
        if do_sample:
            torch.manual_seed((seed * 1_000_003 + batch.index * 1009 + s) & 0x7FFFFFFF)
        with torch.no_grad():
            out = model.generate(input_ids=left[s:e].to(device), attention_mask=att[s:e].to(device), **kw)
        return out[:, L:].cpu()

    gens = [row for part in runner.map(B, gen) for row in part]
    ids = torch.full((B, seq_length), pad_id, dtype=torch.long)
    am = torch.zeros((B, seq_length), dtype=torch.long)
    mask = torch.zeros((B, seq_length), dtype=torch.bool)
    generated = torch.zeros((B, seq_length), dtype=torch.bool)
    records = []
    for i, (n, g) in enumerate(zip(lens, gens)):
        g = g.tolist()
        if eos_id in g:
            g = g[: g.index(eos_id) + 1]
        g = g[: seq_length - n]
        m = n + len(g)
        ids[i, :n] = batch.input_ids[i, :n]
        ids[i, n:m] = torch.tensor(g, dtype=torch.long)
        am[i, :m] = 1
        mask[i, :n] = batch.mask[i, :n]
        keep = [not (clean_added_tokens and t in special_ids) for t in g]
        mask[i, n:m] = torch.tensor(keep, dtype=torch.bool)
        generated[i, n:m] = True
        rec = {
            "batch": batch.index,
            "row": i,
            "doc_index": batch.doc_index[i] if i < len(batch.doc_index) else None,
            "prompt": tokenizer.decode(batch.input_ids[i, :n].tolist()),
            "generation": tokenizer.decode(g, skip_special_tokens=True),
            "prompt_tokens": n,
            "generated_tokens": len(g),
        }
        for k, vals in batch.labels.items():
            rec[k] = _jsonable(vals[i])
        records.append(rec)
    labels = dict(batch.labels)
    labels["generated"] = list(generated)
    labels["prompt_length"] = [int(n) for n in lens]
    out = Batch(
        index=batch.index,
        input_ids=ids,
        attention_mask=am,
        mask=mask,
        doc_index=list(batch.doc_index),
        labels=labels,
        documents=list(batch.documents),
        source=list(batch.source),
        segments=list(batch.segments),
    )
    return out, records


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    try:
        json.dumps(v)
        return v
    except TypeError:
        return str(v)


def generations_jsonl(records: Sequence[dict]) -> bytes:
    """Generation records as JSON lines (UTF-8)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


# ---------------------------------------------------------------- labels -> tensors


def label_tensors(
    values: dict[str, list], vocabularies: dict[str, list[str]] | None = None
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Per-row label values as ``labels.<name>`` tensors, plus the string vocabularies.

    Tensors (one per row) are stacked; booleans -> bool, integers -> int64,
    other numbers -> float64 (missing -> NaN); anything else is a string
    label stored as int64 codes into a vocabulary (missing -> -1): the given
    one for that name (e.g. the configured categories), else the sorted
    distinct values of this megabatch.
    """
    import torch

    tensors: dict[str, Any] = {}
    vocabs: dict[str, list[str]] = {}
    for name, vals in values.items():
        if vals and all(isinstance(v, torch.Tensor) for v in vals):
            tensors[name] = torch.stack(vals)
            continue
        present = [v for v in vals if v is not None]
        if present and all(isinstance(v, bool) for v in present) and len(present) == len(vals):
            tensors[name] = torch.tensor(vals, dtype=torch.bool)
        elif (
            present
            and all(isinstance(v, int) and not isinstance(v, bool) for v in present)
            and len(present) == len(vals)
        ):
            tensors[name] = torch.tensor(vals, dtype=torch.int64)
        elif present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
            tensors[name] = torch.tensor([float("nan") if v is None else float(v) for v in vals], dtype=torch.float64)
        else:
            given = list((vocabularies or {}).get(name) or [])
            extra = sorted({str(v) for v in present} - set(given))
            vocab = given + extra
            pos = {s: j for j, s in enumerate(vocab)}
            tensors[name] = torch.tensor([-1 if v is None else pos[str(v)] for v in vals], dtype=torch.int64)
            vocabs[name] = vocab
    return tensors, vocabs


def decode_label(codes, vocabulary: Sequence[str]) -> list[str | None]:
    """String labels back from their codes (-1 -> None)."""
    return [None if int(c) < 0 else vocabulary[int(c)] for c in codes]
