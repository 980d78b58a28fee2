"""The task-type seam (fedpeft.tasks): a second task type needs no edits outside tasks/.

* A dummy task type defined and registered *here* -- a scalar score per text, mean-squared
  error, a head called ``regressor``, targets under ``target`` -- trains with the real
  ``train_local`` (with and without DP-SGD), is evaluated by the real server setup, and runs
  whole federation rounds through the real round loop and ClientApp, writing its own metric.
* Sequence classification (the default) keeps its behaviour: the collation, the physical
  chunks, the per-example loss (against a hand-computed cross-entropy), the batch loss and
  the evaluation are the ones fedpeft computed before the seam.
* The head names come from one place: the literal ``"classifier"`` (and ``"score"``) appears
  in no source module outside ``src/fedpeft/tasks/``.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from inprocess_grid import LocalGrid
from tiny_model import dp_rng
from torch import nn
from torch.nn import functional as F

from fedpeft.adapters import get as get_plugin
from fedpeft.client.trainer import train_local
from fedpeft.config import ConfigError, DataConfig, ModelConfig
from fedpeft.data.batching import Batch, length_buckets, to_device
from fedpeft.data.partition import client_partition
from fedpeft.data.sources import TextDataset, load_dataset
from fedpeft.load import parse_config
from fedpeft.tasks import registry
from fedpeft.tasks.base import HeadMemory, TaskType
from fedpeft.tasks.model import load_tokenizer, resolve_model_path, tokenize

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


# ---- a second task type, defined only in this file ----------------------------------------
class ScoreModel(nn.Module):
    """A BERT encoder with one linear ``regressor`` on the first token: one score per text."""

    def __init__(self, path: str, seed: int) -> None:
        from transformers import AutoModel

        super().__init__()
        self.encoder = AutoModel.from_pretrained(path, attn_implementation="eager")
        self.regressor = nn.Linear(self.encoder.config.hidden_size, 1)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.regressor.weight.copy_(torch.randn(self.regressor.weight.shape, generator=gen) * 0.02)
            self.regressor.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.regressor(hidden[:, 0]).squeeze(-1)


class TextScore(TaskType):
    """Regress each text's label index as a number: MSE, lower is better."""

    name = "test-score"
    description = "test-only regression of a score per text"
    peft_task_type = None  # a plain PeftModel; the head is listed in modules_to_save
    head_prefixes = ("regressor",)
    target_key = "target"
    metric_names = ("mse",)
    higher_is_better = False

    def load_data(self, cfg: DataConfig) -> TextDataset:
        return load_dataset(cfg)

    def num_outputs(self, data: TextDataset) -> int:
        return 1

    def build_model(self, cfg: ModelConfig, num_outputs: int, head_seed: int = 0) -> nn.Module:
        return ScoreModel(str(resolve_model_path(cfg)), head_seed)

    def head_memory(self, hidden: int, num_outputs: int) -> HeadMemory:
        return HeadMemory(trained=hidden + 1)

    def encode(self, tokenizer: Any, data: TextDataset, max_length: int) -> Batch:
        enc = tokenizer(list(data.texts), truncation=True, max_length=max_length, padding="max_length",
                        return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "target": torch.as_tensor(data.labels, dtype=torch.float32)}

    def eval_batches(self, tokenizer: Any, data: TextDataset, batch_size: int, max_length: int) -> Iterator[Batch]:
        for start in range(0, len(data), batch_size):
            part = data.subset(np.arange(start, min(start + batch_size, len(data))))
            yield {**tokenize(tokenizer, part.texts, max_length),
                   "target": torch.as_tensor(part.labels, dtype=torch.float32)}

    def example_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return (model(**self.model_inputs(batch)) - batch[self.target_key]) ** 2

    def evaluate(self, model: nn.Module, tokenizer: Any, data: TextDataset, max_length: int,
                 device: torch.device, batch_size: int = 128) -> dict[str, float]:
        total, seen = 0.0, 0
        with torch.inference_mode():
            for batch in self.eval_batches(tokenizer, data, batch_size, max_length):
                total += float(self.example_loss(model, to_device(batch, device)).sum())
                seen += len(batch["target"])
        return {"mse": total / max(seen, 1), "examples": float(seen)}


@pytest.fixture()
def score_task() -> Iterator[TextScore]:
    task = registry.register(TextScore())
    try:
        yield task
    finally:
        registry.unregister(task.name)


def _score_cfg(tiny_cfg, tmp_path: Path, **extra: Any):  # type: ignore[no-untyped-def]
    return parse_config({
        "model.path": tiny_cfg.model.path, "model.max_length": 24, "data.examples_per_client": 48,
        "data.test_size": 32, "train.rounds": 2, "train.batch_size": 16, "train.physical_batch_size": 8,
        "train.local_steps": 2, "train.lr": 0.05, "task_type": "test-score", "output_dir": str(tmp_path / "run"),
        **extra,
    })


