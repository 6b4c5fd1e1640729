"""Data sources: datasets lists and mixes (HF datasets, local files), labels, shaping, packing, sharding."""

from __future__ import annotations

import collections
import json
import textwrap

import pytest
import torch
from transformers import AutoTokenizer

from collector.config import load_config
from collector.data import BatchStream, DataSpec
from collector.mixing import interleave
from tests.fakes import fake_load_dataset
from tests.modelfixtures import TOKENIZER_DIR
from tests.test_data import same
from vaultsh.errors import ConfigError, UserError


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Non-streaming `datasets` loads write Arrow caches: keep them in tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def spec(**kw):
    base = dict(data_key=None, seq_length=32, batch_size=4, n_batches=1000, seed=3)
    base.update(kw)
    return DataSpec(**base)


def docs_of(tok, **kw):
    return list(BatchStream(spec(**kw), tok).documents())


def cfg_dict(data):
    return {
        "run_name": "r",
        "transformer_config": {"model_name": "some/model"},
        "data_config": {"n_batches": 4, "seq_length": 32, "batch_size": 2, **data},
        "upload_config": {"hooks": ["residuals_0"]},
    }


def err(data, name="c.yaml"):
    with pytest.raises(ConfigError) as ei:
        load_config(cfg_dict(data), name=name)
    return str(ei.value)


# ---------------------------------------------------------------- interleaving


def test_weighted_interleaving_proportions_and_determinism():
    def streams():
        return [iter(range(0, 10**6)), iter(range(10**6, 2 * 10**6)), iter(range(2 * 10**6, 3 * 10**6))]

    weights = [0.6, 0.3, 0.1]
    a = [x for _, x in zip(range(20000), interleave(streams(), weights, seed=11))]
    counts = collections.Counter(x // 10**6 for x in a)
    for i, w in enumerate(weights):
        assert abs(counts[i] / len(a) - w) < 0.015, counts
    # each stream's items keep their own order
    assert [x for x in a if x < 10**6] == sorted(x for x in a if x < 10**6)
    b = [x for _, x in zip(range(20000), interleave(streams(), weights, seed=11))]
    c = [x for _, x in zip(range(20000), interleave(streams(), weights, seed=12))]
    assert a == b and a != c


def test_stopping_strategies():
    first = list(interleave([iter(range(10)), iter(range(100, 1000))], [1, 1], seed=0))
    assert sum(x < 100 for x in first) <= 10 and len(first) < 60  # stops when the small one runs out
    every = list(
        interleave([iter(range(10)), iter(range(100, 1000))], [1, 1], seed=0, stopping_strategy="all_exhausted")
    )
    assert sorted(every) == list(range(10)) + list(range(100, 1000))


def test_datasets_mix_through_hf_datasets(tmp_path, tok):
    a = jsonl(tmp_path / "a.jsonl", [{"text": f"alpha document {i}"} for i in range(1500)])
    b = jsonl(tmp_path / "b.jsonl", [{"body": f"beta {i}", "title": f"T{i}"} for i in range(1500)])
    datasets = [
        {"name": "a", "path": str(a), "weight": 0.75, "text_field": "text", "streaming": True},
        {"name": "b", "path": str(b), "weight": 0.25, "text_template": "{title}: {body}"},
    ]
    docs = docs_of(tok, datasets=datasets)
    names = [d.labels["dataset"] for d in docs]
    # first_exhausted: a (1500 docs, 3/4 of the draws) runs out first, at ~2000 documents
    assert names.count("a") == 1500 and 1800 < len(docs) < 2200
    assert abs(names.count("a") / len(names) - 0.75) < 0.04  # ~4 standard deviations
    assert all(d.text.startswith("alpha") for d in docs if d.labels["dataset"] == "a")
    assert all(d.text.startswith("T") and ": beta " in d.text for d in docs if d.labels["dataset"] == "b")
    again = docs_of(tok, datasets=datasets)
    assert [(d.text, d.index) for d in again] == [(d.text, d.index) for d in docs]
    other = docs_of(tok, datasets=datasets, seed=4)
    assert [d.text for d in other] != [d.text for d in docs]


def test_local_formats(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"t": f"row {i}", "n": i} for i in range(5)]
    jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("t,n\n" + "".join(f"row {i},{i}\n" for i in range(5)))
    (tmp_path / "d.txt").write_text("".join(f"row {i}\n" for i in range(5)))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "data.weird").write_text("".join(json.dumps(r) + "\n" for r in rows))
    want = [f"row {i}" for i in range(5)]
    for name, field, fmt in [
        ("d.jsonl", "t", None),
        ("d.json", "t", None),
        ("d.csv", "t", None),
        ("d.txt", "text", None),
        ("d.parquet", "t", None),
        ("data.weird", "t", "jsonl"),
    ]:
        entry = {"name": "x", "path": str(tmp_path / name), "text_field": field, "format": fmt}
        got = [d.text for d in docs_of(tok, datasets=[entry], shuffle=False)]
        assert got == want, name


