"""vaultsh's own Parquet writer (vaultsh/export/pqwriter.py) against pyarrow's reader and writer."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import vaultsh.export.pqwriter as pqwriter
from vaultsh.export.parquet import fast_path
from vaultsh.export.pqwriter import FastParquetWriter
from vaultsh.export.rows import schema_for, to_table


def _block(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    t, d = 3, 5
    return {
        "states": rng.standard_normal((rows, t, d)).astype(np.float32),
        "input_ids": rng.integers(0, 50_000, (rows, t)),
        "mask": rng.random((rows, t)) > 0.4,
        "position": rng.integers(0, 100, rows).astype(np.int32),
        "half": rng.standard_normal((rows, 2)).astype(np.float16),
        "bits": rng.integers(0, 65_536, (rows, t, d)).astype(np.uint16),
        "score": rng.random(rows),
    }


def _write(block, schema, codecs, groups) -> bytes:
    buf = io.BytesIO()
    w = FastParquetWriter(buf, schema, codecs)
    for a, b in groups:
        w.write_block({k: v[a:b] for k, v in block.items()})
    w.close()
    return buf.getvalue()


@pytest.mark.parametrize("codec", ["none", "zstd", "snappy", "gzip"])
@pytest.mark.parametrize("page_bytes", [1 << 20, 40])  # one page per column chunk, and many
def test_fast_writer_round_trips_through_pyarrow(codec, page_bytes, monkeypatch):
    monkeypatch.setattr(pqwriter, "PAGE_VALUE_BYTES", page_bytes)
    rng = np.random.default_rng(0)
    block = _block(rng, 11)
    schema = schema_for(block, "float32", {"vaultsh.export": "{}"})
    data = _write(block, schema, {"states": codec, "input_ids": "zstd", "mask": codec}, [(0, 4), (4, 11)])
    f = pq.ParquetFile(io.BytesIO(data))
    assert f.metadata.num_rows == 11 and f.metadata.num_row_groups == 2
    table = f.read()
    assert table.schema.equals(schema, check_metadata=False)
    assert table.schema.metadata[b"vaultsh.export"] == b"{}"
    # the same values as pyarrow's own writer produces from the same block
    ref = io.BytesIO()
    pq.write_table(to_table(block, schema), ref)
    assert table.equals(pq.read_table(io.BytesIO(ref.getvalue())))
    for name, arr in block.items():
        got = np.asarray(table[name].to_pylist())
        assert np.array_equal(got, arr), name


def test_fast_writer_handles_a_large_nested_column():
    rng = np.random.default_rng(1)
    block = {"states": rng.standard_normal((4, 64, 96)).astype(np.float32), "sequence": np.arange(4, dtype=np.int32)}
    schema = schema_for(block, "float32", {})
    table = pq.read_table(io.BytesIO(_write(block, schema, {}, [(0, 4)])))
    states = np.asarray(table["states"].combine_chunks().flatten().flatten()).reshape(4, 64, 96)
    assert np.array_equal(states, block["states"])


def test_fast_path_only_for_supported_types():
    ok = pa.schema(
        [
            pa.field("states", pa.list_(pa.field("element", pa.float32(), nullable=False), 4), nullable=False),
            pa.field("input_ids", pa.int64(), nullable=False),
        ]
    )
    assert fast_path(ok)
    assert not fast_path(pa.schema([pa.field("x", pa.int8())])) and not fast_path(
        pa.schema([pa.field("s", pa.string())])
    )


def test_pyarrow_fallback_writes_the_same_export(tmp_path, monkeypatch):
    """The export through pyarrow's writer (forced) and through the fast writer load identically."""
    import datasets
    import torch

    from tests.test_export import HOOK, RUN, write_run
    from vaultsh.export import ExportOptions, export
    from vaultsh.store import LocalStore

    write_run(LocalStore(tmp_path / "vault"), dtype=torch.float16, n_files=2)
    src = str(tmp_path / "vault" / RUN / HOOK)
    export(src, str(tmp_path / "fast"), ExportOptions(mode="tokens"))
    monkeypatch.setenv("VAULTSH_EXPORT_PYARROW_WRITER", "1")
    export(src, str(tmp_path / "slow"), ExportOptions(mode="tokens"))
    a, b = (
        datasets.load_dataset(
            "parquet", data_files=f"{tmp_path / n}/*.parquet", split="train", cache_dir=str(tmp_path / f"hf-{n}")
        )
        for n in ("fast", "slow")
    )
    assert a.features == b.features
    assert a.data.table.equals(b.data.table)


