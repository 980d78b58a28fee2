"""Server optimisers (issue 20): ``fedavgm``, ``fedadagrad``, ``fedadam``, ``fedyogi``.

Each rule against its formula (Reddi et al. 2021, Alg. 2; Hsu et al. 2019), recomputed here in
numpy, over three rounds of hand-made replies; ``fedavg`` unchanged; the moments in the
checkpoint, a restored strategy continuing bit-identically; the ``[strategy]`` options and their
one-line errors; and a tiny FedAdam federation through the real round loop, interrupted and
resumed, ending bit-identical to an uninterrupted one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from inprocess_grid import LocalGrid, NodeIds, Releases

from fedpeft.adapters import get
from fedpeft.config import STRATEGY_OPTIONS, ConfigError, config_from_toml, config_to_toml
from fedpeft.load import parse_config
from fedpeft.server.checkpoint import load_checkpoint, restore, round_checkpoint, save_checkpoint
from fedpeft.strategies.adapter_avg import AdapterAvg, state_to_arrayrecord
from fedpeft.strategies.multitask_avg import MultiTaskSpec
from fedpeft.strategies.registry import STRATEGIES, build_base, build_strategy, describe
from fedpeft.strategies.server_opt import OPTIMIZERS
from fedpeft.strategies.server_opt_avg import ServerOptAvg
from fedpeft.strategies.validation import StateSpec

SHAPES = {"b": (2, 3), "c": (4,)}
SPEC = StateSpec({k: (s, "float32") for k, s in SHAPES.items()}, frozen_hash="h")
WEIGHTS = (10.0, 30.0)
RULES = ("fedavgm", "fedadagrad", "fedadam", "fedyogi")


def _cfg(name: str = "fedavg", **options: Any):  # type: ignore[no-untyped-def]
    return parse_config({"privacy.epsilon": "inf", "train.clients": 2, "data.partition": "iid",
                         "strategy.name": name, **{f"strategy.{k}": v for k, v in options.items()}})


def _reply(state: dict[str, np.ndarray], examples: float, client: str) -> Message:
    out = Message(content=RecordDict({"arrays": ArrayRecord({"x": Array(np.zeros(1))})}), dst_node_id=1,
                  message_type="train")
    return Message(content=RecordDict({
        "arrays": state_to_arrayrecord(state),
        "metrics": MetricRecord({"num-examples": examples}),
        "info": ConfigRecord({"client": client, "frozen-hash": "h"}),
    }), reply_to=out)


def _replies(rounds: int = 3) -> list[list[dict[str, np.ndarray]]]:
    """Per round, two clients' states: multiples of 1/8 (their weighted mean is exact in float32),
    large moves first and small ones last (so Yogi's sign(v - D^2) takes both signs)."""
    rng = np.random.default_rng(7)
    scales = [8.0, 2.0, 0.25, 0.25][:rounds]
    return [[{k: (np.round(rng.normal(0, scale, s) * 8) / 8).astype(np.float32) for k, s in SHAPES.items()}
             for _ in WEIGHTS] for scale in scales]


def _expected(name: str, cfg: Any, replies: list[list[dict[str, np.ndarray]]],
              x0: dict[str, np.ndarray]) -> tuple[list[dict[str, np.ndarray]], set[float]]:
    """The rule's global states, recomputed from the formulas; and the signs Yogi saw."""
    s = cfg.strategy
    x = {k: v.astype(np.float32) for k, v in x0.items()}
    m = {k: np.zeros(v.shape) for k, v in x.items()}
    v2 = {k: np.full(v.shape, s.tau ** 2) for k, v in x.items()}  # Alg. 2: v_-1 = tau^2
    out, signs = [], set()
    for states in replies:
        new = {}
        for k in x:
            agg = sum(w * st[k].astype(np.float64) for w, st in zip(WEIGHTS, states, strict=True)) / sum(WEIGHTS)
            d = agg - x[k].astype(np.float64)
            if name == "fedavgm":
                m[k] = s.momentum * m[k] + d
                step = s.server_lr * m[k]
            else:
                m[k] = s.beta_1 * m[k] + (1 - s.beta_1) * d
                if name == "fedadagrad":
                    v2[k] = v2[k] + d ** 2
                elif name == "fedadam":
                    v2[k] = s.beta_2 * v2[k] + (1 - s.beta_2) * d ** 2
                else:
                    signs.update(np.unique(np.sign(v2[k] - d ** 2)).tolist())
                    v2[k] = v2[k] - (1 - s.beta_2) * d ** 2 * np.sign(v2[k] - d ** 2)
                step = s.server_lr * m[k] / (np.sqrt(v2[k]) + s.tau)
            new[k] = (x[k].astype(np.float64) + step).astype(np.float32)
        x = new
        out.append(x)
    return out, signs


def _run(strategy: Any, replies: list[list[dict[str, np.ndarray]]], x: dict[str, np.ndarray],
         first_round: int = 1) -> list[dict[str, np.ndarray]]:
    """Drive ``strategy`` through one round per entry of ``replies``, as the round loop does."""
    out = []
    for r, states in enumerate(replies, start=first_round):
        list(strategy.configure_train(r, state_to_arrayrecord(x), ConfigRecord(), NodeIds(1, 2)))
        arrays, _ = strategy.aggregate_train(r, [_reply(st, w, str(i)) for i, (st, w)
                                                 in enumerate(zip(states, WEIGHTS, strict=True))])
        x = {k: v.numpy() for k, v in arrays.items()}
        out.append(x)
    return out


X0 = {k: np.full(s, 0.5, np.float32) for k, s in SHAPES.items()}


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("options", [{}, {"server_lr": 0.3}])
def test_each_rule_follows_its_formula_over_three_rounds(name: str, options: dict[str, Any],
                                                          flwr_identity: Any) -> None:
    cfg = _cfg(name, **options)
    strategy = build_base(cfg, get("ffa_lora"), SPEC, "", "h")
    assert type(strategy) is STRATEGIES[name] and isinstance(strategy, ServerOptAvg)
    replies = _replies()
    got = _run(strategy, replies, X0)
    want, signs = _expected(name, cfg, replies, X0)
    for g, w in zip(got, want, strict=True):
        for k in SHAPES:
            assert g[k].dtype == np.float32
            np.testing.assert_allclose(g[k], w[k], rtol=1e-6, atol=1e-7)
    assert np.array_equal(strategy.previous["b"], got[-1]["b"])  # the release is what the base keeps
    if name == "fedyogi":
        assert signs == {-1.0, 1.0}  # both branches of sign(v - D^2) were exercised
    plain = _run(AdapterAvg.from_config(get("ffa_lora"), _cfg(), SPEC, "", "h"), replies, X0)
    assert not np.allclose(plain[-1]["b"], got[-1]["b"])  # a server optimiser is not FedAvg


def test_fedavg_is_unchanged_and_fedavgm_without_momentum_is_fedavg(flwr_identity: Any) -> None:
    cfg = _cfg()
    assert type(build_base(cfg, get("ffa_lora"), SPEC, "", "h")) is AdapterAvg
    replies = _replies(2)
    got = _run(build_base(cfg, get("ffa_lora"), SPEC, "", "h"), replies, X0)
    for g, states in zip(got, replies, strict=True):
        for k in SHAPES:  # the plugin's weighted mean, exactly (no server step)
            assert np.array_equal(g[k], (states[0][k] * 10 + states[1][k] * 30) / 40)
    avgm = _run(build_base(_cfg("fedavgm", momentum=0.0), get("ffa_lora"), SPEC, "", "h"), replies, X0)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(avgm, got, strict=True) for k in SHAPES)


