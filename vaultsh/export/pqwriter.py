"""A small Parquet writer for the export's columns, at close to memory speed.

pyarrow's general writer computes repetition/definition levels value by value;
for a `states` column of fixed-size lists that costs far more than the data
itself (about 100-150 MB/s). Here every column is a required scalar or a
(nested) fixed-size list of required numbers, so the levels of a page are
a pattern known in advance: definition levels are one RLE run, repetition
levels one short RLE pattern per row repeated. Values are written PLAIN,
straight from the numpy buffers.

Files are standard Parquet (format 2, data page v1) with the Arrow schema
stored under `ARROW:schema`, so pyarrow and `datasets` read the columns back
as fixed-size lists. Column types outside `SUPPORTED` use pyarrow's writer
(see parquet.py).
"""

from __future__ import annotations

import base64
import functools
import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

MAGIC = b"PAR1"
PAGE_VALUE_BYTES = 8 << 20

# parquet.thrift enums
_BOOLEAN, _INT32, _INT64, _FLOAT, _DOUBLE, _FLBA = 0, 1, 2, 4, 5, 7
_REQUIRED, _REPEATED = 0, 2
_CONVERTED_LIST, _CONVERTED_UINT_16 = 3, 12
_PLAIN, _RLE = 0, 3
_DATA_PAGE = 0
CODEC_IDS = {"none": 0, "snappy": 1, "gzip": 2, "brotli": 4, "zstd": 6}

# numpy dtype -> (physical type, type_length, converted type, logical type field id, stored numpy dtype)
SUPPORTED = {
    np.dtype(np.float32): (_FLOAT, None, None, None, np.float32),
    np.dtype(np.float64): (_DOUBLE, None, None, None, np.float64),
    np.dtype(np.int32): (_INT32, None, None, None, np.int32),
    np.dtype(np.int64): (_INT64, None, None, None, np.int64),
    np.dtype(np.uint16): (_INT32, None, _CONVERTED_UINT_16, None, np.int32),
    np.dtype(np.float16): (_FLBA, 2, None, 15, np.float16),
    np.dtype(np.bool_): (_BOOLEAN, None, None, None, np.bool_),
}


# --------------------------------------------------------------------------
# Thrift compact protocol (only what the Parquet footer and page headers use)
# --------------------------------------------------------------------------
# compact type codes; a bool field's code is its value (1 true, 2 false), and no list holds bools
_CT: dict[str, int] = {"i8": 3, "i32": 5, "i64": 6, "bin": 8, "list": 9, "struct": 12}


def _varint(out: bytearray, n: int) -> None:
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return


def _zigzag(n: int) -> int:
    return (n << 1) ^ (n >> 63)


def _value(out: bytearray, kind: str, v) -> None:
    if kind in ("i32", "i64"):
        _varint(out, _zigzag(int(v)))
    elif kind == "i8":
        out.append(int(v) & 0xFF)
    elif kind == "bin":
        data = v.encode("utf-8") if isinstance(v, str) else bytes(v)
        _varint(out, len(data))
        out += data
    elif kind == "struct":
        _struct(out, v)
    elif kind.startswith("list:"):
        elem = kind[5:]
        n = len(v)
        code = _CT[elem]
        if n < 15:
            out.append((n << 4) | code)
        else:
            out.append(0xF0 | code)
            _varint(out, n)
        for e in v:
            _value(out, elem, e)
    else:  # pragma: no cover - programming error
        raise ValueError(kind)


def _struct(out: bytearray, fields: list[tuple[int, str, object]]) -> None:
    """Fields as (id, kind, value) in increasing id order; None values are left out."""
    last = 0
    for fid, kind, v in fields:
        if v is None:
            continue
        code = (1 if v else 2) if kind == "bool" else (_CT["list"] if kind.startswith("list:") else _CT[kind])
        delta = fid - last
        if 0 < delta <= 15:
            out.append((delta << 4) | code)
        else:
            out.append(code)
            _varint(out, _zigzag(fid))
        last = fid
        if kind != "bool":
            _value(out, kind, v)
    out.append(0)


def _encode(fields) -> bytes:
    out = bytearray()
    _struct(out, fields)
    return bytes(out)


