"""One table of the dtypes vaultsh stores, reads and names.

Each row gives a dtype's safetensors code (``"BF16"``, what a megabatch header
says), its name (``"bfloat16"``: the torch attribute, numpy's name where numpy
has the type; Activault writes ``"torch.bfloat16"``), its size in bytes, and
the numpy dtype that holds its raw values. numpy has no bfloat16 or float8:
those are kept as their bits (uint16, uint8) until something converts them.

Everything that turns one spelling into another goes through here: the
megabatch format, the reader, export, verify, the planner, the config schema,
`vaultsh hooks`. torch and numpy are imported only by the functions that hand
out their objects, so importing this module costs nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vaultsh.errors import FormatError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch


@dataclass(frozen=True)
class DType:
    code: str  # safetensors dtype code: "F32", "BF16", ...
    name: str  # torch attribute name ("float32", "bfloat16", "float8_e4m3fn", "bool")
    itemsize: int  # bytes per element
    raw_numpy: str  # numpy dtype of the stored values (bf16 and fp8: their raw bits)


_ROWS = (
    DType("F64", "float64", 8, "<f8"),
    DType("F32", "float32", 4, "<f4"),
    DType("F16", "float16", 2, "<f2"),
    DType("BF16", "bfloat16", 2, "<u2"),
    DType("F8_E4M3", "float8_e4m3fn", 1, "u1"),
    DType("F8_E5M2", "float8_e5m2", 1, "u1"),
    DType("I64", "int64", 8, "<i8"),
    DType("I32", "int32", 4, "<i4"),
    DType("I16", "int16", 2, "<i2"),
    DType("I8", "int8", 1, "i1"),
    DType("U64", "uint64", 8, "<u8"),
    DType("U32", "uint32", 4, "<u4"),
    DType("U16", "uint16", 2, "<u2"),
    DType("U8", "uint8", 1, "u1"),
    DType("BOOL", "bool", 1, "?"),
)

BY_CODE: dict[str, DType] = {d.code: d for d in _ROWS}
BY_NAME: dict[str, DType] = {d.name: d for d in _ROWS}
CODES: tuple[str, ...] = tuple(BY_CODE)

# The float dtypes a model computes in and a run stores its states as (`vaultsh hooks --dtype`, the planner).
FLOAT_NAMES: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")

# How people spell those (configs, `dtype=` of the reader), lower case; each name also stands for itself.
ALIASES: dict[str, str] = {
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "f16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "full": "float32",
    "float64": "float64",
    "fp64": "float64",
    "double": "float64",
}


def lookup(dtype: str) -> DType:
    """The row of a safetensors code ("F32") or a name ("float32"); FormatError when there is none."""
    d = BY_CODE.get(dtype) or BY_NAME.get(dtype)
    if d is None:
        raise FormatError(f"unknown dtype {dtype!r} (known: {', '.join(CODES)})")
    return d


def itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors code or a name ("F32" -> 4, "bfloat16" -> 2)."""
    return lookup(dtype).itemsize


def float_name(text: str) -> str | None:
    """The canonical float name of a spelling ("bf16", "torch.half" -> "bfloat16", "float16"); else None.

    Case is kept: callers that accept "BF16" lower-case it first.
    """
    name = text.strip()
    if name.startswith("torch."):
        name = name[len("torch.") :]
    return ALIASES.get(name)


def numpy_float(code: str) -> str | None:
    """The numpy float that holds a code's values as they are ("F16" -> "float16"); None for
    bf16 and fp8 (numpy has no such type) and for integers."""
    d = BY_CODE.get(code)
    return d.name if d is not None and d.raw_numpy.lstrip("<").startswith("f") else None


def code_of_name(name: str) -> str | None:
    """The safetensors code of a name, "torch." prefix allowed ("torch.float32" -> "F32"); else None."""
    d = BY_NAME.get(name.replace("torch.", ""))
    return d.code if d is not None else None


def activault_dtype_name(dtype: Any) -> str:
    """Activault's spelling of a dtype, e.g. 'torch.bfloat16' (its RCache evals it)."""
    s = str(dtype)
    if s.startswith("torch."):
        return s
    if not re.fullmatch(r"[a-z0-9_]+", s):
        raise ValueError(f"not a dtype name: {dtype!r}")
    return "torch." + s


# -- numpy and torch (imported on use) ----------------------------------------
def raw_numpy(code: str) -> np.dtype:
    """The numpy dtype of a code's stored values (bf16 -> uint16 bits, fp8 -> uint8 bits)."""
    import numpy as np

    return np.dtype(BY_CODE[code].raw_numpy)


def to_torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a safetensors code or a name ("BF16", "bfloat16" -> torch.bfloat16)."""
    import torch

    d = BY_CODE.get(dtype) or BY_NAME.get(dtype)
    dt = getattr(torch, d.name, None) if d is not None else None
    if dt is None:
        raise FormatError(f"dtype {dtype!r} is not supported by this torch ({torch.__version__})")
    return dt


def from_torch_dtype(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (torch.float16 -> "F16")."""
    import torch

    for d in _ROWS:
        if getattr(torch, d.name, None) == dtype:
            return d.code
    raise ValueError(f"torch dtype {dtype} has no safetensors equivalent")


def torch_dtype_by_name(name: str) -> torch.dtype | None:
    """The torch dtype called `name` ("bfloat16", "torch.float16"), looked up as an attribute, never
    eval'ed; None when torch has no dtype of that name."""
    import torch

    name = name[len("torch.") :] if name.startswith("torch.") else name
    dt = getattr(torch, name, None) if name.replace("_", "").isalnum() else None
    return dt if isinstance(dt, torch.dtype) else None
