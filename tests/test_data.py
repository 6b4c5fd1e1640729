"""collector.data: registry and data keys, sources, determinism, sharding, masks, end of data."""

from __future__ import annotations

import csv
import json
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from collector import data as D
from collector.data import (
    Batch,
    BatchStream,
    DataSpec,
    Document,
    batch_to_model_inputs,
    find_default_system_block,
    iter_documents,
    load_registry,
    resolve_data_key,
)
from tests.fakes import fake_load_dataset
from tests.modelfixtures import TOKENIZER_DIR
from vaultsh.errors import ConfigError, UserError

DEFAULT_SYS = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def batches(tok, key="pydoc", **kw):
    spec = dict(data_key=key, seq_length=48, batch_size=4, n_batches=12, seed=42)
    worker = kw.pop("worker", 0)
    num_workers = kw.pop("num_workers", 1)
    base_dir = kw.pop("base_dir", None)
    spec.update(kw)
    stream = BatchStream(DataSpec(**spec), tok, worker=worker, num_workers=num_workers, base_dir=base_dir)
    return list(stream), stream


def same(a: Batch, b: Batch) -> bool:
    """The same batch: index, tokens, masks, documents' indices, token count and labels."""
    return (
        a.index == b.index
        and torch.equal(a.input_ids, b.input_ids)
        and torch.equal(a.attention_mask, b.attention_mask)
        and torch.equal(a.mask, b.mask)
        and a.doc_index == b.doc_index
        and a.n_tokens == b.n_tokens
        and a.labels == b.labels
    )


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------- registry


def test_shipped_registry_entries_resolve():
    reg = load_registry()
    for name in ("pydoc", "pydoc-chat", "fineweb-edu", "lmsys-chat", "edu", "lmsys", "smoltalk", "web-instruct"):
        assert name in reg
        assert reg[name].get("description")
    for name in reg:  # every shipped entry is valid (hub ones are only parsed, never opened)
        resolve_data_key(name)
    s = resolve_data_key("pydoc")
    assert (s.kind, s.chat) == ("pydoc", False)
    assert resolve_data_key("pydoc-chat").chat is True
    fw = resolve_data_key("fineweb-edu")
    assert (fw.kind, fw.hf_repo, fw.hf_subset, fw.hf_split, fw.text_field) == (
        "hf",
        "HuggingFaceFW/fineweb-edu",
        "sample-10BT",
        "train",
        "text",
    )
    lm = resolve_data_key("lmsys-chat")
    assert (lm.hf_repo, lm.hf_subset, lm.hf_split, lm.chat_field, lm.chat) == (
        "lmsys/lmsys-chat-1m",
        None,
        "train",
        "conversation",
        True,
    )
    json.dumps(fw.to_dict())


def test_templates_and_activault_spelling():
    assert resolve_data_key("pydoc:chat").chat is True
    assert resolve_data_key("pydoc:CHAT_TEMPLATE").chat is True
    s = resolve_data_key("pydoc-chat:plain")
    assert s.chat is False and s.template_name == "plain"
    assert resolve_data_key("lmsys:CHAT_TEMPLATE").chat_field == "conversations"
    wi = resolve_data_key("web-instruct:plain")
    assert wi.chat is False and wi.template == "{instruction}\n\n{generation}" and wi.chat_columns is None
    with pytest.raises(ConfigError, match=r"no template 'fancy' \(available: chat, plain"):
        resolve_data_key("pydoc:fancy")
    with pytest.raises(ConfigError, match=r"available: chat;"):
        resolve_data_key("lmsys-chat:plain")


