"""Physical chunks of a logical batch: shared by the client's trainer and the server's cost model.

A logical (Poisson) batch is sorted by length and cut into chunks of at most
``physical_batch_size`` examples, each trimmed to its own longest sequence: compute follows
the real snippet lengths, and the gradient of the logical batch is the same sum over
examples. The server's emulation of device time (:mod:`fedpeft.sim.hetero.cost`) times the
same chunks, so the function lives here, below both.
"""

from __future__ import annotations

import torch

__all__ = ["length_buckets"]


def length_buckets(
    input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, chunk: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Split one logical batch into chunks of at most ``chunk`` examples of similar length,
    each trimmed to its own longest sequence (right padding). An empty batch gives no chunks."""
    lengths = mask.sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True)
    out = []
    for lo in range(0, len(order), chunk):
        idx = order[lo : lo + chunk]
        width = max(int(lengths[idx].max()), 1)
        out.append((input_ids[idx, :width], mask[idx, :width], labels[idx]))
    return out
