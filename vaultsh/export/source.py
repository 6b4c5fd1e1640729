"""The hook directory an export reads: resolution, committed files, probing, fetching.

Megabatches are decoded straight into numpy arrays (no torch for safetensors;
`.saved.pt` files go through `torch.load(weights_only=True)`), so bf16 is
handled bit-exactly: its raw 16-bit patterns are kept until `rows.convert_states`.
"""

from __future__ import annotations

import posixpath
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vaultsh.dtypes import from_torch_dtype, raw_numpy
from vaultsh.errors import FormatError, NotFoundError, UserError
from vaultsh.megabatch import HEADER_PROBE_BYTES, MegabatchHeader, parse_header, read_header
from vaultsh.run import METADATA, FileRecord, Run, megabatch_format
from vaultsh.store import Store, open_location

PROBE_THREADS = 16
RANGE_BYTES = 16 << 20
FETCH_THREADS = 16


@dataclass
class Source:
    """One hook directory of a run and its committed megabatches (at the time it was opened)."""

    store: Store
    run: Run
    hook: str
    uri: str  # the hook directory, as a full URI
    files: list[FileRecord]
    uncommitted: int  # files in the hook directory that no commit record names
    metadata: dict | None
    cfg: dict | None

    def key_of(self, name: str) -> str:
        """The store key of a megabatch file of this hook, by its base name."""
        return self.run.hook_prefix(self.hook) + name


def open_source(uri: str) -> Source:
    """Resolve `RUN_URI/HOOK` and list its committed megabatches; one-line errors otherwise."""
    text = str(uri).rstrip("/")
    store, key = open_location(text)
    key = key.strip("/")
    if "/" not in key:
        raise UserError(f"{uri}: not a hook directory (expected RUN/HOOK, e.g. s3://bucket/run/residuals_10)")
    run_name, hook = posixpath.split(key)
    run = Run(store, run_name)
    try:
        prefix = run.hook_prefix(hook)
    except ValueError as exc:
        raise UserError(f"{uri}: {exc}") from None
    # four independent requests at once: each is a round trip to the store
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="vaultsh-export-open") as ex:
        f_listing = ex.submit(store.list_dir, prefix)
        f_commits = ex.submit(run.iter_commits)
        f_meta = ex.submit(run.read_metadata, hook)
        f_cfg = ex.submit(run.read_cfg)
        listing = f_listing.result()
        names = {o.name for o in listing.objects}
        if METADATA not in names and not any(megabatch_format(n) for n in names):
            _not_a_hook(store, run, run_name, key, uri)
        commits = f_commits.result()
        metadata, cfg = f_meta.result(), f_cfg.result()
    files = run.committed_files(hook, commits)
    named = {f.key for f in files}
    uncommitted = sum(1 for o in listing.objects if megabatch_format(o.name) and o.key not in named) if commits else 0
    if not files:
        extra = f" ({uncommitted} uncommitted file(s) are ignored until their run commits them)" if uncommitted else ""
        raise UserError(f"{store.child_uri(prefix.rstrip('/'))}: no committed megabatches to export{extra}")
    return Source(store, run, hook, store.child_uri(prefix.rstrip("/")), files, uncommitted, metadata, cfg)


def _not_a_hook(store: Store, run: Run, run_name: str, key: str, uri: str) -> None:
    """Raise the one-line error for a URI that is no hook directory, with a hint of what is there."""
    hint = ""
    try:
        here = Run(store, key).hooks()
        if here:
            hint = f"; it is a run: pick a hook, e.g. {uri.rstrip('/')}/{here[0]} (hooks: {', '.join(here[:10])})"
        else:
            hooks = run.hooks()
            if hooks:
                hint = f"; hooks in run {run_name!r}: {', '.join(hooks[:10])}"
    except UserError:
        pass
    raise UserError(f"{uri}: not a hook directory (no metadata.json or megabatch files there){hint}")


# --------------------------------------------------------------------------
# probing (for the plan)
# --------------------------------------------------------------------------


@dataclass
class FileInfo:
    """What the plan needs to know about one megabatch file."""

    name: str
    size: int
    sequences: int
    seq_len: int
    d_model: int
    dtype: str
    ids_dtype: str
    real_tokens: int
    labels: dict[str, tuple[str, list[int]]] = field(default_factory=dict)  # name -> (dtype, shape[1:])


def _pt_info(store: Store, rec: FileRecord) -> FileInfo:
    from vaultsh.megabatch import load_pt  # torch only for Activault pickles

    obj = load_pt(store.get_bytes(rec.key), store.child_uri(rec.key))
    s, ids = obj["states"], obj["input_ids"]
    n, t, d = s.shape
    return FileInfo(rec.name, rec.size, n, t, d, _st_name(s.dtype), _st_name(ids.dtype), n * t)


def _st_name(dtype) -> str:
    return from_torch_dtype(dtype)