def test_template_with_missing_field_names_field_and_record(tmp_path, tok):
    recs = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}, {"instruction": "e"}]
    p = jsonl(tmp_path / "inst.jsonl", recs)
    entry = {"name": "inst", "path": str(p), "text_template": "Instruction:\n{instruction}\n\nOutput:\n{output}"}
    with pytest.raises(UserError) as ei:
        docs_of(tok, datasets=[entry], shuffle=False)
    msg = str(ei.value)
    assert "'inst' record 2" in msg and "field 'output'" in msg and "instruction" in msg


# ---------------------------------------------------------------- config


def test_config_datasets_and_mixes(tmp_path):
    p = jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    ok = {"name": "a", "path": "a.jsonl", "text_field": "text"}
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(json.dumps(cfg_dict({"datasets": [ok]})))
    cfg = load_config(cfgfile)
    assert cfg.data.datasets[0].path == str(p.resolve())  # relative to the config file
    assert load_config(cfg.model_dump()) == cfg

    mixes = tmp_path / "datasets.yaml"
    mixes.write_text(
        textwrap.dedent("""\
        data_mixes:
          small_mix:
            name: small_mix
            datasets:
              - {name: a, path: a.jsonl, format: json, weight: 0.4, text_field: text}
          broken_mix:
            name: broken_mix
            datasets:
              - {name: a, path: a.jsonl, weight: 0.4, text_field: text, text_template: "{text}"}
        """)
    )
    cfg = load_config(cfg_dict({"data_mixes": str(mixes), "mix": "small_mix"}))
    assert cfg.data.mix == "small_mix"
    msg = err({"data_mixes": str(mixes), "mix": "large_mix"})
    assert "data_config.mix: 'large_mix' is not in" in msg and "available: small_mix, broken_mix" in msg
    msg = err({"data_mixes": str(mixes), "mix": "broken_mix"})
    assert (
        "data_mixes.broken_mix.datasets[0] ('a'): give exactly one of text_field or text_template (both given)" in msg
    )


@pytest.mark.parametrize(
    "data,expected",
    [
        (
            {"datasets": [{"name": "a", "path": "org/set"}]},
            "data_config.datasets[0] ('a'): give exactly one of text_field or text_template (neither given)",
        ),
        (
            {"datasets": [{"name": "a", "path": "org/set", "text_field": "t", "weight": 0}]},
            "data_config.datasets[0].weight: 0 is not allowed (must be > 0)",
        ),
        (
            {"datasets": [{"name": "a", "path": "org/set", "text_field": "t", "format": "xml"}]},
            "data_config.datasets[0].format: 'xml' is not allowed (must be one of 'json', 'jsonl', 'csv', 'text' or 'parquet')",
        ),
        (
            {"datasets": [{"name": "a", "path": "./nope.jsonl", "text_field": "t"}]},
            "data_config.datasets[0].path: './nope.jsonl': no such file or directory",
        ),
        (
            {"datasets": [{"name": "a", "path": "org/set", "text_template": "{}"}]},
            "data_config.datasets[0].text_template: '{}' uses positional fields",
        ),
        (
            {"data_key": "pydoc", "datasets": [{"name": "a", "path": "org/set", "text_field": "t"}]},
            "data_config: give one data source, not data_key and datasets",
        ),
        ({}, "data_config.data_key: required but missing (or give data_config.datasets"),
        ({"data_key": "pydoc", "mix": "m"}, "data_config.mix: 'm' needs data_config.data_mixes"),
        ({"data_key": "pydoc", "filter": "score >> 3"}, "data_config.filter: 'score >> 3' is not a filter"),
        ({"data_key": "pydoc", "filter": "score > high"}, "'>' needs a number on the right"),
        (
            {"data_key": "pydoc", "category_balance_strategy": "even"},
            "data_config.category_balance_strategy: 'even' is not allowed (must be one of 'use_all' or 'equalize')",
        ),
        ({"data_key": "pydoc", "sample": 2.5}, "data_config.sample: 2.5 is not allowed (a fraction must be in (0, 1]"),
        ({"data_key": "pydoc", "reversed": True}, "data_config.reversed: true needs data_config.sort_by_length: true"),
        (
            {"data_key": "pydoc", "packing": True, "skip_cache": True},
            "data_config.packing: true cannot be combined with skip_cache",
        ),
        ({"data_key": "pydoc", "packing": True, "label_columns": ["x"]}, "cannot carry per-sequence labels"),
        ({"data_key": "pydoc", "text_field": "x"}, "data_config.text_field: only applies with data_config.path"),
    ],
)
def test_config_data_errors(data, expected):
    msg = err(data)
    assert expected in msg, msg
    assert msg.startswith("c.yaml: ")