def test_a_second_task_type_trains_and_is_evaluated_through_the_seam(tiny_cfg, tmp_path, score_task) -> None:  # type: ignore[no-untyped-def]
    from fedpeft.server.loop import ServerSetup

    cfg = _score_cfg(tiny_cfg, tmp_path, **{"privacy.epsilon": "inf"})
    setup = ServerSetup(cfg)
    assert setup.task_type is score_task
    state = set(setup.state)
    assert any(k.split(".")[2] == "regressor" and "modules_to_save" in k for k in state), sorted(state)
    assert not any("classifier" in k or "lora_A" in k for k in state)  # FFA-LoRA: B + the task's head
    before = setup.evaluate()
    assert set(before) == {"mse", "examples"} and before["examples"] == len(setup.test)
    pool, _ = score_task.train_test_split(cfg.data, cfg.seed)
    data = client_partition(pool, cfg.data, cfg.train.clients, 0, cfg.seed)
    tok = load_tokenizer(cfg.model)
    plain = score_task.evaluate(setup.model, tok, data, 24, CPU)["mse"]
    result = train_local(setup.model, setup.plugin, tok, data, cfg, 12, CPU, None, 0)
    assert result.samples_seen == 12 * 16
    assert score_task.evaluate(setup.model, tok, data, 24, CPU)["mse"] < plain  # it learned its own objective
    head = {k: v.clone() for k, v in setup.plugin.trainable_state(setup.model).items() if "regressor" in k}
    dp = train_local(setup.model, setup.plugin, tok, data, cfg, 2, CPU, 1.0, dp_rng(0))  # DP-SGD through the seam
    assert dp.steps == 2 and np.isfinite(dp.loss_mean)
    after = setup.plugin.trainable_state(setup.model)
    assert all(not torch.equal(after[k], v) for k, v in head.items())


@pytest.mark.parametrize("epsilon", ["inf", 8.0])
def test_the_round_loop_records_a_second_task_types_metric(tiny_cfg, tmp_path, score_task, flwr_identity,  # type: ignore[no-untyped-def]
                                                          epsilon) -> None:
    from fedpeft.server.loop import run_federation

    rounds = 2 if epsilon == "inf" else 1  # DP: one round (the privacy plan is the slow part)
    cfg = _score_cfg(tiny_cfg, tmp_path, **{"privacy.epsilon": epsilon, "train.clients": 2, "train.rounds": rounds})
    rows = run_federation(LocalGrid(2), cfg, tmp_path / "run", timeout=60)  # type: ignore[arg-type]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1)) and all(r["clients_accepted"] == 2 for r in rows)
    written = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row in written:
        assert "accuracy" not in row and np.isfinite(row["mse"]) and row["mse"] >= 0
    assert f"round {rounds}/{rounds}: mse=" in (tmp_path / "run" / "server.log").read_text()


# ---- sequence classification: the behaviour before the seam -------------------------------
def _seq_cls(tiny_cfg):  # type: ignore[no-untyped-def]
    from fedpeft.tasks.seq_cls import load_base_model

    task = registry.task_for(tiny_cfg)
    pool, test = task.train_test_split(tiny_cfg.data, tiny_cfg.seed)
    plugin = get_plugin(tiny_cfg.adapter.method)
    model = plugin.attach(load_base_model(tiny_cfg.model, pool.num_classes, head_seed=tiny_cfg.adapter.seed), tiny_cfg)
    with torch.no_grad():  # a non-trivial function of the input
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    return task, plugin, model.eval(), pool.subset(np.arange(40)), test, load_tokenizer(tiny_cfg.model)


