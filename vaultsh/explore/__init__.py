"""Exploring a store: grep the text, exact top-activating tokens, SAE checks, heatmaps, norms.

One module per command, each a plain function returning a result with
`to_json()`; the shell (`vaultsh/shell/explore.py`) and the CLI
(`vaultsh/subcommands/{grep,top,sae_eval,view,norms}.py`) are thin wrappers.

- `scope.py`   which runs and hooks a URI or shell directory means
- `text.py`    token pieces, character offsets, decoded contexts
- `context.py` ranged reads of `input_ids` and `mask` only (bytes counted)
- `sae.py`     SAE checkpoints (SAELens and sparsify layouts, safetensors only)
- `values.py`  per-token values: a dimension, a direction, an SAE feature, the norm
- `source.py`  a token's provenance (source, document, offset) for `top` and `grep`
- `grep.py`, `top.py`, `saeeval.py`, `heat.py`, `norms.py`: the commands
- `render.py`  text for people (rich); `png.py` images (Pillow)

States are streamed through `vaultsh.reader.ActivationReader`; torch is
imported inside the functions that need it.
"""