def test_config_inference_section(tmp_path):
    p = jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "category": "a"}])
    raw = cfg_dict({"path": str(p)})
    del raw["data_config"]["batch_size"]
    raw["inference"] = {"batch_size": 3, "max_new_tokens": 8, "save_activations": True}
    cfg = load_config(raw)
    assert cfg.data.batch_size == 3 and cfg.inference.max_new_tokens == 8
    assert load_config(cfg.model_dump()) == cfg
    raw["data_config"]["batch_size"] = 2
    with pytest.raises(ConfigError, match=r"inference.batch_size: 3 contradicts data_config.batch_size 2"):
        load_config(raw)
    raw["data_config"]["batch_size"] = 3
    raw["inference"]["max_new_tokens"] = 32
    with pytest.raises(ConfigError, match=r"inference.max_new_tokens: 32 leaves no room for the prompt"):
        load_config(raw)
    raw["inference"] = {"max_new_tokens": 4}
    raw["storage"] = {"format": "pt"}
    with pytest.raises(ConfigError, match=r"storage.format: 'pt' cannot store labels"):
        load_config(raw)
    raw.pop("storage")
    raw["inference"] = {"save_activations": False}
    with pytest.raises(ConfigError, match=r"inference.save_activations: false only makes sense"):
        load_config(raw)


# ---------------------------------------------------------------- labels, shaping


@pytest.fixture
def labelled(tmp_path):
    recs = []
    for cat, n in (("violence", 10), ("privacy", 4), ("harmless", 7)):
        recs += [
            {
                "prompt": f"{cat} prompt number {i} " + "word " * (i % 5),
                "category": cat,
                "score": str(i),
                "source": f"s{i % 2}",
            }
            for i in range(n)
        ]
    return jsonl(tmp_path / "or-bench.jsonl", recs), recs


def test_categories_use_all_and_equalize_exactly(labelled, tok):
    path, recs = labelled
    docs = docs_of(tok, path=str(path))
    assert collections.Counter(d.labels["category"] for d in docs) == {"violence": 10, "privacy": 4, "harmless": 7}
    docs = docs_of(tok, path=str(path), category_balance_strategy="equalize")
    assert collections.Counter(d.labels["category"] for d in docs) == {"violence": 4, "privacy": 4, "harmless": 4}
    docs = docs_of(tok, path=str(path), categories=["violence", "harmless"], category_balance_strategy="equalize")
    assert collections.Counter(d.labels["category"] for d in docs) == {"violence": 7, "harmless": 7}
    docs = docs_of(tok, path=str(path), categories=["privacy"])
    assert {d.labels["category"] for d in docs} == {"privacy"} and len(docs) == 4
    with pytest.raises(UserError, match="'weapons' has no documents to equalize"):
        docs_of(tok, path=str(path), categories=["weapons"], category_balance_strategy="equalize")


def test_labels_travel_with_each_batch_row(labelled, tok):
    path, recs = labelled
    by_text = {r["prompt"].strip(): r for r in recs}
    stream = BatchStream(spec(path=str(path), label_columns=["score", "source"], n_batches=5), tok)
    out = list(stream)
    assert len(out) == 5
    for b in out:
        assert sorted(b.labels) == ["category", "score", "source"]
        for i, d in enumerate(b.documents):
            r = by_text[d.text.strip()]
            assert (b.labels["category"][i], b.labels["score"][i], b.labels["source"][i]) == (
                r["category"],
                r["score"],
                r["source"],
            )


def test_missing_category_field_is_a_clear_error(tmp_path, tok):
    p = jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "category": "x"}, {"prompt": "b"}])
    with pytest.raises(UserError, match=r"record 1: record has no category field 'category'"):
        docs_of(tok, path=str(p), shuffle=False)