def _through_file(tmp_path: Path, strategy: Any) -> Any:
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, round_checkpoint(2, "h", dict(X0), strategy, [], {}, [], ()))
    return load_checkpoint(path)


@pytest.mark.parametrize("name", RULES)
def test_moments_survive_the_checkpoint_and_a_resume_is_bit_identical(name: str, tmp_path: Path,
                                                                      flwr_identity: Any) -> None:
    cfg, replies = _cfg(name), _replies(4)
    straight = build_base(cfg, get("ffa_lora"), SPEC, "", "h")
    first = _run(straight, replies[:2], X0)
    ckpt = _through_file(tmp_path, straight)
    state = dict(ckpt.strategy)[type(straight).__name__]
    assert state["optimizer"]["name"] == name
    assert all(v.dtype == np.float64 for slot in state["optimizer"]["moments"].values() for v in slot.values())
    resumed = build_base(cfg, get("ffa_lora"), SPEC, "", "h")
    restore(ckpt, resumed, [])
    rest = _run(straight, replies[2:], first[-1], first_round=3)
    again = _run(resumed, replies[2:], first[-1], first_round=3)
    for a, b in zip(rest, again, strict=True):
        assert all(a[k].tobytes() == b[k].tobytes() for k in SHAPES)  # bit-identical
    fresh = build_base(cfg, get("ffa_lora"), SPEC, "", "h")
    fresh.load_state_dict({**resumed.state_dict(), "optimizer": type(fresh.optimizer)(cfg.strategy).state_dict()})
    cold = _run(fresh, replies[2:], first[-1], first_round=3)
    assert not np.array_equal(cold[0]["b"], rest[0]["b"])  # without the moments it would not continue
    other = "fedyogi" if name != "fedyogi" else "fedadam"
    with pytest.raises(ValueError, match="strategy chain"):  # a checkpoint of one rule, resumed with another
        restore(ckpt, build_base(_cfg(other), get("ffa_lora"), SPEC, "", "h"), [])
    with pytest.raises(ValueError, match="server optimiser state is for"):
        OPTIMIZERS[other](_cfg(other).strategy).load_state_dict(state["optimizer"])