def test_unknown_key_and_bad_files(tmp_path):
    with pytest.raises(ConfigError) as e:
        resolve_data_key("nope")
    msg = str(e.value)
    assert "data_config.data_key: 'nope' is not in the registry (known: " in msg and "pydoc" in msg
    with pytest.raises(ConfigError, match="not found"):
        resolve_data_key("file:missing.jsonl", base_dir=tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        resolve_data_key("missing.txt", base_dir=tmp_path)
    with pytest.raises(ConfigError, match="hf:REPO"):
        resolve_data_key("hf:onlyrepo")
    with pytest.raises(ConfigError):
        resolve_data_key("  ")
    bad = tmp_path / "reg.json"
    bad.write_text(json.dumps({"x": {"source": "pydoc_topics", "text_field": "a", "template": "{a}"}}))
    with pytest.raises(ConfigError, match="at most one"):
        resolve_data_key("x", registry=bad)
    bad.write_text(json.dumps({"x": {"source": "pydoc_topics", "colour": "red"}}))
    with pytest.raises(ConfigError, match="unknown field"):
        resolve_data_key("x", registry=bad)
    bad.write_text(json.dumps({"x": {"source": "pydoc_topics", "shuffle_buffer": "big"}}))
    with pytest.raises(ConfigError, match="shuffle_buffer must be a positive integer"):
        resolve_data_key("x", registry=bad)
    bad.write_text(json.dumps({"x": {"source": "s3://nope"}}))
    with pytest.raises(ConfigError, match="is not 'pydoc_topics'"):
        resolve_data_key("x", registry=bad)


def test_direct_paths_resolve_against_base_dir(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}])
    monkeypatch.chdir("/")
    for key in ("d.jsonl", "file:d.jsonl", "d.jsonl:chat"):
        s = resolve_data_key(key, base_dir=tmp_path)
        assert s.kind == "file" and s.path == str((tmp_path / "d.jsonl").resolve())
    assert resolve_data_key("d.jsonl:chat", base_dir=tmp_path).chat is True
    assert resolve_data_key("d.jsonl", base_dir=tmp_path).chat is None  # auto per record


def test_extra_registry_from_env(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "qa.jsonl", [{"q": "Why?", "a": "Because."}])
    reg = tmp_path / "mine.json"
    reg.write_text(json.dumps({"qa": {"source": "file:qa.jsonl", "template": "Q: {q}\nA: {a}", "chat": False}}))
    monkeypatch.setenv(D.REGISTRY_ENV, str(reg))
    assert "pydoc" in load_registry() and "qa" in load_registry()
    docs = list(iter_documents(resolve_data_key("qa")))  # relative path: against the registry's dir
    assert [d.text for d in docs] == ["Q: Why?\nA: Because."]


# ---------------------------------------------------------------- sources


def test_pydoc_yields_real_prose():
    docs = list(iter_documents("pydoc"))
    assert len(docs) > 200
    assert all(isinstance(d.text, str) and d.text.strip() and d.messages is None for d in docs)
    assert docs[0].text.startswith('The "assert" statement')  # sorted topic keys, source order
    text = " ".join(d.text for d in docs)
    for word in ("the", "function", "statement", "object"):
        assert f" {word} " in text
    assert sum(len(d.text) <= D.DEFAULT_MAX_DOC_CHARS for d in docs) > 0.9 * len(docs)
    shuffled = list(iter_documents("pydoc", seed=1))
    assert sorted(d.index for d in shuffled) == [d.index for d in docs]
    assert [d.index for d in shuffled] != [d.index for d in docs]
    assert [d.index for d in iter_documents("pydoc", seed=1)] == [d.index for d in shuffled]
    chat = next(iter(iter_documents("pydoc-chat")))
    assert chat.messages == [{"role": "user", "content": docs[0].text}]