def test_filter_sample_and_max_samples(labelled, tok):
    path, recs = labelled
    docs = docs_of(tok, path=str(path), filter="score >= 5")  # CSV-like strings compare as numbers
    assert len(docs) == 5 + 2 and all(int(d.text.split()[3]) >= 5 for d in docs)
    docs = docs_of(tok, path=str(path), filter="category in [privacy, harmless]")
    assert len(docs) == 11
    docs = docs_of(tok, path=str(path), filter="category != violence", max_samples=3)
    assert len(docs) == 3 and all(d.labels["category"] != "violence" for d in docs)
    s1 = docs_of(tok, path=str(path), sample=6)
    s2 = docs_of(tok, path=str(path), sample=6)
    assert len(s1) == 6 and [d.text for d in s1] == [d.text for d in s2]
    frac = docs_of(tok, path=str(path), sample=0.5)
    assert 0 < len(frac) < 21 and [d.text for d in frac] == [d.text for d in docs_of(tok, path=str(path), sample=0.5)]
    with pytest.raises(UserError, match="sample: 50 is more than the 21 documents"):
        docs_of(tok, path=str(path), sample=50)


def test_sort_by_length_longest_first_when_reversed(tmp_path, tok):
    recs = [{"text": " ".join(["word"] * n)} for n in (5, 40, 12, 3, 25, 18, 7, 30)]
    p = jsonl(tmp_path / "l.jsonl", recs)
    entry = [{"name": "l", "path": str(p), "text_field": "text"}]
    longest = BatchStream(spec(datasets=entry, sort_by_length=True, reversed=True, batch_size=2, seq_length=64), tok)
    lengths = [len(d.text.split()) for d in longest.documents()]
    assert lengths == [40, 30, 25, 18, 12, 7, 5, 3]
    first = next(iter(longest))
    assert int(first.attention_mask[0].sum()) == max(int(b.attention_mask.sum(1).max()) for b in longest)
    shortest = BatchStream(spec(datasets=entry, sort_by_length=True, batch_size=2, seq_length=64), tok)
    assert [len(d.text.split()) for d in shortest.documents()] == sorted(lengths)


def test_sharding_disjoint_and_complete_for_every_source(tmp_path, labelled, tok):
    path, _ = labelled
    a = jsonl(tmp_path / "a.jsonl", [{"text": f"alpha {i} " * (1 + i % 4)} for i in range(60)])
    b = jsonl(tmp_path / "b.jsonl", [{"text": f"beta {i}"} for i in range(60)])
    entries = [
        {"name": "a", "path": str(a), "text_field": "text", "weight": 2},
        {"name": "b", "path": str(b), "text_field": "text", "streaming": True},
    ]
    cases = [
        dict(datasets=entries, n_batches=9, batch_size=3),
        dict(path=str(path), category_balance_strategy="equalize", n_batches=4, batch_size=3),
        dict(datasets=entries, packing=True, n_batches=7, batch_size=2, seq_length=16),
        dict(datasets=entries, sort_by_length=True, reversed=True, n_batches=9, batch_size=3),
    ]
    for case in cases:
        single = list(BatchStream(spec(**case), tok))
        assert len(single) == case["n_batches"], case
        parts = [list(BatchStream(spec(**case), tok, worker=w, num_workers=3)) for w in range(3)]
        merged = sorted((x for p in parts for x in p), key=lambda x: x.index)
        assert [x.index for x in merged] == list(range(case["n_batches"]))
        assert all(same(x, y) for x, y in zip(merged, single)), case


# ---------------------------------------------------------------- packing, chat


def test_packing_has_no_padding_and_eos_between_documents(tmp_path, tok):
    texts = [f"Document number {i} says " + "hello " * (i % 7) for i in range(40)]
    p = jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts])
    entry = [{"name": "p", "path": str(p), "text_field": "text"}]
    stream = BatchStream(
        spec(datasets=entry, packing=True, shuffle=False, batch_size=2, seq_length=24, n_batches=5), tok
    )
    out = list(stream)
    assert len(out) == 5
    eos = tok.eos_token_id
    expected = []
    for t in texts:
        expected += tok(t)["input_ids"] + [eos]
    flat = torch.cat([b.input_ids.reshape(-1) for b in out]).tolist()
    assert flat == expected[: len(flat)]  # documents back to back, one EOS between each
    for b in out:
        assert b.input_ids.shape == (2, 24) and bool(b.attention_mask.all()) and bool(b.mask.all())
    cleaned = list(
        BatchStream(
            spec(
                datasets=entry,
                packing=True,
                shuffle=False,
                batch_size=2,
                seq_length=24,
                n_batches=5,
                clean_added_tokens=True,
            ),
            tok,
        )
    )
    for b, c in zip(out, cleaned):
        assert torch.equal(b.input_ids, c.input_ids)
        assert torch.equal(c.mask, b.input_ids != eos)  # the EOS separators are masked when cleaning


