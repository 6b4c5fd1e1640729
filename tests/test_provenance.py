"""Provenance: each stored sequence says which source, document and token offset it came from."""

from __future__ import annotations

import json

import pytest
import torch

from collector.config import load_config
from collector.worker import run_worker
from vaultsh import megabatch as mbf
from vaultsh.errors import FormatError
from vaultsh.events import EventSink
from vaultsh.run import Run
from vaultsh.store import LocalStore

from .modelfixtures import TOKENIZER_DIR

PLANTED_ROW = 17
PLANTED = "The planted zebra document sings of quartz, cobalt and seventeen violet lanterns."
T = 24


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def _texts(tmp_path):
    notes = [f"note number {i} about the weather in town {i % 7}, with some words after it" for i in range(50)]
    rows = [f"json row {i}: a record of moderate length about item {i * 3}" for i in range(50)]
    rows[PLANTED_ROW] = PLANTED
    (tmp_path / "notes.txt").write_text("".join(n + "\n" for n in notes))
    (tmp_path / "my.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return [notes, rows]


def _cfg(tiny_dir, tmp_path, uri, **data):
    raw = {
        "run_name": "prov",
        "transformer_config": {"model_name": str(tiny_dir), "dtype": "float32"},
        "data_config": {"n_batches": 24, "seq_length": T, "batch_size": 2, "seed": 3, "shuffle": False, **data},
        "upload_config": {"batches_per_upload": 4, "hooks": ["residuals_1"]},
        "storage": {"uri": str(uri)},
    }
    return load_config(raw)


def _rows(store, run, hook="residuals_1"):
    for f in run.committed_files(hook):
        mb = mbf.read_megabatch(store, f.key)
        for i in range(mb.input_ids.shape[0]):
            yield f.key, i, mb


@pytest.fixture(scope="module")
def mixed(tiny_dir, tmp_path_factory):
    """A run over two sources (a text file, a JSONL file with the planted row), in file order."""
    tmp_path = tmp_path_factory.mktemp("mixed")
    texts = _texts(tmp_path)
    datasets = [
        {"name": "notes", "path": str(tmp_path / "notes.txt"), "text_field": "text"},
        {"name": "my_jsonl", "path": str(tmp_path / "my.jsonl"), "text_field": "text"},
    ]
    cfg = _cfg(tiny_dir, tmp_path, tmp_path / "vault", datasets=datasets, n_batches=40)
    assert run_worker(cfg, 0, sink=EventSink(0))["status"] == "complete"
    store = LocalStore(tmp_path / "vault")
    return texts, store, Run(store, "prov")


def _planted(store, run):
    for key, i, mb in _rows(store, run):
        if mb.source[i].tolist() == [1, PLANTED_ROW, 0]:
            return key, i
    raise AssertionError("planted document not stored")


def test_planted_document_comes_back_with_its_source_row_and_offset(mixed, tok):
    texts, store, run = mixed
    meta = run.read_metadata("residuals_1")
    assert meta["sources"] == ["notes", "my_jsonl"]
    assert meta["source_columns"] == ["source_index", "document_index", "token_offset"]

    seen, planted = set(), []
    for key, i, mb in _rows(store, run):
        assert (
            mb.source is not None and mb.source.dtype == torch.int64 and mb.source.shape == (mb.input_ids.shape[0], 3)
        )
        src, doc, off = (int(x) for x in mb.source[i])
        assert off == 0  # one document per sequence, from its first token
        # independent: the text at that row of that file, tokenised as the collector does
        want = tok(texts[src][doc])["input_ids"][:T]
        got = mb.input_ids[i][: len(want)].tolist()
        assert got == want, f"{key} row {i}: provenance {src, doc, off} does not match the stored tokens"
        assert bool(mb.mask[i][: len(want)].all()) and not bool(mb.mask[i][len(want) :].any())
        seen.add(src)
        if (src, doc) == (1, PLANTED_ROW):
            planted.append((key, i))
            assert PLANTED.startswith(tok.decode(mb.input_ids[i][mb.mask[i]].tolist()).strip())
    assert seen == {0, 1}
    assert len(planted) == 1  # the planted document was stored exactly once, and found by its provenance

    # the per-sequence readers agree with the whole-file read
    key, i = planted[0]
    seq = mbf.read_sequence(store, key, i)
    assert seq["source"].tolist() == [1, PLANTED_ROW, 0]
    src, seg = mbf.read_source(store, key)
    assert src[i].tolist() == [1, PLANTED_ROW, 0] and seg is None


def test_packed_rows_record_every_document_piece_exactly(tiny_dir, tmp_path, tok):
    texts = _texts(tmp_path)
    cfg = _cfg(tiny_dir, tmp_path, tmp_path / "vault", data_key=str(tmp_path / "my.jsonl"), packing=True, n_batches=8)
    assert run_worker(cfg, 0, sink=EventSink(0))["status"] == "complete"
    store = LocalStore(tmp_path / "vault")
    run = Run(store, "prov")
    assert run.read_metadata("residuals_1")["sources"] == [str(tmp_path / "my.jsonl")]  # a direct key: its location
    eos = tok.eos_token_id
    pieces = 0
    continued = 0
    for f in run.committed_files("residuals_1"):
        mb = mbf.read_megabatch(store, f.key)
        seg = mb.source_segments
        assert seg is not None and seg.shape[1] == 5
        for r in range(mb.input_ids.shape[0]):
            mine = seg[seg[:, 0] == r].tolist()
            assert mine[0][1] == 0 and mb.source[r].tolist() == mine[0][2:]  # source = the first piece
            ends = [p[1] for p in mine[1:]] + [T]
            for (_row, pos, src, doc, off), end in zip(mine, ends):
                assert src == 0
                full = tok(texts[1][doc])["input_ids"]
                if full[-1] != eos:
                    full = full + [eos]
                assert mb.input_ids[r][pos:end].tolist() == full[off : off + end - pos], (f.key, r, pos)
                pieces += 1
                continued += off > 0
    assert pieces > 2 * 8 * 2 and continued > 0  # rows hold several documents; some continue from a previous row


def test_files_without_provenance_still_read(tmp_path):
    store = LocalStore(tmp_path)
    states = torch.randn(3, 4, 5)
    ids = torch.arange(12).reshape(3, 4)
    mbf.write_megabatch(store, "old.safetensors", states, ids)
    mbf.write_megabatch(store, "old.saved.pt", states, ids, fmt="pt")
    for key in ("old.safetensors", "old.saved.pt"):
        mb = mbf.read_megabatch(store, key)
        assert mb.source is None and mb.source_segments is None and torch.equal(mb.input_ids, ids)
        assert mbf.read_sequence(store, key, 1)["source"] is None
        assert mbf.read_source(store, key) == (None, None)
        assert not mbf.read_header(store, key).has_source


def test_source_tensor_round_trips_and_a_bad_one_is_refused(tmp_path):
    store = LocalStore(tmp_path)
    states, ids = torch.randn(3, 4, 5), torch.arange(12).reshape(3, 4)
    src = torch.tensor([[0, 5, 0], [1, 9, 0], [-1, -1, -1]])
    mbf.write_megabatch(store, "a.safetensors", states, ids, source=src)
    assert torch.equal(mbf.read_megabatch(store, "a.safetensors").source, src)
    assert mbf.read_sequence(store, "a.safetensors", -1)["source"].tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match=r"source must be an int64 tensor of shape \[3, 3\]"):
        mbf.write_megabatch(store, "b.safetensors", states, ids, source=src[:2])
    # a file whose source tensor has the wrong shape is a clear format error
    tensors = {
        "states": states,
        "input_ids": ids,
        "mask": torch.ones(3, 4, dtype=torch.bool),
        "source": torch.zeros(2, 3, dtype=torch.int64),
    }
    prefix, order = mbf.build_header(tensors, {"format": mbf.FORMAT_NAME})
    store.put_bytes("bad.safetensors", prefix + b"".join(t.numpy().tobytes() for _, t in order))
    with pytest.raises(FormatError, match=r"tensor 'source' has shape \[2, 3\], expected \[3, 3\]"):
        mbf.read_header(store, "bad.safetensors")


