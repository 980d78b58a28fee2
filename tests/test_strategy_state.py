"""Strategies, wrappers and stateful hooks: the ``[strategy]`` registry, and every component's
``state_dict()`` surviving a checkpoint file and ``load_state_dict()`` exactly (issue 17)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord
from inprocess_grid import NodeIds

import fedpeft.wire as wire
from fedpeft.adapters import get
from fedpeft.config import ConfigError
from fedpeft.load import parse_config
from fedpeft.privacy.central import ClientLevelAccountant
from fedpeft.server.checkpoint import Checkpoint, load_checkpoint, restore, round_checkpoint, save_checkpoint
from fedpeft.strategies.adapter_avg import AdapterAvg, state_to_arrayrecord
from fedpeft.strategies.central_dp import CentralDPFixedClipping
from fedpeft.strategies.deadlines import DeadlinePolicy, DeadlineStrategy
from fedpeft.strategies.multitask_avg import MultiTaskAvg, MultiTaskSpec
from fedpeft.strategies.registry import MULTITASK_STRATEGIES, build_strategy
from fedpeft.strategies.registry import STRATEGIES as REGISTRY
from fedpeft.strategies.registry import names as strategy_names
from fedpeft.strategies.state import chain_state_dict, strategy_chain
from fedpeft.strategies.validation import StateSpec
from tests.test_central_dp import _reply
from tests.test_hetero_models import HOOK_SCENARIO, MINILM, _dp_reply

SPEC = StateSpec({"w": ((100, 100), "float32")}, frozen_hash="h")


def _cfg(**extra: Any):  # type: ignore[no-untyped-def]
    return parse_config({"privacy.epsilon": "inf", "train.clients": 6, "train.clients_per_round": 2,
                         "data.partition": "iid", **extra})


def _through_file(tmp_path: Path, strategy: Any = None, hooks: tuple[Any, ...] = ()) -> Checkpoint:
    """Save the components' state as the round loop does, and read the file back."""
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, round_checkpoint(1, "h", {"w": np.zeros((100, 100), np.float32)}, strategy, [], {}, [],
                                           hooks))
    return load_checkpoint(path)


def _sampled(strategy: Any, rounds: range) -> list[list[int]]:
    zero = state_to_arrayrecord({"w": np.zeros((100, 100), np.float32)})
    return [[m.metadata.dst_node_id for m in strategy.configure_train(r, zero, ConfigRecord(), NodeIds(11, 12, 13, 14, 15, 16))]
            for r in rounds]


# ---- the registry ---------------------------------------------------------------------------

def test_strategy_names_and_unknown_name_is_one_line() -> None:
    assert tuple(REGISTRY) == tuple(strategy_names()) == ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi")
    assert tuple(MULTITASK_STRATEGIES) == ("fedavg",)  # the server optimisers are single-task
    assert parse_config({}).strategy.name == "fedavg"
    with pytest.raises(ConfigError) as info:
        parse_config({"strategy.name": "fedsgd"})
    assert "strategy.name" in str(info.value) and "allowed: fedavg, fedavgm, fedadagrad, fedadam, fedyogi" in str(
        info.value) and "\n" not in str(info.value)


def test_wrappers_are_applied_in_the_documented_order() -> None:
    cfg = _cfg(**{"central.mode": "server"})
    timer = SimpleNamespace(policy=DeadlinePolicy("over-select", over_select=2.0))
    seen: list[Any] = []

    def spy(inner: Any) -> Any:
        seen.append(inner)
        return SimpleNamespace(strategy=inner)

    strategy, hooks = build_strategy(cfg, get("ffa_lora"), SPEC, "", "h", round_timer=timer, extra=spy)  # type: ignore[arg-type]
    chain = strategy_chain(strategy)
    assert [type(s).__name__ for s in chain] == ["CentralDPFixedClipping", "SimpleNamespace", "DeadlineStrategy",
                                                 "AdapterAvg"]
    assert seen == [chain[2]] and [type(h) for h in hooks] == [ClientLevelAccountant]
    assert chain[-1].per_round == 4 and chain[2].wanted == 2  # over-selection x2 of k = 2
    multi, _ = build_strategy(_cfg(), get("ffa_lora"), MultiTaskSpec(SPEC.tensors, "h", {"t": SPEC}), "", "h")
    assert type(multi) is MultiTaskAvg and type(build_strategy(_cfg(), get("ffa_lora"), SPEC, "", "h")[0]) is AdapterAvg