def test_chat_records_default_system_prompt_masked_not_deleted(tmp_path, tok):
    recs = [
        {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
        for i in range(4)
    ]
    p = jsonl(tmp_path / "chat.jsonl", recs)
    entry = [{"name": "chat", "path": str(p), "text_field": "messages"}]
    plain = next(iter(BatchStream(spec(datasets=entry, shuffle=False, seq_length=64), tok)))
    clean = next(
        iter(BatchStream(spec(datasets=entry, shuffle=False, seq_length=64, clean_default_system_prompt=True), tok))
    )
    assert torch.equal(plain.input_ids, clean.input_ids)  # nothing deleted
    row = plain.input_ids[0]
    n = int(plain.attention_mask[0].sum())
    text = tok.decode(row[:n])
    assert "You are a helpful AI assistant named SmolLM" in text and "Question 0?" in text
    masked = plain.mask[0] & ~clean.mask[0]
    assert "helpful AI assistant" in tok.decode(row[masked]) and "Question" not in tok.decode(row[masked])
    assert "Question 0?" in tok.decode(row[clean.mask[0]])


def test_hub_entry_goes_to_load_dataset_streaming_and_shuffled(monkeypatch, tok):
    import datasets

    load_dataset, calls = fake_load_dataset([{"text": f"web page {i}"} for i in range(6)])
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    entry = [
        {
            "name": "c4",
            "path": "allenai/c4",
            "subset": "en",
            "split": "validation",
            "streaming": True,
            "text_field": "text",
        }
    ]
    docs = docs_of(tok, datasets=entry)
    assert calls["load"] == ("allenai/c4", "en", "validation", True) and calls["shuffle"][0] == 3
    assert [d.text for d in docs] == [f"web page {i}" for i in reversed(range(6))]
    with pytest.raises(ConfigError, match="streamed hub dataset"):  # sorting needs the whole data set
        docs_of(tok, datasets=entry, sort_by_length=True)

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        UserError, match=r"dataset 'c4' \(allenai/c4\): could not load: ConnectionError: Couldn't reach"
    ):
        docs_of(tok, datasets=entry)


# ---------------------------------------------------------------- the LM-training guide's form

LM_DATASET_CONFIG = """\
run_name: r
transformer_config: {model_name: some/model}
data_config: {n_batches: 4, batch_size: 2}
upload_config: {hooks: [residuals_0]}
dataset_config:
  datasets:
    - name: "pile-uncopyrighted"
      path: "a.jsonl"
      split: "train"
      streaming: true
      weight: 0.7
      text_field: "text"
    - name: "inst"
      path: "b.jsonl"
      split: "train"
      streaming: true
      weight: 0.3
      text_template: "Instruction:\\n{instruction}\\n\\nOutput:\\n{output}"
  tokenizer_name: "some/model"
  max_seq_length: 32
"""


def lm_files(tmp_path):
    jsonl(tmp_path / "a.jsonl", [{"text": f"alpha {i}"} for i in range(20)])
    jsonl(tmp_path / "b.jsonl", [{"instruction": f"do {i}", "output": "done"} for i in range(20)])


def test_dataset_config_block_is_the_datasets_form(tmp_path, tok):
    lm_files(tmp_path)
    (tmp_path / "lm.yaml").write_text(LM_DATASET_CONFIG)
    cfg = load_config(tmp_path / "lm.yaml")
    plain = json.loads(json.dumps(cfg_dict({"seq_length": 32})))
    plain["data_config"]["datasets"] = [
        {"name": "pile-uncopyrighted", "path": "a.jsonl", "streaming": True, "weight": 0.7, "text_field": "text"},
        {
            "name": "inst",
            "path": "b.jsonl",
            "streaming": True,
            "weight": 0.3,
            "text_template": "Instruction:\n{instruction}\n\nOutput:\n{output}",
        },
    ]
    (tmp_path / "plain.yaml").write_text(json.dumps(plain))
    assert cfg == load_config(tmp_path / "plain.yaml")
    assert cfg.data.seq_length == 32 and cfg.warnings == []
    docs = list(BatchStream(cfg.data, tok).documents())
    assert {d.labels["dataset"] for d in docs} == {"pile-uncopyrighted", "inst"}


