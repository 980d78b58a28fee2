"""Sequence classification (``task_type = "seq-cls"``, the default): text in, one class out.

* Data: :mod:`fedpeft.data.sources` (Rotten Tomatoes, or a CSV/TSV/JSONL file with a text and
  a label column); labels are class indices in ``range(len(label_names))``.
* Model: ``AutoModelForSequenceClassification`` with ``num_labels`` = the number of classes,
  the checkpoint's pooling (:mod:`fedpeft.tasks.pooling`), and the classification head
  (``classifier`` for BERT-style encoders, ``score`` for decoder classifiers) re-initialised
  from the adapter seed, so every process starts from the same head without sending it. The
  head trains in full beside the adapter; PEFT's ``SEQ_CLS`` task type keeps it as a
  ``modules_to_save`` copy itself.
* Batches: ``input_ids`` and ``attention_mask`` (padded to ``model.max_length``, each physical
  chunk trimmed to its longest row) plus ``labels``.
* Loss: cross-entropy of the logits, per example; the training objective is its batch mean
  (``F.cross_entropy``'s own mean reduction, as before the task seam).
* Metrics: ``accuracy`` (argmax; primary, higher is better) and the mean cross-entropy ``loss``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedpeft.config import ConfigError, DataConfig, ModelConfig
from fedpeft.data.batching import Batch, to_device
from fedpeft.data.sources import TextDataset, load_dataset, train_test_split_for
from fedpeft.tasks.base import HeadMemory, TaskType
from fedpeft.tasks.model import fresh_copy, quiet_transformers, resolve_model_path, tokenize
from fedpeft.tasks.pooling import pooling_for, use_mean_pooling

__all__ = ["HEAD_PREFIXES", "SequenceClassification", "batches", "evaluate", "load_base_model"]

HEAD_PREFIXES = ("classifier", "score")
"""Top-level names of Hugging Face's sequence-classification heads (encoders: ``classifier``,
decoders: ``score``)."""


@lru_cache(maxsize=2)
def _load_base(path: str, num_labels: int, pooling: str) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()  # the "newly initialised head" notice is expected
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, attn_implementation="eager"
        )
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError("model.path", path, f"could not load a sequence-classification model ({first})") from None
    if pooling == "mean":
        use_mean_pooling(model)
    model.eval()
    return model


def load_base_model(cfg: ModelConfig, num_labels: int, head_seed: int = 0) -> nn.Module:
    """A fresh copy of the base classifier with a deterministically initialised head.

    The classification head is re-initialised from ``head_seed`` so that every process
    (server and clients) starts from the same head without sending it.
    """
    model = fresh_copy(lambda: _load_base(str(resolve_model_path(cfg)), num_labels, pooling_for(cfg)))
    gen = torch.Generator().manual_seed(head_seed)
    std = getattr(model.config, "initializer_range", 0.02)
    for name, module in model.named_modules():
        if name.split(".")[0] in HEAD_PREFIXES and isinstance(module, nn.Linear):
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                if module.bias is not None:
                    module.bias.zero_()
    return model


def batches(tokenizer: Any, texts: Sequence[str], labels: Sequence[int], batch_size: int,
            max_length: int) -> Iterator[Batch]:
    """Sequential evaluation batches, sorted by length to minimise padding."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenize(tokenizer, [texts[i] for i in idx], max_length)
        batch["labels"] = torch.as_tensor([labels[i] for i in idx])
        yield batch


def evaluate(model: nn.Module, tokenizer: Any, data: TextDataset, max_length: int, device: torch.device,
             batch_size: int = 128) -> dict[str, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``data``."""
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    with torch.inference_mode():
        for batch in batches(tokenizer, data.texts, data.labels.tolist(), batch_size, max_length):
            batch = to_device(batch, device)
            labels = batch.pop("labels")
            logits = model(**batch).logits
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            seen += len(labels)
    model.train(was_training)
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1), "examples": float(seen)}


class SequenceClassification(TaskType):
    """Text classification with a Hugging Face sequence-classification head (module doc)."""

    name = "seq-cls"
    description = "sequence classification: cross-entropy on the class of each text, argmax accuracy"
    peft_task_type = "SEQ_CLS"
    head_prefixes = HEAD_PREFIXES
    metric_names = ("accuracy", "loss")
    higher_is_better = True
    baseline_note = ("Always predicting the test set's majority class scores {value:.3f}; an accuracy near it "
                     "means the model learned (almost) nothing.")

    def load_data(self, cfg: DataConfig) -> TextDataset:
        return load_dataset(cfg)

    def train_test_split(self, cfg: DataConfig, seed: int) -> tuple[TextDataset, TextDataset]:
        return train_test_split_for(cfg, seed)  # cached per process: one split, shared by every caller

    def build_model(self, cfg: ModelConfig, num_outputs: int, head_seed: int = 0) -> nn.Module:
        return load_base_model(cfg, num_outputs, head_seed)

    def peft_config(self) -> dict[str, Any]:
        return {"task_type": self.peft_task_type}  # PEFT's SEQ_CLS wrapper saves classifier/score itself

    def head_memory(self, hidden: int, num_outputs: int) -> HeadMemory:
        # the linear classifier trains; BERT's pooler (dense h x h) stays frozen
        return HeadMemory(trained=hidden * num_outputs + num_outputs, frozen=hidden * hidden + hidden)

    def encode(self, tokenizer: Any, data: TextDataset, max_length: int) -> Batch:
        enc = tokenizer(list(data.texts), truncation=True, max_length=max_length, padding="max_length",
                        return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.as_tensor(data.labels, dtype=torch.long)}

    def eval_batches(self, tokenizer: Any, data: TextDataset, batch_size: int, max_length: int) -> Iterator[Batch]:
        return batches(tokenizer, data.texts, data.labels.tolist(), batch_size, max_length)

    def example_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(**self.model_inputs(batch)).logits
        return F.cross_entropy(logits, batch["labels"], reduction="none")

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(**self.model_inputs(batch)).logits
        return F.cross_entropy(logits, batch["labels"])  # the fused mean: bit-identical to earlier runs

    def evaluate(self, model: nn.Module, tokenizer: Any, data: TextDataset, max_length: int,
                 device: torch.device, batch_size: int = 128) -> dict[str, float]:
        return evaluate(model, tokenizer, data, max_length, device, batch_size)

    def baseline(self, test: TextDataset) -> float | None:
        return float(np.bincount(test.labels).max() / len(test)) if len(test) else None
