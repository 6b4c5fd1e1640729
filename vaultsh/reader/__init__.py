"""Streaming reader: feed SAE training from a run at full speed (RCache-compatible).

    from vaultsh.reader import ActivationReader
    reader = ActivationReader("s3://bucket/run/blocks.12.hook_resid_post", device="cuda")
    for batch in reader:            # states [N, T, D], input_ids [N, T], mask [N, T]
        ...
    reader.close()

    # Activault's scripts keep working by changing one import:
    from vaultsh.reader import S3RCache

Only committed megabatches are read (an Activault run without commit records
counts as all-committed), safetensors or Activault `.saved.pt` (loaded with
`weights_only=True`), from a LocalStore or any S3 endpoint. See docs/reader.md.

Modules, one job each: `fetch` (stores, ranged reads, retries), `buffers`
(buffer pool under a byte limit), `prefetch` (background downloads of one pass), `decode`
(bytes -> checked tensors), `stage` (device, dtype, normalisation), `tokens`
(token batches, mixing buffer), `core` (ActivationReader), `dataset` (torch
IterableDataset), `activault` (S3RCache), `progress` (ReaderStats).

Importing this package imports torch.
"""

from vaultsh.reader.activault import S3RCache
from vaultsh.reader.core import ActivationReader, SkippedFileWarning
from vaultsh.reader.dataset import ActivationDataset
from vaultsh.reader.progress import ReaderStats
from vaultsh.reader.stage import NORMALIZE_MODES

__all__ = ["ActivationReader", "ActivationDataset", "S3RCache", "ReaderStats", "SkippedFileWarning", "NORMALIZE_MODES"]