def test_tensors_the_rule_does_not_cover_pass_through(flwr_identity: Any) -> None:
    opt = OPTIMIZERS["fedavgm"](_cfg("fedavgm").strategy)
    agg = {"b": np.ones(3, np.float32), "mask": np.array([1, 0], np.int64), "new": np.ones(2, np.float32),
           "grown": np.ones(4, np.float32)}
    out = opt.step({"b": np.zeros(3, np.float32), "mask": np.array([0, 0]), "grown": np.zeros(2, np.float32)}, agg)
    assert np.array_equal(out["b"], np.ones(3)) and set(opt.moments["m"]) == {"b"}
    assert all(out[k] is agg[k] for k in ("mask", "new", "grown"))
    out = opt.step({"b": out["b"]}, {"b": out["b"]})  # D = 0: momentum alone moves it on
    np.testing.assert_allclose(out["b"], 1.9, rtol=1e-6)
    strategy = build_base(_cfg("fedadam"), get("ffa_lora"), SPEC, "", "h")
    with pytest.raises(RuntimeError, match="configure_train"):
        strategy.aggregate_states([X0], [1.0])


def test_options_defaults_toml_round_trip_and_cli() -> None:
    from fedpeft.cli.main import build_parser, config_from_args

    assert _cfg("fedavgm").strategy.momentum == 0.9 and _cfg("fedavgm").strategy.server_lr == 1.0
    adam = _cfg("fedadam")
    assert (adam.strategy.server_lr, adam.strategy.beta_1, adam.strategy.beta_2, adam.strategy.tau) == (
        0.01, 0.9, 0.99, 1e-3)
    assert _cfg("fedadam", server_lr=0.5).strategy.server_lr == 0.5  # the user's value wins over the name's
    assert config_from_toml(config_to_toml(adam)) == adam
    assert "server_lr = 0.01" in config_to_toml(adam)  # config.toml shows what the run used
    args = build_parser().parse_args(["simulate", "--set", "strategy.name=fedyogi", "--set", "strategy.tau=0.01",
                                      "--set", "privacy.epsilon=inf"])
    cfg = config_from_args(args)
    assert (cfg.strategy.name, cfg.strategy.tau, cfg.strategy.server_lr) == ("fedyogi", 0.01, 0.01)
    assert set(STRATEGY_OPTIONS) <= set(STRATEGIES) and all(
        OPTIMIZERS[n].options() == STRATEGY_OPTIONS[n] for n in OPTIMIZERS)
    for name in STRATEGIES:
        text = describe(name)
        assert text.startswith(name) and all(f"strategy.{k}=" in text for k in STRATEGY_OPTIONS[name])