def _levels_one_by_one(sizes: tuple[int, ...]) -> list[int]:
    """Repetition levels of one row, value by value, straight from the definition."""
    n = int(np.prod(sizes))
    strides = [int(np.prod(sizes[i + 1 :])) for i in range(len(sizes))]  # values per list at level i+1
    levels = []
    for j in range(n):
        restarting = [i + 1 for i, st in enumerate(strides) if j % st == 0]
        levels.append(0 if j == 0 else min(restarting))
    return levels


def _decode_runs(data: bytes, width: int) -> list[int]:
    out, i = [], 0
    while i < len(data):
        header, shift = 0, 0
        while True:
            b = data[i]
            i += 1
            header |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        assert header & 1 == 0, "only RLE runs are written"
        out += [int.from_bytes(data[i : i + width], "little")] * (header >> 1)
        i += width
    return out


@pytest.mark.parametrize("sizes", [(1,), (7,), (1, 1), (3, 1), (1, 4), (3, 5), (2, 3, 4), (4, 1, 2), (64, 128)])
def test_repetition_pattern_matches_the_definition(sizes):
    pqwriter._rep_pattern.cache_clear()
    assert _decode_runs(pqwriter._rep_pattern(sizes), 1) == _levels_one_by_one(sizes)


def test_rows_are_the_picked_rows_without_a_copy_until_asked():
    from vaultsh.export.rows import Rows

    base = np.arange(40, dtype=np.float32).reshape(10, 4)
    sel = np.array([1, 2, 3, 5, 8, 9])
    rows = Rows(base, sel)
    assert rows.shape == (6, 4) and len(rows) == 6 and rows.dtype == np.float32
    assert np.array_equal(np.asarray(rows), base[sel])
    chunks = list(rows.chunks())
    assert [len(c) for c in chunks] == [3, 1, 2] and all(np.shares_memory(c, base) for c in chunks)
    assert np.array_equal(np.concatenate(chunks), base[sel])
    part = rows[2:5]
    assert isinstance(part, Rows) and np.array_equal(np.asarray(part), base[sel[2:5]])
    assert np.array_equal(rows[np.array([4, 0])], base[[8, 1]])
    assert list(Rows(base, sel[:0]).chunks()) == []


def test_fast_writer_writes_picked_rows_like_a_gathered_copy():
    from vaultsh.export.rows import Rows

    rng = np.random.default_rng(3)
    base = rng.standard_normal((50, 6)).astype(np.float32)
    sel = np.flatnonzero(rng.random(50) > 0.3)
    schema = pa.schema(
        [pa.field("states", pa.list_(pa.field("element", pa.float32(), nullable=False), 6), nullable=False)]
    )
    outs = []
    for states in (Rows(base, sel), base[sel]):
        buf = io.BytesIO()
        w = FastParquetWriter(buf, schema, {"states": "none"})
        w.write_block({"states": states[: len(sel) // 2]})
        w.write_block({"states": states[len(sel) // 2 :]})
        w.close()
        outs.append(buf.getvalue())
    assert outs[0] == outs[1]
    got = pq.read_table(io.BytesIO(outs[0])).column("states").to_pylist()
    assert np.array_equal(np.array(got, dtype=np.float32), base[sel])
