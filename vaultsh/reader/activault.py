"""Activault's `S3RCache` on vaultsh's reader: existing training scripts change one import."""

from __future__ import annotations

import os
import warnings
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import torch

from vaultsh.errors import UserError
from vaultsh.reader.core import MAX_CONNECTIONS, MB, ActivationReader
from vaultsh.reader.progress import ReaderStats
from vaultsh.run import Run
from vaultsh.store import is_s3_uri, normalize_key


def _activault_source(s3_prefix: str) -> str:
    """'s3://...' and existing local hook directories are taken as given; anything else is a bucket key."""
    s = str(s3_prefix)
    if is_s3_uri(s) or s.startswith("file://"):
        return s[len("file://") :] if s.startswith("file://") else s
    p = Path(s).expanduser()
    if p.is_absolute() or s.startswith(("./", "../", "~")) or (p.is_dir() and (p / "metadata.json").is_file()):
        return str(p)
    return ""


class S3RCache:
    """Activault's `S3RCache`, on vaultsh's reader: existing scripts change one import.

        cache = S3RCache.from_credentials(aws_access_key_id=..., aws_secret_access_key=...,
                                          s3_prefix="run_name/hook_name", device="cuda", return_ids=True)
        for batch in cache:
            batch["states"], batch["input_ids"]     # [N, T, D], [N, T]
        cache.finalize()

    As in Activault: the bucket is `bucket_name` (default `$S3_BUCKET_NAME`, else
    "main"), the endpoint `$S3_ENDPOINT_URL`; files are read in a seeded random
    order unless `preserve_file_order`; with `return_ids=False` each item is
    the states tensor, its tokens shuffled within the megabatch when `shuffle`;
    `buffer_size` megabatches are prefetched; `chunk_size` is the ranged-GET
    size and `concurrency` the number of parallel connections (capped at 64).
    Unlike Activault: only committed megabatches are read, files are checked
    (a bad one raises, or is skipped with `on_error="skip"`), tensors are
    moved to `device`, and `s3_prefix` may also be an `s3://` URI or a local
    hook directory. `device="cuda"` without CUDA falls back to the CPU with a
    warning (Activault never moved tensors). `paths` and `n_workers` are
    accepted and ignored (downloads run on threads, not processes). Any
    ActivationReader option can be passed as a keyword.
    """

    @classmethod
    def from_credentials(cls, aws_access_key_id=None, aws_secret_access_key=None, *args, **kwargs) -> S3RCache:
        return cls(None, *args, _credentials=(aws_access_key_id, aws_secret_access_key), **kwargs)

    def __init__(
        self,
        s3_client=None,
        s3_prefix: str | Sequence[str] = "",
        bucket_name: str | None = None,
        device: str = "cpu",
        concurrency: int = 100,
        chunk_size: int = 16 * MB,
        buffer_size: int = 2,
        shuffle: bool = True,
        preserve_file_order: bool = False,
        seed: int = 42,
        paths=None,
        n_workers: int = 1,
        return_ids: bool = False,
        *,
        _credentials: tuple | None = None,
        **reader_kwargs,
    ):
        prefixes = [s3_prefix] if isinstance(s3_prefix, (str, os.PathLike)) else list(s3_prefix)
        if not prefixes or not all(str(p).strip() for p in prefixes):
            raise UserError("S3RCache needs s3_prefix='RUN/HOOK' (a hook directory in the bucket)")
        bucket = (bucket_name or os.environ.get("S3_BUCKET_NAME") or "main").strip()
        if bucket.startswith("s3://"):
            bucket = bucket[len("s3://") :]
        bucket = bucket.strip("/")
        self.bucket_name = bucket
        self.s3_prefix = s3_prefix
        self.return_ids = bool(return_ids)
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            warnings.warn(
                f"S3RCache: device {str(device)!r} requested but CUDA is not available; using the CPU",
                RuntimeWarning,
                stacklevel=2,
            )
            dev = torch.device("cpu")
        self.device = dev

        locals_ = [_activault_source(p) for p in prefixes]
        store = None
        if not all(locals_):
            from vaultsh.store.s3 import S3Credentials, S3Store

            endpoint = os.environ.get("S3_ENDPOINT_URL") or None
            connections = min(int(concurrency), MAX_CONNECTIONS)
            if s3_client is not None:
                store = S3Store(bucket, endpoint_url=endpoint, client=s3_client)
            else:
                key, secret = _credentials if _credentials else (None, None)
                creds = S3Credentials(key, secret) if key is not None else None  # None: boto3's own chain
                store = S3Store(bucket, endpoint_url=endpoint, credentials=creds, max_concurrency=connections)
        sources = []
        for p, loc in zip(prefixes, locals_):
            sources.append(loc if loc else normalize_key(str(p)).strip("/"))
        # local/URI sources open their own stores; bucket keys go through `store`
        if store is not None and any(locals_):
            raise UserError("S3RCache: mix of bucket keys and s3:// URIs / local paths in s3_prefix; use one kind")
        opts: dict[str, Any] = dict(
            device=self.device,
            return_ids=self.return_ids,
            return_mask=False,
            shuffle=bool(shuffle and not preserve_file_order),
            seed=seed,
            prefetch=max(1, int(buffer_size)),
            connections=max(1, min(int(concurrency), MAX_CONNECTIONS)),
            range_bytes=int(chunk_size),
            _token_shuffle=bool(shuffle and not return_ids),
        )
        opts.update(reader_kwargs)
        self._reader = ActivationReader(sources if len(sources) > 1 else sources[0], store=store, **opts)
        self.metadata = self._reader.metadata
        try:
            first = self._reader._sources[0]
            self.config = Run(first.store, first.run).read_cfg() or {}
        except Exception:  # noqa: BLE001 - Activault only warns when cfg.json is missing
            self.config = {}
        self._it: Generator[dict, None, None] | None = None

    # Activault's surface ---------------------------------------------------------
    @property
    def current_file_index(self) -> int:
        return self._reader.file_index

    def set_file_index(self, index: int) -> None:
        self._reader.set_file_index(index)

    def sync(self) -> None:
        """Re-list the committed files (new megabatches since construction); applies to the next pass."""
        self._reader.refresh()

    @property
    def stats(self) -> ReaderStats:
        return self._reader.stats

    @property
    def reader(self) -> ActivationReader:
        return self._reader

    def __iter__(self):
        self._it = iter(self._reader)
        return self

    def __next__(self):
        if self._it is None:
            self._it = iter(self._reader)
        batch = next(self._it)
        if self.return_ids:
            return {"states": batch["states"], "input_ids": batch["input_ids"]}
        return batch["states"]

    def finalize(self) -> None:
        """Stop background downloads (Activault's clean-up call)."""
        if self._it is not None:
            self._it.close()
            self._it = None
        if self._reader._pf is not None:
            self._reader._pf.close()

    close = finalize

    def __repr__(self) -> str:
        return f"S3RCache(bucket={self.bucket_name!r}, s3_prefix={self.s3_prefix!r})"
