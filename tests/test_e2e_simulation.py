"""End to end through Flower's real simulation engine: the run directory contract."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedpeft.sim.simulate import simulate


class MessageSpy:
    """Wrapper strategy (Flower style: keeps the wrapped one as ``.strategy``) that records
    the tensor names of every message sent and received."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        self.sent: list[str] = []
        self.received: list[str] = []

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        for m in messages:
            self.sent.extend(m.content["arrays"].keys())
        return messages

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        replies = list(replies)
        for r in replies:
            if not r.has_error():
                for value in r.content.values():
                    if hasattr(value, "to_numpy_ndarrays"):
                        self.received.extend(value.keys())
        return self.strategy.aggregate_train(server_round, replies)


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from fedpeft.load import parse_config

    cfg = parse_config({
        "model.path": str(tiny_model_dir), "model.max_length": 24,
        "data.examples_per_client": 96, "data.test_size": 64,
        "train.rounds": 2, "train.batch_size": 32, "train.local_steps": 2,
    })
    spies: list[MessageSpy] = []

    def wrap(strategy: Any) -> MessageSpy:
        spies.append(MessageSpy(strategy))
        return spies[-1]

    path, rows = simulate(cfg, tmp_path_factory.mktemp("e2e") / "run", wrap_strategy=wrap)  # type: ignore[arg-type]
    return cfg, path, rows, spies[0]


def test_run_directory_contract(tiny_run) -> None:  # type: ignore[no-untyped-def]
    cfg, path, rows, _ = tiny_run
    assert tomllib.loads((path / "config.toml").read_text())["adapter"]["method"] == "ffa_lora"
    lines = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    for row in lines:
        for key in ("round", "accuracy", "loss", "epsilon", "epsilon_per_client", "delta",
                    "bytes_up", "bytes_down", "seconds"):
            assert key in row, key
        assert set(row["epsilon_per_client"]) == {"0", "1", "2"}
        assert row["epsilon"] == max(row["epsilon_per_client"].values())
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
    assert lines[1]["epsilon"] > lines[0]["epsilon"]
    assert lines[1]["epsilon"] <= cfg.privacy.epsilon
    ledgers = sorted((path / "ledger").glob("client-*.json"))
    assert len(ledgers) == 3
    for led in ledgers:
        entries = json.loads(led.read_text())["entries"]
        assert [e["round"] for e in entries] == [1, 2]
    log = (path / "server.log").read_text()
    assert "round 2/2: accuracy=" in log and "example-level" in log
    assert (path / "report.html").is_file() and (path / "plots" / "epsilon_per_client.png").is_file()  # the report


def test_no_message_ever_contains_lora_a(tiny_run) -> None:  # type: ignore[no-untyped-def]
    _, _, _, spy = tiny_run
    assert spy.sent and spy.received
    assert not [k for k in spy.sent + spy.received if "lora_A" in k]
    assert any("lora_B" in k for k in spy.received)


def test_exported_adapter_loads_with_peft_and_reproduces_accuracy(tiny_run) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedpeft.data.sources import train_test_split_for
    from fedpeft.tasks.model import load_tokenizer
    from fedpeft.tasks.seq_cls import evaluate

    cfg, path, rows, _ = tiny_run
    base = AutoModelForSequenceClassification.from_pretrained(cfg.model.path, num_labels=2,
                                                              attn_implementation="eager")
    model = PeftModel.from_pretrained(base, str(path / "adapter"))
    _, test = train_test_split_for(cfg.data, cfg.seed)
    ev = evaluate(model, load_tokenizer(cfg.model), test, cfg.model.max_length, torch.device("cpu"))
    assert ev["accuracy"] == pytest.approx(rows[-1]["accuracy"], abs=1e-9)
    assert np.isclose(ev["loss"], rows[-1]["loss"], rtol=1e-4)
