"""The on-storage megabatch format: write, read, header-only read, per-sequence slices.

Default format is **safetensors** (one file per hook per megabatch)::

    [8 bytes: little-endian u64 N][N bytes: JSON header, space-padded][data section]

with tensors ``states [N, T, D]``, ``input_ids [N, T]``, ``mask [N, T]`` (bool)
optional per-sequence ``labels.<name>`` (first dim N), and the provenance
tensors ``source`` (int64 ``[N, 3]``: source index, document index, token
offset of each sequence's first token; -1 where unknown) and, with packing,
``source_segments`` (int64 ``[M, 5]``: row, position, source, document, token
offset of every document piece). Files written before provenance have neither
and still read (``Megabatch.source`` is None). The JSON header's
``__metadata__`` carries ``format`` (``FORMAT_NAME``), ``format_version`` and
whatever the writer adds (run, hook, model, ...), all as strings.

Because the header comes first and tensors are row-major, a reader fetches the
header with one small ranged read and sequence ``i`` of any tensor with one
more: ``inspect`` of a multi-GB file on S3 never downloads it.

``fmt="pt"`` writes Activault's ``.saved.pt`` dict (``states``, ``input_ids``,
``tensor_bytes``). Reading ``.pt`` uses ``torch.load(weights_only=True)`` only:
a file in a bucket is untrusted input and is never unpickled freely.

torch is imported lazily inside the functions that need it; header parsing
(``parse_header``) is pure Python.
"""

from __future__ import annotations

import io
import json
import math
import re
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vaultsh.dtypes import BY_CODE, from_torch_dtype, to_torch_dtype
from vaultsh.errors import FormatError, UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from vaultsh.store.base import WriteStream

FORMAT_NAME = "vaultsh.megabatch"
SOURCE = "source"  # int64 [N, 3]: (source index, document index, token offset) of each sequence's first token
SOURCE_SEGMENTS = "source_segments"  # int64 [M, 5]: (row, position, source, document, offset) per document piece
SOURCE_COLUMNS = ("source_index", "document_index", "token_offset")
SEGMENT_COLUMNS = ("row", "position", "source_index", "document_index", "token_offset")
FORMAT_VERSION = 1
EXTENSIONS = {"safetensors": ".safetensors", "pt": ".saved.pt"}  # format name -> file suffix (the only such map)

HEADER_PROBE_BYTES = 64 << 10  # first ranged read of read_header
MAX_HEADER_BYTES = 100_000_000  # same limit as safetensors
DEFAULT_CHUNK_BYTES = 64 << 20

_PT_MAGICS = (b"PK\x03\x04",) + tuple(b"\x80" + bytes([p]) for p in range(2, 6))


# --------------------------------------------------------------------------
# header
# --------------------------------------------------------------------------


@dataclass
class TensorInfo:
    """One tensor of a megabatch: dtype name, shape, byte range in the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def itemsize(self) -> int:
        return BY_CODE[self.dtype].itemsize

    def row_bytes(self) -> int:
        """Bytes of one slice along the first dimension (one sequence)."""
        n = self.shape[0] if self.shape else 1
        return self.nbytes // n if n else math.prod(self.shape[1:]) * self.itemsize


@dataclass
class MegabatchHeader:
    """Everything known about a megabatch without reading its tensor data.

    ``format`` is "safetensors" or "pt". For safetensors, ``data_offset`` is the
    absolute offset of the data section (8 + header length) and each tensor's
    ``start``/``end`` are relative to it. For pt files the offsets are only the
    tensors' sizes laid end to end (there is no random access into a pickle).
    """

    format: str
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_offset: int
    file_size: int | None

    def _states(self) -> TensorInfo:
        try:
            return self.tensors["states"]
        except KeyError:
            raise FormatError(f"megabatch header ({self.format}) has no tensor 'states'") from None

    @property
    def n_sequences(self) -> int:
        return self._states().shape[0]

    @property
    def seq_len(self) -> int:
        return self._states().shape[1]

    @property
    def d_model(self) -> int:
        return self._states().shape[2]

    @property
    def dtype(self) -> str:
        """The safetensors dtype name of ``states`` ("F32", "BF16", ...)."""
        return self._states().dtype

    @property
    def n_tokens(self) -> int:
        return self.n_sequences * self.seq_len

    @property
    def label_names(self) -> list[str]:
        return sorted(k[len("labels.") :] for k in self.tensors if k.startswith("labels."))

    @property
    def has_mask(self) -> bool:
        return "mask" in self.tensors

    @property
    def has_source(self) -> bool:
        """Whether the file records provenance (the ``source`` tensor)."""
        return SOURCE in self.tensors

    @property
    def hook(self) -> str | None:
        return self.metadata.get("hook")

    @property
    def model(self) -> str | None:
        return self.metadata.get("model")

    @property
    def format_version(self) -> int | None:
        v = self.metadata.get("format_version")
        try:
            return int(v) if v is not None else None
        except ValueError:
            return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description (for `inspect --json`)."""
        out: dict[str, Any] = {
            "format": self.format,
            "file_size": self.file_size,
            "data_offset": self.data_offset,
            "metadata": dict(self.metadata),
            "tensors": {
                name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.start, t.end]}
                for name, t in self.tensors.items()
            },
        }
        if "states" in self.tensors:  # what its shape and dtype say
            out.update(
                (name, getattr(self, name)) for name in ("n_sequences", "seq_len", "d_model", "dtype", "n_tokens")
            )
        out.update(label_names=self.label_names, hook=self.hook, model=self.model)
        return out


