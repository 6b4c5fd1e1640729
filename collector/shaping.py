"""Input shaping: filter, categories and balance, sample, max_samples, sort by length.

Applied in this order to the (already shuffled, interleaved) document stream:

1. ``filter`` (on records, before they become documents): ``FIELD OP VALUE``
   with OP one of ``== != > >= < <=`` or ``FIELD in [a, b]`` /
   ``FIELD not in [a, b]``; VALUE is a YAML scalar (``3``, ``0.5``, ``true``,
   ``'a b'`` or a bare word). Numbers compare numerically even when the record
   holds them as strings (CSV).
2. ``categories`` (a list keeps only those; ``[]`` keeps all) and
   ``category_balance_strategy: equalize``: every category keeps its first
   ``k`` documents in stream order, ``k`` the smallest category's count.
3. ``sample``: an integer ``n`` keeps ``n`` documents chosen with a seeded
   generator (stream order kept); a fraction keeps each document with that
   probability (seeded, streaming).
4. ``max_samples``: the first ``n`` documents.
5. ``sort_by_length``: shortest first by token count (``reversed``: longest
   first, so an out-of-memory shows at the start); ties keep stream order.

Steps 2 (equalize), 3 (a count) and 5 read the stream to its end, so they
need a finite source (not a streamed hub dataset; step 5 is fine after
``max_samples``).
"""

from __future__ import annotations

import itertools
import operator
import re
from collections.abc import Callable, Iterator
from typing import Any

from vaultsh.errors import ConfigError, UserError

_FILTER_RX = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(==|!=|>=|<=|>|<|=|\bnot\s+in\b|\bin\b)\s*(.+?)\s*$", re.S)
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "=": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}
_LENGTH_CHUNK = 512


def _scalar(text: str) -> Any:
    import yaml

    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(v, (dict, list)) or (v is None and text.lower() not in ("null", "~")):
        return text
    return v


def parse_filter(expr: str) -> Callable[[Any, str], bool]:
    """Compile a filter expression into ``keep(record, where) -> bool``; ConfigError if malformed."""
    import yaml

    m = _FILTER_RX.match(expr or "")
    if not m:
        raise ConfigError(
            "is not a filter (write FIELD OP VALUE, OP one of == != > >= < <=, "
            'or FIELD in [a, b]; e.g. "category == violence" or "length >= 20")'
        )
    field, op, raw = m.group(1), re.sub(r"\s+", " ", m.group(2)), m.group(3)
    if op in ("in", "not in"):
        try:
            values = yaml.safe_load(raw)
        except yaml.YAMLError:
            values = None
        if not isinstance(values, list) or not values:
            raise ConfigError(f"is not a filter: '{op}' needs a non-empty list such as [a, b]")
        want = list(values)
        negate = op == "not in"

        def keep_in(rec: Any, where: str) -> bool:
            got = _lookup(rec, field, where)
            hit = any(_equal(got, w) for w in want)
            return hit != negate

        return keep_in
    value = _scalar(raw)
    fn = _OPS[op]
    ordered = op in (">", ">=", "<", "<=")
    if ordered and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"is not a filter: '{op}' needs a number on the right, got {raw!r}")

    def keep(rec: Any, where: str) -> bool:
        got = _lookup(rec, field, where)
        if ordered:
            num = _number(got)
            if num is None:
                raise UserError(
                    f"{where}: filter field {field!r} is {got!r}, not a number to compare with {op} {value}"
                )
            return fn(num, value)
        eq = _equal(got, value)
        return eq if op in ("==", "=") else not eq

    return keep


