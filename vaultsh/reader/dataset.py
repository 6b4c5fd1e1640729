"""A torch IterableDataset over an ActivationReader."""

from __future__ import annotations

import torch

from vaultsh.errors import UserError
from vaultsh.reader.core import ActivationReader


class ActivationDataset(torch.utils.data.IterableDataset):
    """A torch IterableDataset over an ActivationReader.

        ds = ActivationDataset("s3://bucket/run/hook", tokens=True, batch_size=4096)
        loader = DataLoader(ds, batch_size=None, num_workers=4)

    Items are already batched: use `batch_size=None` in the DataLoader. Each
    worker reads its own share of the files (with its own connections);
    together the workers read every file exactly once. Stats live in the workers.
    `states_only=True` yields the bare `states` of each batch (a tensor, or a
    dict hook -> tensor for aligned reads), for trainers that take tensors.
    """

    def __init__(self, source=None, *, reader: ActivationReader | None = None, states_only: bool = False, **kwargs):
        super().__init__()
        self.states_only = bool(states_only)
        if reader is None:
            if source is None:
                raise UserError("ActivationDataset needs a source or a reader")
            reader = ActivationReader(source, **kwargs)
        elif source is not None or kwargs:
            raise UserError("pass either a reader or a source with options, not both")
        self.reader = reader

    def __iter__(self):
        if self.states_only:
            return (batch["states"] for batch in self.reader)
        return iter(self.reader)

    def set_epoch(self, epoch: int) -> None:
        self.reader.set_epoch(epoch)
