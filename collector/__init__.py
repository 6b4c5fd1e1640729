"""The collection worker: a config -> batches -> a forward pass with hooks -> megabatches in a store.

`config/` (schema, input forms, checks), `data/` (sources, templates, masks, batching), `layers`/`sites`/`capture`
(hook names, what they mean per family, capturing them), `model` (loading), `worker` (the loop), `uploader`
(bounded upload queue). It writes through `vaultsh.store` and `vaultsh.run` and never imports the shell, the
dashboard or the CLI.
"""
