"""Instruction examples as token sequences: the chat template, completion-only targets, padding.

One example is (system prompt, earlier turns, user prompt, response)
(:class:`fedpeft.data.instructions.InstructionDataset`). The *prompt* is everything the
model is given -- rendered with the tokenizer's chat template and its generation prompt
(``<|im_start|>assistant\\n`` for SmolLM2), or, for a model without a template, a plain
``### Instruction: / ### Response:`` format -- and the *completion* is what it must learn to
produce: the response and the template's end-of-turn text (the tokenizer's EOS for the plain
format), so a tuned model also learns to stop.

The two are tokenised separately (prompt ids, then completion ids) and concatenated: exactly
the ids the model sees when :mod:`fedpeft.tasks.generation` feeds it the prompt and it
generates, so training and inference agree at the boundary. Targets are the completion's
ids; prompt and padding positions get :data:`IGNORE` (PyTorch's ``ignore_index``), so the
loss is the completion's alone.

Truncation keeps the completion (up to ``max_length - 1`` tokens) and cuts the prompt from
the *left*: the end of a prompt (the question and the generation prompt) matters most.
Training batches are right-padded (the bucketing in :mod:`fedpeft.data.batching` trims each
physical chunk to its longest row); generation batches are left-padded (every row's next
token is at the last position).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedpeft.data.batching import Batch
from fedpeft.data.instructions import InstructionDataset

__all__ = ["IGNORE", "PLAIN_RESPONSE", "encode_examples", "example_messages", "left_padded", "messages_prompt_ids",
           "prompt_ids", "render_prompt"]

IGNORE = -100
"""Target of a position that is not learned (prompt, padding): ``F.cross_entropy``'s default ``ignore_index``."""

PLAIN_INSTRUCTION = "### Instruction:\n"
PLAIN_RESPONSE = "\n\n### Response:\n"


def example_messages(data: InstructionDataset, i: int) -> list[dict[str, str]]:
    """Example ``i``'s conversation up to (not including) its response, as chat messages."""
    messages: list[dict[str, str]] = []
    if data.systems and data.systems[i]:
        messages.append({"role": "system", "content": data.systems[i]})
    if data.histories:
        messages.extend({"role": role, "content": content} for role, content in data.histories[i])
    messages.append({"role": "user", "content": data.texts[i]})
    return messages


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """The prompt text of a conversation: the chat template with its generation prompt, or
    the plain instruction format for a tokenizer without a template."""
    if _has_template(tokenizer):
        return str(tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True))
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"] + "\n\n")
        elif m["role"] == "user":
            parts.append(PLAIN_INSTRUCTION + m["content"])
        else:
            parts.append(PLAIN_RESPONSE + m["content"] + "\n\n")
    return "".join(parts) + PLAIN_RESPONSE


def _completion_text(tokenizer: Any, messages: Sequence[dict[str, str]], prompt: str, response: str) -> str:
    """The text after the prompt that a model must produce: the response and the template's
    end of turn (the template's own rendering of the whole conversation, minus the prompt)."""
    if _has_template(tokenizer):
        full = str(tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}],
                                                 tokenize=False))
        if full.startswith(prompt) and len(full) > len(prompt):
            return full[len(prompt):]
    return response + (tokenizer.eos_token or "")


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer: Any, data: InstructionDataset, i: int) -> list[int]:
    """Token ids of example ``i``'s prompt (what generation starts from)."""
    return messages_prompt_ids(tokenizer, example_messages(data, i))


def messages_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a conversation's prompt: training, evaluation and ``fedpeft generate``
    all start from these. A tokenizer that adds a BOS token to every sequence (Llama's) gets
    it here, at the very start."""
    ids = _ids(tokenizer, render_prompt(tokenizer, messages))
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", False) and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def _example(tokenizer: Any, data: InstructionDataset, i: int, max_length: int) -> tuple[list[int], list[int]]:
    messages = example_messages(data, i)
    prompt = render_prompt(tokenizer, messages)
    p_ids = prompt_ids(tokenizer, data, i)
    c_ids = _ids(tokenizer, _completion_text(tokenizer, messages, prompt, data.responses[i]))[: max_length - 1]
    p_ids = p_ids[-(max_length - len(c_ids)):]  # keep the prompt's end: the question and the generation prompt
    return p_ids, c_ids


def encode_examples(tokenizer: Any, data: InstructionDataset, max_length: int) -> Batch:
    """Every example as one right-padded batch of ``max_length`` columns: ``input_ids``,
    ``attention_mask`` and ``labels`` (completion ids; :data:`IGNORE` on prompt and padding)."""
    n = len(data)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((n, max_length), pad, dtype=torch.long)
    mask = torch.zeros((n, max_length), dtype=torch.long)
    labels = torch.full((n, max_length), IGNORE, dtype=torch.long)
    for i in range(n):
        p_ids, c_ids = _example(tokenizer, data, i, max_length)
        row = p_ids + c_ids
        input_ids[i, : len(row)] = torch.as_tensor(row)
        mask[i, : len(row)] = 1
        labels[i, len(p_ids) : len(row)] = torch.as_tensor(c_ids, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def left_padded(rows: Sequence[Sequence[int]], pad: int) -> Batch:
    """Token rows left-padded to the longest (generation: every row's next token is last)."""
    width = max((len(r) for r in rows), default=1)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            input_ids[i, width - len(r):] = torch.as_tensor(list(r))
            mask[i, width - len(r):] = 1
    return {"input_ids": input_ids, "attention_mask": mask}
