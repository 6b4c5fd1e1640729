"""Export a hook directory of a run to sharded Parquet (loadable with Hugging Face `datasets`).

    from vaultsh.export import ExportOptions, export
    export("s3://bucket/run/residuals_10", "out/", ExportOptions(mode="tokens", shuffle=True, seed=0))

Modules: `source` (resolve RUN/HOOK, probe and decode megabatches), `rows`
(dtype conversion, rows per mode, Arrow tables), `manifest` (plan, resume),
`parquet` (atomic shard writer), `pqwriter` (a minimal fast Parquet writer
for fixed-size-list columns), `shuffle` (global two-pass shuffle), `card`
(dataset card), `core` (the orchestration). numpy and pyarrow are imported by
these modules; import this package only from the export command.
"""

from vaultsh.export.core import CARD, ExportResult, Progress, export
from vaultsh.export.manifest import MANIFEST, ExportOptions

__all__ = ["export", "ExportOptions", "ExportResult", "Progress", "MANIFEST", "CARD"]
