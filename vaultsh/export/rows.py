"""Rows of an export: dtype conversion, row blocks per mode, Arrow tables.

A *block* is a dict of numpy arrays that share their first dimension (rows):

- sequences mode: `states [R, T, D]`, `input_ids [R, T]`, `mask [R, T]`,
  `megabatch [R]`, `sequence [R]`, `label_<name> [R, ...]`;
- tokens mode (unmasked tokens only): `states [R, D]`, `input_ids [R]`,
  `position [R]`, `megabatch [R]`, `sequence [R]`, `label_<name> [R, ...]`.

Extra dimensions become (nested) Arrow fixed-size lists, which `datasets`
loads as `Sequence(length=...)` features.

bf16 states are either widened to float32 (exact: the 16 bits become the top
half of a float32) or kept as their raw bits in a uint16 column
(`--dtype bfloat16`); cast back with `(x.astype(np.uint32) << 16).view(np.float32)`
or `torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)`.
"""

from __future__ import annotations

import numpy as np

from vaultsh.dtypes import BY_CODE, numpy_float
from vaultsh.errors import UserError

OUT_DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")
BF16_CAST = "(x.astype(np.uint32) << 16).view(np.float32)  # or torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)"

Block = dict  # name -> np.ndarray, same first dimension


def resolve_dtype(requested: str, stored: str, allowed: tuple[str, ...] = OUT_DTYPES, fmt: str = "") -> str:
    """The states dtype of the export: `auto` keeps float32/16/64 and widens bf16/fp8 to float32.

    `requested` must be one of `allowed`; `fmt` names the --format that allows only those."""
    if requested not in allowed:
        with_fmt = f" with --format {fmt}" if fmt else ""
        raise UserError(f"--dtype {requested!r} is not allowed{with_fmt}; use one of {', '.join(allowed)}")
    if requested != "auto":
        return requested
    return numpy_float(stored) or "float32"


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Raw bf16 bit patterns (uint16) -> float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounded to nearest even; NaNs stay NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    out = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((u[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)
    return out


def _fp8_to_f32(raw: np.ndarray, stored: str) -> np.ndarray:
    import torch

    from vaultsh.dtypes import to_torch_dtype

    t = torch.from_numpy(np.ascontiguousarray(raw)).view(to_torch_dtype(stored))
    return t.to(torch.float32).numpy()


def to_float32(raw: np.ndarray, stored: str) -> np.ndarray:
    """Any stored float (bf16/fp8 as raw bits) as float32."""
    if stored == "BF16":
        return bf16_bits_to_f32(raw)
    if stored.startswith("F8"):
        return _fp8_to_f32(raw, stored)
    return raw.astype(np.float32, copy=False)


def convert_states(raw: np.ndarray, stored: str, out: str) -> np.ndarray:
    """States in the export dtype (`out` already resolved); a view when nothing changes."""
    if out == "bfloat16":
        return raw if stored == "BF16" else f32_to_bf16_bits(to_float32(raw, stored))
    if numpy_float(stored):
        return raw.astype(out, copy=False)
    return to_float32(raw, stored).astype(out, copy=False)


def convert_label(arr: np.ndarray, stored: str) -> np.ndarray:
    """Label tensors: bf16/fp8 widened to float32, everything else as stored."""
    if stored == "BF16" or stored.startswith("F8"):
        return to_float32(arr, stored)
    return arr


class Rows:
    """Some rows of a 2-D array, picked by index but not copied (tokens-mode states).

    Unmasked tokens come in long runs of consecutive positions, so the Parquet
    writer writes each run straight from the fetched buffer (`chunks`) instead
    of gathering a copy of the whole megabatch first. Slicing gives another
    `Rows`; an index array, or numpy itself (`np.asarray`), gathers a copy.
    """

    def __init__(self, base: np.ndarray, sel: np.ndarray):
        self.base, self.sel = base, sel

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.sel),) + self.base.shape[1:]

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def itemsize(self) -> int:
        return self.base.itemsize

    @property
    def ndim(self) -> int:
        return self.base.ndim

    def __len__(self) -> int:
        return len(self.sel)

    def __getitem__(self, key):
        if isinstance(key, slice) and key.step in (None, 1):
            return Rows(self.base, self.sel[key])
        return self.base[self.sel[key]]

    def __array__(self, dtype=None, copy=None):
        out = self.base[self.sel]
        return out if dtype is None else out.astype(dtype, copy=False)

    def chunks(self):
        """Contiguous views of `base`, in order, that together are these rows."""
        if len(self.sel) == 0:
            return
        breaks = np.flatnonzero(np.diff(self.sel) != 1) + 1
        starts = np.concatenate([[0], breaks]).tolist()
        stops = np.concatenate([breaks, [len(self.sel)]]).tolist()
        for a, b in zip(starts, stops):
            first = int(self.sel[a])
            yield self.base[first : first + (b - a)]