# --------------------------------------------------------------------------
# levels
# --------------------------------------------------------------------------
def _one_run(count: int, value: int, width_bytes: int) -> bytes:
    out = bytearray()
    _varint(out, count << 1)
    out += value.to_bytes(width_bytes, "little")
    return bytes(out)


@dataclass
class _Leaf:
    name: str
    sizes: tuple[int, ...]  # fixed-size list lengths, outer to inner
    physical: int
    type_length: int | None
    converted: int | None
    logical: int | None
    stored: type
    row_pattern: bytes  # repetition levels of one row (RLE)

    @property
    def level(self) -> int:
        return len(self.sizes)

    @property
    def per_row(self) -> int:
        return int(np.prod(self.sizes, dtype=np.int64)) if self.sizes else 1

    @property
    def width(self) -> int:
        return max(1, (self.level.bit_length() + 7) // 8)


@functools.lru_cache(maxsize=32)
def _rep_pattern(sizes: tuple[int, ...]) -> bytes:
    """Repetition levels of one row of a fixed-size list of `sizes`, RLE-encoded.

    Level 0 opens the row; afterwards each value carries the outermost level
    whose list restarts at it (the innermost level k when none does). Built
    run by run: for sizes (T, D) that is 0, D-1 times 2, then T-1 times
    (1, D-1 times 2): about 2*T runs, never one entry per value.
    """
    if not sizes:
        return b""
    k = len(sizes)
    runs: list[list[int]] = []  # [value, count], adjacent equal values merged

    def add(value: int, count: int) -> None:
        if count <= 0:
            return
        if runs and runs[-1][0] == value:
            runs[-1][1] += count
        else:
            runs.append([value, count])

    def walk(depth: int, opening: int) -> None:
        # the values of one list at `depth` (0-based, outer to inner); its first value has level `opening`
        if depth == k - 1:
            add(opening, 1)
            add(k, sizes[depth] - 1)
            return
        for i in range(sizes[depth]):
            walk(depth + 1, opening if i == 0 else depth + 1)

    walk(0, 0)
    width = max(1, (k.bit_length() + 7) // 8)
    out = bytearray()
    for value, count in runs:
        _varint(out, count << 1)
        out += value.to_bytes(width, "little")
    return bytes(out)


class FastParquetWriter:
    """Write blocks of numpy columns as row groups of one Parquet file (see the module docstring)."""

    def __init__(self, f: BinaryIO, arrow_schema, codecs: dict[str, str]):
        self.f = f
        self.schema = arrow_schema
        self.codecs = codecs
        self.leaves: list[_Leaf] = []
        for field in arrow_schema:
            sizes = []
            typ = field.type
            while hasattr(typ, "list_size"):
                sizes.append(typ.list_size)
                typ = typ.value_type
            dt = np.dtype(typ.to_pandas_dtype()) if str(typ) != "halffloat" else np.dtype(np.float16)
            phys, tlen, conv, logical, stored = SUPPORTED[dt]
            self.leaves.append(
                _Leaf(field.name, tuple(sizes), phys, tlen, conv, logical, stored, _rep_pattern(tuple(sizes)))
            )
        self.row_groups: list[list] = []
        self.num_rows = 0
        self.offset = 0
        self._write(MAGIC)

    def _write(self, data) -> None:
        self.f.write(data)
        self.offset += memoryview(data).nbytes

    def _codec(self, name: str):
        c = self.codecs.get(name, "none")
        if c == "none":
            return 0, None
        import pyarrow as pa

        return CODEC_IDS[c], pa.Codec(c)

    def write_block(self, block: dict[str, np.ndarray]) -> None:
        """One row group of every column of `block` (arrays with the same first dimension)."""
        rows = len(next(iter(block.values())))
        if rows == 0:
            return
        chunks = []
        total = 0
        for leaf in self.leaves:
            meta, size = self._column(leaf, block[leaf.name], rows)
            chunks.append(meta)
            total += size
        self.row_groups.append([(1, "list:struct", chunks), (2, "i64", total), (3, "i64", rows)])
        self.num_rows += rows

    def _column(self, leaf: _Leaf, arr, rows: int):
        codec_id, codec = self._codec(leaf.name)
        runs = hasattr(arr, "chunks") and arr.dtype == leaf.stored  # rows.Rows: written run by run, no gather
        if runs:
            flat = arr
        else:
            flat = np.ascontiguousarray(arr, dtype=leaf.stored).reshape(rows, leaf.per_row)
        itemsize = 1 if leaf.physical == _BOOLEAN else np.dtype(leaf.stored).itemsize
        rows_per_page = max(1, PAGE_VALUE_BYTES // max(1, leaf.per_row * itemsize))
        start = self.offset
        unc = comp = 0
        for a in range(0, rows, rows_per_page):
            b = min(rows, a + rows_per_page)
            page_rows = flat[a:b]
            n_values = (b - a) * leaf.per_row
            parts: list = []
            if leaf.level:
                rep = leaf.row_pattern * (b - a)
                dfn = _one_run(n_values, leaf.level, leaf.width)
                parts += [struct.pack("<I", len(rep)), rep, struct.pack("<I", len(dfn)), dfn]
            if leaf.physical == _BOOLEAN:
                parts.append(np.packbits(page_rows.reshape(-1), bitorder="little").tobytes())
            elif runs:
                parts += [np.ascontiguousarray(c).reshape(-1).data.cast("B") for c in page_rows.chunks()]
            else:
                parts.append(page_rows.reshape(-1).data.cast("B"))
            body_len = sum(memoryview(p).nbytes for p in parts)
            if codec is not None:
                body = codec.compress(b"".join(bytes(p) for p in parts), asbytes=True)
                parts = [body]
            comp_len = sum(memoryview(p).nbytes for p in parts)
            header = _encode(
                [
                    (1, "i32", _DATA_PAGE),
                    (2, "i32", body_len),
                    (3, "i32", comp_len),
                    (5, "struct", [(1, "i32", n_values), (2, "i32", _PLAIN), (3, "i32", _RLE), (4, "i32", _RLE)]),
                ]
            )
            self._write(header)
            for p in parts:
                self._write(p)
            unc += len(header) + body_len
            comp += len(header) + comp_len
        path = [leaf.name] + ["list", "element"] * leaf.level
        meta = [
            (1, "i32", leaf.physical),
            (2, "list:i32", [_RLE, _PLAIN] if leaf.level else [_PLAIN]),
            (3, "list:bin", path),
            (4, "i32", codec_id),
            (5, "i64", rows * leaf.per_row),
            (6, "i64", unc),
            (7, "i64", comp),
            (9, "i64", start),
        ]
        return [(2, "i64", start), (3, "struct", meta)], unc

    def _schema_elements(self) -> list:
        els = [[(4, "bin", "schema"), (5, "i32", len(self.leaves))]]
        for leaf in self.leaves:
            name = leaf.name
            for _ in range(leaf.level):
                els.append(
                    [
                        (3, "i32", _REQUIRED),
                        (4, "bin", name),
                        (5, "i32", 1),
                        (6, "i32", _CONVERTED_LIST),
                        (10, "struct", [(3, "struct", [])]),
                    ]
                )
                els.append([(3, "i32", _REPEATED), (4, "bin", "list"), (5, "i32", 1)])
                name = "element"
            logical: list | None = [(leaf.logical, "struct", [])] if leaf.logical else None
            els.append(
                [
                    (1, "i32", leaf.physical),
                    (2, "i32", leaf.type_length),
                    (3, "i32", _REQUIRED),
                    (4, "bin", name),
                    (6, "i32", leaf.converted),
                    (10, "struct", logical),
                ]
            )
        return els

    def close(self) -> None:
        """Write the footer (schema, row groups, Arrow schema) and the closing magic."""
        kv = [[(1, "bin", "ARROW:schema"), (2, "bin", base64.b64encode(self.schema.serialize().to_pybytes()).decode())]]
        for k, v in (self.schema.metadata or {}).items():
            kv.append([(1, "bin", k), (2, "bin", v)])
        footer = _encode(
            [
                (1, "i32", 2),
                (2, "list:struct", self._schema_elements()),
                (3, "i64", self.num_rows),
                (4, "list:struct", self.row_groups),
                (5, "list:struct", kv),
                (6, "bin", "vaultsh export"),
            ]
        )
        self._write(footer)
        self._write(struct.pack("<I", len(footer)))
        self._write(MAGIC)
