"""Runs written by the real collector (tiny random Llama, real tokenizer), shared by the shell and verify tests.

Not a test module itself: `collector_vault()` builds, once per test session,
a local store holding

- `duo/`  a safetensors run written by the collector's 2 workers (`num_runs: 2`,
          8 batches of 2 sequences, 2 batches per megabatch: 4 commit records, 2 hooks);
- `act/`  an Activault-layout run written with vaultsh.megabatch's `fmt="pt"`:
          `{uuid}--{n}_{job}.saved.pt` files, no commit records;

and `s3_vault()` copies them byte for byte into a bucket on the loopback S3 server.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from .fakes import activault_metadata
from .modelfixtures import TOKENIZER_DIR, make_tiny_llama_dir

HOOKS = ["residuals_0", "mlp_1"]
RUN = "duo"
ACT_UUID = "0f909221-ff28-4a94-a43f-cfe973e835cf"
ACT_HOOK = "models.layers.1.mlp.post"

_lock = threading.Lock()
_cache: dict = {}


def make_cfg(model_dir: Path, uri: str, run_name: str, **over):
    from collector.config import load_config

    raw = {
        "run_name": run_name,
        "num_runs": over.pop("num_runs", 1),
        "transformer_config": {"model_name": str(model_dir), "dtype": "float32"},
        "data_config": {
            "data_key": "pydoc",
            "n_batches": over.pop("n_batches", 6),
            "seq_length": 32,
            "batch_size": 2,
            "seed": 7,
            "clean_added_tokens": True,
        },
        "upload_config": {"batches_per_upload": 2, "hooks": HOOKS, "max_queued_megabatches": 2},
        "storage": {"uri": str(uri), **over.pop("storage", {})},
    }
    assert not over, over
    return load_config(raw)


def collect(cfg, worker: int = 0, store=None) -> dict:
    from collector.worker import run_worker
    from vaultsh.events import EventSink

    return run_worker(cfg, worker, sink=EventSink(worker, callback=lambda e: None), store=store)


def write_activault_run(store, run: str = "act", n_files: int = 3) -> None:
    """Activault's layout: cfg.json naming the tokenizer, metadata.json, `{uuid}--{n}_{job}.saved.pt` files."""
    import torch

    from vaultsh.megabatch import write_megabatch

    store.put_bytes(
        f"{run}/cfg.json",
        json.dumps({"run_name": run, "transformer_config": {"model_name": str(TOKENIZER_DIR)}}).encode(),
    )
    store.put_bytes(
        f"{run}/{ACT_HOOK}/metadata.json",
        json.dumps(
            activault_metadata(batch_size=2, sequence_length=16, d_in=8, batches_per_file=2, dtype="bfloat16")
        ).encode(),
    )
    g = torch.Generator().manual_seed(3)
    for n in range(n_files):
        write_megabatch(
            store,
            f"{run}/{ACT_HOOK}/{ACT_UUID}--{n}_0.saved.pt",
            torch.randn(4, 16, 8, generator=g).to(torch.bfloat16),
            torch.randint(100, 20000, (4, 16), generator=g),
            fmt="pt",
        )


def collector_vault(tmp_path_factory) -> dict:
    """The local store described above (built once per session) and what the collector reported."""
    with _lock:
        if "vault" not in _cache:
            from vaultsh.store import LocalStore

            base = tmp_path_factory.mktemp("collector-vault")
            model = make_tiny_llama_dir(base / "model")
            root = base / "vault"
            cfg = make_cfg(model, root, RUN, num_runs=2, n_batches=8)
            results = [collect(cfg, 0), collect(cfg, 1)]
            store = LocalStore(root)
            write_activault_run(store)
            _cache["vault"] = {"model": model, "root": root, "store": store, "results": results}
        return _cache["vault"]


def copy_tree(src, dst, prefix: str = "", dst_prefix: str | None = None) -> int:
    """Copy every object under `prefix` from store `src` to `dst` (byte for byte); returns the count."""
    n = 0
    dst_prefix = prefix if dst_prefix is None else dst_prefix
    for info in src.iter_objects(prefix):
        dst.put_bytes(dst_prefix + info.key[len(prefix) :], src.get_bytes(info.key))
        n += 1
    return n


def s3_vault(vault: dict, s3_server: str, s3_admin, bucket: str):
    """An S3Store on a new bucket holding a byte-for-byte copy of the collector's vault."""
    from vaultsh.store.s3 import S3Store

    s3_admin.create_bucket(Bucket=bucket)
    store = S3Store(bucket, endpoint_url=s3_server)
    copy_tree(vault["store"], store)
    return store
