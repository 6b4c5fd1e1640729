"""`vaultsh s3`: a prompt-toolkit shell over a store (S3 bucket or local directory).

- `registry.py`  the command registry (decorator: name, aliases, args, flags, help)
- `commands.py`  the handlers; they return results, never print
- `results.py`   what handlers return (each with `to_json()`)
- `render.py`    results as text for people
- `completer.py` context-aware, threaded, cached completion
- `context.py`   the shell's state: store, current directory, caches
- `app.py`       the interactive loop and the batch runner
- `explore.py`   grep, top, sae-eval, norms; `values.py` the value options of top and view --heat
- `decode.py`, `tally.py`, `transfer.py`: tokenizer/decoding, filecount/sizecheck, downloads
- `verify` uses the headless `vaultsh/verify.py`, shared with `vaultsh verify`
"""

from __future__ import annotations

__all__ = ["Shell"]


def __getattr__(name: str):
    if name == "Shell":
        from vaultsh.shell.app import Shell

        return Shell
    raise AttributeError(name)
