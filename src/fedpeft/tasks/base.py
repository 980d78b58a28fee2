"""The task-type interface: everything fedpeft does that depends on *what* is learned.

A task type is the axis that PEFT calls ``TaskType`` (it picks the wrapper class and which
modules train in full beside the adapter) and that torchtune leaves to ``cfg.loss`` and the
recipe's collate function. Here one object owns all of it, so the trainer, the server's
loop, the adapter plugins and the simulators never look inside a batch:

* **data** -- :meth:`TaskType.load_data` reads the examples named by ``[data]`` and
  :meth:`TaskType.train_test_split` gives the run's fixed (training pool, held-out test set);
  :meth:`TaskType.load_task` reads one task of a multi-task federation (``[tasks]``) and
  :meth:`TaskType.task_layout` lays out the run's tasks with both;
* **model** -- :meth:`TaskType.build_model` loads the base model from ``[model]`` and sizes
  it with what the data tells it (:meth:`TaskType.num_outputs`, e.g. the number of labels);
  :attr:`TaskType.head_prefixes` names the top-level modules that train in full beside the
  adapter (the classification head), :meth:`TaskType.peft_config` what PEFT's ``LoraConfig``
  needs to know about the task;
* **collation** -- :meth:`TaskType.encode` turns examples into one named :data:`Batch`
  (model inputs *and* targets, padded to ``max_length``); :meth:`TaskType.chunks` cuts a
  logical batch into length-sorted physical chunks; :meth:`TaskType.model_inputs` picks what
  the model's forward takes;
* **objective** -- :meth:`TaskType.example_loss`, one value per example (what DP-SGD clips);
  :meth:`TaskType.loss` is its mean over the batch, the default loss of every adapter plugin;
* **evaluation** -- :meth:`TaskType.evaluate` returns a metrics dict with every name in
  :attr:`TaskType.metric_names` (what ``metrics.jsonl`` records), the first of which is the
  :attr:`TaskType.primary_metric` (``higher_is_better`` says which way is better);
* **memory model** -- :meth:`TaskType.head_memory`: the head's parameters, for the
  heterogeneous-client memory estimate.

A new task type subclasses :class:`TaskType` in ``src/fedpeft/tasks/``, is registered in
:mod:`fedpeft.tasks.registry`, and is chosen with the top-level config key ``task_type``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from fedpeft.config import DataConfig, ModelConfig, RunConfig
from fedpeft.config.tasks import TaskSpec
from fedpeft.data.batching import Batch, bucket_batch
from fedpeft.data.layout import TaskLayout, load_task, task_layout
from fedpeft.data.sources import TextDataset, split_train_test, with_label_names
from fedpeft.tasks.model import load_tokenizer, resolve_model_path

__all__ = ["HeadMemory", "TaskType"]


@dataclass(frozen=True)
class HeadMemory:
    """What the heterogeneous-client memory model needs about a task's head.

    ``trained``: parameters trained in full beside the adapter (their values, gradients,
    optimizer moments and, under DP, per-example gradients count); ``frozen``: frozen
    parameters outside the encoder's embeddings and layers (e.g. BERT's pooler);
    ``vocab_logit_bytes``: > 0 when the task scores the whole vocabulary at every position
    with the model's own language-model head (a causal LM: an untied head's weights then
    count, a tied one is the input embedding), the bytes its loss holds per position and
    vocabulary entry at its peak (the logits and the loss's copies of them)."""

    trained: int
    frozen: int = 0
    vocab_logit_bytes: int = 0


class TaskType(ABC):
    """One task type. Subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    peft_task_type: ClassVar[str | None] = None  # a value of peft.TaskType, e.g. "SEQ_CLS"
    head_prefixes: ClassVar[tuple[str, ...]] = ()  # top-level modules trained in full beside the adapter
    input_keys: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask")  # what the model's forward takes
    sequence_keys: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask")  # batch tensors with a token axis
    target_key: ClassVar[str] = "labels"  # the batch's targets (never given to the model's forward)
    metric_names: ClassVar[tuple[str, ...]] = ("loss",)  # columns of metrics.jsonl; the first is primary
    higher_is_better: ClassVar[bool] = False  # of the primary metric
    baseline_note: ClassVar[str] = ""  # a sentence about :meth:`baseline`, formatted with ``value=``
    evaluates_initial_model: ClassVar[bool] = False  # the server scores the round-0 model too (initial_eval.json)

    @property
    def primary_metric(self) -> str:
        """The metric a run is judged by (reports, plots, the CLI's summary line)."""
        return self.metric_names[0]

    # ---- configuration -------------------------------------------------------------------
    def validate_config(self, cfg: RunConfig) -> None:
        """Raise ``ConfigError`` for settings this task type cannot honour (default: none)."""
        return None

    def resolve_config(self, cfg: RunConfig) -> RunConfig:
        """``cfg`` with every host-dependent ``auto`` this task type reads made concrete, by the
        server, once, before the configuration is sent: every client then loads the same
        weights, whatever its own hardware (default: nothing host-dependent)."""
        return cfg

    # ---- data ----------------------------------------------------------------------------
    @abstractmethod
    def load_data(self, cfg: DataConfig) -> TextDataset:
        """Every example named by ``cfg`` (a deployed node calls this on its own file).

        ``labels`` of the result are the strata the held-out split balances and the
        label-based partitions use (the class for classification; all 0 for a task without
        classes, with one label name)."""

    def train_test_split(self, cfg: DataConfig, seed: int) -> tuple[TextDataset, TextDataset]:
        """The run's (training pool, held-out test set); identical in every process. A task
        type that loads through a per-process cache overrides this to split once."""
        return split_train_test(self.load_data(cfg), cfg.test_size, seed)

    def load_task(self, spec: TaskSpec) -> TextDataset:
        """Every example of one ``[tasks]`` task: a shipped one by name, or the user's file
        (``spec.path``); cached per process. Default: classification's loader
        (:func:`fedpeft.data.layout.load_task`: labelled texts)."""
        return load_task(spec)

    def task_layout(self, cfg: RunConfig) -> TaskLayout:
        """The run's task layout, its data read and split by this task type (what the server,
        every client process and the simulator's preflight use)."""
        return task_layout(cfg, self.train_test_split, self.load_task)

    def with_federation_labels(self, data: TextDataset, names: tuple[str, ...], source: str) -> TextDataset:
        """A deployed node's own data with its labels in the federation's vocabulary ``names``
        (classification: label i must be the same class everywhere; an unknown one is an
        error). A task type whose labels are only strata (partitioning, balancing) keeps the
        node's data as it is."""
        return with_label_names(data, names, source)

    # ---- model ---------------------------------------------------------------------------
    def resolve_model(self, cfg: ModelConfig) -> Path:
        """The local model directory ``cfg`` names (ConfigError if there is none); a
        preflight before any process starts, and what an exported adapter names as its base."""
        return resolve_model_path(cfg)

    def load_tokenizer(self, cfg: ModelConfig) -> Any:
        """The model's tokenizer (cached per process)."""
        return load_tokenizer(cfg)

    def num_outputs(self, data: TextDataset) -> int:
        """What the data tells the model (default: the number of label names)."""
        return data.num_classes

    @abstractmethod
    def build_model(self, cfg: ModelConfig, num_outputs: int, head_seed: int = 0) -> nn.Module:
        """A fresh base model, identical in every process: a new head is initialised from
        ``head_seed``, never from the global RNG, so it need not be sent."""

    def peft_config(self) -> dict[str, Any]:
        """Keyword arguments for PEFT's ``LoraConfig`` that depend on the task (default: the
        PEFT task type, and :attr:`head_prefixes` as ``modules_to_save``)."""
        return {"task_type": self.peft_task_type, "modules_to_save": list(self.head_prefixes) or None}

    def is_head(self, name: str) -> bool:
        """Whether parameter ``name`` (of the model as :meth:`build_model` returns it) is in a head."""
        return name.split(".")[0] in self.head_prefixes

    @abstractmethod
    def head_memory(self, hidden: int, num_outputs: int) -> HeadMemory:
        """The head's parameter counts for an encoder of width ``hidden``."""

    # ---- collation -----------------------------------------------------------------------
    @abstractmethod
    def encode(self, tokenizer: Any, data: TextDataset, max_length: int) -> Batch:
        """All of ``data`` as one batch, row i = example i, padded to ``max_length`` (the
        trainer's dataset; :meth:`chunks` trims each physical chunk to its own length)."""

    def chunks(self, batch: Batch, size: int) -> list[Batch]:
        """Physical chunks of a logical batch: at most ``size`` examples each, sorted by
        length and trimmed to their longest row (:func:`fedpeft.data.batching.bucket_batch`)."""
        return bucket_batch(batch, size, self.sequence_keys)

    def model_inputs(self, batch: Batch) -> Batch:
        """The keyword arguments of the model's forward (no targets)."""
        return {k: batch[k] for k in self.input_keys}

    @abstractmethod
    def eval_batches(self, tokenizer: Any, data: TextDataset, batch_size: int, max_length: int) -> Iterator[Batch]:
        """Sequential batches of ``data`` for evaluation (and the server's public-data steps)."""

    # ---- objective and evaluation --------------------------------------------------------
    @abstractmethod
    def example_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The loss of every example of ``batch``, shape ``(len(batch),)``."""

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The training objective of a batch: the mean per-example loss (Opacus's ``mean``
        reduction scales it back per example)."""
        return self.example_loss(model, batch).mean()

    @abstractmethod
    def evaluate(self, model: nn.Module, tokenizer: Any, data: TextDataset, max_length: int,
                 device: torch.device, batch_size: int = 128) -> dict[str, Any]:
        """Every name in :attr:`metric_names` (and ``examples``) of ``model`` on ``data``; a
        task type may add ``<metric>_per_task`` tables (name -> value) for its strata."""

    def samples(self, model: nn.Module, tokenizer: Any, data: TextDataset, max_length: int, device: torch.device,
                max_new_tokens: int, per_stratum: int = 2) -> list[dict[str, str]]:
        """A few example outputs of ``model`` on held-out data, written to the run directory
        each round (``samples/round-NNN.jsonl``); default: none (a classifier's are its metrics)."""
        return []

    def baseline(self, test: TextDataset) -> float | None:
        """The primary metric of a model that learned nothing, if it has a closed form
        (reports say how far above it a run got); default: none."""
        return None

    def describe(self) -> str:
        better = "higher" if self.higher_is_better else "lower"
        return f"{self.name:<10} {self.description} | metric: {self.primary_metric} ({better} is better)"