def test_dataset_config_tokenizer_other_than_the_models_is_a_warning(tmp_path):
    lm_files(tmp_path)
    (tmp_path / "lm.yaml").write_text(
        LM_DATASET_CONFIG.replace('tokenizer_name: "some/model"', 'tokenizer_name: "gpt2"')
    )
    cfg = load_config(tmp_path / "lm.yaml")
    assert cfg.warnings == [
        "dataset_config.tokenizer_name: 'gpt2' is not the model's tokenizer ('some/model'); "
        "the text is tokenized with the model's own tokenizer"
    ]


@pytest.mark.parametrize(
    "edit,expected",
    [
        (
            lambda t: t.replace(
                "data_config: {n_batches: 4, batch_size: 2}",
                "data_config: {n_batches: 4, batch_size: 2, seq_length: 64}",
            ),
            "dataset_config.max_seq_length: 32 contradicts data_config.seq_length 64; write one of them",
        ),
        (
            lambda t: t.replace("batch_size: 2}", "batch_size: 2, data_key: pydoc}"),
            "dataset_config and data_config.data_key both give the text; keep one",
        ),
        (
            lambda t: t.replace('      text_field: "text"\n', ""),
            "dataset_config.datasets[0] ('pile-uncopyrighted'): give exactly one of text_field or text_template (neither given)",
        ),
        (
            lambda t: t.replace("weight: 0.7", "weight: -1"),
            "dataset_config.datasets[0].weight: -1 is not allowed (must be > 0)",
        ),
        (
            lambda t: t.replace("max_seq_length: 32", "max_seq_length: 1"),
            "dataset_config.max_seq_length: 1 is not allowed (must be >= 2)",
        ),
        (
            lambda t: t.replace("data_config: {n_batches: 4, batch_size: 2}\n", ""),
            "data_config: required but missing (n_batches and batch_size; the datasets come from dataset_config)",
        ),
        (
            lambda t: t + "train_config: {learning_rate: 5e-5}\n",
            "train_config: unknown key; training settings have no meaning for collection",
        ),
    ],
)
def test_dataset_config_errors_name_its_fields(tmp_path, edit, expected):
    lm_files(tmp_path)
    (tmp_path / "lm.yaml").write_text(edit(LM_DATASET_CONFIG))
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path / "lm.yaml")
    assert expected in str(ei.value), str(ei.value)


DATA_MIXES = """\
data_mixes:
  high_quality_mix:
    name: "high_quality_mix"
    datasets:
      - name: "custom_dataset_1"
        path: "a.jsonl"
        format: "json"
        split: "train"
        streaming: true
        weight: 0.4
        text_field: "text"
  science_mix:
    name: "science_mix"
    datasets:
      - {name: inst, path: b.jsonl, weight: 1, text_template: "{instruction} {output}"}
"""


def test_top_level_data_mixes_block(tmp_path):
    lm_files(tmp_path)
    head = "run_name: r\ntransformer_config: {model_name: some/model}\nupload_config: {hooks: [residuals_0]}\n"
    (tmp_path / "m.yaml").write_text(
        head + "data_config: {n_batches: 4, batch_size: 2, seq_length: 32, mix: science_mix}\n" + DATA_MIXES
    )
    cfg = load_config(tmp_path / "m.yaml")
    assert [d.name for d in cfg.data.datasets] == ["inst"] and cfg.data.mix is None
    assert cfg.data.datasets[0].path == str((tmp_path / "b.jsonl").resolve())
    (tmp_path / "m.yaml").write_text(head + "data_config: {n_batches: 4, batch_size: 2, seq_length: 32}\n" + DATA_MIXES)
    with pytest.raises(
        ConfigError,
        match=r"data_mixes: holds 2 mixes \(high_quality_mix, science_mix\); "
        r"pick one with data_config.mix",
    ):
        load_config(tmp_path / "m.yaml")
    (tmp_path / "m.yaml").write_text(
        head + "data_config: {n_batches: 4, batch_size: 2, seq_length: 32, mix: art}\n" + DATA_MIXES
    )
    with pytest.raises(
        ConfigError, match=r"data_config.mix: 'art' is not in data_mixes \(available: high_quality_mix, science_mix\)"
    ):
        load_config(tmp_path / "m.yaml")