# ---- each strategy's state ------------------------------------------------------------------

@pytest.mark.parametrize("kind", [AdapterAvg, MultiTaskAvg])
def test_base_strategy_state_round_trip(kind: type[AdapterAvg], tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    spec = SPEC if kind is AdapterAvg else MultiTaskSpec(SPEC.tensors, "h", {"t": SPEC})
    a = kind.from_config(get("ffa_lora"), _cfg(), spec, "", "h")
    _sampled(a, range(1, 4))  # the sampler moves on
    arrays, _ = a.aggregate_train(3, [_reply(2.0, 10.0, "0"), _reply(4.0, 30.0, "1")])
    assert arrays is not None and float(a.previous["w"][0, 0]) == pytest.approx(3.5)
    b = kind.from_config(get("ffa_lora"), _cfg(), spec, "", "h")
    restore(_through_file(tmp_path, a), b, [])
    assert set(b.previous) == {"w"} and np.array_equal(b.previous["w"], a.previous["w"])
    assert b.previous["w"].dtype == np.float32
    fresh = kind.from_config(get("ffa_lora"), _cfg(), spec, "", "h")
    restored = _sampled(b, range(4, 12))
    assert restored == _sampled(a, range(4, 12))  # the restored sampler picks the same clients ...
    assert restored != _sampled(fresh, range(4, 12))  # ... where a fresh one would start over


def test_central_dp_wrapper_has_no_state_and_draws_fresh_noise(tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    cfg = _cfg(**{"central.mode": "server", "central.clip": 0.5, "central.noise_multiplier": 2.0})
    releases = []
    for _ in range(2):  # the same round, the same replies, the global numpy RNG seeded alike: fresh noise
        np.random.seed(0)
        strategy, _ = build_strategy(cfg, get("ffa_lora"), SPEC, "", "h")
        _sampled(strategy, range(1, 2))
        arrays, _ = strategy.aggregate_train(1, [_reply(1e-12, 10.0, "0"), _reply(1e-12, 10.0, "1")])
        releases.append(arrays["w"].numpy())
        assert np.array_equal(strategy_chain(strategy)[-1].previous["w"], releases[-1])  # only the release kept
    assert releases[0].std() == pytest.approx(2.0 * 0.5 / 2, rel=0.05)
    assert not np.allclose(releases[0], releases[1], atol=0.1)
    ckpt = _through_file(tmp_path, strategy)
    assert [name for name, _ in ckpt.strategy] == ["CentralDPFixedClipping", "AdapterAvg"]
    assert ckpt.strategy[0][1] == {}  # no noise, no generator state
    restore(ckpt, build_strategy(cfg, get("ffa_lora"), SPEC, "", "h")[0], [])
    with pytest.raises(ValueError, match="must be empty"):
        CentralDPFixedClipping(AdapterAvg.from_config(get("ffa_lora"), cfg, SPEC, "", "h"), 1.0, 1.0, 2
                               ).load_state_dict({"noise": [1.0]})


def test_deadline_wrapper_state_round_trip_and_other_policy_refused(tmp_path: Path) -> None:
    cfg = _cfg()
    timer = SimpleNamespace(policy=DeadlinePolicy("drop-late", deadline_s=30.0))
    strategy, _ = build_strategy(cfg, get("ffa_lora"), SPEC, "", "h", round_timer=timer)  # type: ignore[arg-type]
    ckpt = _through_file(tmp_path, strategy)
    assert ckpt.strategy[0] == ["DeadlineStrategy", {"policy": {"policy": "drop-late", "deadline_s": 30.0,
                                                                 "over_select": 1.0}, "wanted": 2}]
    again, _ = build_strategy(cfg, get("ffa_lora"), SPEC, "", "h", round_timer=timer)  # type: ignore[arg-type]
    restore(ckpt, again, [])
    other, _ = build_strategy(cfg, get("ffa_lora"), SPEC, "", "h",  # type: ignore[arg-type]
                              round_timer=SimpleNamespace(policy=DeadlinePolicy("wait-all")))
    with pytest.raises(ValueError, match="deadline policy"):
        restore(ckpt, other, [])
    with pytest.raises(ValueError, match="strategy chain"):  # resumed without the deadline wrapper
        restore(ckpt, AdapterAvg.from_config(get("ffa_lora"), cfg, SPEC, "", "h"), [])
    assert isinstance(strategy, DeadlineStrategy) and chain_state_dict(strategy)[1][0] == "AdapterAvg"


def test_client_level_accountant_continues_after_a_resume(tmp_path: Path) -> None:
    cfg = _cfg(**{"central.mode": "server", "central.noise_multiplier": 1.1})
    report = SimpleNamespace(released=True, accepted=[SimpleNamespace(weight=10.0), SimpleNamespace(weight=10.0)])
    straight, first = ClientLevelAccountant(cfg), ClientLevelAccountant(cfg)
    rows: list[dict[str, Any]] = [{} for _ in range(3)]
    for i in range(3):
        straight.on_round_end(i + 1, rows[i], report)
    for i in range(2):
        first.on_round_end(i + 1, {}, report)
    resumed = ClientLevelAccountant(cfg)
    restore(_through_file(tmp_path, AdapterAvg.from_config(get("ffa_lora"), cfg, SPEC, "", "h"), (first,)),
            AdapterAvg.from_config(get("ffa_lora"), cfg, SPEC, "", "h"), [resumed])
    assert resumed.epsilon == first.epsilon
    row: dict[str, Any] = {}
    resumed.on_round_end(3, row, report)
    assert row["epsilon_client_level"] == rows[2]["epsilon_client_level"] and row["central_releases"] == 3
    other = ClientLevelAccountant(_cfg(**{"central.mode": "server", "central.delta": 1e-4}))
    with pytest.raises(ValueError, match="configuration"):
        other.load_state_dict(first.state_dict())


# ---- the heterogeneous-device emulator --------------------------------------------------------

def _emulator(tmp_path: Path, scenario_text: str = HOOK_SCENARIO):  # type: ignore[no-untyped-def]
    from fedpeft.sim.hetero.hook import HeteroEmulator
    from fedpeft.sim.hetero.scenario import load_scenario
    from fedpeft.sim.hetero.timing import StepCost

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "s.toml").write_text(scenario_text)
    scenario = load_scenario(str(tmp_path / "s.toml"))
    cfg = parse_config(scenario.config, {"train.batch_size": 32, "privacy.epsilon": 6.0})
    return HeteroEmulator(scenario, cfg, step_cost=StepCost(seconds_per_example=0.01, batch=32, steps=2))


def _emulated_round(emulator: Any, server_round: int) -> dict[str, Any]:
    emulator.round_directives(server_round)
    kept = emulator.settle(server_round, [_dp_reply(cid) for cid in range(3)], bytes_down_each=1000)
    row: dict[str, Any] = {"round": server_round, "seconds": 1.0, "accuracy": 0.5}
    emulator.on_round_end(server_round, row, SimpleNamespace())
    return {"kept": [m.content["info"]["client"] for m in kept], "row": row}


def _fake_setup() -> Any:
    config = SimpleNamespace(num_hidden_layers=MINILM.layers, hidden_size=MINILM.hidden,
                             num_attention_heads=MINILM.heads, intermediate_size=MINILM.intermediate,
                             vocab_size=MINILM.vocab, num_labels=2, model_type="bert")
    return SimpleNamespace(model=SimpleNamespace(config=config), state={"w": np.zeros((4, 4), np.float32)})


@pytest.mark.usefixtures("flwr_identity")
def test_hetero_emulator_state_round_trips_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedpeft.server.run_dir import RunDir
    from fedpeft.sim.hetero import cost

    a = _emulator(tmp_path / "a")
    a.on_start(_fake_setup(), None, RunDir(tmp_path / "run-a"))
    first = [_emulated_round(a, r) for r in (1, 2)]
    assert len(first[0]["kept"]) == 2 and first[0]["row"]["sim_seconds"] == pytest.approx(10.0)  # Slow is late
    b = _emulator(tmp_path / "b")
    b.step_cost = None  # the resumed run must not measure again: it gets the first start's cost back
    monkeypatch.setattr(cost, "measure_step_cost", lambda setup: pytest.fail("step cost measured on resume"))
    restore(_through_file(tmp_path, AdapterAvg.from_config(get("ffa_lora"), a.cfg, SPEC, "", "h"), (a,)),
            AdapterAvg.from_config(get("ffa_lora"), b.cfg, SPEC, "", "h"), [b])
    b.on_start(_fake_setup(), None, RunDir(tmp_path / "run-b"))
    assert b.state_dict() == a.state_dict()
    assert b.sim_clock == a.sim_clock > 0 and b.step_cost == a.step_cost and b.timeline == a.timeline
    timeline = (tmp_path / "run-b" / "hetero_timeline.jsonl").read_text()
    assert timeline == (tmp_path / "run-a" / "hetero_timeline.jsonl").read_text() and len(timeline.splitlines()) == 6
    # the next round goes on identically: same outcomes, same clock
    assert _emulated_round(b, 3) == _emulated_round(a, 3)
    assert json.dumps(b.state_dict(), default=str) == json.dumps(a.state_dict(), default=str)


@pytest.mark.usefixtures("flwr_identity")
def test_hetero_emulator_refuses_another_scenarios_state(tmp_path: Path) -> None:
    a = _emulator(tmp_path / "a")
    a.plan_memory(MINILM)
    other = _emulator(tmp_path / "b", HOOK_SCENARIO.replace("seconds = 10.0", "seconds = 20.0"))
    with pytest.raises(ValueError, match="scenario"):
        other.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="HeteroEmulator"):  # resumed without the scenario
        restore(_through_file(tmp_path, AdapterAvg.from_config(get("ffa_lora"), a.cfg, SPEC, "", "h"), (a,)),
                AdapterAvg.from_config(get("ffa_lora"), a.cfg, SPEC, "", "h"), [])