def _fail(key: str | None, msg: str) -> FormatError:
    return FormatError(f"{key}: {msg}" if key else msg)


def _looks_like_pt(buf: bytes) -> bool:
    return any(buf.startswith(m) for m in _PT_MAGICS)


def _header_len(buf: bytes, file_size: int | None, key: str | None) -> int | None:
    """Validate the 8-byte length prefix. Returns N, or None for a pt/pickle file."""
    avail = len(buf) if file_size is None else file_size
    if avail == 0 or len(buf) == 0:
        raise _fail(key, "not a megabatch: empty file")
    if len(buf) < 8:
        if _looks_like_pt(buf):
            return None
        hint = " (a JSON file?)" if buf[:1] in (b"{", b"[") else ""
        raise _fail(key, f"truncated: {len(buf)} bytes, shorter than the 8-byte safetensors header length{hint}")
    (n,) = struct.unpack("<Q", buf[:8])
    sane = 1 < n < MAX_HEADER_BYTES
    fits = file_size is None or 8 + n <= file_size
    starts_json = buf[8:9] == b"{" if len(buf) > 8 else False
    if sane and fits and (starts_json or len(buf) == 8):
        return n
    if _looks_like_pt(buf):
        return None
    hint = " (the file starts with a JSON bracket: a JSON file?)" if buf[:1] in (b"{", b"[") else ""
    if not fits:
        if sane and starts_json:
            raise _fail(key, f"truncated: header is {n} bytes but the file has only {file_size} bytes")
        raise _fail(key, f"not a safetensors megabatch: header length {n} exceeds file size {file_size}{hint}")
    if not sane:
        raise _fail(
            key, f"not a safetensors megabatch: header length {n} is not between 2 and {MAX_HEADER_BYTES}{hint}"
        )
    raise _fail(key, f"not a safetensors megabatch: the header does not start with '{{'{hint}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_header(buf: bytes, file_size: int | None, key: str | None = None) -> MegabatchHeader:
    """Parse and strictly validate a megabatch header from the first bytes of a file.

    ``buf`` must hold at least ``8 + N`` bytes (N from the length prefix);
    ``file_size`` (when known) lets offsets be checked against the file. Every
    problem raises ``FormatError`` with one line naming ``key`` and the reason.

    A torch zip / pickle file (``.saved.pt``) is detected by its magic bytes and
    returned as a header with ``format="pt"`` and no tensors: its shapes can only
    be learned by loading it (``read_header`` does that).
    """
    buf = bytes(buf[:]) if not isinstance(buf, bytes) else buf
    n = _header_len(buf, file_size, key)
    if n is None:
        return MegabatchHeader("pt", {}, {}, 0, file_size)
    if len(buf) < 8 + n:
        raise _fail(key, f"truncated: header is {n} bytes but only {len(buf) - 8} were available")
    raw = buf[8 : 8 + n]
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _fail(key, f"not a safetensors megabatch: header is not valid JSON ({reason})") from None
    if not isinstance(obj, dict):
        raise _fail(key, f"not a safetensors megabatch: header is a JSON {type(obj).__name__}, not an object")

    meta = obj.pop("__metadata__", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _fail(key, "bad header: __metadata__ must map strings to strings")

    data_offset = 8 + n
    data_size = None if file_size is None else file_size - data_offset
    tensors: dict[str, TensorInfo] = {}
    for name, ent in obj.items():
        where = f"tensor {name!r}"
        if not isinstance(ent, dict):
            raise _fail(key, f"bad header: {where} is not an object")
        dt, shape, offs = ent.get("dtype"), ent.get("shape"), ent.get("data_offsets")
        if not isinstance(dt, str) or dt not in BY_CODE:
            raise _fail(key, f"bad header: {where} has unknown dtype {dt!r}")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise _fail(key, f"bad header: {where} has invalid shape {shape!r}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(type(o) is int for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise _fail(key, f"bad header: {where} has invalid data_offsets {offs!r}")
        start, end = offs
        expect = math.prod(shape) * BY_CODE[dt].itemsize
        if end - start != expect:
            raise _fail(
                key, f"bad header: {where} {dt}{shape} needs {expect} bytes but data_offsets {offs} span {end - start}"
            )
        if data_size is not None and end > data_size:
            raise _fail(
                key, f"truncated: {where} ends at byte {data_offset + end} but the file has only {file_size} bytes"
            )
        tensors[name] = TensorInfo(dt, tuple(shape), start, end)

    # Offsets must tile the data section without overlap (and, like safetensors
    # requires, without gaps); trailing bytes after the last tensor are refused.
    pos = 0
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if t.start < pos:
            raise _fail(
                key, f"bad header: tensor {name!r} at data_offsets [{t.start}, {t.end}] overlaps another tensor"
            )
        if t.start > pos:
            raise _fail(key, f"bad header: gap before tensor {name!r} (data_offsets start {t.start}, expected {pos})")
        pos = t.end
    if data_size is not None and pos != data_size:
        raise _fail(key, f"bad header: {data_size - pos} unexplained bytes after the last tensor")

    fmt_name = meta.get("format")
    if fmt_name is not None and fmt_name != FORMAT_NAME and "states" not in tensors:
        raise _fail(key, f"foreign file: safetensors with format {fmt_name!r}, no tensor 'states'")
    ver = meta.get("format_version")
    if fmt_name == FORMAT_NAME and ver is not None:
        if not ver.isdigit():
            raise _fail(key, f"bad header: format_version {ver!r} is not an integer")
        if int(ver) > FORMAT_VERSION:
            raise _fail(
                key, f"written by a newer vaultsh: format_version {ver}, this version reads up to {FORMAT_VERSION}"
            )

    header = MegabatchHeader("safetensors", meta, tensors, data_offset, file_size)
    _check_megabatch_shapes(header, key)
    return header


def _check_megabatch_shapes(h: MegabatchHeader, key: str | None) -> None:
    t = h.tensors
    for need in ("states", "input_ids"):
        if need not in t:
            have = ", ".join(sorted(t)) or "none"
            raise _fail(key, f"missing tensor {need!r} (tensors: {have})")
    s, ids = t["states"], t["input_ids"]
    if len(s.shape) != 3:
        raise _fail(key, f"tensor 'states' must be 3-D [N, T, D], got shape {list(s.shape)}")
    if len(ids.shape) != 2 or ids.shape != s.shape[:2]:
        raise _fail(key, f"tensor 'input_ids' has shape {list(ids.shape)}, expected {list(s.shape[:2])}")
    if not (ids.dtype.startswith("I") or ids.dtype.startswith("U")):
        raise _fail(key, f"tensor 'input_ids' has dtype {ids.dtype}, expected an integer type")
    if "mask" in t:
        m = t["mask"]
        if m.shape != s.shape[:2]:
            raise _fail(key, f"tensor 'mask' has shape {list(m.shape)}, expected {list(s.shape[:2])}")
        if m.dtype not in ("BOOL", "U8"):
            raise _fail(key, f"tensor 'mask' has dtype {m.dtype}, expected BOOL")
    for name, info in t.items():
        if name.startswith("labels.") and (not info.shape or info.shape[0] != s.shape[0]):
            raise _fail(key, f"tensor {name!r} has shape {list(info.shape)}, expected first dimension {s.shape[0]}")
    for name, width, first in (
        (SOURCE, len(SOURCE_COLUMNS), s.shape[0]),
        (SOURCE_SEGMENTS, len(SEGMENT_COLUMNS), None),
    ):
        prov = t.get(name)
        if prov is None:
            continue
        if len(prov.shape) != 2 or prov.shape[1] != width or (first is not None and prov.shape[0] != first):
            want = f"[{first if first is not None else 'M'}, {width}]"
            raise _fail(key, f"tensor {name!r} has shape {list(prov.shape)}, expected {want}")
        if prov.dtype != "I64":
            raise _fail(key, f"tensor {name!r} has dtype {prov.dtype}, expected I64")


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------


def _cpu_contig(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def _raw_view(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, bf16 included)."""
    import torch

    flat = t.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    if sys.byteorder != "little" and t.element_size() > 1:  # pragma: no cover - big-endian hosts
        raise ValueError("writing megabatches on a big-endian host is not supported")
    return flat.numpy().data.cast("B")


def _check_write_args(states, input_ids, mask, labels, source=None, segments=None) -> None:
    import torch

    if not isinstance(states, torch.Tensor) or states.dim() != 3:
        raise ValueError(f"states must be a 3-D tensor [N, T, D], got {getattr(states, 'shape', type(states))}")
    if not states.is_floating_point():
        raise ValueError(f"states must be a floating point tensor, got {states.dtype}")
    n, t = states.shape[:2]
    if not isinstance(input_ids, torch.Tensor) or tuple(input_ids.shape) != (n, t):
        raise ValueError(f"input_ids must be a tensor of shape [{n}, {t}], got {getattr(input_ids, 'shape', None)}")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool or input_ids.is_complex():
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (n, t)):
        raise ValueError(f"mask must be a tensor of shape [{n}, {t}], got {getattr(mask, 'shape', None)}")
    for name, lab in (labels or {}).items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"label names must be non-empty strings, got {name!r}")
        if not isinstance(lab, torch.Tensor) or lab.dim() < 1 or lab.shape[0] != n:
            raise ValueError(
                f"label {name!r} must be a tensor with first dimension {n}, got {getattr(lab, 'shape', None)}"
            )
    for name, t, first, width in (
        (SOURCE, source, n, len(SOURCE_COLUMNS)),
        (SOURCE_SEGMENTS, segments, None, len(SEGMENT_COLUMNS)),
    ):
        if t is None:
            continue
        ok = isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == width and t.dtype == torch.int64
        if not ok or (first is not None and t.shape[0] != first):
            raise ValueError(
                f"{name} must be an int64 tensor of shape [{first if first is not None else 'M'}, {width}], "
                f"got {getattr(t, 'dtype', type(t))} {list(getattr(t, 'shape', []))}"
            )


def file_metadata(
    run: str,
    hook: str,
    model: str,
    worker: int,
    megabatch: int,
    batch_start: int,
    batch_end: int,
    created: str | None = None,
) -> dict[str, Any]:
    """The header metadata a collector worker writes into each megabatch (before format fields).

    One place for it, so `vaultsh plan` sizes headers exactly as workers write
    them. `created` is an ISO time with microseconds always present (fixed width).
    """
    from datetime import datetime, timezone

    return {
        "run": run,
        "hook": hook,
        "model": model,
        "worker": worker,
        "megabatch": megabatch,
        "batch_start": batch_start,
        "batch_end": batch_end,
        "tokenizer": model,
        "created": created or datetime.now(timezone.utc).isoformat(timespec="microseconds"),
    }


def build_header(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None
) -> tuple[bytes, list[tuple[str, torch.Tensor]]]:
    """The safetensors prefix (length + padded JSON) and the tensors in data order.

    Data order is safetensors' own: larger element size first, then name, so each
    tensor starts aligned to its element size (the prefix is 8-byte aligned).
    """
    order = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    hdr: dict[str, Any] = {}
    if metadata:
        hdr["__metadata__"] = metadata
    pos = 0
    for name, t in order:
        nbytes = t.numel() * t.element_size()
        hdr[name] = {"dtype": from_torch_dtype(t.dtype), "shape": list(t.shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    js = json.dumps(hdr, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js, order


def write_megabatch(
    store,
    key: str,
    states: torch.Tensor,
    input_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    labels: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str | int | float] | None = None,
    fmt: str = "safetensors",
    source: torch.Tensor | None = None,
    source_segments: torch.Tensor | None = None,
) -> int:
    """Write one megabatch to ``store`` under ``key``; returns the bytes written.

    safetensors: ``states`` [N,T,D] (any float dtype, stored as given),
    ``input_ids`` [N,T] (int64/int32 as given), ``mask`` [N,T] (bool; default all
    true), ``labels`` (per-sequence tensors, first dim N, stored as
    ``labels.<name>``), ``metadata`` (stringified into ``__metadata__`` together
    with ``format``/``format_version``), ``source`` / ``source_segments``
    (provenance, int64 ``[N, 3]`` / ``[M, 5]``, see the module docstring). The file is streamed through
    ``store.put_stream``: prefix, then each tensor's bytes straight from memory.

    pt: Activault's ``torch.save({"states", "input_ids", "tensor_bytes"})``;
    ``mask``, ``labels``, provenance and ``metadata`` have no place in that
    layout and are not written.
    """
    import torch

    if fmt not in EXTENSIONS:
        raise UserError(f"unknown megabatch format {fmt!r} (allowed: {', '.join(EXTENSIONS)})")
    _check_write_args(states, input_ids, mask, labels, source, source_segments)
    states = _cpu_contig(states)
    input_ids = _cpu_contig(input_ids)

    if fmt == "pt":
        obj = {
            "states": states,
            "input_ids": input_ids,
            # As Activault's HookUploader computes it: states bytes + input_ids bytes.
            "tensor_bytes": states.numel() * states.element_size() + input_ids.numel() * input_ids.element_size(),
        }
        written = [0]

        def write_pt(f: WriteStream) -> None:
            start = f.tell()
            torch.save(obj, f)  # type: ignore[arg-type]  # torch's stubs ask for IO[bytes]; it needs only write/flush
            written[0] = f.tell() - start

        store.put_stream(key, write_pt)
        return written[0]

    n, t = states.shape[:2]
    mask = torch.ones((n, t), dtype=torch.bool) if mask is None else _cpu_contig(mask).to(torch.bool)
    tensors = {"states": states, "input_ids": input_ids, "mask": mask}
    for name, lab in (labels or {}).items():
        tensors[f"labels.{name}"] = _cpu_contig(lab)
    if source is not None:
        tensors[SOURCE] = _cpu_contig(source)
    if source_segments is not None:
        tensors[SOURCE_SEGMENTS] = _cpu_contig(source_segments)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta["format"] = FORMAT_NAME
    meta["format_version"] = str(FORMAT_VERSION)
    prefix, order = build_header(tensors, meta)
    views = [_raw_view(tn) for _, tn in order]
    total = len(prefix) + sum(v.nbytes for v in views)

    def write_st(f: WriteStream) -> None:
        f.write(prefix)
        for v in views:
            if v.nbytes:
                f.write(v)

    store.put_stream(key, write_st)
    return total


# --------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------


@dataclass
class Megabatch:
    """A megabatch read back: tensors plus its header.

    ``mask`` is all-true for files without one (pt). With ``read_megabatch(names=...)``
    the tensors not asked for are None. ``source`` / ``source_segments`` are the
    provenance tensors, None in files without them (pt, files written before).
    """

    states: torch.Tensor | None
    input_ids: torch.Tensor | None
    mask: torch.Tensor | None
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    header: MegabatchHeader | None = None
    source: torch.Tensor | None = None
    source_segments: torch.Tensor | None = None


def _tensor_from_bytes(data, info: TensorInfo, shape: tuple[int, ...], key: str | None, name: str) -> torch.Tensor:
    import torch

    dt = to_torch_dtype(info.dtype)
    expect = math.prod(shape) * info.itemsize
    if len(data) != expect:
        raise _fail(key, f"truncated: tensor {name!r} needs {expect} bytes, got {len(data)}")
    if expect == 0:
        return torch.empty(shape, dtype=dt)
    return torch.frombuffer(bytearray(data), dtype=dt).reshape(shape)


def _weights_only_reason(e: BaseException) -> str:
    """The useful line of torch's weights-only refusal (never its advice to load unsafely)."""
    msg = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.+)", msg, re.S)
    text = m.group(1) if m else msg
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in lines:
        if "unsupported GLOBAL" in line or "Unsupported operand" in line:
            return line.split(". Please use")[0][:200]
    for line in lines:
        if line.startswith(("Weights only load failed", "Check the documentation", "(1)", "(2)", "In PyTorch")):
            continue
        if "weights_only" in line and "False" in line:
            continue
        return line.split(". Please use")[0][:200]
    return type(e).__name__


def load_pt(data: bytes, key: str | None) -> dict:
    """torch.load(weights_only=True) of untrusted bytes, validated as an Activault dict."""
    import pickle

    import torch

    try:
        # No warnings.catch_warnings() here: it is process-global, and readers load in threads.
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        reason = _weights_only_reason(e)
        if "global" in reason.lower():
            raise _fail(key, f"pickle with non-tensor objects refused: {reason}") from None
        raise _fail(key, f"pickle refused by the weights-only loader: {reason}") from None
    except Exception as e:  # zip/pickle corruption: RuntimeError, EOFError, ValueError...
        first = (str(e).splitlines() or [type(e).__name__])[0]
        first = first.split(". This is an internal")[0][:200]
        raise _fail(key, f"truncated or corrupt pt file: {first}") from None
    if not isinstance(obj, dict):
        raise _fail(
            key, f"foreign file: pt file holds a {type(obj).__name__}, not a dict with 'states' and 'input_ids'"
        )
    states, ids = obj.get("states"), obj.get("input_ids")
    if not isinstance(states, torch.Tensor) or states.dim() != 3:
        raise _fail(key, "foreign file: pt dict has no 3-D tensor 'states'")
    if not isinstance(ids, torch.Tensor) or tuple(ids.shape) != tuple(states.shape[:2]):
        raise _fail(key, f"foreign file: pt dict has no tensor 'input_ids' of shape {list(states.shape[:2])}")
    return obj


def pt_header(obj: dict, file_size: int | None) -> MegabatchHeader:
    """The header of a loaded Activault dict (`load_pt`): tensor dtypes and shapes as if laid out like safetensors."""
    tensors: dict[str, TensorInfo] = {}
    pos = 0
    for name in ("states", "input_ids"):
        t = obj[name]
        nbytes = t.numel() * t.element_size()
        tensors[name] = TensorInfo(from_torch_dtype(t.dtype), tuple(t.shape), pos, pos + nbytes)
        pos += nbytes
    meta = {}
    if isinstance(obj.get("tensor_bytes"), int):
        meta["tensor_bytes"] = str(obj["tensor_bytes"])
    return MegabatchHeader("pt", meta, tensors, 0, file_size)


def _probe(store, key: str) -> tuple[MegabatchHeader, dict | None]:
    """The header with at most two small ranged reads; pt files are loaded whole."""
    size = store.head(key).size
    if size == 0:
        raise _fail(key, "not a megabatch: empty file")
    buf = store.get_range(key, 0, min(HEADER_PROBE_BYTES, size))
    n = _header_len(buf, size, key)
    if n is None:
        data = store.get_bytes(key)
        obj = load_pt(data, key)
        return pt_header(obj, len(data)), obj
    if len(buf) < 8 + n:
        buf += store.get_range(key, len(buf), 8 + n - len(buf))
    return parse_header(buf, size, key), None


def read_header(store, key: str) -> MegabatchHeader:
    """The header of ``key``: a HEAD plus one (rarely two) small ranged reads.

    For a pt file the header needs the whole file loaded (weights_only).
    """
    return _probe(store, key)[0]


def _all_true_mask(n: int, t: int) -> torch.Tensor:
    import torch

    return torch.ones((n, t), dtype=torch.bool)


def _megabatch_from_pt(obj: dict, header: MegabatchHeader, names: list[str] | None, key: str) -> Megabatch:
    want = _wanted(header, names, key, allow_mask=True)
    s, ids = obj["states"], obj["input_ids"]
    return Megabatch(
        states=s if "states" in want else None,
        input_ids=ids if "input_ids" in want else None,
        mask=_all_true_mask(*ids.shape) if "mask" in want else None,
        labels={},
        header=header,
    )


def _wanted(header: MegabatchHeader, names: list[str] | None, key: str, allow_mask: bool = True) -> list[str]:
    if names is None:
        out = list(header.tensors)
        if "mask" not in out:
            out.append("mask")
        return out
    if isinstance(names, str):
        names = [names]
    out = []
    for name in names:
        if name not in header.tensors and not (name == "mask" and allow_mask):
            have = ", ".join(sorted(header.tensors))
            raise _fail(key, f"no tensor {name!r} (tensors: {have})")
        if name not in out:
            out.append(name)
    return out


def read_megabatch(store, key: str, names: list[str] | None = None) -> Megabatch:
    """Read a megabatch (safetensors or pt).

    ``names`` limits what is fetched (e.g. ``["states"]``, ``["input_ids", "mask"]``,
    ``["labels.source"]``): for safetensors that is one ranged read per tensor
    after the header; tensors not named come back None. Without ``names`` the
    whole object is downloaded once.
    """
    if names is None:
        data = store.get_bytes(key)
        header = parse_header(data, len(data), key)
        if header.format == "pt":
            loaded = load_pt(data, key)
            return _megabatch_from_pt(loaded, pt_header(loaded, len(data)), None, key)
        mv = memoryview(data)
        fetch = lambda info: mv[header.data_offset + info.start : header.data_offset + info.end]  # noqa: E731
    else:
        header, obj = _probe(store, key)
        if obj is not None:
            return _megabatch_from_pt(obj, header, names, key)
        fetch = lambda info: store.get_range(key, header.data_offset + info.start, info.nbytes)  # noqa: E731

    want = _wanted(header, names, key)
    got: dict[str, Any] = {}
    for name in want:
        info = header.tensors.get(name)
        if info is None:  # mask absent from the file
            continue
        got[name] = _tensor_from_bytes(fetch(info), info, info.shape, key, name)
    if "mask" in want:
        m = got.get("mask")
        got["mask"] = _all_true_mask(header.n_sequences, header.seq_len) if m is None else _as_bool(m)
    return Megabatch(
        states=got.get("states"),
        input_ids=got.get("input_ids"),
        mask=got.get("mask"),
        labels={k[len("labels.") :]: v for k, v in got.items() if k.startswith("labels.")},
        header=header,
        source=got.get(SOURCE),
        source_segments=got.get(SOURCE_SEGMENTS),
    )


def read_source(
    store, key: str, header: MegabatchHeader | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(``source`` [N, 3], ``source_segments`` [M, 5] or None) of a megabatch; (None, None) without provenance.

    safetensors: the header plus one small ranged read per tensor. pt files
    (Activault's layout) never have provenance.
    """
    if header is None:
        header = read_header(store, key)
    out: list[torch.Tensor | None] = []
    for name in (SOURCE, SOURCE_SEGMENTS):
        info = header.tensors.get(name)
        if header.format != "safetensors" or info is None:
            out.append(None)
            continue
        data = store.get_range(key, header.data_offset + info.start, info.nbytes)
        out.append(_tensor_from_bytes(data, info, info.shape, key, name))
    return out[0], out[1]


def _as_bool(t: torch.Tensor) -> torch.Tensor:
    import torch

    return t if t.dtype == torch.bool else t.to(torch.bool)


class SequenceIndexError(UserError, IndexError):
    """A sequence index outside a megabatch."""


def _check_index(header: MegabatchHeader, i: int, key: str) -> int:
    n = header.n_sequences
    if isinstance(i, bool) or not isinstance(i, int):
        raise SequenceIndexError(f"{key}: sequence index must be an integer, got {i!r}")
    j = i + n if i < 0 else i
    if not 0 <= j < n:
        valid = f"0..{n - 1}" if n else "none: the megabatch is empty"
        raise SequenceIndexError(f"{key}: sequence {i} out of range (valid: {valid})")
    return j


def read_sequence(store, key: str, i: int, header: MegabatchHeader | None = None) -> dict:
    """Sequence ``i`` of a megabatch without reading the rest.

    Returns ``{"index", "states" [T,D], "input_ids" [T], "mask" [T], "labels": {name: tensor},
    "source": [3] int64 or None}`` (``source``: source index, document index, token offset).
    safetensors: one ranged read per tensor of exactly sequence i's bytes. pt:
    the whole file is read (pickles have no random access). Negative ``i``
    counts from the end; out-of-range raises ``SequenceIndexError`` (a
    UserError and an IndexError) naming the valid range.
    """
    obj = None
    if header is None:
        header, obj = _probe(store, key)
    if header.format == "pt":
        j = _check_index(header, i, key)
        if obj is None:
            obj = load_pt(store.get_bytes(key), key)
        s, ids = obj["states"], obj["input_ids"]
        return {
            "index": j,
            "states": s[j].clone(),
            "input_ids": ids[j].clone(),
            "mask": _all_true_mask(1, ids.shape[1])[0],
            "labels": {},
            "source": None,
        }
    j = _check_index(header, i, key)
    out: dict[str, Any] = {"index": j, "labels": {}, "source": None}
    for name, info in header.tensors.items():
        if name not in ("states", "input_ids", "mask", SOURCE) and not name.startswith("labels."):
            continue
        row = info.row_bytes()
        data = store.get_range(key, header.data_offset + info.start + j * row, row)
        t = _tensor_from_bytes(data, info, info.shape[1:], key, name)
        if name.startswith("labels."):
            out["labels"][name[len("labels.") :]] = t
        else:
            out[name] = _as_bool(t) if name == "mask" else t
    if "mask" not in out:
        out["mask"] = _all_true_mask(1, header.seq_len)[0]
    return out


def iter_states_chunks(
    store, key: str, header: MegabatchHeader | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first_sequence, states[first:first+k])`` in chunks of whole sequences.

    Each chunk is one ranged read of about ``chunk_bytes`` (at least one
    sequence), so multi-GB files stream in bounded memory. pt files are loaded
    once and sliced.
    """
    obj = None
    if header is None:
        header, obj = _probe(store, key)
    n, t, d = header.n_sequences, header.seq_len, header.d_model
    per = max(1, chunk_bytes // max(1, t * d * BY_CODE[header.dtype].itemsize))
    if header.format == "pt":
        if obj is None:
            obj = load_pt(store.get_bytes(key), key)
        states = obj["states"]
        for s in range(0, n, per):
            yield s, states[s : s + per]
        return
    info = header.tensors["states"]
    row = info.row_bytes()
    for s in range(0, n, per):
        k = min(per, n - s)
        data = store.get_range(key, header.data_offset + info.start + s * row, k * row)
        yield s, _tensor_from_bytes(data, info, (k, t, d), key, "states")


def scan_states(
    store,
    key: str,
    header: MegabatchHeader | None = None,
    progress: Callable[[int, int], object] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, Any]:
    """Stream ``states`` once and report NaN/Inf counts and value statistics.

    min/max/mean/std (population) are over all finite values, accumulated in
    float64 (chunks merged with Chan's formula); ``masked_fraction`` is the share
    of token positions whose mask is false. ``progress(bytes_done, bytes_total)``
    is called after each chunk.
    """
    import torch

    pt_obj = None
    if header is None:
        header, pt_obj = _probe(store, key)
    n, t, d = header.n_sequences, header.seq_len, header.d_model
    total_bytes = header.tensors["states"].nbytes
    if header.format == "pt" and pt_obj is None:
        pt_obj = load_pt(store.get_bytes(key), key)

    if pt_obj is not None:
        chunks: Iterator = _slices(pt_obj["states"], n, chunk_bytes)
    else:
        chunks = iter_states_chunks(store, key, header, chunk_bytes)

    nan = inf = 0
    count = 0
    mean = 0.0
    m2 = 0.0
    vmin = math.inf
    vmax = -math.inf
    done = 0
    if progress:
        progress(0, total_bytes)
    for _, chunk in chunks:
        x = chunk.reshape(-1)
        if x.numel():
            fin = torch.isfinite(x)
            n_fin = int(fin.sum())
            if n_fin != x.numel():
                nan += int(torch.isnan(x).sum())
                inf += int(torch.isinf(x).sum())
                x = x[fin]
            if n_fin:
                xd = x.to(torch.float64)
                c_mean = float(xd.mean())
                c_m2 = float(((xd - c_mean) ** 2).sum())
                vmin = min(vmin, float(xd.min()))
                vmax = max(vmax, float(xd.max()))
                tot = count + n_fin
                delta = c_mean - mean
                mean += delta * n_fin / tot
                m2 += c_m2 + delta * delta * count * n_fin / tot
                count = tot
        done += chunk.numel() * chunk.element_size()
        if progress:
            progress(done, total_bytes)

    if header.format == "safetensors" and "mask" in header.tensors:
        info = header.tensors["mask"]
        mdata = store.get_range(key, header.data_offset + info.start, info.nbytes)
        mask = _tensor_from_bytes(mdata, info, info.shape, key, "mask")
        real = int(_as_bool(mask).sum())
    else:
        real = n * t
    tokens = n * t
    return {
        "key": key,
        "format": header.format,
        "dtype": header.dtype,
        "shape": [n, t, d],
        "tokens": tokens,
        "real_tokens": real,
        "masked_fraction": (tokens - real) / tokens if tokens else 0.0,
        "values": n * t * d,
        "finite_count": count,
        "nan_count": nan,
        "inf_count": inf,
        "min": vmin if count else None,
        "max": vmax if count else None,
        "mean": mean if count else None,
        "std": math.sqrt(m2 / count) if count else None,
        "bytes": total_bytes,
    }


def _slices(states: torch.Tensor, n: int, chunk_bytes: int) -> Iterator[tuple[int, torch.Tensor]]:
    row = max(1, states[0].numel() * states.element_size()) if n else 1
    per = max(1, chunk_bytes // row)
    for s in range(0, n, per):
        yield s, states[s : s + per]