@pytest.mark.parametrize(("name", "key", "value", "text"), [
    ("fedadam", "server_lr", 0, "must be > 0"),
    ("fedadam", "server_lr", "inf", "must be > 0"),
    ("fedavgm", "momentum", 1.0, "[0, 1)"),
    ("fedadam", "beta_1", -0.1, "[0, 1)"),
    ("fedyogi", "beta_2", 1, "[0, 1)"),
    ("fedadagrad", "tau", 0, "must be > 0"),
    ("fedavgm", "beta_2", 0.5, "fedavgm does not read it; its options: server_lr, momentum"),
    ("fedavg", "server_lr", 0.5, "fedavg does not read it; its options: none"),
    ("fedadam", "momentum", 0.5, "fedadam does not read it"),
    ("fedadam", "lr", 0.5, "unknown key; allowed keys in [strategy]"),
    ("fedadam", "server_lr", "x", "expected a number"),
])
def test_bad_options_are_one_line_errors(name: str, key: str, value: Any, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        _cfg(name, **{key: value})
    assert f"strategy.{key}" in str(info.value) and text in str(info.value) and "\n" not in str(info.value)


def test_central_dp_and_multitask_are_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="un-noised") as info:
        parse_config({"privacy.epsilon": "inf", "train.clients": 2, "data.partition": "iid",
                      "strategy.name": "fedavgm", "central.mode": "server"})
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="allowed for a multi-task federation: fedavg"):
        build_strategy(_cfg("fedadam"), get("ffa_lora"), MultiTaskSpec(SPEC.tensors, "h", {"t": SPEC}), "", "h")


def _loop_cfg(model: Path, out: Path, rounds: int) -> Any:
    return parse_config({
        "model.path": str(model), "model.max_length": 24, "data.examples_per_client": 96,
        "data.test_size": 64, "train.rounds": rounds, "train.batch_size": 32, "train.local_steps": 2,
        "output_dir": str(out), "privacy.epsilon": "inf", "strategy.name": "fedadam", "strategy.server_lr": 0.05,
    })


def test_fedadam_through_the_real_round_loop(tiny_model_dir: Path, tmp_path: Path, flwr_identity: Any) -> None:
    """2 rounds of FedAdam (no DP) through ``run_federation`` and the real ClientApp: the B
    matrices move, by the server optimiser's step; the moments are in the checkpoint."""

    from fedpeft.server.loop import run_federation

    hook = Releases()
    rows = run_federation(LocalGrid(3), _loop_cfg(tiny_model_dir, tmp_path, 2), tmp_path, hooks=[hook])  # type: ignore[arg-type]
    assert [r["round"] for r in rows] == [1, 2] and all(np.isfinite(r["accuracy"]) for r in rows)
    assert 'name = "fedadam"' in (tmp_path / "config.toml").read_text()
    b_names = [k for k in hook.released[1] if "lora_B" in k]
    assert b_names and all(not np.array_equal(hook.released[1][k], hook.released[2][k]) for k in b_names)
    ckpt = load_checkpoint(tmp_path / "checkpoint.npz")
    moments = dict(ckpt.strategy)["AdapterFedAdam"]["optimizer"]["moments"]
    assert set(moments["m"]) == set(moments["v"]) == set(hook.released[2])  # exactly the tensors sent (B and head)
    assert all("lora_A" not in k for k in moments["m"])


@pytest.mark.slow
def test_fedadam_through_the_real_round_loop_resumes_bit_identically(tiny_model_dir: Path, tmp_path: Path,
                                                                       flwr_identity: Any) -> None:
    """3 clients, 3 rounds of FedAdam; the same run killed after round 2's aggregation and
    resumed ends with the uninterrupted run's global state, bit for bit (~25 s)."""

    from fedpeft.server.loop import run_federation

    reference = Releases()
    run_federation(LocalGrid(3), _loop_cfg(tiny_model_dir, tmp_path / "ref", 3), tmp_path / "ref",  # type: ignore[arg-type]
                   hooks=[reference])
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="server killed"):
        run_federation(LocalGrid(3), _loop_cfg(tiny_model_dir, run, 3), run, hooks=[Releases(crash_after=2)])  # type: ignore[arg-type]
    again = Releases()
    run_federation(LocalGrid(3), _loop_cfg(tiny_model_dir, run, 3), run, hooks=[again], resume=True)  # type: ignore[arg-type]
    for k, v in reference.released[3].items():
        assert again.released[3][k].tobytes() == v.tobytes(), k