# ---- AdapterAvg's primitives --------------------------------------------------------------------

NODES = [11, 12, 13, 14, 15, 16]  # what _sampled's grid lists


def test_the_sampler_is_seeded_with_the_run_seed(flwr_identity) -> None:  # type: ignore[no-untyped-def]
    """from_config seeds ``random.Random`` with ``cfg.seed``; built directly, the seed is 0."""
    seeded, unseeded = random.Random(7), random.Random(0)
    strategy = AdapterAvg.from_config(get("ffa_lora"), _cfg(seed=7), SPEC, "", "h")
    assert _sampled(strategy, range(1, 6)) == [sorted(seeded.sample(NODES, 2)) for _ in range(5)]
    direct = AdapterAvg(get("ffa_lora"), SPEC, clients_per_round=2, plugin_cfg=_cfg(seed=7))
    assert _sampled(direct, range(1, 6)) == [sorted(unseeded.sample(NODES, 2)) for _ in range(5)]


def test_every_instruction_carries_the_configuration_its_hash_and_the_extra_entries(  # type: ignore[no-untyped-def]
        flwr_identity) -> None:
    strategy = AdapterAvg.from_config(get("ffa_lora"), _cfg(), SPEC, "seed = 0\n", "abc",
                                      extra_config={wire.LEDGER_DIR: "/ledgers"})
    expected = {wire.SERVER_ROUND: 3, wire.CONFIG_TOML: "seed = 0\n", wire.CONFIG_HASH: "abc",
                wire.FROZEN_HASH: "h", wire.ATTEMPT: 0, wire.LEDGER_DIR: "/ledgers"}
    assert dict(strategy.round_config(3)) == expected
    zero = state_to_arrayrecord({"w": np.zeros((100, 100), np.float32)})
    messages = list(strategy.configure_train(3, zero, ConfigRecord(), NodeIds(1, 2)))
    assert [dict(wire.round_config_of(m)) for m in messages] == [expected, expected]
    direct = AdapterAvg(get("ffa_lora"), SPEC, clients_per_round=2, plugin_cfg=_cfg())  # nothing given: empty
    assert dict(direct.round_config(1)) == {wire.SERVER_ROUND: 1, wire.CONFIG_TOML: "", wire.CONFIG_HASH: "",
                                            wire.FROZEN_HASH: "h", wire.ATTEMPT: 0}
