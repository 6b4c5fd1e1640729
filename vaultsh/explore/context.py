"""Ranged reads of a megabatch's `input_ids` and `mask` alone, with the bytes read counted.

A safetensors megabatch is read as: one small ranged read for the header (a
second only when the header is longer than the first guess), then exactly the
bytes of `input_ids` and of `mask`. The states are never touched. A `.saved.pt`
file has no random access: it is read whole (weights_only) and every byte counts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from vaultsh.dtypes import raw_numpy
from vaultsh.errors import FormatError
from vaultsh.megabatch import MegabatchHeader, parse_header

HEADER_GUESS = 4096  # a collector's megabatch header is ~1 KiB


class ByteCounter:
    """Bytes and requests fetched through `get_range`/`get_bytes` of a store."""

    def __init__(self, store):
        self.store = store
        self.bytes = 0
        self.requests = 0

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Exactly `length` bytes from `start`; a FormatError naming the file when it ends before them."""
        data = self.store.get_range(key, start, length)
        self.bytes += len(data)
        self.requests += 1
        if len(data) != length:  # the file is shorter than its header or its listing says
            raise FormatError(
                f"{self.store.child_uri(key)}: truncated or replaced: it ends at byte {start + len(data)}, "
                f"{start + length} expected"
            )
        return data

    def get_bytes(self, key: str) -> bytes:
        data = self.store.get_bytes(key)
        self.bytes += len(data)
        self.requests += 1
        return data


@dataclass
class Tokens:
    """`input_ids` [N, T] and `mask` [N, T] of one megabatch, as numpy arrays."""

    key: str
    input_ids: np.ndarray
    mask: np.ndarray
    header: MegabatchHeader

    @property
    def ids_mask_bytes(self) -> int:
        """Bytes of the two tensors as stored (the floor for what a read of them costs)."""
        return (
            int(self.input_ids.nbytes + self.mask.nbytes)
            if self.header.format == "pt"
            else sum(self.header.tensors[n].nbytes for n in ("input_ids", "mask") if n in self.header.tensors)
        )


def _read_header(io: ByteCounter, key: str, size: int) -> tuple[MegabatchHeader | None, bytes]:
    """(the safetensors header, the first bytes of the file read for it); (None, ...) for a pt file."""
    buf = io.get_range(key, 0, min(HEADER_GUESS, size))
    if len(buf) >= 8:
        (n,) = struct.unpack("<Q", buf[:8])
        if buf[8:9] == b"{" and 8 + n <= size:
            if len(buf) < 8 + n:
                buf += io.get_range(key, len(buf), 8 + n - len(buf))
            return parse_header(buf, size, key), buf
    if _pickle_like(buf):
        return None, buf
    return parse_header(buf, size, key), buf


def read_small_header(io: ByteCounter, key: str, size: int | None = None) -> MegabatchHeader | None:
    """The safetensors header with one (rarely two) small ranged reads; None for a pt file."""
    return _read_header(io, key, io.store.head(key).size if size is None else size)[0]


def _pickle_like(buf: bytes) -> bool:
    return buf.startswith(b"PK\x03\x04") or (len(buf) > 1 and buf[0] == 0x80 and 2 <= buf[1] <= 5)


def read_tokens(io: ByteCounter, key: str, size: int | None = None) -> Tokens:
    """`input_ids` and `mask` of megabatch `key` (all-true mask when the file has none).

    The header read overshoots into the data section, where the writer puts
    `input_ids` first (largest element size first): those bytes are used, not read again.
    """
    if size is None:
        size = io.store.head(key).size
    header, prefix = _read_header(io, key, size)
    if header is None:  # .saved.pt: no random access into a pickle
        from vaultsh.megabatch import load_pt, pt_header

        data = io.get_bytes(key)
        obj = load_pt(data, key)
        ids = obj["input_ids"].numpy()
        return Tokens(key, ids, np.ones(ids.shape, dtype=bool), pt_header(obj, len(data)))
    out = {}
    for name in ("input_ids", "mask"):
        info = header.tensors.get(name)
        if info is None:
            continue
        a, b = header.data_offset + info.start, header.data_offset + info.end
        if b <= len(prefix):
            raw = prefix[a:b]
        elif a < len(prefix):
            raw = prefix[a:] + io.get_range(key, len(prefix), b - len(prefix))
        else:
            raw = io.get_range(key, a, b - a)
        out[name] = np.frombuffer(raw, dtype=raw_numpy(info.dtype)).reshape(info.shape)
    ids = out["input_ids"]
    mask = out.get("mask")
    mask = np.ones(ids.shape, dtype=bool) if mask is None else mask.astype(bool, copy=False)
    return Tokens(key, ids, mask, header)


def read_sequence_tokens(io: ByteCounter, key: str, seq: int, header: MegabatchHeader) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids [T], mask [T]) of one sequence: one ranged read per tensor."""
    out = {}
    for name in ("input_ids", "mask"):
        info = header.tensors.get(name)
        if info is None:
            continue
        row = info.row_bytes()
        raw = io.get_range(key, header.data_offset + info.start + seq * row, row)
        out[name] = np.frombuffer(raw, dtype=raw_numpy(info.dtype))
    ids = out["input_ids"]
    return ids, out.get("mask", np.ones(ids.shape, dtype=bool)).astype(bool, copy=False)


def read_sources(io: ByteCounter, key: str, header: MegabatchHeader) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(`source` [N, 3], `source_segments` [M, 5] or None) of a megabatch: one small ranged read per tensor
    (bytes counted); (None, None) for a file without provenance (or a pt file)."""
    out: list[np.ndarray | None] = []
    for name in ("source", "source_segments"):
        info = header.tensors.get(name) if header.format == "safetensors" else None
        if info is None:
            out.append(None)
            continue
        raw = io.get_range(key, header.data_offset + info.start, info.nbytes)
        out.append(np.frombuffer(raw, dtype=raw_numpy(info.dtype)).reshape(info.shape))
    return out[0], out[1]