def test_seq_cls_is_the_default_and_collates_as_before(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    assert parse_config().task_type == "seq-cls" == registry.DEFAULT
    task, _, _, data, _, tok = _seq_cls(tiny_cfg)
    batch = task.encode(tok, data, 64)  # longer than every snippet: each row is padded to max_length
    enc = tok(list(data.texts), truncation=True, max_length=64, padding="max_length", return_tensors="pt")
    assert batch["input_ids"].shape == (40, 64)
    assert list(batch) == ["input_ids", "attention_mask", "labels"]
    assert torch.equal(batch["input_ids"], enc["input_ids"]) and torch.equal(batch["attention_mask"], enc["attention_mask"])
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == data.labels.tolist()
    chunks = task.chunks(batch, 8)
    expected = length_buckets(batch["input_ids"], batch["attention_mask"], batch["labels"], 8)
    assert len(chunks) == len(expected) == 5
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    order = sorted(range(len(data)), key=lambda i: (-lengths[i], i))  # longest first, ties in data order
    for j, (chunk, (ids, mask, labels)) in enumerate(zip(chunks, expected, strict=True)):
        assert torch.equal(chunk["input_ids"], ids) and torch.equal(chunk["attention_mask"], mask)
        assert torch.equal(chunk["labels"], labels)
        rows = order[8 * j : 8 * j + 8]
        width = max(lengths[i] for i in rows)
        assert torch.equal(chunk["input_ids"], batch["input_ids"][rows, :width])
        assert chunk["labels"].tolist() == [int(data.labels[i]) for i in rows]
    assert task.model_inputs(chunks[0]).keys() == {"input_ids", "attention_mask"}


def test_seq_cls_loss_is_the_cross_entropy_of_each_example(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    task, plugin, model, data, _, tok = _seq_cls(tiny_cfg)
    batch = task.chunks(task.encode(tok, data, 24), 16)[0]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        log_probs = logits - logits.exp().sum(-1, keepdim=True).log()  # by hand, not F.cross_entropy
        by_hand = -log_probs[torch.arange(len(logits)), batch["labels"]]
        per_example = task.example_loss(model, batch)
        assert per_example.shape == (16,) and float(by_hand.std()) > 1e-3
        torch.testing.assert_close(per_example, by_hand, rtol=1e-5, atol=1e-6)
        # the training objective: F.cross_entropy's own mean, bit for bit as before the seam
        assert torch.equal(task.loss(model, batch), F.cross_entropy(logits, batch["labels"]))
        assert torch.equal(plugin.loss(model, batch, task), task.loss(model, batch))  # the plugin's default
        torch.testing.assert_close(task.loss(model, batch), by_hand.mean())


class TokenLogits(nn.Module):
    """A stand-in classifier whose two logits vary with the text (a tiny random BERT predicts
    one class for every snippet): ``sin`` / ``cos`` of the sum of its token ids."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        x = (input_ids * attention_mask).sum(dim=1).float() / 97.0
        return type("Output", (), {"logits": torch.stack([torch.sin(x), torch.cos(x)], dim=-1)})()


def test_seq_cls_evaluation_is_argmax_accuracy_and_mean_cross_entropy(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    task = registry.task_for(tiny_cfg)
    _, test = task.train_test_split(tiny_cfg.data, tiny_cfg.seed)
    tok, model = load_tokenizer(tiny_cfg.model), TokenLogits()
    ev = task.evaluate(model, tok, test, 24, CPU, batch_size=16)
    assert task.primary_metric == "accuracy" and task.higher_is_better and task.metric_names == ("accuracy", "loss")
    logits = torch.cat([model(**tokenize(tok, [t], 24)).logits for t in test.texts])  # one text at a time
    labels = torch.as_tensor(test.labels)
    assert 0.1 < float(logits.argmax(-1).float().mean()) < 0.9  # both classes are predicted
    assert ev["examples"] == len(test)
    assert ev["accuracy"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))
    assert ev["loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-4)
    assert task.baseline(test) == pytest.approx(float(np.bincount(test.labels).max()) / len(test))


# ---- configuration --------------------------------------------------------------------------
def test_task_type_is_checked_against_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    from fedpeft.cli.main import main as cli_main

    with pytest.raises(ConfigError, match=r"task_type='nope': allowed: causal-lm, seq-cls$"):
        parse_config({"task_type": "nope"})
    assert cli_main(["simulate", "--task", "nope"]) == 2
    assert "task_type='nope'" in capsys.readouterr().err


def test_a_registered_task_type_is_a_config_value_and_sizes_the_memory_model(score_task) -> None:  # type: ignore[no-untyped-def]
    from fedpeft.sim.hetero.memory import EncoderShape

    assert parse_config({"task_type": "test-score"}).task_type == "test-score"
    assert "regressor" in registry.head_prefixes() and "classifier" in registry.head_prefixes()
    with pytest.raises(ValueError, match="already registered"):
        registry.register(TextScore())
    seq = EncoderShape(layers=2, hidden=32, heads=2, intermediate=64, vocab=100, num_outputs=3)
    score = dataclasses.replace(seq, task_type="test-score")
    assert seq.head_params() == 32 * 3 + 3 and score.head_params() == 33
    assert seq.base_params - score.base_params == (32 * 3 + 3) + (32 * 32 + 32) - 33  # no pooler, smaller head


# ---- one place for the head names -------------------------------------------------------------
def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _names_a_head(text: str) -> bool:
    """A module or parameter name (no whitespace: prose such as a plot label is not one)
    that contains ``classifier``, or is ``score``."""
    return not any(c.isspace() for c in text) and ("classifier" in text or text == "score")


def head_name_literals(root: Path) -> list[str]:
    """``path:line`` of every string constant outside docstrings that names a head in the
    Python files under ``root`` (f-string parts included)."""
    hits = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
                    and _names_a_head(node.value)):
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return hits


def test_head_names_are_written_only_in_the_task_types() -> None:
    hits = head_name_literals(ROOT / "src" / "fedpeft") + head_name_literals(ROOT / "benchmarks")
    outside = [h for h in hits if not h.startswith("src/fedpeft/tasks/")]
    assert not outside, f"head names outside src/fedpeft/tasks/ (use fedpeft.tasks.registry.head_prefixes): {outside}"
    assert "src/fedpeft/tasks/seq_cls.py" in {h.split(":")[0] for h in hits}  # the scan sees the real definition