def _lookup(rec: Any, field: str, where: str) -> Any:
    if isinstance(rec, str) and field == "text":
        return rec
    if not isinstance(rec, dict):
        raise UserError(f"{where}: filter needs object records with field {field!r}, got {type(rec).__name__}")
    if field not in rec:
        raise UserError(f"{where}: filter field {field!r} is not in the record (fields: {', '.join(map(str, rec))})")
    return rec[field]


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _equal(got: Any, want: Any) -> bool:
    if isinstance(want, bool) or isinstance(got, bool):
        return str(got).lower() == str(want).lower()
    if isinstance(want, (int, float)):
        num = _number(got)
        return num is not None and num == float(want)
    return str(got) == str(want)


# ---------------------------------------------------------------- the pipeline


def _get(spec: Any, name: str, default: Any = None) -> Any:
    v = getattr(spec, name, default)
    return default if v is None else v


def shape(
    docs: Iterator, spec: Any, seed: int, length_fn: Callable[[list], list[int]] | None, finite: bool
) -> Iterator:
    """Apply steps 2-5 of the module docstring to a document stream (filter is applied on records)."""
    import numpy as np

    cats = [str(c) for c in _get(spec, "categories", [])]
    equalize = _get(spec, "category_balance_strategy", "use_all") == "equalize"
    sample = _get(spec, "sample")
    max_samples = _get(spec, "max_samples")
    sort = bool(_get(spec, "sort_by_length", False))
    needs_all = [
        n
        for n, on in (
            ("category_balance_strategy: equalize", equalize),
            ("sample: <count>", isinstance(sample, int)),
            ("sort_by_length", sort and max_samples is None),
        )
        if on
    ]
    if needs_all and not finite:
        raise ConfigError(
            f"data: {needs_all[0]} reads the whole data set, but a source is a streamed hub "
            "dataset (set streaming: false, or max_samples before sort_by_length)"
        )
    if cats:
        wanted = set(cats)
        docs = (d for d in docs if d.labels.get("category") in wanted)
    if equalize:
        docs = iter(equalize_categories(list(docs), cats))
    if sample is not None:
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x73616D70])
        if isinstance(sample, int):
            pool = list(docs)
            if sample > len(pool):
                raise UserError(f"data.sample: {sample} is more than the {len(pool)} documents available")
            pick = np.sort(rng.choice(len(pool), size=sample, replace=False))
            docs = iter([pool[int(i)] for i in pick])
        else:
            frac = float(sample)
            docs = (d for d in docs if rng.random() < frac)
    if max_samples is not None:
        docs = itertools.islice(docs, int(max_samples))
    if sort:
        if length_fn is None:
            raise ValueError("sort_by_length needs a length function (the tokenizer)")
        docs = iter(sort_by_length(list(docs), length_fn, bool(_get(spec, "reversed", False))))
    return docs


def equalize_categories(docs: list, categories: list[str]) -> list:
    """Keep the first k documents of each category (k = the smallest count), in stream order."""
    counts: dict[str, int] = {}
    for d in docs:
        c = d.labels.get("category")
        counts[c] = counts.get(c, 0) + 1
    names = categories or sorted(counts)
    missing = [c for c in names if counts.get(c, 0) == 0]
    if missing:
        raise UserError(
            f"data.categories: {missing[0]!r} has no documents to equalize "
            f"(categories present: {', '.join(sorted(map(str, counts))) or 'none'})"
        )
    k = min(counts[c] for c in names)
    taken: dict[str, int] = {c: 0 for c in names}
    out = []
    for d in docs:
        c = d.labels.get("category")
        if c in taken and taken[c] < k:
            taken[c] += 1
            out.append(d)
    return out


def sort_by_length(docs: list, length_fn: Callable[[list], list[int]], longest_first: bool) -> list:
    """Stable sort by token count (shortest first, or longest first)."""
    lengths: list[int] = []
    for i in range(0, len(docs), _LENGTH_CHUNK):
        lengths += length_fn(docs[i : i + _LENGTH_CHUNK])
    order = sorted(range(len(docs)), key=lambda i: (-lengths[i] if longest_first else lengths[i], i))
    return [docs[i] for i in order]
