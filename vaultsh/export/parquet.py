"""Writing one Parquet shard atomically through a Store.

`Store.put_stream` gives the atomicity: LocalStore writes a hidden temp file
in OUT and renames it into place (fsynced first only with `durable`, i.e.
`vaultsh export --fsync`; otherwise a resume checks finished shards, see
core.shard_intact); S3Store streams it as one
multipart upload (vaultsh/store/s3stream.py), which appears only when
complete. A writer that raises (an interrupt, a row count that does not
match the plan) leaves nothing under the shard's name.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable

import numpy as np

from vaultsh.errors import FormatError, UserError
from vaultsh.export.pqwriter import SUPPORTED, FastParquetWriter
from vaultsh.export.rows import Block, nrows, row_nbytes, slice_rows, to_table
from vaultsh.store import Store

ROW_GROUP_BYTES = 128 << 20
SMALL_CODEC = "zstd"
CODECS = ("none", "snappy", "zstd", "gzip", "brotli")
_STATS_COLUMNS = ("megabatch", "sequence", "position")


class Stopped(UserError):
    """The export was interrupted; the shard being written was discarded."""


def rows_per_group(row_bytes: int) -> int:
    """Rows of one row group: about ROW_GROUP_BYTES of data (at least one row)."""
    return max(1, ROW_GROUP_BYTES // max(1, row_bytes))


def fast_path(schema) -> bool:
    """True when vaultsh's own writer (pqwriter) handles every column of `schema`."""
    import pyarrow as pa

    if os.environ.get("VAULTSH_EXPORT_PYARROW_WRITER"):
        return False
    for f in schema:
        t = f.type
        while pa.types.is_fixed_size_list(t):
            t = t.value_type
        try:
            dt = np.dtype(np.float16) if pa.types.is_float16(t) else np.dtype(t.to_pandas_dtype())
        except (NotImplementedError, TypeError):
            return False
        if dt not in SUPPORTED:
            return False
    return True


def writer_kwargs(schema, compression: str) -> dict:
    """ParquetWriter options: states with the chosen codec, the small columns zstd, no dictionaries."""
    if compression not in CODECS:
        raise UserError(f"--compression {compression!r} is not allowed; use one of {', '.join(CODECS)}")
    codecs = {f.name: SMALL_CODEC for f in schema}
    codecs["states"] = compression
    return {
        "compression": codecs,
        "use_dictionary": False,
        "write_statistics": [c for c in _STATS_COLUMNS if c in schema.names],
    }


def write_shard(
    store: Store,
    name: str,
    schema,
    blocks: Iterable[tuple[Block, int]],
    compression: str,
    expect_rows: int,
    on_block: Callable[[int, int], object] | None = None,
    stop: threading.Event | None = None,
    durable: bool = False,
) -> tuple[int, int]:
    """Write the `(block, source_bytes)` pairs as shard `name`; returns (rows, bytes of the file).

    Each block is cut into row groups of about ROW_GROUP_BYTES. `on_block(rows,
    source_bytes)` is called after each block. The shard is refused (nothing
    stored) unless exactly `expect_rows` rows were written. `durable` fsyncs
    the shard before it appears, syncing after each block on the way (spreads
    the write-back over the export instead of one long final fsync).
    """
    import pyarrow.parquet as pq

    kwargs = writer_kwargs(schema, compression)
    fast = fast_path(schema)
    done = {"rows": 0, "bytes": 0}

    def write(f) -> None:
        start = f.tell()
        local = _has_fd(f)  # a real file (LocalStore's temp file), not a multipart upload stream
        put: Callable[[Block], object]
        if fast:
            w = FastParquetWriter(f, schema, kwargs["compression"])
            put = w.write_block
        else:
            w = pq.ParquetWriter(f, schema, **kwargs)
            put = lambda part: w.write_table(to_table(part, schema), row_group_size=nrows(part))  # noqa: E731
        for block, src_bytes in blocks:  # an error leaves the file unfinished: put_stream discards it
            if stop is not None and stop.is_set():
                raise Stopped("export interrupted")
            n = nrows(block)
            step = rows_per_group(row_nbytes(block))
            for a in range(0, n, step):
                put(slice_rows(block, a, min(n, a + step)))
            done["rows"] += n
            if durable and local:  # write back while the next megabatch downloads, not all at the final fsync
                f.flush()
                os.fdatasync(f.fileno())
            if on_block is not None:
                on_block(n, src_bytes)
        w.close()
        if done["rows"] != expect_rows:
            raise FormatError(
                f"{store.child_uri(name)}: {done['rows']} rows read, the export plan says {expect_rows} "
                "(did the run's committed files change since the export started?)"
            )
        done["bytes"] = f.tell() - start

    store.put_stream(name, write, durable=durable)
    return done["rows"], done["bytes"]


def _has_fd(f) -> bool:
    """True when `f` is backed by an OS file descriptor (so fdatasync applies)."""
    try:
        f.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True
