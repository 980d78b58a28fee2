"""The causal-LM task type on a tiny random Llama: encoding, per-example loss, DP gradients,
generation with left padding, exact match, and the configuration's task-type defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedpeft.config import ConfigError
from fedpeft.data.instructions import InstructionDataset
from fedpeft.load import parse_config
from fedpeft.tasks.causal_lm import CausalLM, completion_losses
from fedpeft.tasks.chat import IGNORE, encode_examples, prompt_ids, render_prompt
from fedpeft.tasks.generation import generate_ids, normalise_answer
from fedpeft.tasks.registry import get

TASK = get("causal-lm")


def _data(n: int = 4, long_prompt: bool = False) -> InstructionDataset:
    prompts = tuple(("tell me a long story about the sea " * 20 if long_prompt and i == 0 else f"what is {i} plus one?")
                    for i in range(n))
    responses = tuple(f"it is {i + 1}" for i in range(n))
    return InstructionDataset(prompts, torch.zeros(n, dtype=torch.long).numpy(), ("all",), responses=responses,
                              systems=("",) * n, histories=((),) * n)


@pytest.fixture(scope="module")
def lm(tiny_llama_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()
    return model, tok


def test_the_task_type_is_registered_with_causal_lm_defaults(tiny_llama_dir: Path) -> None:
    assert isinstance(TASK, CausalLM)
    cfg = parse_config({"task_type": "causal-lm", "model.path": str(tiny_llama_dir)})
    assert cfg.adapter.target_modules == ("q_proj", "v_proj")
    assert cfg.model.max_length == 128 and cfg.data.partition == "by-column" and cfg.data.label_column == "source"
    # the user's layer still wins over the task type's defaults
    own = parse_config({"task_type": "causal-lm", "model.path": str(tiny_llama_dir), "model.max_length": 64,
                        "adapter.target_modules": "q_proj"})
    assert own.model.max_length == 64 and own.adapter.target_modules == ("q_proj",)
    assert parse_config().adapter.target_modules == ("query", "value")  # seq-cls unchanged


def test_every_task_type_default_names_a_real_field() -> None:
    from dataclasses import fields

    from fedpeft.config import TASK_TYPE_DEFAULTS, RunConfig

    sections = {f.name: f.default_factory() for f in fields(RunConfig) if callable(f.default_factory)}  # type: ignore[misc]
    for task_type, layer in TASK_TYPE_DEFAULTS.items():
        get(task_type)  # a registered task type
        for section, values in layer.items():
            known = {f.name for f in fields(sections[section])}
            assert set(values) <= known, (task_type, section, set(values) - known)


def test_label_proportions_are_refused_for_instruction_data(tiny_llama_dir: Path) -> None:
    with pytest.raises(ConfigError, match="no classes"):
        parse_config({"task_type": "causal-lm", "model.path": str(tiny_llama_dir),
                      "data.partition": "label-proportions"})


def test_only_completion_tokens_are_targets(lm) -> None:  # type: ignore[no-untyped-def]
    _, tok = lm
    data = _data()
    batch = encode_examples(tok, data, 48)
    for i in range(len(data)):
        targets = batch["labels"][i][batch["labels"][i] != IGNORE].tolist()
        text = tok.decode(targets, skip_special_tokens=False)
        assert text.startswith(data.responses[i]), text  # the response ...
        assert text.rstrip().endswith(tok.eos_token)  # ... and the end of turn, so a tuned model learns to stop
        p_len = len(prompt_ids(tok, data, i))
        assert (batch["labels"][i][:p_len] == IGNORE).all()  # the prompt is never a target
        assert batch["input_ids"][i][:p_len].tolist() == prompt_ids(tok, data, i)
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == IGNORE).all()


def test_truncation_keeps_the_completion_and_the_end_of_the_prompt(lm) -> None:  # type: ignore[no-untyped-def]
    _, tok = lm
    data = _data(2, long_prompt=True)
    batch = encode_examples(tok, data, 24)
    row = batch["input_ids"][0].tolist()
    ends_with = tok("[unused0]assistant", add_special_tokens=False)["input_ids"]
    targets = batch["labels"][0][batch["labels"][0] != IGNORE].tolist()
    assert tok.decode(targets).startswith("it is 1")
    start = row.index(targets[0])
    assert row[start - len(ends_with):start] == ends_with  # the generation prompt survived the cut


def test_plain_format_without_a_chat_template(lm) -> None:  # type: ignore[no-untyped-def]
    import copy

    _, tok = lm
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    text = render_prompt(plain, [{"role": "user", "content": "hello"}])
    assert "### Instruction:" in text and text.endswith("### Response:\n")
    batch = encode_examples(plain, _data(1), 48)
    targets = batch["labels"][0][batch["labels"][0] != IGNORE].tolist()
    assert plain.decode(targets, skip_special_tokens=True).strip() == "it is 1"


def test_an_examples_loss_is_the_mean_over_its_own_completion_tokens(lm) -> None:  # type: ignore[no-untyped-def]
    model, tok = lm
    data = _data(3)
    batch = encode_examples(tok, data, 40)
    together = TASK.example_loss(model, batch)
    for i in range(3):  # alone, without the others' padding: the same value
        single = encode_examples(tok, data.subset([i]), 40)
        width = int(single["attention_mask"].sum())
        alone = TASK.example_loss(model, {k: v[:, :width] for k, v in single.items()})
        assert torch.allclose(alone, together[i:i + 1], atol=1e-5)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    sums, counts = completion_losses(logits, batch["labels"])
    manual = []
    for i in range(3):
        lab = batch["labels"][i, 1:]
        keep = lab != IGNORE
        manual.append(torch.nn.functional.cross_entropy(logits[i, :-1][keep], lab[keep]))
    assert torch.allclose(sums / counts, torch.stack(manual), atol=1e-5)
    assert torch.allclose(TASK.loss(model, batch), torch.stack(manual).mean(), atol=1e-5)


def test_opacus_per_sample_gradients_equal_per_example_autograd(lm, lm_cfg) -> None:  # type: ignore[no-untyped-def]
    """What DP-SGD clips is each example's own gradient: Opacus's hooks on the LoRA B of a
    PEFT-wrapped Llama give exactly the gradient of that example's completion loss."""
    import copy

    from opacus import GradSampleModule

    from fedpeft.adapters.registry import get as get_plugin

    model, tok = lm
    plugin = get_plugin("ffa_lora")
    adapted = plugin.attach(copy.deepcopy(model), lm_cfg)
    with torch.no_grad():  # B starts at zero: make it non-zero so the gradients are generic
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    batch = encode_examples(tok, _data(3), 40)
    gsm = GradSampleModule(adapted, batch_first=True, loss_reduction="mean")
    TASK.loss(gsm, batch).backward()
    trainable = [(n, p) for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_B" in n for n, _ in trainable)
    per_sample = {n: p.grad_sample.clone() for n, p in trainable}
    gsm._close()
    for i in range(3):
        adapted.zero_grad(set_to_none=True)
        single = {k: v[i:i + 1] for k, v in batch.items()}
        TASK.loss(adapted, single).backward()
        for n, p in trainable:
            # Opacus's "mean" reduction: grad_sample[i] is example i's gradient (scaled back by the batch)
            assert torch.allclose(per_sample[n][i], p.grad, atol=1e-5), n


def test_left_padded_batched_generation_equals_one_prompt_at_a_time(lm) -> None:  # type: ignore[no-untyped-def]
    model, tok = lm
    data = _data(4, long_prompt=False)
    prompts = [prompt_ids(tok, data, i) for i in range(4)]
    prompts[0] = prompts[0] + prompts[0]  # different lengths: left padding matters
    batched = generate_ids(model, tok, prompts, 5, torch.device("cpu"), batch_size=4)
    alone = [generate_ids(model, tok, [p], 5, torch.device("cpu"))[0] for p in prompts]
    assert batched == alone


def test_normalised_exact_match() -> None:
    assert normalise_answer("Positive.") == normalise_answer("positive")
    assert normalise_answer("The  Tech") == "tech"
    assert normalise_answer("negative") != normalise_answer("positive")


def test_exact_match_counts_correct_answers(lm, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import fedpeft.tasks.causal_lm as mod

    model, tok = lm
    data = _data(4)
    answers = [data.responses[0].upper() + ".", "wrong", data.responses[2], "nope"]
    monkeypatch.setattr(mod, "generate_texts", lambda *a, **k: answers)
    ev = TASK.evaluate(model, tok, data, 40, torch.device("cpu"))
    assert ev["exact_match"] == pytest.approx(0.5)
    assert ev["perplexity"] == pytest.approx(torch.tensor(ev["loss"]).exp().item(), rel=1e-6)
    assert ev["examples"] == 4


@pytest.mark.parametrize("dp", [False, True])
def test_bfloat16_base_weights_train_with_float32_adapters(tiny_llama_dir: Path, lm_cfg, dp: bool) -> None:  # type: ignore[no-untyped-def]
    """The CUDA default (model.dtype=auto -> bfloat16 on a GPU that has it), exercised on CPU:
    the frozen base is bfloat16, the adapter trains in float32, DP-SGD's per-sample
    gradients work across the two dtypes, and the frozen weights do not move."""
    import dataclasses

    from tiny_model import dp_rng

    from fedpeft.adapters.registry import get as get_plugin
    from fedpeft.client.trainer import train_local

    cfg = dataclasses.replace(lm_cfg, model=dataclasses.replace(lm_cfg.model, dtype="bfloat16"))
    task = get("causal-lm")
    base = task.build_model(cfg.model, 0)
    assert next(base.parameters()).dtype == torch.bfloat16
    plugin = get_plugin("ffa_lora")
    model = plugin.attach(base, cfg)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    pool, _ = task.train_test_split(cfg.data, cfg.seed)
    tok = task.load_tokenizer(cfg.model)
    result = train_local(model, plugin, tok, pool.subset(list(range(16))), cfg, steps=2, device=torch.device("cpu"),
                         noise_multiplier=1.0 if dp else None, seed=dp_rng() if dp else 0)
    assert result.steps == 2
    assert any(float(p.detach().abs().sum()) > 0 for p in trainable.values())  # B moved from zero
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n
