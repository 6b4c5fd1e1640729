"""Records of a `datasets:` source, loaded with Hugging Face `datasets`.

A hub id with `load_dataset(path, subset, split=..., streaming=...)`, a local
file or directory with the json/csv/text/parquet builders, a `save_to_disk`
directory with `load_from_disk`. Streaming entries are shuffled with a seeded
buffer, others with a seeded permutation.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from collector.data.specs import SourceSpec
from vaultsh.errors import UserError

BUILDERS = {"json": "json", "jsonl": "json", "csv": "csv", "text": "text", "parquet": "parquet"}
FORMAT_SUFFIXES = {
    "json": (".json", ".jsonl"),
    "jsonl": (".jsonl", ".json"),
    "csv": (".csv",),
    "text": (".txt", ".text"),
    "parquet": (".parquet",),
}


def is_saved_dataset(p: Path) -> bool:
    return any((p / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def iter_dataset_records(spec: SourceSpec, seed: int | None) -> Iterator[tuple[int, Any]]:
    """(index, record) of a 'datasets' source: source order (seed None) or seeded shuffled order."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise UserError(f"dataset {spec.name!r} is loaded with Hugging Face datasets: pip install datasets") from None
    where = f"dataset {spec.name!r} ({spec.ds_path})"
    try:
        ds = _open(spec)
    except UserError:
        raise
    except Exception as e:  # missing files, unknown split/subset, network, auth: one clear line
        raise UserError(f"{where}: could not load: {type(e).__name__}: {_first_line(e)}") from None
    shuffle = seed is not None and spec.shuffle
    if spec.streaming:
        if shuffle:
            ds = ds.shuffle(seed=seed, buffer_size=spec.shuffle_buffer)
        it = _guard(enumerate(ds), where)
        yield from it
        return
    n = len(ds)
    if shuffle:
        import numpy as np

        order: Iterator[int] = (int(i) for i in np.random.default_rng(seed).permutation(n))
    else:
        order = iter(range(n))
    for i in _guard(order, where):
        yield i, ds[i]


def _guard(it: Iterator, where: str) -> Iterator:
    """Re-raise errors from inside `datasets` (bad rows, parse errors) as one-line UserErrors."""
    while True:
        try:
            x = next(it)
        except StopIteration:
            return
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{where}: could not read a record: {type(e).__name__}: {_first_line(e)}") from None
        yield x


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else ""


def _open(spec: SourceSpec):
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    split = spec.hf_split or "train"
    if not spec.ds_local:
        return load_dataset(spec.ds_path, spec.hf_subset, split=split, streaming=spec.streaming)
    p = Path(spec.ds_path or "")
    if p.is_dir() and is_saved_dataset(p):
        ds = load_from_disk(str(p))
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise UserError(f"dataset {spec.name!r}: {p} has no split {split!r} (has: {', '.join(ds)})")
            ds = ds[split]
        assert isinstance(ds, Dataset)
        return ds.to_iterable_dataset() if spec.streaming else ds
    fmt = spec.ds_format or "json"
    if p.is_dir():
        files = sorted(str(x) for x in p.rglob("*") if x.is_file() and x.suffix.lower() in FORMAT_SUFFIXES[fmt])
        if not files:
            raise UserError(f"dataset {spec.name!r}: no {fmt} files under {p}")
    elif p.is_file():
        files = [str(p)]
    else:
        raise UserError(f"dataset {spec.name!r}: {p} does not exist")
    return load_dataset(BUILDERS[fmt], data_files={split: files}, split=split, streaming=spec.streaming)
