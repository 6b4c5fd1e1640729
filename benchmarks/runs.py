"""Synthetic committed runs for the benchmarks that read runs back (reader, export)."""

from __future__ import annotations

SEQ_LEN = 1024
D_MODEL = 1024
HOOK = "blocks.12.hook_resid_post"


def write_float32_run(
    store, run_name: str, n_files: int, n_seq: int, hooks: tuple[str, ...] = (HOOK,)
) -> list[tuple[str, int]]:
    """A committed run of `n_files` float32 megabatches [n_seq, SEQ_LEN, D_MODEL] per hook (the same
    tokens in every hook) with metadata and statistics; returns [(key, size)] in commit order."""
    import torch

    from vaultsh.megabatch import write_megabatch
    from vaultsh.run import CommitRecord, FileRecord, Run, metadata_for
    from vaultsh.stats import RunningStats

    run = Run(store, run_name)
    for hook in hooks:
        run.write_metadata(hook, metadata_for(batch_size=n_seq, sequence_length=SEQ_LEN, d_in=D_MODEL, hook=hook))
    g = torch.Generator().manual_seed(0)
    block = torch.randn(1, SEQ_LEN, D_MODEL, generator=g)
    ids = torch.randint(0, 50_000, (n_seq, SEQ_LEN), generator=g)
    mask = torch.ones(n_seq, SEQ_LEN, dtype=torch.bool)
    mask[:, 0] = False
    real = int(mask.sum())  # as the collector records it: unmasked tokens
    out = []
    for i in range(n_files):
        files = {}
        for h, hook in enumerate(hooks):
            states = (block + i + h / 2).expand(n_seq, SEQ_LEN, D_MODEL).contiguous()
            key = run.megabatch_key(hook, 0, i)
            size = write_megabatch(store, key, states, ids, mask, metadata={"hook": hook})
            files[hook] = FileRecord(hook, key, size, None, n_seq, real, 0, i)
            out.append((key, size))
        run.commit(CommitRecord(0, i, i, i + 1, files, tokens=real))
    for hook in hooks:
        run.write_statistics(hook, RunningStats.from_batch(block[0]))
    return out