def test_describe_names_the_source():
    from vaultsh.provenance import describe

    assert describe([1, 17, 0], ["notes", "my_jsonl"]) == "my_jsonl doc 17 @ token 0"
    assert describe([-1, -1, -1], ["notes"]) == "unknown"
    assert describe([4, 2, 3], ["notes"]) == "source 4 doc 2 @ token 3"


@pytest.fixture(params=["local", "s3"])
def shell_store(request, mixed):
    _texts_, store, _run = mixed
    if request.param == "local":
        return store
    from vaultsh.store.s3 import S3Store

    from .test_shell_fixtures import copy_tree

    server, admin = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_admin")
    import uuid

    bucket = f"vaultsh-prov-{uuid.uuid4().hex[:8]}"
    admin.create_bucket(Bucket=bucket)
    s3 = S3Store(bucket, endpoint_url=server)
    copy_tree(store, s3)
    return s3


def _shell(store, line, json_mode):
    import io

    from vaultsh.shell.app import Shell

    out, err = io.StringIO(), io.StringIO()
    rc = Shell(store=store, cwd="", stdout=out, stderr=err, json_mode=json_mode, interactive=False).run_lines([line])
    assert rc == 0, err.getvalue()
    return out.getvalue()


def test_shell_tokens_view_and_inspect_show_the_source(mixed, shell_store):
    _texts_, store, run = mixed
    key, i = _planted(store, run)
    files = [f.key for f in run.committed_files("residuals_1")]
    n = files.index(key)
    got = json.loads(_shell(shell_store, f"cd prov/residuals_1; tokens {n} {i}", json_mode=True))
    assert got["source"] == {"source": "my_jsonl", "source_index": 1, "document_index": PLANTED_ROW, "token_offset": 0}
    text = _shell(shell_store, f"cd prov/residuals_1; view {n} {i}", json_mode=False)
    assert f"Source: my_jsonl doc {PLANTED_ROW} @ token 0" in text
    # inspect's previews: the first sequences of the file, each with its source from the stored tensor
    docs = json.loads(
        "["
        + _shell(shell_store, f"cd prov/residuals_1; inspect --no-scan {n}", json_mode=True)
        .strip()
        .replace("}\n{", "},{")
        + "]"
    )
    preview = next(d for d in docs if "preview" in d)["preview"]
    src = mbf.read_megabatch(store, key).source
    names = run.read_metadata("residuals_1")["sources"]
    assert [p["source"]["source"] for p in preview] == [names[int(r[0])] for r in src[: len(preview)]]
    assert [p["source"]["document_index"] for p in preview] == src[: len(preview), 1].tolist()
