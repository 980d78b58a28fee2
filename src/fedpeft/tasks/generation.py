"""Greedy generation for evaluation, samples and ``fedpeft generate``; exact-match scoring.

Generation is greedy (``do_sample=False``): deterministic, so a score or a sample is a
function of the weights alone, and ``fedpeft generate`` and a plain
``PeftModel.from_pretrained(...).generate`` give the same tokens (tested). Prompts are
left-padded in batches sorted by length (:func:`fedpeft.tasks.chat.left_padded`); each
batch stops at the longest reference answer of its task plus a margin (short-answer tasks need a few
tokens, not ``model.max_new_tokens``), or at every row's end of turn.

Exact match compares normalised strings (SQuAD's normalisation: lower case, punctuation,
English articles and extra white space removed), so "Positive." matches "positive".
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fedpeft.data.batching import to_device
from fedpeft.tasks.chat import left_padded

__all__ = ["generate_ids", "generate_texts", "normalise_answer", "stop_token_ids"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalise_answer(text: str) -> str:
    """SQuAD-style normalisation for exact match."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Tokens that end a reply: EOS and, for chat templates, the end-of-turn token."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None
        if isinstance(tid, int):
            ids.add(tid)
    return sorted(ids)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module that has ``generate`` (Opacus's wrapper forwards to ``_module``)."""
    return getattr(model, "_module", model)


def generate_ids(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 device: torch.device, batch_size: int = 16) -> list[list[int]]:
    """Greedy continuation ids of every prompt (without the prompt, cut at the first stop token)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stops = stop_token_ids(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: dict[int, list[int]] = {}
    gen_model: Any = _unwrap(model)
    was_training = gen_model.training
    gen_model.eval()
    with torch.inference_mode():
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            batch = to_device(left_padded([prompts[i] for i in idx], pad), device)
            seqs = gen_model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                      eos_token_id=stops or None, temperature=None, top_p=None, top_k=None)
            width = batch["input_ids"].shape[1]
            for row, i in enumerate(idx):
                ids = seqs[row, width:].tolist()
                cut = next((k for k, t in enumerate(ids) if t in stops), len(ids))
                out[i] = ids[:cut]
    gen_model.train(was_training)
    return [out[i] for i in range(len(prompts))]


def generate_texts(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   device: torch.device, batch_size: int = 16) -> list[str]:
    """:func:`generate_ids`, decoded (special tokens dropped, white space stripped)."""
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens, device, batch_size)
    return [tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids]