def make_block(dec, megabatch: int, mode: str, out_dtype: str, labels: list[str]) -> Block:
    """The rows of one decoded megabatch (see the module docstring)."""
    n, t, d = dec.states.shape
    block: Block = {}
    if mode == "tokens":
        sel = np.flatnonzero(dec.mask.reshape(-1))
        flat = dec.states.reshape(n * t, d)
        stored = BY_CODE.get(dec.states_dtype)
        if stored is not None and stored.name == out_dtype:  # the export keeps the stored bytes as they are
            block["states"] = Rows(flat, sel)
        else:  # the conversion copies anyway
            block["states"] = convert_states(flat[sel], dec.states_dtype, out_dtype)
        block["input_ids"] = dec.input_ids.reshape(-1)[sel]
        block["position"] = (sel % t).astype(np.int32)
        seq = (sel // t).astype(np.int32)
    else:
        block["states"] = convert_states(dec.states, dec.states_dtype, out_dtype)
        block["input_ids"] = dec.input_ids
        block["mask"] = dec.mask
        seq = np.arange(n, dtype=np.int32)
    block["megabatch"] = np.full(len(seq), megabatch, dtype=np.int32)
    block["sequence"] = seq
    for name in labels:
        arr, stored = dec.labels[name]
        arr = convert_label(arr, stored)
        block[f"label_{name}"] = arr[seq] if mode == "tokens" else arr
    return block


def nrows(block: Block) -> int:
    return len(block["megabatch"])


def row_nbytes(block: Block) -> int:
    """Bytes of one row across all columns."""
    return sum(a.itemsize * int(np.prod(a.shape[1:], dtype=np.int64)) for a in block.values())


def take(block: Block, idx: np.ndarray) -> Block:
    return {k: a[idx] for k, a in block.items()}


def slice_rows(block: Block, start: int, stop: int) -> Block:
    return {k: a[start:stop] for k, a in block.items()}


def _arrow_type(a: np.ndarray):
    """Non-nullable (nested) fixed-size lists of the array's trailing dimensions."""
    import pyarrow as pa

    typ = pa.from_numpy_dtype(a.dtype)
    for size in reversed(a.shape[1:]):
        typ = pa.list_(pa.field("element", typ, nullable=False), int(size))
    return typ


def _arrow_array(a: np.ndarray, typ):
    import pyarrow as pa

    flat = np.ascontiguousarray(a).reshape(-1)
    arr = pa.array(flat)
    types = []
    t = typ
    while pa.types.is_fixed_size_list(t):
        types.append(t)
        t = t.value_type
    for lt in reversed(types):
        arr = pa.FixedSizeListArray.from_arrays(arr, type=lt)
    return arr


def schema_for(block: Block, out_dtype: str, metadata: dict[str, str]):
    """The Arrow schema of the export (field metadata says how to read bf16 bits)."""
    import pyarrow as pa

    fields = []
    for name, a in block.items():
        meta = None
        if name == "states" and out_dtype == "bfloat16":
            meta = {"vaultsh.dtype": "bfloat16", "vaultsh.cast": BF16_CAST}
        fields.append(pa.field(name, _arrow_type(a), nullable=False, metadata=meta))
    return pa.schema(fields, metadata=metadata)


def to_table(block: Block, schema):
    """A block as an Arrow table of `schema` (zero-copy for contiguous numeric columns)."""
    import pyarrow as pa

    return pa.Table.from_arrays([_arrow_array(block[f.name], f.type) for f in schema], schema=schema)
