"""What the data code passes around: the data section, resolved sources, documents, batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch


from collector.config.schema import DataConfig

DEFAULT_SHUFFLE_BUFFER = 10_000
DEFAULT_MAX_DOC_CHARS = 2000


def DataSpec(data_key: str, seq_length: int, batch_size: int, n_batches: int, **fields: Any) -> DataConfig:
    """A data section built by hand (tests, benchmarks): a `DataConfig` with the given fields, not validated.

    `BatchStream` reads the config's `data_config` and this alike; the fields
    and their defaults are `collector.config.DataConfig`'s.
    """
    unknown = sorted(set(fields) - set(DataConfig.model_fields))
    if unknown:
        raise TypeError(f"DataSpec() got an unexpected keyword argument {unknown[0]!r}")
    return DataConfig.model_construct(
        data_key=data_key, seq_length=seq_length, batch_size=batch_size, n_batches=n_batches, **fields
    )


# what cfg.json says of a `datasets` source, under its entry's names (DatasetEntry) -> the SourceSpec field holding it
_ENTRY_FIELDS = dict(
    path="ds_path", subset="hf_subset", split="hf_split", format="ds_format", streaming="streaming", weight="weight"
)


@dataclass(frozen=True)
class SourceSpec:
    """A resolved data key: where documents come from and how to render them."""

    key: str  # the data_key as written
    name: str  # registry name, or the file / hub location for direct keys
    source: str  # "pydoc_topics" | "file:<abs path>" | "hf:<repo>[:<subset>]:<split>" | "datasets:<path>"
    kind: str  # "pydoc" | "file" | "hf" | "datasets" (a `datasets:` entry, loaded with HF datasets)
    chat: bool | None = False  # None: decided per record (direct files only)
    template_name: str | None = None
    text_field: str | None = None
    template: str | None = None
    chat_field: str | None = None
    chat_columns: tuple[tuple[str, str], ...] | None = None
    description: str = ""
    path: str | None = None
    hf_repo: str | None = None
    hf_subset: str | None = None
    hf_split: str | None = None
    filter: tuple[tuple[str, Any], ...] = ()
    shuffle: bool = True
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    txt_split: str = "paragraph"
    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS
    # kind "datasets" only
    ds_path: str | None = None  # hub id, or an absolute local file/directory
    ds_local: bool = False
    ds_format: str | None = None  # json | jsonl | csv | text | parquet (local files)
    streaming: bool = False
    weight: float = 1.0

    def to_dict(self) -> dict:
        """JSON-ready description (for cfg.json)."""
        out: dict[str, Any] = {
            "data_key": self.key,
            "name": self.name,
            "source": self.source,
            "chat": self.chat,
            "template_name": self.template_name,
            "text_field": self.text_field,
            "template": self.template,
            "chat_field": self.chat_field,
            "chat_columns": [list(p) for p in self.chat_columns] if self.chat_columns else None,
            "filter": dict(self.filter) or None,
            "shuffle": self.shuffle,
            "description": self.description,
        }
        if self.kind == "hf":
            out["shuffle_buffer"] = self.shuffle_buffer
        if self.kind == "file" and (self.path or "").endswith(".txt"):
            out["txt_split"] = self.txt_split
        if self.kind == "pydoc":
            out["max_doc_chars"] = self.max_doc_chars
        if self.kind == "datasets":
            out.update((name, getattr(self, attr)) for name, attr in _ENTRY_FIELDS.items())
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class Document:
    """One document: plain ``text`` or chat ``messages`` (role/content dicts)."""

    text: str | None = None
    messages: list[dict] | None = None
    index: int = -1  # record index in source order (stream position for hub sources)
    labels: dict[str, Any] = field(default_factory=dict)  # per-sequence labels (category, label_columns, ...)
    source: int = -1  # index of its source in BatchStream.sources (the `sources` of metadata.json)

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass
class Batch:
    """One global batch, on CPU."""

    index: int  # global batch index
    input_ids: torch.Tensor  # LongTensor [B, T]
    attention_mask: torch.Tensor  # LongTensor [B, T]: 1 real position, 0 padding
    mask: torch.Tensor  # BoolTensor [B, T]: True on content tokens only
    n_tokens: int = field(init=False)  # mask.sum(), counted once here
    doc_index: list[int] = field(default_factory=list)  # Document.index of each row
    labels: dict[str, list] = field(default_factory=dict)  # label name -> one value per row
    documents: list[Document] = field(default_factory=list)  # the rows' documents (not with packing)
    # provenance of each row's first token: (source index, document index, token offset); see collector/provenance.py
    source: list[tuple[int, int, int]] = field(default_factory=list)
    # packing only: every document piece of every row, (row, position, source, document, token offset)
    segments: list[tuple[int, int, int, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.n_tokens = int(self.mask.sum())

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_length(self) -> int:
        return int(self.input_ids.shape[1])


def batch_to_model_inputs(batch: Batch, device: Any) -> dict:
    """``input_ids`` and ``attention_mask`` of ``batch`` on ``device``, ready for ``model(**inputs)``."""
    import torch

    dev = torch.device(device)
    nb = dev.type == "cuda"
    return {
        "input_ids": batch.input_ids.to(dev, non_blocking=nb),
        "attention_mask": batch.attention_mask.to(dev, non_blocking=nb),
    }
