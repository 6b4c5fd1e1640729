"""Streaming a hook's megabatches through the reader (its prefetch), for the scans."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from vaultsh.explore.scope import HookRef

Progress = Callable[[int, int], None]  # (files done, files in all)

ROWS_PER_CHUNK = 16384  # tokens per value computation: bounds the memory of an SAE's full encode


def megabatches(
    store, ref: HookRef, files: int | None = None, seed: int = 0, progress: Progress | None = None
) -> Iterator[tuple[str, dict]]:
    """(file key, megabatch dict with states, input_ids, mask) for the hook's committed files, in order;
    `files=N`: a seeded random sample of N files."""
    from vaultsh.reader import ActivationReader

    reader = ActivationReader(
        ref.key, store=store, return_ids=True, return_mask=True, return_file=True, shuffle=files is not None, seed=seed
    )
    keys = [f.key for f in reader.files]
    total = len(keys) if files is None else min(files, len(keys))
    try:
        for done, mb in enumerate(reader, 1):
            yield keys[mb["file_index"]], mb
            if progress:
                progress(done, total)
            if done >= total:
                break
    finally:
        reader.close()


def chunked(fn, x):
    """`fn` over row chunks of x [n, D] (one result [n])."""
    import torch

    if x.shape[0] <= ROWS_PER_CHUNK:
        return fn(x)
    return torch.cat([fn(x[i : i + ROWS_PER_CHUNK]) for i in range(0, x.shape[0], ROWS_PER_CHUNK)])


def token_values(vf, states):
    """Values [N, T] (float32) of every token of states [N, T, D]."""
    import torch

    n, t, d = states.shape
    if vf.name.startswith("dim "):  # one column: no need to convert the whole tensor
        return vf.fn(states).to(torch.float32, copy=True)  # callers may write into it
    x = states.reshape(n * t, d).to(torch.float32)
    return chunked(vf.fn, x).reshape(n, t)
