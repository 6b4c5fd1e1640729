"""Stand-ins shared by several test files (and the benchmarks): a counting store proxy, a fake streamed hub,
Activault's metadata.json."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vaultsh.run import metadata_for

#: the fields of Activault's own metadata.json, in its order (vaultsh's adds hook, site, layer, format, ...)
ACTIVAULT_METADATA_FIELDS = (
    "batch_size",
    "sequence_length",
    "dtype",
    "d_in",
    "batches_per_file",
    "shape",
    "input_ids_shape",
    "bytes_per_file",
)


class CountingStore:
    """Proxy over a store that counts ranged reads, whole reads and bytes read."""

    def __init__(self, inner):
        self.inner = inner
        self.uri = inner.uri
        self.range_calls: list[tuple[str, int, int]] = []
        self.bytes_read = 0
        self.get_bytes_calls = 0

    @property
    def calls(self) -> int:
        """Reads of either kind."""
        return len(self.range_calls) + self.get_bytes_calls

    def get_range(self, key, start, length):
        data = self.inner.get_range(key, start, length)
        self.range_calls.append((key, start, length))
        self.bytes_read += len(data)
        return data

    def get_bytes(self, key):
        data = self.inner.get_bytes(key)
        self.get_bytes_calls += 1
        self.bytes_read += len(data)
        return data

    def reset(self):
        self.range_calls.clear()
        self.bytes_read = 0
        self.get_bytes_calls = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)


class FakeStream:
    """A streamed hub data set (`datasets.IterableDataset`) over `rows`: `shuffle` is recorded in `calls` and
    reverses the rows."""

    def __init__(self, rows: list[dict], calls: dict[str, Any]):
        self.rows, self.calls = rows, calls

    def shuffle(self, seed, buffer_size):
        self.calls["shuffle"] = (seed, buffer_size)
        return FakeStream(self.rows[::-1], self.calls)

    def __iter__(self):
        return iter(self.rows)


def fake_load_dataset(rows: list[dict]) -> tuple[Callable[..., FakeStream], dict[str, Any]]:
    """A stand-in for `datasets.load_dataset` that streams `rows`, and the dict it records its calls in:
    calls["load"] = (path, name, split, streaming), calls["shuffle"] = (seed, buffer_size)."""
    calls: dict[str, Any] = {}

    def load_dataset(path, name=None, split=None, streaming=False):
        calls["load"] = (path, name, split, streaming)
        return FakeStream(rows, calls)

    return load_dataset, calls


def activault_metadata(**sizes: Any) -> dict[str, Any]:
    """metadata.json as Activault writes it: `metadata_for(**sizes)` (shapes derived the same way) without the
    fields vaultsh adds."""
    return {k: v for k, v in metadata_for(hook="", **sizes).items() if k in ACTIVAULT_METADATA_FIELDS}