def _read_header(store: Store, rec: FileRecord) -> MegabatchHeader:
    """The header with one ranged GET when the size is known from the commit record (else read_header)."""
    if rec.size <= 0:
        return read_header(store, rec.key)
    buf = store.get_range(rec.key, 0, min(HEADER_PROBE_BYTES, rec.size))
    if len(buf) >= 8:
        (n,) = struct.unpack("<Q", buf[:8])
        if 1 < n and 8 + n <= len(buf) and buf[8:9] == b"{":
            return parse_header(buf[: 8 + n], rec.size, rec.key)
    return read_header(store, rec.key)  # a pt file, a large header, or a size that changed


def probe_file(store: Store, rec: FileRecord, count_tokens: bool) -> FileInfo:
    """Shapes, dtypes, labels and (if asked) the unmasked token count of one committed file."""
    uri = store.child_uri(rec.key)
    try:
        header = _read_header(store, rec)
    except NotFoundError:
        raise NotFoundError(f"{uri}: committed megabatch is missing from the store") from None
    except FormatError as exc:
        raise FormatError(_with_uri(str(exc), rec.key, uri)) from None
    if header.format == "pt":
        return _pt_info(store, rec)
    n, t = header.n_sequences, header.seq_len
    real = n * t
    if count_tokens and "mask" in header.tensors:
        m = header.tensors["mask"]
        raw = store.get_range(rec.key, header.data_offset + m.start, m.nbytes)
        if len(raw) != m.nbytes:
            raise FormatError(f"{uri}: truncated mask ({len(raw)} of {m.nbytes} bytes)")
        real = int(np.count_nonzero(np.frombuffer(raw, dtype=np.uint8)))
    labels = {
        name[len("labels.") :]: (info.dtype, list(info.shape[1:]))
        for name, info in header.tensors.items()
        if name.startswith("labels.")
    }
    return FileInfo(
        rec.name,
        header.file_size or rec.size,
        n,
        t,
        header.d_model,
        header.dtype,
        header.tensors["input_ids"].dtype,
        real,
        labels,
    )


def probe_all(store: Store, files: list[FileRecord], count_tokens: bool) -> list[FileInfo]:
    """`probe_file` for every file, in parallel, in order."""
    if len(files) <= 2:
        return [probe_file(store, f, count_tokens) for f in files]
    with ThreadPoolExecutor(max_workers=min(PROBE_THREADS, len(files))) as ex:
        return list(ex.map(lambda f: probe_file(store, f, count_tokens), files))


def _with_uri(msg: str, key: str, uri: str) -> str:
    if msg.startswith(key + ":"):
        return uri + msg[len(key) :]
    return msg if uri in msg else f"{uri}: {msg}"


# --------------------------------------------------------------------------
# fetching and decoding
# --------------------------------------------------------------------------


@dataclass
class Decoded:
    """One megabatch as numpy arrays: states raw (bf16/fp8 as their bits), mask as bool."""

    states: np.ndarray  # [N, T, D]
    states_dtype: str  # safetensors dtype name of `states`
    input_ids: np.ndarray  # [N, T]
    mask: np.ndarray  # [N, T] bool
    labels: dict[str, tuple[np.ndarray, str]]  # name -> (array [N, ...], dtype name)
    nbytes: int  # bytes of the file
    buffer: np.ndarray | None = None  # the fetched bytes the arrays may view (Fetcher.recycle)


