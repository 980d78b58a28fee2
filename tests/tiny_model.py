"""A tiny random BERT with MiniLM's tokenizer, for fast tests of the real code paths, and the
helpers the test files share (one copy each: a method's config and model, tensors to NumPy,
the learns-beyond-random check, test-only DP randomness, a small hetero scenario)."""

from __future__ import annotations

import shutil
from pathlib import Path


def make_tiny_model(directory: Path, layers: int = 2, hidden: int = 32, dropout: float = 0.1) -> Path:
    """Write a randomly initialised BERT (a few hundred thousand weights) to ``directory``
    (``dropout = 0``: deterministic training, for tests that compare exact gradients)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from fedpeft.tasks.model import default_model_path

    src = default_model_path()
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, directory / name)
    config = BertConfig(
        vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=128, num_labels=2,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory


LEARN_MIN_DROP = 0.0005  # relative: the trained drop is at least this fraction of the loss before (measured on
# the tiny BERT, head frozen, 10-20 steps: 0.08 % (MeteoRA's gates) to 1.4 % (LoRA); the random control decides)
RANDOM_FACTOR = 3.0  # and this many times the largest drop a same-norm random update gives


def assert_learns_beyond_random(params, train, loss_of, label: str = "", draws: int = 4,  # type: ignore[no-untyped-def]
                                min_drop: float = LEARN_MIN_DROP) -> tuple[float, float]:
    """Assert that ``train()`` lowers ``loss_of()`` by learning, not by chance; return (before, after).

    ``params`` names the trainable tensors. After training, each tensor's update is replaced by a
    random direction of the same norm on the entries the training changed (so a sparse method's
    control is as sparse), ``draws`` times; the trained drop must exceed ``min_drop`` of the loss
    before and ``RANDOM_FACTOR`` times the largest random drop (a random update -- a trainer that
    ignored the gradient -- cannot pass both). The trained values are put back afterwards.
    """
    import torch

    start = {n: p.detach().clone() for n, p in params.items()}
    before = loss_of()
    train()
    after = loss_of()
    trained = {n: p.detach().clone() for n, p in params.items()}
    moved = {n: trained[n] - start[n] for n in params}
    assert any(bool(m.abs().sum() > 0) for m in moved.values()), f"{label}: training changed nothing"
    gen, random_drops = torch.Generator().manual_seed(1), []
    with torch.no_grad():
        for _ in range(draws):
            for n, p in params.items():
                direction = torch.randn(p.shape, generator=gen) * (moved[n] != 0)
                p.copy_(start[n] + direction * moved[n].norm() / direction.norm().clamp(min=1e-30))
            random_drops.append(before - loss_of())
        for n, p in params.items():
            p.copy_(trained[n])
    drop = before - after
    assert drop > min_drop * before, (label, "drop below the relative margin", before, drop)
    assert drop > RANDOM_FACTOR * max(abs(d) for d in random_drops), (label, "no better than random", drop,
                                                                      random_drops)
    return before, after


def with_method(cfg, method: str, **options):  # type: ignore[no-untyped-def]
    """``cfg`` with ``adapter.method = method`` and these ``adapter.options``."""
    import dataclasses

    adapter = dataclasses.replace(cfg.adapter, method=method, options=tuple(sorted(options.items())))
    return dataclasses.replace(cfg, adapter=adapter)


def attach_method(cfg, method: str | None = None, num_classes: int | None = None):  # type: ignore[no-untyped-def]
    """``(plugin, model)``: the base model of ``cfg`` (``num_classes`` labels; None: the
    run's data) with ``method`` (None: ``cfg.adapter.method``) attached after its
    ``validate_config``."""
    from fedpeft.adapters import get
    from fedpeft.data.sources import train_test_split_for
    from fedpeft.tasks.seq_cls import load_base_model

    if num_classes is None:
        num_classes = train_test_split_for(cfg.data, cfg.seed)[0].num_classes
    plugin = get(method or cfg.adapter.method)
    plugin.validate_config(cfg)
    return plugin, plugin.attach(load_base_model(cfg.model, num_classes, head_seed=cfg.adapter.seed), cfg)


def to_numpy(state):  # type: ignore[no-untyped-def]
    """A state dict of tensors as independent NumPy copies."""
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def adapter_alone_lowers_loss(model, plugin, cfg, data, steps: int = 10) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Freeze the classifier head, then train ``steps`` plain (non-DP) steps of the adapter
    alone on ``data``; assert (:func:`assert_learns_beyond_random`) that the training loss
    dropped by learning, and return it (before, after)."""
    import torch

    from fedpeft.client.trainer import train_local
    from fedpeft.tasks.model import load_tokenizer
    from fedpeft.tasks.seq_cls import evaluate

    for name, param in model.named_parameters():
        if "classifier" in name.split("."):  # a PEFT model nests it (base_model.model.classifier...)
            param.requires_grad_(False)
    tok, cpu = load_tokenizer(cfg.model), torch.device("cpu")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return assert_learns_beyond_random(
        params, lambda: train_local(model, plugin, tok, data, cfg, steps=steps, device=cpu, noise_multiplier=None,
                                    seed=0),
        lambda: float(evaluate(model, tok, data, 24, cpu)["loss"]), label=cfg.adapter.method)


def clipped_mean_gradient(plugin, model, tok, data, cfg, clip: float):  # type: ignore[no-untyped-def]
    """``mean_i clip_C(g_i)`` over ``data`` (flat, in ``model.parameters()`` order of the trainable
    ones), each g_i by per-example autograd of the plugin's loss on its unpadded example; asserts
    that every example is really clipped (norm > 10 C). What one DP-SGD step with q = 1, sigma = 0
    applies (tests/test_dp_mechanism.py, tests/lora_fold_helpers.py)."""
    import torch

    from fedpeft.client.trainer import tensorize
    from fedpeft.tasks.registry import task_for

    params = [p for p in model.parameters() if p.requires_grad]
    ds = tensorize(tok, data, cfg.model.max_length, task_for(cfg))
    clipped = []
    for i in range(len(data)):
        ids, mask, label = ds[i]
        width = int(mask.sum())
        loss = plugin.loss(model, {"input_ids": ids[None, :width], "attention_mask": mask[None, :width],
                                   "labels": label[None]}, task_for(cfg))
        g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, params)])
        assert float(g.norm()) > 10 * clip  # every example is really clipped
        clipped.append(g * min(1.0, clip / float(g.norm())))
    return torch.stack(clipped).mean(0)