def test_the_strategies_command_lists_names_formulas_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from fedpeft.cli.main import main

    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    for name in STRATEGIES:
        assert f"\n{name} " in f"\n{out}"
    assert "v <- v - (1-beta_2)*D^2*sign(v-D^2)" in out and "strategy.momentum=0.9" in out
    assert "strategy.server_lr=0.01" in out and "no privacy cost" in out


def test_flwr_run_config_gets_the_strategy_names_defaults() -> None:
    """pyproject lists the options as "" (unset), so `flwr run --run-config strategy.name='fedadam'`
    resolves as `fedpeft simulate --set strategy.name=fedadam`."""
    from fedpeft.server.app import config_from_run_config
    from tests.test_flwr_app import _app_config

    cfg = config_from_run_config({**_app_config(), "strategy.name": "fedadam"})
    assert cfg == parse_config({"strategy.name": "fedadam"}) and cfg.strategy.server_lr == 0.01


def test_ffa_lora_linearity_fedavgm_on_b_is_fedavgm_on_delta_w() -> None:
    """ΔW = B·A with A frozen: FedAvgM's step on B, times A, is FedAvgM on the clients' ΔW
    (module doc of server_opt); FedAdam's element-wise v is in B's coordinates, so it is not."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(4, 6))
    rounds = [[rng.normal(size=(5, 4)) for _ in range(3)] for _ in range(3)]
    for name, same in (("fedavgm", True), ("fedadam", False)):
        opt = OPTIMIZERS[name](_cfg(name).strategy)
        b = np.zeros((5, 4))
        w, m = b @ a, np.zeros((5, 6))
        for states in rounds:
            b = opt.step({"B": b}, {"B": np.mean(states, axis=0)})["B"]
            d = np.mean([s @ a for s in states], axis=0) - w  # the clients' mean change of ΔW
            m = 0.9 * m + d
            w = w + 1.0 * m
        assert np.allclose(b @ a, w) is same


def test_central_dp_reads_the_strategys_declared_capability_not_its_name() -> None:
    """A runtime-registered strategy that keeps no un-noised state runs with central DP; one
    that declares it cannot is refused, whatever its name; the error lists what is allowed."""
    from fedpeft.strategies import registry
    from fedpeft.strategies.adapter_avg import AdapterAvg
    from fedpeft.strategies.server_opt_avg import ServerOptAvg

    class PlainMean(AdapterAvg):
        """A test-only alias of FedAvg (nothing across rounds but the release)."""

    class Moments(ServerOptAvg):
        """A test-only server optimiser under another name."""

    layer = {"privacy.epsilon": "inf", "train.clients": 2, "data.partition": "iid", "central.mode": "server"}
    registry.register("test_plain_mean", PlainMean)
    registry.register("test_moments", Moments)
    try:
        assert parse_config({**layer, "strategy.name": "test_plain_mean"}).strategy.name == "test_plain_mean"
        with pytest.raises(ConfigError, match="un-noised") as info:
            parse_config({**layer, "strategy.name": "test_moments"})
        assert "allowed with central DP: fedavg, test_plain_mean" in str(info.value)
    finally:
        for name in ("test_plain_mean", "test_moments"):
            registry.STRATEGIES.pop(name, None)
            registry.MULTITASK_STRATEGIES.pop(name, None)


def test_build_strategy_rechecks_central_dp_compatibility_without_validation() -> None:
    """Defence in depth: a strategy chain built from a configuration that skipped
    ``fedpeft.load`` validation (a library caller, a test) still refuses central DP on a
    server optimiser or on a plugin whose aggregate is not a weighted mean."""
    import dataclasses

    def central(cfg: Any) -> Any:
        return dataclasses.replace(cfg, central=dataclasses.replace(cfg.central, mode="server"))

    strategy, hooks = build_strategy(central(_cfg("fedavg")), get("ffa_lora"), SPEC, "", "h")
    assert hooks and type(strategy).__name__ == "CentralDPFixedClipping"
    with pytest.raises(ConfigError, match="un-noised"):
        build_strategy(central(_cfg("fedadam")), get("ffa_lora"), SPEC, "", "h")
    with pytest.raises(ConfigError, match="weighted mean"):
        build_strategy(central(_cfg("fedavg")), get("osft"), SPEC, "", "h")
