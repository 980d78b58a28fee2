"""FedSA-LoRA's personalised evaluation (``adapter.options.eval_fraction``): each client scores
the global A and head with its own B on a held-out split of its data in the last round.

What each test guards: a DP reply carries nothing the client's ledger does not account for
(every metric key is a DP-public one or the personalised accuracy, and that accuracy is a
noised release recorded in the ledger, planned from round 1 so the run stays within its
target); a reply whose accuracy was not recorded never leaves the node; the value is the
accuracy of exactly "global state after round R-1 + the client's own B after round R-1" on
its held-out examples, which differs from the server's model (B = 0) on the same examples;
the ledger's plan reserves the release; compare judges fedsa_lora by it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord
from inprocess_grid import LocalGrid, Releases
from lora_helpers import method_model
from tiny_model import to_numpy as _numpy

import fedpeft.client.app as client_app
import fedpeft.wire as wire
from fedpeft.adapters.fedsa_lora import FedSaLoraPlugin
from fedpeft.client.node_store import load_local
from fedpeft.client.personal_eval import check_accounted, release_digest, split_held_out
from fedpeft.load import parse_config
from fedpeft.privacy.accounting import epsilon_for
from fedpeft.privacy.ledger import Ledger
from fedpeft.privacy.releases import release_entry
from fedpeft.server.loop import run_federation
from fedpeft.sim.compare.sweep import personal_layer
from fedpeft.tasks.seq_cls import evaluate


def _cfg(tiny_model_dir: Path, tmp_path: Path, epsilon: float, **extra: Any):  # type: ignore[no-untyped-def]
    return parse_config({
        "model.path": str(tiny_model_dir), "model.max_length": 16, "data.examples_per_client": 40,
        "data.test_size": 16, "train.clients": 2, "train.rounds": 2, "train.batch_size": 16, "train.local_steps": 3,
        "train.lr": 0.05, "privacy.epsilon": epsilon, "adapter.method": "fedsa_lora", "output_dir": str(tmp_path),
        "adapter.options.eval_fraction": 0.25, **extra,
    })


def _run(cfg, tmp_path: Path, app=None):  # type: ignore[no-untyped-def]
    replies: list[tuple[int, Message | None]] = []  # None: the ClientApp raised (the grid sends an error)
    inner = app or client_app.app

    def spy(msg, context):  # type: ignore[no-untyped-def]
        server_round = int(msg.content[wire.CONFIG][wire.SERVER_ROUND])
        try:
            reply = inner(msg, context)
        except Exception:
            replies.append((server_round, None))
            raise
        replies.append((server_round, reply))
        return reply

    hook = Releases()
    rows = run_federation(LocalGrid(2, app=spy), cfg, tmp_path, hooks=[hook])  # type: ignore[arg-type]
    return rows, replies, hook


def _ledgers(tmp_path: Path) -> dict[str, Ledger]:
    return {p.stem.removeprefix("client-"): Ledger.from_json(p.read_text())
            for p in sorted((tmp_path / "ledger").glob("client-*.json"))}


def test_dp_reply_carries_only_what_the_ledger_accounts(tiny_model_dir: Path, tmp_path: Path,
                                                        flwr_identity) -> None:  # type: ignore[no-untyped-def]
    """The server's view of a DP run (the adversary): every key of every reply is DP-public or the
    personalised accuracy; the accuracy comes in the last round only, noised, and each client's
    ledger holds its release (sigma = eval_sigma, q = 1, output hash of the value) within the target."""
    cfg = _cfg(tiny_model_dir, tmp_path, 8.0)
    rows, replies, _ = _run(cfg, tmp_path)
    assert len(replies) == 4 and not any(r is None or r.has_error() for _, r in replies)
    ledgers = _ledgers(tmp_path)
    for server_round, reply in replies:
        assert reply is not None
        metrics = dict(reply.content[wire.METRICS])
        assert set(metrics) <= wire.DP_METRICS | wire.PERSONAL_METRICS, sorted(metrics)
        if server_round < cfg.train.rounds:
            assert not set(metrics) & wire.PERSONAL_METRICS, "only the last round releases the evaluation"
            continue
        value, n = float(metrics[wire.PERSONAL_ACCURACY]), int(metrics[wire.PERSONAL_EXAMPLES])
        assert n == 10, "a quarter of the client's 40 examples"
        assert abs(value * n - round(value * n)) > 1e-6, "under DP the released accuracy is noised"
        ledger = ledgers[str(reply.content[wire.INFO][wire.CLIENT])]
        release = [e for e in ledger.entries if e.output_hash == release_digest(value)]
        assert len(release) == 1 and release[0].round == cfg.train.rounds
        assert (release[0].noise_multiplier, release[0].sample_rate, release[0].steps) == release_entry(8.0)
        assert metrics[wire.EPSILON] == pytest.approx(ledger.epsilon()[0]), "the reply states the spend with it"
        assert ledger.epsilon()[0] <= cfg.privacy.epsilon + 1e-9, "the planned release fits the target"
        assert ledger.entries[-2].epsilon_after < ledger.epsilon()[0], "the release is charged"
        assert ledger.reserved == [], "nothing is still reserved after the release"
    assert rows[-1]["personal_clients"] == 2 and "personal_accuracy" not in rows[0]


def test_a_reply_with_an_unrecorded_accuracy_never_leaves_the_node(tiny_model_dir: Path, tmp_path: Path,
                                                                   monkeypatch, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    """With the ledger entry of the release skipped (a bug), the last round's replies are errors
    that carry no accuracy, and no row has one."""
    monkeypatch.setattr(client_app, "record_eval", lambda ledger, *a, **k: ledger.epsilon()[0])
    rows, replies, _ = _run(_cfg(tiny_model_dir, tmp_path, 8.0), tmp_path)
    last = [r for rnd, r in replies if rnd == 2]
    assert len(last) >= 2 and all(r is None or r.has_error() for r in last), "every try (a retry re-sends) refused"
    assert all("personal_accuracy" not in row for row in rows)
    with pytest.raises(wire.ProtocolError, match="recorded in the client's ledger"):
        check_accounted({wire.NUM_EXAMPLES: 3, wire.PERSONAL_ACCURACY: 0.5, wire.PERSONAL_EXAMPLES: 2}, None, 2)
    with pytest.raises(wire.ProtocolError, match="may not carry"):
        check_accounted(MetricRecord({wire.TRAIN_LOSS: 0.5}), None, 2)


def test_personal_metric_is_global_a_and_head_with_own_b_and_differs_from_the_server(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    """No DP: each client's value is exactly the accuracy on its held-out split of the model with
    the server's state after round 1 and its own B after round 1; the server's model (B = 0)
    scores differently on the same examples for at least one client."""
    cfg = _cfg(tiny_model_dir, tmp_path, float("inf"), **{"train.lr": 0.2, "train.local_steps": 6})
    held: dict[str, Any] = {}
    real = client_app.personal_accuracy

    def spy(task_type, model, tokenizer, data, cfg_, device, sigma):  # type: ignore[no-untyped-def]
        value = real(task_type, model, tokenizer, data, cfg_, device, sigma)
        plugin_ = FedSaLoraPlugin()
        installed = {**_numpy(plugin_.trainable_state(model)), **plugin_.local_state(model)}  # what was scored
        held[str(len(held))] = (data, value, installed)
        return value

    monkeypatch.setattr(client_app, "personal_accuracy", spy)
    rows, replies, hook = _run(cfg, tmp_path)
    values = {str(r.content[wire.INFO][wire.CLIENT]): float(r.content[wire.METRICS][wire.PERSONAL_ACCURACY])
              for rnd, r in replies if rnd == 2 and r is not None}
    assert len(values) == 2 and sorted(v for _, v, _ in held.values()) == sorted(values.values())
    plugin, model = method_model(cfg)
    differs = []
    for client, value in values.items():
        run = next((tmp_path / "ledger" / f"client-{client}.local").iterdir()).name
        _, own_b = load_local(tmp_path / "ledger", client, run, 2)
        assert own_b and any(v.any() for v in own_b.values()), "the client's B after round 1 is on its disk"
        want = {**hook.released[1], **own_b}
        scored = next(((d, m) for d, _, m in held.values() if all(np.array_equal(m[k], own_b[k]) for k in own_b)),
                      None)
        assert scored is not None, f"client {client}'s scored model does not carry its own B after round 1"
        data, installed = scored
        assert set(installed) == set(want) and all(np.array_equal(installed[k], want[k]) for k in want), \
            "the scored model is the server's state after round 1 with the client's own B after round 1"
        plugin.load_state(model, hook.released[1])
        plugin.load_local_state(model, own_b)
        again = evaluate(model, _tokenizer(tiny_model_dir), data, cfg.model.max_length, torch.device("cpu"))
        assert again["accuracy"] == pytest.approx(value), "global state of round 1 + own B of round 1"
        plugin.load_local_state(model, {})  # the server's model: B = 0
        server = evaluate(model, _tokenizer(tiny_model_dir), data, cfg.model.max_length, torch.device("cpu"))
        differs.append(server["loss"] != pytest.approx(again["loss"], abs=1e-6))
    assert any(differs), "the personalised model is not the server's"
    assert rows[-1]["personal_accuracy"] == pytest.approx(float(np.mean(list(values.values()))))


def _tokenizer(path: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_ledger_plan_reserves_the_release() -> None:
    """ensure_plan with a reserved release calibrates a larger DP-SGD sigma so that the planned
    steps plus the release spend at most the target (without the reservation they would
    overspend), the budget check counts it, and dropping the reservation re-plans."""
    kw: dict[str, Any] = dict(target_epsilon=3.0, delta=1e-5, sample_rate=0.25, planned_steps=20, accountant="pld")
    plain = Ledger(client="0", target_epsilon=3.0, delta=1e-5)
    plain.ensure_plan(**kw)
    ledger = Ledger(client="0", target_epsilon=3.0, delta=1e-5)
    ledger.ensure_plan(**kw, reserved=(release_entry(4.0),))
    assert ledger.noise_multiplier > plain.noise_multiplier and ledger.reserved == [[4.0, 1.0, 1]]
    assert epsilon_for([(ledger.noise_multiplier, 0.25, 20), release_entry(4.0)], 1e-5, "pld")[0] <= 3.0 + 1e-6
    assert epsilon_for([(plain.noise_multiplier, 0.25, 20), release_entry(4.0)], 1e-5, "pld")[0] > 3.0 + 0.01, \
        "without the reservation the release would overspend"
    assert ledger.epsilon_if(20)[0] > plain.epsilon_if(20)[0] - 0.5 and ledger.check_budget(20) <= 3.0 + 1e-6
    assert ledger.epsilon_if(20)[0] == pytest.approx(
        epsilon_for([(ledger.noise_multiplier, 0.25, 20), release_entry(4.0)], 1e-5, "pld")[0]), \
        "the budget check counts the reserved release"
    assert Ledger.from_json(ledger.to_json()).reserved == [[4.0, 1.0, 1]], "the reservation is stored"
    assert "holds" not in ledger.ensure_plan(**kw) and ledger.reserved == [], "a changed reservation re-plans"


def test_split_is_disjoint_and_compare_turns_it_on(tiny_model_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fedpeft.data.sources import train_test_split_for

    cfg = _cfg(tiny_model_dir, tmp_path, 8.0)
    pool, _ = train_test_split_for(cfg.data, cfg.seed)
    data = pool.subset(np.arange(40))
    train, held = split_held_out(data, 0.25, 0, "3")
    assert len(train) == 30 and len(held) == 10
    assert sorted(train.texts + held.texts) == sorted(data.texts), "a partition of the client's examples"
    assert split_held_out(data, 0.25, 0, "3")[1].texts == held.texts, "same public seed, same split"
    assert split_held_out(data, 0.25, 0, "4")[1].texts != held.texts, "each client its own split"
    assert personal_layer("fedsa_lora") == {"adapter.options.eval_fraction": 0.2}
    assert personal_layer("ffa_lora") == {} and personal_layer("lora") == {}
    with pytest.raises(ValueError, match="seq-cls"):
        parse_config({"adapter.method": "fedsa_lora", "adapter.options.eval_fraction": 0.2, "task_type": "causal-lm"})


def test_compare_judges_fedsa_by_the_personal_metric(tmp_path: Path) -> None:
    """collect() takes personal_accuracy of the last row when a run has it, and says so."""
    from fedpeft.sim.compare import report

    rows = [{"round": 1, "accuracy": 0.5, "loss": 0.7}, {"round": 2, "accuracy": 0.55, "loss": 0.6,
                                                          "personal_accuracy": 0.81}]

    class _Cell:
        method, epsilon, seed = "fedsa_lora", float("inf"), 0
        path = tmp_path
        cfg = parse_config({"adapter.method": "fedsa_lora"})
        name = "c"

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import fedpeft.sim.compare.report as rep

    orig = rep.cell_is_finished
    try:
        rep.cell_is_finished = lambda c: True  # type: ignore[assignment]
        results, _, _ = report.collect([_Cell()])  # type: ignore[list-item]
    finally:
        rep.cell_is_finished = orig  # type: ignore[assignment]
    assert results[0]["final_accuracy"] == 0.81 and results[0]["best_accuracy"] == 0.81
    assert results[0]["judged_by"].startswith("personal_accuracy")
    rows[-1].pop("personal_accuracy")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep.cell_is_finished = lambda c: True  # type: ignore[assignment]
    try:
        results, _, _ = report.collect([_Cell()])  # type: ignore[list-item]
    finally:
        rep.cell_is_finished = orig  # type: ignore[assignment]
    assert results[0]["final_accuracy"] == 0.55 and results[0]["judged_by"] == "accuracy"
