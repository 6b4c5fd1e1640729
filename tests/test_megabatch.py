"""The megabatch format: round trips, header-only reads, slices, refusal of bad files."""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fakes import CountingStore
from vaultsh import dtypes
from vaultsh import megabatch as mb
from vaultsh.errors import FormatError, UserError
from vaultsh.store.local import LocalStore


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


@pytest.fixture
def cstore(store):
    return CountingStore(store)


def make(n=4, t=6, d=8, dtype=torch.float32, seed=0, ids_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(n, t, d, generator=g).to(dtype)
    ids = torch.randint(0, 49152, (n, t), generator=g).to(ids_dtype)
    mask = torch.rand(n, t, generator=g) > 0.2
    return states, ids, mask


def raw_file(store, key, data: bytes):
    store.put_bytes(key, data)
    return key


def st_bytes(header: dict, data: bytes = b"", pad: bool = True) -> bytes:
    js = json.dumps(header).encode()
    if pad:
        js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js + data


def good_header_dict(n=2, t=3, d=4):
    sb = n * t * d * 4
    ib = n * t * 8
    return {
        "states": {"dtype": "F32", "shape": [n, t, d], "data_offsets": [0, sb]},
        "input_ids": {"dtype": "I64", "shape": [n, t], "data_offsets": [sb, sb + ib]},
    }, sb + ib


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_exact(store, dtype):
    states, ids, mask = make(dtype=dtype)
    labels = {"source": torch.tensor([0, 1, 2, 1]), "score": torch.randn(4, 2)}
    meta = {"run": "r1", "hook": "blocks.3.hook_resid_post", "model": "SmolLM2", "megabatch": 7, "lr": 0.5}
    n = mb.write_megabatch(store, "h/mb.safetensors", states, ids, mask, labels, meta)
    assert n == store.head("h/mb.safetensors").size

    got = mb.read_megabatch(store, "h/mb.safetensors")
    assert got.states.dtype == dtype and torch.equal(got.states, states)
    assert got.input_ids.dtype == torch.int64 and torch.equal(got.input_ids, ids)
    assert got.mask.dtype == torch.bool and torch.equal(got.mask, mask)
    assert set(got.labels) == {"source", "score"}
    for k, v in labels.items():
        assert torch.equal(got.labels[k], v)
    h = got.header
    assert (h.n_sequences, h.seq_len, h.d_model) == (4, 6, 8)
    assert h.dtype == dtypes.from_torch_dtype(dtype)
    assert h.label_names == ["score", "source"]
    assert h.hook == "blocks.3.hook_resid_post" and h.model == "SmolLM2"
    assert h.metadata["megabatch"] == "7" and h.metadata["lr"] == "0.5"
    assert h.metadata["format"] == mb.FORMAT_NAME and h.metadata["format_version"] == "1"
    json.dumps(h.to_dict())  # JSON-serialisable
    # the tensors come back writable and independent of any buffer
    got.states.add_(1)


def test_int32_input_ids_and_default_mask(store):
    states, ids, _ = make(ids_dtype=torch.int32)
    mb.write_megabatch(store, "a", states, ids)
    got = mb.read_megabatch(store, "a")
    assert got.input_ids.dtype == torch.int32 and torch.equal(got.input_ids, ids)
    assert got.mask.all() and got.mask.shape == ids.shape
    assert got.labels == {}


def test_non_contiguous_inputs(store):
    states, ids, mask = make(n=6)
    s = states.transpose(0, 1).contiguous().transpose(0, 1)  # same values, not contiguous
    assert not s.is_contiguous()
    mb.write_megabatch(store, "a", s, ids[:, :], mask)
    assert torch.equal(mb.read_megabatch(store, "a").states, states)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_file_is_valid_safetensors(store, dtype):
    states, ids, mask = make(dtype=dtype)
    labels = {"doc": torch.arange(4, dtype=torch.int32)}
    mb.write_megabatch(store, "a.safetensors", states, ids, mask, labels, {"hook": "mlp_3"})
    path = store.child_uri("a.safetensors")
    data = store.get_bytes("a.safetensors")
    (n,) = struct.unpack("<Q", data[:8])
    assert (8 + n) % 8 == 0  # header padded like safetensors pads it

    loaded = safetensors.torch.load(data)
    assert set(loaded) == {"states", "input_ids", "mask", "labels.doc"}
    ours = mb.read_megabatch(store, "a.safetensors")
    assert torch.equal(loaded["states"], ours.states)
    assert torch.equal(loaded["input_ids"], ours.input_ids)
    assert torch.equal(loaded["mask"], ours.mask)
    assert torch.equal(loaded["labels.doc"], ours.labels["doc"])
    with safetensors.safe_open(path, framework="pt") as f:
        assert f.metadata()["hook"] == "mlp_3"
        assert f.metadata()["format"] == mb.FORMAT_NAME
        assert torch.equal(f.get_tensor("states"), states)
        assert f.get_slice("states")[2:3].shape == (1, 6, 8)


def test_reads_foreign_safetensors_writer(store):
    """A file written by safetensors itself (same tensors) reads the same."""
    states, ids, mask = make(dtype=torch.bfloat16)
    data = safetensors.torch.save({"states": states, "input_ids": ids, "mask": mask}, metadata={"hook": "x"})
    store.put_bytes("f.safetensors", data)
    got = mb.read_megabatch(store, "f.safetensors")
    assert torch.equal(got.states, states) and torch.equal(got.mask, mask)
    assert mb.read_header(store, "f.safetensors").hook == "x"


def test_empty_megabatch_round_trip(store):
    states, ids, _ = make(n=0)
    mb.write_megabatch(store, "e", states, ids)
    got = mb.read_megabatch(store, "e")
    assert got.states.shape == (0, 6, 8) and got.header.n_sequences == 0
    with pytest.raises(mb.SequenceIndexError):
        mb.read_sequence(store, "e", 0)
    assert mb.scan_states(store, "e")["nan_count"] == 0


def test_write_rejects_bad_arguments(store):
    states, ids, mask = make()
    with pytest.raises(ValueError):
        mb.write_megabatch(store, "a", states[0], ids)
    with pytest.raises(ValueError):
        mb.write_megabatch(store, "a", states, ids[:, :3])
    with pytest.raises(ValueError):
        mb.write_megabatch(store, "a", states, ids.float())
    with pytest.raises(ValueError):
        mb.write_megabatch(store, "a", states.to(torch.int32), ids)
    with pytest.raises(ValueError):
        mb.write_megabatch(store, "a", states, ids, mask[:2])
    with pytest.raises(ValueError):
        mb.write_megabatch(store, "a", states, ids, labels={"x": torch.zeros(3)})
    with pytest.raises(UserError):
        mb.write_megabatch(store, "a", states, ids, fmt="npz")
    assert not store.exists("a")


def test_dtype_table_round_trips():
    for name in dtypes.CODES:
        assert dtypes.raw_numpy(name).itemsize == dtypes.itemsize(name) == dtypes.itemsize(dtypes.BY_CODE[name].name)
        try:
            dt = dtypes.to_torch_dtype(name)
        except FormatError:
            continue  # not in this torch
        assert dtypes.from_torch_dtype(dt) == name
        assert torch.empty(0, dtype=dt).element_size() == dtypes.itemsize(name)
    with pytest.raises(FormatError):
        dtypes.itemsize("F128")


def test_module_imports_without_torch():
    code = "import vaultsh.megabatch, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- header-only reads


def test_read_header_is_small_and_size_independent(cstore):
    small_states, small_ids, _ = make(n=2, t=4, d=8)
    big_states, big_ids, _ = make(n=64, t=128, d=256)  # 8 MiB of float32
    mb.write_megabatch(cstore, "small", small_states, small_ids, metadata={"hook": "h"})
    mb.write_megabatch(cstore, "big", big_states, big_ids, metadata={"hook": "h"})
    assert cstore.head("big").size > 8 << 20

    read = {}
    for key in ("small", "big"):
        cstore.reset()
        h = mb.read_header(cstore, key)
        assert cstore.get_bytes_calls == 0
        assert len(cstore.range_calls) <= 2
        read[key] = cstore.bytes_read
        assert h.file_size == cstore.head(key).size
    assert (mb.read_header(cstore, "big").n_sequences, mb.read_header(cstore, "big").d_model) == (64, 256)
    assert read["big"] < 1 << 20
    assert read["big"] <= 64 << 10  # one probe read covers a normal header


def test_read_header_long_header_takes_two_reads(cstore):
    states, ids, _ = make()
    meta = {f"k{i}": "v" * 100 for i in range(1000)}  # ~110 KB header > 64 KiB probe
    mb.write_megabatch(cstore, "a", states, ids, metadata=meta)
    cstore.reset()
    h = mb.read_header(cstore, "a")
    assert len(cstore.range_calls) == 2 and cstore.get_bytes_calls == 0
    assert h.metadata["k999"] == "v" * 100
    assert cstore.bytes_read == h.data_offset  # exactly the header, no data


def test_read_megabatch_names_reads_only_those(cstore):
    states, ids, mask = make(n=16, t=32, d=64)
    labels = {"y": torch.arange(16)}
    mb.write_megabatch(cstore, "a", states, ids, mask, labels)
    h = mb.read_header(cstore, "a")
    cstore.reset()
    got = mb.read_megabatch(cstore, "a", names=["input_ids", "labels.y"])
    assert got.states is None and got.mask is None
    assert torch.equal(got.input_ids, ids) and torch.equal(got.labels["y"], labels["y"])
    assert cstore.get_bytes_calls == 0
    wanted = h.tensors["input_ids"].nbytes + h.tensors["labels.y"].nbytes
    assert cstore.bytes_read - h.data_offset <= wanted + (64 << 10)
    assert cstore.bytes_read < h.tensors["states"].nbytes

    only = mb.read_megabatch(cstore, "a", names=["states"])
    assert torch.equal(only.states, states) and only.input_ids is None
    with pytest.raises(FormatError, match="no tensor 'nope'"):
        mb.read_megabatch(cstore, "a", names=["nope"])


# ---------------------------------------------------------------- sequences


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_sequence_matches_slices(cstore, dtype):
    states, ids, mask = make(n=9, t=7, d=5, dtype=dtype)
    labels = {"src": torch.arange(9) * 3, "vec": torch.randn(9, 2)}
    mb.write_megabatch(cstore, "a", states, ids, mask, labels)
    h = mb.read_header(cstore, "a")
    for i in (0, 1, 4, 8, -1):
        cstore.reset()
        seq = mb.read_sequence(cstore, "a", i, header=h)
        j = i % 9
        assert seq["index"] == j
        assert torch.equal(seq["states"], states[j]) and seq["states"].shape == (7, 5)
        assert torch.equal(seq["input_ids"], ids[j])
        assert torch.equal(seq["mask"], mask[j])
        assert torch.equal(seq["labels"]["src"], labels["src"][j])
        assert torch.equal(seq["labels"]["vec"], labels["vec"][j])
        # one ranged read per tensor, each exactly one sequence's bytes
        assert len(cstore.range_calls) == len(h.tensors)
        assert cstore.bytes_read == sum(t.nbytes // 9 for t in h.tensors.values())
    seq = mb.read_sequence(cstore, "a", 3)  # header read on demand
    assert torch.equal(seq["states"], states[3])


def test_read_sequence_bad_index(store):
    states, ids, _ = make(n=4)
    mb.write_megabatch(store, "a", states, ids)
    for bad in (4, 100, -5):
        with pytest.raises(mb.SequenceIndexError, match=r"valid: 0\.\.3"):
            mb.read_sequence(store, "a", bad)
    with pytest.raises(UserError):
        mb.read_sequence(store, "a", 4)
    with pytest.raises(IndexError):
        mb.read_sequence(store, "a", 4)


# ---------------------------------------------------------------- pt format


def test_pt_round_trip(store):
    states, ids, mask = make(dtype=torch.bfloat16)
    n = mb.write_megabatch(store, "h/x.saved.pt", states, ids, mask, metadata={"hook": "h"}, fmt="pt")
    assert n == store.head("h/x.saved.pt").size
    # Activault's reader: torch.load of the whole object, a dict
    raw = torch.load(io.BytesIO(store.get_bytes("h/x.saved.pt")), weights_only=True)
    assert set(raw) == {"states", "input_ids", "tensor_bytes"}
    assert raw["tensor_bytes"] == states.numel() * 2 + ids.numel() * 8
    got = mb.read_megabatch(store, "h/x.saved.pt")
    assert torch.equal(got.states, states) and torch.equal(got.input_ids, ids)
    assert got.mask.all() and got.mask.shape == ids.shape
    h = mb.read_header(store, "h/x.saved.pt")
    assert h.format == "pt" and (h.n_sequences, h.seq_len, h.d_model, h.dtype) == (4, 6, 8, "BF16")
    seq = mb.read_sequence(store, "h/x.saved.pt", 2)
    assert torch.equal(seq["states"], states[2]) and seq["mask"].all()
    chunks = list(mb.iter_states_chunks(store, "h/x.saved.pt", h, chunk_bytes=200))
    assert torch.equal(torch.cat([c for _, c in chunks]), states)


def test_activault_shaped_pt_readable(store):
    """A file exactly as Activault's HookUploader writes it (torch.save to a buffer)."""
    states = torch.randn(8, 16, 32, dtype=torch.float16)
    ids = torch.randint(0, 1000, (8, 16))
    buf = io.BytesIO()
    torch.save({"states": states, "input_ids": ids, "tensor_bytes": states.numel() * 2 + ids.numel() * 8}, buf)
    store.put_bytes("run/blocks.1.hook_resid_post/abc--1_0.saved.pt", buf.getvalue())
    got = mb.read_megabatch(store, "run/blocks.1.hook_resid_post/abc--1_0.saved.pt")
    assert torch.equal(got.states, states) and torch.equal(got.input_ids, ids)
    stats = mb.scan_states(store, "run/blocks.1.hook_resid_post/abc--1_0.saved.pt")
    assert stats["format"] == "pt" and stats["tokens"] == 128 and stats["nan_count"] == 0


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class _Loud:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("container", ["raw-pickle", "torch-zip"])
def test_malicious_pickle_refused_and_not_executed(store, tmp_path, capsys, container):
    marker = tmp_path / "pwned"
    payload = {
        "states": torch.zeros(1, 1, 1),
        "input_ids": torch.zeros(1, 1, dtype=torch.long),
        "x": _Evil(str(marker)),
        "y": _Loud(),
    }
    if container == "raw-pickle":
        data = pickle.dumps(payload, protocol=2)
    else:
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
    store.put_bytes("evil.saved.pt", data)
    for call in (
        lambda: mb.read_megabatch(store, "evil.saved.pt"),
        lambda: mb.read_header(store, "evil.saved.pt"),
        lambda: mb.read_sequence(store, "evil.saved.pt", 0),
        lambda: mb.scan_states(store, "evil.saved.pt"),
    ):
        with pytest.raises(FormatError) as ei:
            call()
        msg = str(ei.value)
        assert "\n" not in msg and "evil.saved.pt" in msg
        assert "refused" in msg or "corrupt" in msg
    assert not marker.exists()
    assert "pwned" not in capsys.readouterr().out


def test_pt_foreign_contents_refused(store):
    def save(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    cases = {
        "tensor.pt": save(torch.zeros(3)),
        "nostates.pt": save({"weights": torch.zeros(3)}),
        "flatstates.pt": save({"states": torch.zeros(3, 4), "input_ids": torch.zeros(3, dtype=torch.long)}),
        "badids.pt": save({"states": torch.zeros(2, 3, 4), "input_ids": torch.zeros(2, 5, dtype=torch.long)}),
        "truncated.pt": save({"states": torch.zeros(2, 3, 4), "input_ids": torch.zeros(2, 3)})[:200],
    }
    for key, data in cases.items():
        store.put_bytes(key, data)
        with pytest.raises(FormatError, match=key.replace(".", r"\.")):
            mb.read_megabatch(store, key)
        with pytest.raises(FormatError):
            mb.read_header(store, key)


# ---------------------------------------------------------------- bad files


def test_truncated_safetensors_refused(store):
    states, ids, mask = make(n=8, t=16, d=32)
    mb.write_megabatch(store, "good", states, ids, mask, metadata={"hook": "h"})
    data = store.get_bytes("good")
    (n,) = struct.unpack("<Q", data[:8])
    cuts = [0, 1, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, len(data) // 2, len(data) - 1]
    for cut in cuts:
        key = f"cut{cut}"
        store.put_bytes(key, data[:cut])
        for fn in (mb.read_header, mb.read_megabatch):
            with pytest.raises(FormatError) as ei:
                fn(store, key)
            assert key in str(ei.value) and "\n" not in str(ei.value)
        with pytest.raises(FormatError):
            mb.parse_header(data[:cut], cut)
    with pytest.raises(FormatError, match="truncated"):
        mb.read_header(store, f"cut{len(data) - 1}")
    with pytest.raises(FormatError, match="empty"):
        mb.read_header(store, "cut0")


def test_foreign_files_refused(store):
    rng = np.random.default_rng(0)
    files = {
        "random.bin": rng.bytes(4096),
        "conf.json": json.dumps({"batch_size": 32, "dtype": "torch.float32"}).encode(),
        "list.json": b"[1, 2, 3]" + b" " * 100,
        "empty": b"",
        "text.txt": b"hello world, this is not a megabatch\n" * 10,
        "tiny": b"\x05\x00",
    }
    for key, data in files.items():
        store.put_bytes(key, data)
        for fn in (mb.read_header, mb.read_megabatch):
            with pytest.raises(FormatError) as ei:
                fn(store, key)
            assert key in str(ei.value) and "\n" not in str(ei.value)
    with pytest.raises(FormatError, match="JSON file"):
        mb.read_header(store, "conf.json")
    # safetensors, but not a megabatch
    store.put_bytes("weights.safetensors", safetensors.torch.save({"w": torch.zeros(3, 3)}))
    with pytest.raises(FormatError, match="missing tensor 'states'"):
        mb.read_header(store, "weights.safetensors")


def test_header_length_exceeds_file(store):
    data = struct.pack("<Q", 8319483291) + b"{" + b"x" * 111
    assert len(data) == 120
    store.put_bytes("liar", data)
    with pytest.raises(
        FormatError, match="liar: not a safetensors megabatch: header length 8319483291 exceeds file size 120"
    ):
        mb.read_header(store, "liar")
    data = struct.pack("<Q", 5000) + b'{"states":' + b" " * 102
    store.put_bytes("short", data)
    with pytest.raises(FormatError, match="5000 bytes but the file has only 120"):
        mb.read_header(store, "short")
    with pytest.raises(FormatError, match="header length 9 exceeds file size 12"):
        mb.parse_header(struct.pack("<Q", 9) + b"abcd", 12)


def _bad(hdr, data_len, match, meta=None):
    if meta is not None:
        hdr = {"__metadata__": meta, **hdr}
    blob = st_bytes(hdr, b"\0" * data_len)
    with pytest.raises(FormatError, match=match):
        mb.parse_header(blob, len(blob), key="k")


def test_inconsistent_offsets_and_shapes_refused():
    hdr, size = good_header_dict()
    blob = st_bytes(hdr, b"\0" * size)
    h = mb.parse_header(blob, len(blob))
    assert h.n_sequences == 2 and h.data_offset == len(blob) - size

    def mod(name, **kw):
        h2 = json.loads(json.dumps(hdr))
        h2[name].update(kw)
        return h2

    _bad(mod("states", data_offsets=[0, 95]), size, "needs 96 bytes")
    _bad(mod("input_ids", data_offsets=[90, 138]), size, "overlaps")
    _bad(mod("input_ids", data_offsets=[100, 148]), size + 4, "gap")
    _bad(mod("input_ids", data_offsets=[96, 144]), size + 10, "unexplained bytes")
    _bad(mod("input_ids", data_offsets=[200, 248]), size, "truncated")
    _bad(mod("input_ids", data_offsets=[144, 96]), size, "invalid data_offsets")
    _bad(mod("input_ids", data_offsets=[96]), size, "invalid data_offsets")
    _bad(mod("states", dtype="F33"), size, "unknown dtype")
    _bad(mod("states", shape=[2, 3, -4]), size, "invalid shape")
    _bad(mod("states", shape=[2, 12], data_offsets=[0, 96]), size, "3-D")
    _bad(mod("input_ids", shape=[3, 2]), size, "input_ids")
    _bad(mod("input_ids", dtype="F64"), size, "integer")
    _bad({"states": hdr["states"]}, 96, "missing tensor 'input_ids'")
    _bad(hdr, size, "__metadata__", meta={"n": 1})
    _bad(hdr, size, "newer vaultsh", meta={"format": mb.FORMAT_NAME, "format_version": "99"})
    _bad({**hdr, "labels.x": {"dtype": "I64", "shape": [3], "data_offsets": [144, 168]}}, size + 24, "labels.x")
    _bad({**hdr, "mask": {"dtype": "BOOL", "shape": [2, 2], "data_offsets": [144, 148]}}, size + 4, "mask")
    # duplicate keys and non-object JSON
    js = (
        b'{"states":{"dtype":"F32","shape":[1,1,1],"data_offsets":[0,4]},'
        b'"states":{"dtype":"F32","shape":[1,1,1],"data_offsets":[0,4]}}'
    )
    blob = struct.pack("<Q", len(js)) + js + b"\0" * 4
    with pytest.raises(FormatError, match="duplicate"):
        mb.parse_header(blob, len(blob))
    blob = struct.pack("<Q", 8) + b"[1,2,3] "
    with pytest.raises(FormatError):
        mb.parse_header(blob, len(blob))
    blob = struct.pack("<Q", 8) + b"{\xff\xfe    }"
    with pytest.raises(FormatError, match="not valid JSON"):
        mb.parse_header(blob, len(blob))


def test_parse_header_reports_pt_by_magic():
    buf = io.BytesIO()
    torch.save({"states": torch.zeros(1, 1, 1)}, buf)
    assert mb.parse_header(buf.getvalue()[:64], None).format == "pt"
    assert mb.parse_header(pickle.dumps({"a": 1}, protocol=2), None).format == "pt"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.one_of(st.none(), st.integers(0, 10**6)))
def test_parse_header_only_raises_format_error(data, size):
    try:
        mb.parse_header(data, size)
    except FormatError as e:
        assert "\n" not in str(e)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_parse_header_survives_corrupted_real_headers(data):
    states, ids, mask = make(n=2, t=3, d=4)
    prefix, order = mb.build_header({"states": states, "input_ids": ids, "mask": mask}, {"a": "b"})
    blob = bytearray(prefix + b"".join(bytes(mb._raw_view(t)) for _, t in order))
    pos = data.draw(st.integers(0, len(prefix) - 1))
    blob[pos] = data.draw(st.integers(0, 255))
    try:
        mb.parse_header(bytes(blob), len(blob))
    except FormatError as e:
        assert "\n" not in str(e)


# ---------------------------------------------------------------- scans


def test_iter_states_chunks_covers_every_sequence_once(store):
    states, ids, _ = make(n=13, t=5, d=7)
    mb.write_megabatch(store, "a", states, ids)
    h = mb.read_header(store, "a")
    row = 5 * 7 * 4
    for chunk_bytes in (1, row, row + 1, 3 * row, 100 * row):
        seen = []
        parts = []
        for start, chunk in mb.iter_states_chunks(store, "a", h, chunk_bytes=chunk_bytes):
            assert chunk.shape[1:] == (5, 7) and chunk.shape[0] >= 1
            assert chunk.numel() * 4 <= max(chunk_bytes, row)
            seen.extend(range(start, start + chunk.shape[0]))
            parts.append(chunk)
        assert seen == list(range(13))
        assert torch.equal(torch.cat(parts), states)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scan_states_counts_and_stats(store, dtype):
    states, ids, mask = make(n=10, t=8, d=16, dtype=dtype)
    flat = states.view(-1)
    flat[[3, 50, 777]] = float("nan")
    flat[[10, 900]] = float("inf")
    flat[1000] = float("-inf")
    mb.write_megabatch(store, "a", states, ids, mask)
    calls = []
    res = mb.scan_states(store, "a", progress=lambda done, total: calls.append((done, total)), chunk_bytes=1000)
    assert res["nan_count"] == 3 and res["inf_count"] == 3
    ref = states.float().numpy().astype(np.float64).reshape(-1)
    fin = ref[np.isfinite(ref)]
    assert res["finite_count"] == fin.size
    assert res["min"] == fin.min() and res["max"] == fin.max()
    assert res["mean"] == pytest.approx(fin.mean(), rel=1e-12, abs=1e-12)
    assert res["std"] == pytest.approx(fin.std(), rel=1e-12)
    assert res["tokens"] == 80 and res["real_tokens"] == int(mask.sum())
    assert res["masked_fraction"] == pytest.approx(1 - mask.float().mean().item())
    assert calls[-1][0] == calls[-1][1] == states.numel() * states.element_size()
    assert len(calls) > 2 and all(a <= b for (a, _), (b, _) in zip(calls, calls[1:]))
    json.dumps(res)


def test_scan_states_all_nan(store):
    states = torch.full((2, 3, 4), float("nan"))
    mb.write_megabatch(store, "a", states, torch.zeros(2, 3, dtype=torch.long))
    res = mb.scan_states(store, "a")
    assert res["nan_count"] == 24 and res["min"] is None and res["std"] is None