class Fetcher:
    """Whole megabatches into memory by parallel ranged reads written in place (one pool per export).

    Uses the streaming reader's `read_with_retries` (reads straight from the
    socket or file into the buffer, retries transient network errors) when
    it is importable, else `Store.get_range` plus a copy. Buffers handed back
    with `recycle` are reused: a fresh 64 MB buffer costs the kernel 16k page
    faults and zero-filling, a recycled one nothing.
    """

    def __init__(self, threads: int = FETCH_THREADS, keep_buffers: int = 6):
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vaultsh-export-range")
        self.stop = threading.Event()
        self._free: list[np.ndarray] = []
        self._free_lock = threading.Lock()
        self._keep = keep_buffers
        self._read_with_retries: Callable[..., int] | None
        try:
            from vaultsh.reader.fetch import read_with_retries
        except ImportError:  # pragma: no cover - the reader is optional here
            self._read_with_retries = None
        else:
            self._read_with_retries = read_with_retries

    def close(self) -> None:
        self.stop.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        with self._free_lock:
            self._free.clear()

    def recycle(self, dec: Decoded) -> None:
        """Give `dec`'s buffer back for a later fetch; nothing of `dec` may be used afterwards."""
        buf, dec.buffer = dec.buffer, None
        if buf is None:
            return
        with self._free_lock:
            if len(self._free) < self._keep:
                self._free.append(buf)

    def _buffer(self, n: int) -> np.ndarray:
        with self._free_lock:
            for i, b in enumerate(self._free):
                if len(b) >= n:
                    return self._free.pop(i)[:n]
        return np.empty(n, dtype=np.uint8)  # not zero-filled

    def _read(self, store: Store, key: str, uri: str, start: int, mv: memoryview) -> int:
        if self._read_with_retries is not None:
            try:
                return self._read_with_retries(store, key, uri, start, mv, self.stop, 5, 0.2)
            except TypeError:  # pragma: no cover - a changed signature: fall back to the store
                self._read_with_retries = None
        data = store.get_range(key, start, len(mv))
        mv[: len(data)] = data
        return len(data)

    def fetch(self, store: Store, key: str, size: int) -> np.ndarray:
        """The object's `size` bytes as a uint8 array (a FormatError if it is shorter or longer)."""
        uri = store.child_uri(key)
        buf = self._buffer(size + 1)  # one spare byte tells a longer object
        mv = buf.data
        # ranges over the object, the last one a byte longer: no extra request just for the spare byte
        parts = [(s, min(RANGE_BYTES, size - s)) for s in range(0, size, RANGE_BYTES)] or [(0, 0)]
        parts[-1] = (parts[-1][0], parts[-1][1] + 1)
        futs = [self.pool.submit(self._read, store, key, uri, a, mv[a : a + n]) for a, n in parts]
        got = sum(f.result() for f in futs)
        if got != size:
            raise FormatError(
                f"{uri}: {got if got <= size else 'more than ' + str(size)} bytes, "
                f"the export plan says {size} (was the file replaced since the export started?)"
            )
        return buf[:size]


def _array(data, header: MegabatchHeader, name: str) -> np.ndarray:
    info = header.tensors[name]
    count = int(np.prod(info.shape)) if info.shape else 1
    arr: np.ndarray = np.frombuffer(
        data, dtype=raw_numpy(info.dtype), count=count, offset=header.data_offset + info.start
    )
    return arr.reshape(info.shape)


def decode(data, key: str, uri: str) -> Decoded:
    """Decode a fetched megabatch (safetensors zero-copy, or an Activault pt dict)."""
    if len(data) >= 8:
        (n,) = struct.unpack("<Q", bytes(data[:8]))
        head = bytes(data[: 8 + n]) if 1 < n < len(data) else bytes(data[:8])
    else:
        head = bytes(data)
    try:
        header = parse_header(head, len(data), key)
    except FormatError as exc:
        raise FormatError(_with_uri(str(exc), key, uri)) from None
    if header.format == "pt":
        return _decode_pt(data, key, uri)
    states = _array(data, header, "states")
    ids = _array(data, header, "input_ids")
    if "mask" in header.tensors:
        mask = _array(data, header, "mask")
        mask = mask if mask.dtype == np.bool_ else mask != 0
    else:
        mask = np.ones(ids.shape, dtype=np.bool_)
    labels = {
        name[len("labels.") :]: (_array(data, header, name), header.tensors[name].dtype)
        for name in header.tensors
        if name.startswith("labels.")
    }
    return Decoded(states, header.dtype, ids, mask, labels, len(data))


def _decode_pt(data, key: str, uri: str) -> Decoded:
    import torch

    from vaultsh.megabatch import load_pt

    try:
        obj = load_pt(bytes(data), key)
    except FormatError as exc:
        raise FormatError(_with_uri(str(exc), key, uri)) from None
    s, ids = obj["states"], obj["input_ids"]
    dt = _st_name(s.dtype)
    if s.dtype == torch.bfloat16:
        raw = s.contiguous().view(torch.int16).numpy().view(np.uint16)
    elif dt.startswith("F8"):
        raw = s.contiguous().view(torch.uint8).numpy()
    else:
        raw = s.contiguous().numpy()
    ids_np = ids.contiguous().numpy()
    return Decoded(raw, dt, ids_np, np.ones(ids_np.shape, dtype=np.bool_), {}, len(data))


def load(fetcher: Fetcher, store: Store, rec_key: str, size: int) -> Decoded:
    """Fetch and decode one committed megabatch (its buffer can go back with `fetcher.recycle`)."""
    uri = store.child_uri(rec_key)
    try:
        data = fetcher.fetch(store, rec_key, size)
    except NotFoundError:
        raise NotFoundError(f"{uri}: committed megabatch is missing from the store") from None
    dec = decode(data, rec_key, uri)
    dec.buffer = data.base if data.base is not None else data
    return dec


def describe_labels(infos: list[FileInfo]) -> dict[str, Any]:
    """Labels present in every file, with their (dtype, trailing shape) from the first file."""
    if not infos:
        return {}
    common = set(infos[0].labels)
    for fi in infos[1:]:
        common &= set(fi.labels)
    return {name: infos[0].labels[name] for name in sorted(common)}
