"""Text sources, the data registry, chat rendering, masks and batching.

Data keys
---------
``data_config.data_key`` is resolved by :func:`resolve_data_key` into a
:class:`SourceSpec`:

- ``NAME`` — an entry of the shipped registry ``collector/datasets.json``
  (plus the entries of a JSON file named by ``$VAULTSH_DATASETS``, which win);
- ``NAME:TEMPLATE`` — the same entry rendered with one of its named templates:
  ``chat`` (alias ``CHAT_TEMPLATE``, Activault's spelling) renders with the
  tokenizer's chat template, ``plain`` uses the raw text, and an entry may
  define more under ``"templates"``;
- a local file: ``file:PATH`` or any path ending in ``.txt``/``.jsonl``/
  ``.json``/``.csv`` (optionally ``:chat``/``:plain``); relative paths resolve
  against ``base_dir`` (the config file's directory), then the current
  directory, then the repository root;
- ``hf:REPO[:SUBSET]:SPLIT`` — a Hugging Face hub dataset, streamed (needs the
  optional ``datasets`` package).

Registry entries
----------------
``{"source": ..., "description": ..., "chat": bool}`` plus at most one way to
get text out of a record: ``text_field`` (a field holding text),
``template`` (a ``str.format`` template over the record's fields),
``chat_field`` (a field holding a list of messages, ``role``/``content`` or
ShareGPT ``from``/``value``) or ``chat_columns`` (``[[role, field], ...]``:
one message per field, Activault's ``chat_template``). With none of them a
record is auto-detected: a string, a ``text`` field, or a
``messages``/``conversations``/``conversation`` list. Optional:
``templates`` (``{name: {overrides}}``), ``filter`` (``{field: value}``,
records that differ are skipped), ``shuffle`` (default true),
``shuffle_buffer`` (streaming sources, default 10000), ``txt_split`` (``.txt``
files: ``paragraph`` (default) — one document per blank-line-separated block,
``line`` or ``file``), ``max_doc_chars`` (``pydoc_topics``: paragraphs are
packed into documents of up to this many characters, default 2000).

Documents and order
-------------------
A source yields records in a fixed order; empty records (no text, no
messages) and filtered ones are skipped. The order is shuffled
deterministically from ``seed``: a seeded permutation over finite sources
(pydoc, local files; ``.txt``/``.jsonl`` files are indexed by byte offset so
they are not held in memory), a seeded shuffle buffer over streaming ones
(``datasets``' own ``shuffle(seed, buffer_size)``, which also shuffles shards).

Batches
-------
Each sequence is one document: rendered (chat template if the source is
chat), tokenised, truncated on the right to ``seq_length`` and right-padded to
exactly ``seq_length`` with the pad token (eos when there is none). Global
batch ``b`` holds documents ``b*batch_size ... (b+1)*batch_size - 1`` of the
stream, so every worker (``b % num_workers == worker``) sees exactly the
batches a single worker would, and ``start_batch`` is pure slicing. Batches a
worker does not own are skipped without running the tokenizer, except with
``skip_cache`` (see below), where token counts decide which documents exist.
Every worker reads the whole document stream up to its last batch.

- ``skip_cache=True``: documents whose token count exceeds ``seq_length`` are
  dropped instead of truncated (Activault: "skip caching very long texts"),
  so every stored sequence is a whole document.
- End of data: the stream stops after the last *full* global batch; the
  documents of a final partial batch are not used. ``BatchStream.exhausted``
  and ``BatchStream.available_batches`` say so afterwards, and a warning is
  logged. A source too small for even one batch is a :class:`UserError`.
- ``packing: true``: documents are concatenated with EOS between them and cut
  into full rows of ``seq_length`` (collector/packing.py; not with
  ``skip_cache`` or generation). A row may then hold several documents:
  ``Batch.source`` names the one each row starts in and ``Batch.segments``
  every document piece, which the megabatch records as provenance
  (collector/provenance.py).

Masks
-----
``attention_mask`` is 1 on every real position (special tokens included) and
0 on padding. ``mask`` is True only on content: False on padding; with
``clean_added_tokens`` also False on tokens the tokenizer added (BOS/EOS) and
on every added/special token id (``<|im_start|>``, ``<|im_end|>``, ...), as
Activault does; with ``clean_default_system_prompt`` also False on the whole
system turn the chat template inserts when a conversation has no system
message (header, default prompt text and closing tokens). A system prompt
supplied by the data is kept. Tokens are masked, never deleted, so positions
stay aligned with the model's activations.

Layout
------
Each file has one job; this package re-exports the public names.

- ``specs.py``: `DataSpec` (a hand-built `DataConfig`), `SourceSpec`, `Document`, `Batch`;
- ``registry.py``: the data registry and `resolve_data_key`;
- ``records.py``: a source's records in order, as documents (`iter_documents`);
- ``hfdatasets.py``: records of `datasets:` sources, through Hugging Face `datasets`;
- ``sources.py``: the data section -> sources -> one labelled, mixed, shaped document stream;
- ``encode.py``: rendering, tokenising and masks (`find_default_system_block`);
- ``batches.py``: `BatchStream`, global batches sharded over workers.
"""

from __future__ import annotations

from collector.data.batches import BatchStream
from collector.data.encode import Encoder, find_default_system_block
from collector.data.records import buffer_shuffle, iter_documents, iter_records, record_to_document
from collector.data.registry import (
    CHAT_ALIASES,
    FILE_SUFFIXES,
    REGISTRY_ENV,
    REGISTRY_PATH,
    REPO_ROOT,
    TXT_SPLITS,
    load_registry,
    registry_names,
    resolve_data_key,
)
from collector.data.specs import (
    DEFAULT_MAX_DOC_CHARS,
    DEFAULT_SHUFFLE_BUFFER,
    Batch,
    DataSpec,
    Document,
    SourceSpec,
    batch_to_model_inputs,
)

_Encoder, _buffer_shuffle = Encoder, buffer_shuffle  # the names tests reach for

__all__ = [
    "Batch",
    "BatchStream",
    "DataSpec",
    "Document",
    "Encoder",
    "SourceSpec",
    "batch_to_model_inputs",
    "find_default_system_block",
    "iter_documents",
    "iter_records",
    "load_registry",
    "record_to_document",
    "registry_names",
    "resolve_data_key",
    "CHAT_ALIASES",
    "DEFAULT_MAX_DOC_CHARS",
    "DEFAULT_SHUFFLE_BUFFER",
    "FILE_SUFFIXES",
    "REGISTRY_ENV",
    "REGISTRY_PATH",
    "REPO_ROOT",
    "TXT_SPLITS",
    "buffer_shuffle",
]
