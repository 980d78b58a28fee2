"""The completion loss reads only the logits it needs (``logits_to_keep``): the same losses as
from every position's logits, fewer positions through the output layer, and a model without
the argument still works."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fedpeft.data.instructions import InstructionDataset
from fedpeft.tasks.causal_lm import completion_logits, completion_losses, logits_to_keep
from fedpeft.tasks.chat import IGNORE, encode_examples
from fedpeft.tasks.registry import get

TASK = get("causal-lm")


@pytest.fixture(scope="module")
def lm(tiny_llama_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval(), tok


def _batch(tok) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    prompts = ("a much longer question about the colour of the sea and the sky?", "short?", "what is two plus two?")
    data = InstructionDataset(prompts, torch.zeros(3, dtype=torch.long).numpy(), ("all",),
                              responses=("blue", "yes it is", "four"))
    return encode_examples(tok, data, 48)


def _full_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook shift: logits[:, :-1] predict labels[:, 1:]."""
    ce = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                     ignore_index=IGNORE, reduction="none").view(labels[:, 1:].shape)
    return ce.sum(dim=1), (labels[:, 1:] != IGNORE).sum(dim=1)


def test_logits_to_keep_starts_one_before_the_earliest_target() -> None:
    labels = torch.full((2, 12), IGNORE)
    labels[0, 8:10] = 1
    labels[1, 5:7] = 1
    assert logits_to_keep(labels) == 12 - 4  # position 4 predicts the target at 5
    labels[1, 0] = 1  # a target at column 0 has no predictor: keep everything
    assert logits_to_keep(labels) == 12
    assert logits_to_keep(torch.full((2, 5), IGNORE)) == 1


def test_the_loss_from_the_kept_logits_equals_the_loss_from_all(lm) -> None:  # type: ignore[no-untyped-def]
    model, tok = lm
    batch = _batch(tok)
    labels = batch["labels"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    widths: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: widths.append(i[0].shape[1]))
    try:
        with torch.no_grad():
            kept = completion_logits(model, inputs, labels)
            full = model(**inputs).logits
    finally:
        hook.remove()
    assert widths[0] == kept.shape[1] == logits_to_keep(labels) < labels.shape[1]  # the prompt's logits were skipped
    sums, counts = completion_losses(kept, labels)
    ref_sums, ref_counts = _full_losses(full, labels)
    assert torch.equal(counts, ref_counts) and bool((counts > 0).all())
    assert torch.allclose(sums, ref_sums, atol=1e-5)
    assert torch.allclose(completion_losses(full, labels)[0], ref_sums, atol=1e-5)  # all logits: also accepted
    assert torch.allclose(TASK.example_loss(model, batch), ref_sums / ref_counts, atol=1e-5)


def test_a_model_without_logits_to_keep_gets_every_position(lm) -> None:  # type: ignore[no-untyped-def]
    model, tok = lm

    class Plain(nn.Module):  # a forward with no logits_to_keep (and no **kwargs)
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):  # type: ignore[no-untyped-def]
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    batch = _batch(tok)
    with torch.no_grad():
        ours = TASK.example_loss(Plain(), batch)
        sums, counts = _full_losses(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                    batch["labels"])
    assert torch.allclose(ours, sums / counts, atol=1e-5)
