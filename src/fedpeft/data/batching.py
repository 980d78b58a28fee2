"""Batches as opaque dicts of tensors, and the physical chunks of a logical batch.

A *batch* maps names to tensors whose first dimension is the example; what the names mean
(model inputs, class labels, token targets) is the task type's business
(:mod:`fedpeft.tasks`), so the trainer, the DP audit and the server's cost model move
batches around without knowing what is in them.

A logical (Poisson) batch is sorted by length and cut into chunks of at most
``physical_batch_size`` examples, each trimmed to its own longest sequence: compute follows
the real snippet lengths, and the gradient of the logical batch is the same sum over
examples. The client's trainer and the server's emulation of device time
(:mod:`fedpeft.sim.hetero.cost`) cut the same chunks, so the functions live here, below both.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch.utils.data import TensorDataset

__all__ = ["Batch", "BatchDataset", "batch_len", "bucket_batch", "length_buckets", "to_device"]

Batch = dict[str, torch.Tensor]


def batch_len(batch: Mapping[str, torch.Tensor]) -> int:
    """Number of examples in ``batch`` (the first dimension of its tensors; 0 when empty)."""
    return len(next(iter(batch.values()))) if batch else 0


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> Batch:
    """``batch`` with every tensor on ``device``."""
    return {k: v.to(device) for k, v in batch.items()}


def _bucket_plan(mask: torch.Tensor, chunk: int) -> Iterator[tuple[torch.Tensor, int]]:
    """(row indices, width) of each chunk: rows by descending length (stable), at most
    ``chunk`` per chunk, each chunk as wide as its longest row (at least 1)."""
    lengths = mask.sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True)
    for lo in range(0, len(order), chunk):
        idx = order[lo : lo + chunk]
        yield idx, max(int(lengths[idx].max()), 1)


def length_buckets(
    input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, chunk: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Split one logical batch into chunks of at most ``chunk`` examples of similar length,
    each trimmed to its own longest sequence (right padding). An empty batch gives no chunks."""
    return [(input_ids[idx, :width], mask[idx, :width], labels[idx]) for idx, width in _bucket_plan(mask, chunk)]


def bucket_batch(batch: Mapping[str, torch.Tensor], chunk: int, sequence_keys: Sequence[str],
                 mask_key: str = "attention_mask") -> list[Batch]:
    """:func:`length_buckets` for a named batch: lengths from ``batch[mask_key]``; the tensors
    named in ``sequence_keys`` are trimmed along dimension 1, the others only indexed by row."""
    seq = set(sequence_keys)
    return [{k: (v[idx, :width] if k in seq else v[idx]) for k, v in batch.items()}
            for idx, width in _bucket_plan(batch[mask_key], chunk)]


class BatchDataset(TensorDataset):
    """A ``TensorDataset`` of a whole encoded batch that remembers the tensors' names.

    Opacus's Poisson loader needs a dataset whose items are tuples of tensors (it builds the
    empty batch from the shapes of item 0), so the names travel beside: :meth:`as_batch`
    turns what a loader yields back into a :data:`Batch`.
    """

    def __init__(self, batch: Mapping[str, torch.Tensor]) -> None:
        self.keys = tuple(batch)
        super().__init__(*batch.values())

    def as_batch(self, tensors: Sequence[torch.Tensor]) -> Batch:
        """The loader's tuple (or list) of tensors as a named batch."""
        return dict(zip(self.keys, tensors, strict=True))
