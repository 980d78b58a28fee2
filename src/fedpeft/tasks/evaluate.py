"""Evaluation of a (possibly adapted) classifier on a labelled text set."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fedpeft.data.sources import TextDataset
from fedpeft.tasks.model import batches

__all__ = ["evaluate"]


def evaluate(
    model: nn.Module, tokenizer, data: TextDataset, max_length: int, device: torch.device, batch_size: int = 128  # type: ignore[no-untyped-def]
) -> dict[str, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``data``."""
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    with torch.inference_mode():
        for batch, labels in batches(tokenizer, data.texts, data.labels.tolist(), batch_size, max_length):
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = labels.to(device)
            logits = model(**batch).logits
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            seen += len(labels)
    model.train(was_training)
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1), "examples": float(seen)}