def dp_rng(seed: int = 0):  # type: ignore[no-untyped-def]
    """Reproducible DP randomness for tests: a fixed test-only node secret per ``seed``.

    DP training refuses a plain integer seed (the server may know it); tests that want
    repeatable DP steps use this instead. Never a pattern for real nodes."""
    import hashlib

    from fedpeft.privacy.randomness import NodeSecret, RoundRandomness

    return RoundRandomness.derived(NodeSecret(hashlib.sha256(f"fedpeft-test-{seed}".encode()).digest()), "test")


def hetero_scenario(name: str) -> str:
    """A small heterogeneous-device scenario (TOML): 2 fast, 1 slow (late under the 30 s
    deadline) and 1 tiny-memory client, ranks 4/2, drop-late; shared by the hetero tests."""
    return f'name = "{name}"\n' + _HETERO_SCENARIO


_HETERO_SCENARIO = """host_profile = "Host-2core-CPU"
rank_tiers = [4, 2]

[config]
"adapter.method" = "ffa_lora_hetero"
"adapter.rank" = 4
"train.clients" = 4
"data.partition" = "iid"

[clients]
Fast = 2
Slow = 1
Tiny = 1

[ranks]
Fast = 4
Slow = 2
Tiny = 2

[deadline]
policy = "drop-late"
seconds = 30.0

[profiles.Fast]
tflops = 1000.0
memory_gb = 80.0
uplink_mbps = 1000.0
downlink_mbps = 1000.0
[profiles.Slow]
tflops = 0.000001
memory_gb = 80.0
uplink_mbps = 1.0
downlink_mbps = 1.0
[profiles.Tiny]
tflops = 1.0
memory_gb = 0.000001
uplink_mbps = 1.0
downlink_mbps = 1.0
"""


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}[unused0]{{ m['role'] }}\n{{ m['content'] }}[unused1]\n{% endfor %}"
    "{% if add_generation_prompt %}[unused0]assistant\n{% endif %}"
)
"""A ChatML-like template in BERT word pieces: ``[unused0]`` opens a turn, ``[unused1]`` (the
tokenizer's EOS) closes it -- the shape of SmolLM2's ``<|im_start|>`` / ``<|im_end|>``."""


def make_tiny_llama(directory: Path, layers: int = 2, hidden: int = 32, chat_template: bool = True) -> Path:
    """Write a randomly initialised ``LlamaForCausalLM`` (tied embeddings, ~1 M weights) with
    MiniLM's word-piece tokenizer, a chat template and EOS/pad tokens, as a Hugging Face
    directory: the causal-LM task type's fast test model. ``chat_template=False`` gives a
    tokenizer without a template (the plain prompt format)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedpeft.tasks.model import default_model_path

    directory.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(default_model_path())
    tok.add_special_tokens({"additional_special_tokens": ["[unused0]", "[unused1]"]})
    tok.eos_token = "[unused1]"
    tok.bos_token = None
    if chat_template:
        tok.chat_template = TINY_CHAT_TEMPLATE
    tok.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def write_instructions(path: Path, n: int = 48) -> Path:
    """A small JSONL instruction file with two sources (``source`` column) and one-word answers:
    a colour task and a count task the tiny model can learn."""
    import json

    colours = ["red", "green", "blue", "yellow"]
    rows = []
    for i in range(n):
        if i % 2:
            c = colours[i % 4]
            rows.append({"prompt": f"what colour is the {c} ball?", "response": c, "source": "colour"})
        else:
            rows.append({"prompt": f"how many is {i % 3 + 1}?", "response": ["one", "two", "three"][i % 3],
                         "source": "count"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
