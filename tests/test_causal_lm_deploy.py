"""A deployed causal-LM node: its own instruction file (any supported format, no ``source``
column needed), the server's label list not imposed on it, and a replay key that changes when
any part of an example changes (a response too, not only the prompt)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, RecordDict

from fedpeft.client.app import handle_train
from fedpeft.client.node_store import data_digest
from fedpeft.config import config_hash, config_to_toml
from fedpeft.data.instructions import InstructionDataset
from fedpeft.server.loop import ServerSetup
from fedpeft.strategies.adapter_avg import AdapterAvg, state_to_arrayrecord
from fedpeft.strategies.validation import validate_reply


def _alpaca(path: Path, n: int = 20) -> Path:
    rows = [{"instruction": f"name colour number {i}", "input": "", "output": ["red", "blue"][i % 2]}
            for i in range(n)]
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def test_a_node_trains_on_its_own_alpaca_file(lm_cfg, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    setup = ServerSetup(lm_cfg)
    strategy = AdapterAvg.from_config(setup.plugin, lm_cfg, setup.spec, config_to_toml(lm_cfg), config_hash(lm_cfg),
                                      extra_config={"ledger-dir": str(tmp_path / "server-ledger"),
                                                    "label-names": json.dumps(list(setup.test.label_names))})
    content = RecordDict({"arrays": state_to_arrayrecord(setup.state), "config": strategy.round_config(1)})
    node = {"client-id": "hospital-a", "data-path": str(_alpaca(tmp_path / "own.json")),
            "ledger-dir": str(tmp_path / "node-ledger")}
    ctx = Context(run_id=1, node_id=9, node_config=node, state=RecordDict(), run_config={})
    reply = handle_train(Message(content=content, dst_node_id=9, message_type="train"), ctx)
    assert not reply.has_error()
    arrays = [v for v in reply.content.values() if isinstance(v, ArrayRecord)]
    assert len(arrays) == 1 and set(arrays[0].keys()) == set(setup.spec.tensors)
    rep = validate_reply(reply.content, setup.spec)
    assert rep.weight == 20 and 0 < rep.metrics["epsilon"] <= lm_cfg.privacy.epsilon
    assert (tmp_path / "node-ledger" / "client-hospital-a.json").is_file()


def test_the_replay_key_covers_responses_systems_and_turns() -> None:
    def data(**change: object) -> InstructionDataset:
        fields = {"texts": ("q1", "q2"), "labels": np.zeros(2, dtype=np.int64), "label_names": ("all",),
                  "responses": ("a1", "a2"), "systems": ("", ""), "histories": ((), ())}
        fields.update(change)
        return InstructionDataset(**fields)  # type: ignore[arg-type]

    base = data_digest(data())
    assert data_digest(data()) == base
    for change in ({"responses": ("a1", "a2!")}, {"systems": ("be brief", "")},
                   {"histories": ((("user", "hi"), ("assistant", "hello")), ())}, {"texts": ("q1", "q3")}):
        assert data_digest(data(**change)) != base, change