def test_file_sources(tmp_path):
    (tmp_path / "a.txt").write_text("First para\nline two.\n\n\n  \nSecond para.\n\nThird.\n", encoding="utf-8")
    assert [d.text for d in iter_documents("a.txt", base_dir=tmp_path)] == [
        "First para\nline two.",
        "Second para.",
        "Third.",
    ]
    write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"text": "plain one"},
            {"text": "   "},  # empty: skipped
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        ],
    )
    docs = list(iter_documents("m.jsonl", base_dir=tmp_path))
    assert [d.index for d in docs] == [0, 2, 3]
    assert docs[0].text == "plain one"
    assert docs[1].messages[1] == {"role": "assistant", "content": "hello"}
    assert docs[2].messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    (tmp_path / "j.json").write_text(json.dumps(["x y", {"text": "z"}]))
    assert [d.text for d in iter_documents("j.json", base_dir=tmp_path)] == ["x y", "z"]
    with open(tmp_path / "c.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "text"])
        w.writerow(["1", "comma, inside\nand a newline"])
    assert [d.text for d in iter_documents("c.csv", base_dir=tmp_path)] == ["comma, inside\nand a newline"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(UserError, match="invalid JSON"):
        list(iter_documents("bad.jsonl", base_dir=tmp_path))
    write_jsonl(tmp_path / "nofield.jsonl", [{"body": "x"}])
    with pytest.raises(UserError, match="cannot find text"):
        list(iter_documents("nofield.jsonl", base_dir=tmp_path))


def test_jsonl_registry_text_field_and_template(tmp_path, tok):
    recs = [
        {"id": i, "body": f"Body number {i} is here.", "q": f"Question {i}?", "a": f"Answer {i}."} for i in range(12)
    ]
    write_jsonl(tmp_path / "qa.jsonl", recs)
    reg = tmp_path / "reg.json"
    reg.write_text(
        json.dumps(
            {
                "bodies": {"source": "file:qa.jsonl", "text_field": "body", "chat": False},
                "qa": {
                    "source": "file:qa.jsonl",
                    "template": "Q: {q}\nA: {a}",
                    "chat": False,
                    "templates": {"asked": {"chat_columns": [["user", "q"], ["assistant", "a"]], "chat": True}},
                },
                "missing": {"source": "file:qa.jsonl", "template": "{nope}"},
            }
        )
    )
    docs = list(iter_documents(resolve_data_key("bodies", registry=reg)))
    assert [d.text for d in docs] == [r["body"] for r in recs]
    docs = list(iter_documents(resolve_data_key("qa", registry=reg)))
    assert docs[3].text == "Q: Question 3?\nA: Answer 3."
    docs = list(iter_documents(resolve_data_key("qa:asked", registry=reg)))
    assert docs[0].messages == [
        {"role": "user", "content": "Question 0?"},
        {"role": "assistant", "content": "Answer 0."},
    ]
    with pytest.raises(UserError, match="'nope'"):
        list(iter_documents(resolve_data_key("missing", registry=reg)))
    # through BatchStream: rows are the tokenised template text
    src = resolve_data_key("qa", registry=reg)
    stream = BatchStream(DataSpec("qa", 32, 3, 4, seed=0), tok, source=src)
    out = list(stream)
    assert len(out) == 4
    by_index = {d.index: d.text for d in iter_documents(src)}
    for b in out:
        for row, di in enumerate(b.doc_index):
            n = int(b.attention_mask[row].sum())
            assert tok.decode(b.input_ids[row, :n]) == by_index[di]


def test_hub_source_needs_datasets(monkeypatch, tok):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(UserError, match="pip install datasets"):
        list(iter_documents("fineweb-edu"))
    with pytest.raises(UserError, match="pip install datasets"):
        list(BatchStream(DataSpec("fineweb-edu", 16, 2, 2), tok))


def test_hub_source_with_fake_datasets(monkeypatch):
    load_dataset, calls = fake_load_dataset(
        [{"conversation": [{"role": "user", "content": f"msg {i}"}]} for i in range(3)]
    )
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    docs = list(iter_documents(resolve_data_key("lmsys-chat"), seed=7))
    assert calls == {"load": ("lmsys/lmsys-chat-1m", None, "train", True), "shuffle": (7, D.DEFAULT_SHUFFLE_BUFFER)}
    assert [d.messages[0]["content"] for d in docs] == ["msg 2", "msg 1", "msg 0"]


def test_buffer_shuffle_is_a_seeded_permutation():
    a = list(D._buffer_shuffle(iter(range(100)), seed=3, size=10))
    assert sorted(a) == list(range(100)) and a != list(range(100))
    assert a == list(D._buffer_shuffle(iter(range(100)), seed=3, size=10))


# ---------------------------------------------------------------- batches


def test_shapes_dtypes_and_model_inputs(tok):
    out, stream = batches(tok, n_batches=3)
    assert [b.index for b in out] == [0, 1, 2] and stream.produced == 3 and not stream.exhausted
    for b in out:
        assert b.input_ids.shape == b.attention_mask.shape == b.mask.shape == (4, 48)
        assert b.input_ids.dtype == torch.long and b.attention_mask.dtype == torch.long
        assert b.mask.dtype == torch.bool
        assert b.n_tokens == int(b.mask.sum()) > 0
        assert len(b.doc_index) == 4
    inputs = batch_to_model_inputs(out[0], "cpu")
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert torch.equal(inputs["input_ids"], out[0].input_ids)


def test_accepts_any_config_object(tok):
    cfg = SimpleNamespace(
        data_key="pydoc",
        seq_length=16,
        batch_size=2,
        n_batches=2,
        seed=1,
        start_batch=0,
        skip_cache=False,
        clean_added_tokens=True,
        clean_default_system_prompt=False,
    )
    assert len(list(BatchStream(cfg, tok))) == 2


def test_deterministic_given_seed(tok):
    a, _ = batches(tok, seed=5)
    b, _ = batches(tok, seed=5)
    c, _ = batches(tok, seed=6)
    assert len(a) == len(b) == 12 and all(same(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, c))
    # no document appears twice within a run
    seen = [i for x in a for i in x.doc_index]
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize("skip_cache", [False, True])
def test_start_batch_is_slicing(tok, skip_cache):
    T = 400 if skip_cache else 48  # pydoc documents are ~430 tokens (median)
    full, _ = batches(tok, skip_cache=skip_cache, seq_length=T)
    part, _ = batches(tok, skip_cache=skip_cache, seq_length=T, start_batch=5)
    assert [b.index for b in part] == list(range(5, 12))
    assert all(same(x, y) for x, y in zip(full[5:], part))


@pytest.mark.parametrize("key,skip_cache", [("pydoc", False), ("pydoc-chat", True)])
def test_worker_sharding_matches_single_worker(tok, key, skip_cache):
    kw = dict(
        key=key,
        skip_cache=skip_cache,
        n_batches=11,
        start_batch=1,
        seq_length=400 if skip_cache else 48,
        clean_added_tokens=True,
        clean_default_system_prompt=True,
    )
    single, _ = batches(tok, **kw)
    shards = [batches(tok, worker=w, num_workers=3, **kw)[0] for w in range(3)]
    for w, shard in enumerate(shards):
        assert all(b.index % 3 == w for b in shard)
    merged = sorted((b for s in shards for b in s), key=lambda b: b.index)
    assert [b.index for b in merged] == list(range(1, 11))  # no overlap, nothing missing
    assert all(same(x, y) for x, y in zip(single, merged))
    assert BatchStream(DataSpec(key, 8, 2, 11, start_batch=1), tok, worker=2, num_workers=3).batch_indices() == range(
        2, 11, 3
    )


def test_padding_is_masked(tok, tmp_path):
    write_jsonl(tmp_path / "s.jsonl", [{"text": "short one"}, {"text": "a somewhat longer text with more words in it"}])
    out, _ = batches(tok, key="s.jsonl", base_dir=tmp_path, seq_length=24, batch_size=2, n_batches=1)
    b = out[0]
    for row in range(2):
        n = int(b.attention_mask[row].sum())
        assert n < 24
        assert b.attention_mask[row, :n].all() and not b.attention_mask[row, n:].any()
        assert not b.mask[row, n:].any() and b.mask[row, :n].all()
        assert (b.input_ids[row, n:] == tok.pad_token_id).all()
    assert b.n_tokens == int(b.attention_mask.sum())


def test_truncation_keeps_the_head_of_long_documents(tok, tmp_path):
    long_text = " ".join(f"word{i}" for i in range(3000))  # > the pre-tokenisation cut
    sparse = "start" + " " * 30000 + " ".join(f"w{i}" for i in range(100))  # few tokens per char: cut retried
    write_jsonl(tmp_path / "l.jsonl", [{"text": long_text}, {"text": sparse}])
    out, _ = batches(tok, key="l.jsonl", base_dir=tmp_path, seq_length=40, batch_size=2, n_batches=1)
    b = out[0]
    for row, text in zip(range(2), [[long_text, sparse][i] for i in b.doc_index]):
        assert b.input_ids[row].tolist() == tok(text)["input_ids"][:40]
    assert b.attention_mask.all()


def test_clean_added_tokens(tok):
    im = {tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")}
    kw = dict(key="pydoc-chat", n_batches=2, seq_length=96)
    kept, _ = batches(tok, **kw)
    clean, _ = batches(tok, clean_added_tokens=True, **kw)
    for a, b in zip(kept, clean):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
        is_special = torch.isin(b.input_ids, torch.tensor(sorted(im))) & (b.attention_mask == 1)
        assert is_special.any()
        assert not b.mask[is_special].any()  # masked, not deleted
        assert a.mask[is_special].all()
        assert torch.equal(b.mask, a.mask & ~is_special)


def test_clean_added_tokens_in_plain_text(tok, tmp_path):
    write_jsonl(tmp_path / "sp.jsonl", [{"text": "before <|im_end|> after"}])
    out, _ = batches(tok, key="sp.jsonl", base_dir=tmp_path, batch_size=1, n_batches=1, clean_added_tokens=True)
    b = out[0]
    ids = b.input_ids[0, : int(b.attention_mask[0].sum())].tolist()
    j = ids.index(tok.convert_tokens_to_ids("<|im_end|>"))
    assert not b.mask[0, j] and b.mask[0, :j].all() and b.mask[0, j + 1 : len(ids)].all()


def test_tokenizer_added_bos(tmp_path):
    t = AutoTokenizer.from_pretrained(TOKENIZER_DIR, add_bos_token=True)  # like Llama: BOS on plain text
    bos = t.bos_token_id
    write_jsonl(tmp_path / "b.jsonl", [{"text": "plain words here"}])
    out, _ = batches(t, key="b.jsonl", base_dir=tmp_path, batch_size=1, n_batches=1)
    assert out[0].input_ids[0, 0] == bos and out[0].mask[0, 0]  # kept unless asked
    out, _ = batches(t, key="b.jsonl", base_dir=tmp_path, batch_size=1, n_batches=1, clean_added_tokens=True)
    n = int(out[0].attention_mask[0].sum())
    assert out[0].input_ids[0, 0] == bos and not out[0].mask[0, 0] and out[0].mask[0, 1:n].all()
    # chat text already carries the template's own tokens: no extra BOS is added
    out, _ = batches(t, key="b.jsonl:chat", base_dir=tmp_path, batch_size=1, n_batches=1)
    assert out[0].input_ids[0, :2].tolist() == t("<|im_start|>system", add_special_tokens=False)["input_ids"][:2]


def test_default_system_block_of_smollm2(tok):
    ds = find_default_system_block(tok)
    assert ds is not None and ds.start == 0
    assert ds.prefix == f"<|im_start|>system\n{DEFAULT_SYS}<|im_end|>\n"


def _chat_rows(tok, tmp_path, records, **kw):
    write_jsonl(tmp_path / "chat.jsonl", records)
    out, _ = batches(
        tok, key="chat.jsonl", base_dir=tmp_path, seq_length=80, batch_size=len(records), n_batches=1, seed=0, **kw
    )
    b = out[0]
    by_doc = {}
    for row, di in enumerate(b.doc_index):
        n = int(b.attention_mask[row].sum())
        by_doc[di] = (b.input_ids[row, :n].tolist(), b.mask[row, :n].tolist())
    return by_doc


def test_clean_default_system_prompt(tok, tmp_path):
    user = "Tell me about the assert statement."
    records = [
        {"messages": [{"role": "user", "content": user}]},
        {"messages": [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": user}]},
        {"messages": [{"role": "system", "content": DEFAULT_SYS}, {"role": "user", "content": user}]},
    ]
    by_doc = _chat_rows(tok, tmp_path, records, clean_default_system_prompt=True)
    block = tok(f"<|im_start|>system\n{DEFAULT_SYS}<|im_end|>\n", add_special_tokens=False)["input_ids"]

    ids, mask = by_doc[0]
    assert ids[: len(block)] == block
    assert not any(mask[: len(block)])  # exactly the template-inserted system turn...
    assert all(mask[len(block) :])  # ...and nothing else (clean_added_tokens is off)
    kept = [t for t, m in zip(ids, mask) if m]
    assert user in tok.decode(kept) and DEFAULT_SYS not in tok.decode(kept)

    for d in (1, 2):  # a system prompt supplied by the data is kept, even the default's text
        ids, mask = by_doc[d]
        assert all(mask)
        assert records[d]["messages"][0]["content"] in tok.decode(ids)

    # with both cleanings: only content tokens remain (role names and newlines are content)
    by_doc = _chat_rows(tok, tmp_path, records, clean_default_system_prompt=True, clean_added_tokens=True)
    ids, mask = by_doc[0]
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == f"user\n{user}\n"
    ids, mask = by_doc[1]
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == f"system\nYou are a pirate.\nuser\n{user}\n"

    # off: the default prompt is real content
    ids, mask = _chat_rows(tok, tmp_path, records)[0]
    assert all(mask) and DEFAULT_SYS in tok.decode(ids)


def test_template_without_default_system_prompt():
    t = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    t.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    assert find_default_system_block(t) is None
    t.chat_template = None
    with pytest.raises(UserError, match="no.*chat template|has none"):
        D._Encoder(t, 16, False, False, "pydoc-chat").render(Document(messages=[{"role": "user", "content": "x"}]))


def test_skip_cache_drops_long_documents(tok, tmp_path):
    recs = []
    for i in range(20):
        n = 50 if i % 3 == 0 else 3  # every third document is far longer than seq_length
        recs.append({"text": f"doc {i}: " + " ".join(["lorem ipsum"] * n)})
    write_jsonl(tmp_path / "mix.jsonl", recs)
    kw = dict(key="mix.jsonl", base_dir=tmp_path, seq_length=32, batch_size=4, n_batches=3, seed=3)
    dropped, s1 = batches(tok, skip_cache=True, **kw)
    truncated, _ = batches(tok, skip_cache=False, **kw)
    used = [i for b in dropped for i in b.doc_index]
    assert len(used) == 12 and all(i % 3 != 0 for i in used)
    for b in dropped:  # every row is a whole document: never filled to seq_length
        assert (b.attention_mask.sum(1) < 32).all()
    assert any(i % 3 == 0 for b in truncated for i in b.doc_index)
    assert any(bool(b.attention_mask.all(1).any()) for b in truncated)
    # 13 short documents: 3 full batches, then the source runs out
    more, s2 = batches(tok, skip_cache=True, **dict(kw, n_batches=10))
    assert len(more) == 3 and s2.exhausted and s2.available_batches == 3


def test_end_of_data_stops_at_last_full_batch(tok, tmp_path, caplog):
    write_jsonl(tmp_path / "ten.jsonl", [{"text": f"document number {i}"} for i in range(10)])
    with caplog.at_level("WARNING"):
        out, stream = batches(tok, key="ten.jsonl", base_dir=tmp_path, n_batches=5)
    assert [b.index for b in out] == [0, 1]
    assert stream.exhausted and stream.available_batches == 2 and stream.produced == 2
    assert "ran out after 2 global batches" in caplog.text
    ok, stream = batches(tok, key="ten.jsonl", base_dir=tmp_path, n_batches=2)
    assert len(ok) == 2 and not stream.exhausted
    with pytest.raises(UserError, match="fewer than batch_size=16"):
        batches(tok, key="ten.jsonl", base_dir=tmp_path, batch_size=16)


def test_bad_stream_arguments(tok):
    with pytest.raises(ConfigError, match="packing"):
        BatchStream(DataSpec("pydoc", 16, 2, 2, packing=True, skip_cache=True), tok)
    with pytest.raises(ConfigError, match="worker index 3"):
        BatchStream(DataSpec("pydoc", 16, 2, 2), tok, worker=3, num_workers=3)
    with pytest.raises(ConfigError, match="seq_length"):
        BatchStream(DataSpec("pydoc", 0, 2, 2), tok)
    s = BatchStream(DataSpec("pydoc", 16, 2, 3, start_batch=3), tok)
    assert list(s) == [] and s.planned_batches == 0
