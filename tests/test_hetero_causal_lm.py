"""The heterogeneous-client emulation with ``task_type = "causal-lm"`` on the tiny Llama: the
emulator plans memory with the decoder model (not the encoder's), the server's cost model
prices a causal-LM step, and (slow) one real Flower simulation of a scenario."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from tiny_model import hetero_scenario

from fedpeft.sim.hetero.memory import DecoderShape, TrainShape, estimate, model_shape_from_dir


def _scenario_cfg(tmp: Path, tiny_llama_dir: Path, instructions_file: Path, **extra: Any):  # type: ignore[no-untyped-def]
    from fedpeft.load import parse_config
    from fedpeft.sim.hetero.scenario import load_scenario

    (tmp / "s.toml").write_text(hetero_scenario("test-hetero-lm"))
    scenario = load_scenario(str(tmp / "s.toml"))
    cfg = parse_config(scenario.config, {
        "task_type": "causal-lm", "model.path": str(tiny_llama_dir), "data.path": str(instructions_file),
        "model.max_length": 32, "model.max_new_tokens": 4, "data.test_size": 12, "train.rounds": 2,
        "train.batch_size": 8, "train.local_steps": 1, "output_dir": str(tmp / "run"), **extra,
    })
    return scenario, cfg


def _decoder_estimate(tiny_llama_dir: Path, cfg, rank: int) -> int:  # type: ignore[no-untyped-def]
    shape = model_shape_from_dir(tiny_llama_dir, 0, "causal-lm", "float32")
    assert isinstance(shape, DecoderShape)
    t = cfg.train
    train = TrainShape(min(t.physical_batch_size, t.batch_size), cfg.model.max_length, rank,
                       tuple(cfg.adapter.target_modules), cfg.privacy.enabled, t.optimizer)
    return estimate(shape, train).total


def test_emulator_plans_a_causal_lm_with_the_decoder_model(tiny_llama_dir: Path, instructions_file: Path,
                                                           tmp_path: Path) -> None:
    """``on_start`` picks the memory model from the server model's config (a Llama: the
    decoder family, its float32 weights), so a client's plan counts the vocabulary logits."""
    from fedpeft.server.setup import ServerSetup
    from fedpeft.sim.hetero.hook import HeteroEmulator
    from fedpeft.sim.hetero.timing import StepCost

    scenario, cfg = _scenario_cfg(tmp_path, tiny_llama_dir, instructions_file)
    emulator = HeteroEmulator(scenario, cfg, step_cost=StepCost(seconds_per_example=0.01))
    emulator.on_start(ServerSetup(cfg), None, SimpleNamespace(path=tmp_path))  # type: ignore[arg-type]
    fast, slow, tiny = (emulator.decisions[n] for n in ("Fast", "Slow", "Tiny"))
    assert fast.estimate_bytes == _decoder_estimate(tiny_llama_dir, cfg, 4) and fast.rank == 4
    assert slow.estimate_bytes == _decoder_estimate(tiny_llama_dir, cfg, 2) and slow.rank == 2
    b, s = min(cfg.train.physical_batch_size, cfg.train.batch_size), cfg.model.max_length
    vocab = model_shape_from_dir(tiny_llama_dir, 0, "causal-lm").vocab  # type: ignore[attr-defined]
    assert fast.estimate_bytes > 12 * b * s * vocab  # the logits alone: far beyond the encoder formula's
    assert tiny.declined and "declines" in tiny.reason
    plan = json.loads((tmp_path / "hetero_plan.json").read_text())
    assert plan["memory"]["Fast"]["estimate_bytes"] == fast.estimate_bytes


@pytest.mark.parametrize("epsilon", [8.0, math.inf])
def test_server_prices_a_causal_lm_step(lm_cfg, epsilon: float) -> None:  # type: ignore[no-untyped-def]
    """The time model is the server's own timed step of the run's recipe, whatever the task
    type: a causal-LM step (completion loss; DP-SGD's per-sample work under DP) is priced."""
    import torch

    from fedpeft.server.setup import ServerSetup
    from fedpeft.sim.hetero.cost import measure_step_cost

    cfg = dataclasses.replace(lm_cfg, privacy=dataclasses.replace(lm_cfg.privacy, epsilon=epsilon))
    setup = ServerSetup(cfg)
    before = {k: v.detach().clone() for k, v in setup.model.state_dict().items()}
    rng = torch.random.get_rng_state()
    cost = measure_step_cost(setup, steps=1)
    assert cost.seconds_per_example > 0 and cost.batch == min(cfg.train.batch_size, len(setup.test))
    assert cost.dp == math.isfinite(epsilon)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in setup.model.state_dict().items())


@pytest.mark.slow
def test_causal_lm_scenario_runs_with_deadlines_ranks_and_declines(tiny_llama_dir: Path, instructions_file: Path,
                                                                   tmp_path: Path) -> None:
    """A real Flower simulation of the shared hetero scenario with the tiny Llama: the fast
    clients are accepted at rank 4, the rank-2 straggler is late, the tiny-memory client
    declines; rows carry the simulated time and the task's own metric; plots are written."""
    from fedpeft.sim.hetero.run import run_scenario

    scenario, cfg = _scenario_cfg(tmp_path, tiny_llama_dir, instructions_file)
    path, rows = run_scenario(scenario, cfg, tmp_path / "run")
    assignment = scenario.assign(4, cfg.seed)
    lines = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    for row in lines:
        assert row["sim_seconds"] == pytest.approx(30.0)  # the straggler is late: the round lasts the deadline
        assert row["hetero"] == {"accepted": 2, "late": 1, "surplus": 0, "crashed": 0, "offline": 0, "declined": 1}
        assert "exact_match" in row and "perplexity" in row
    plan = json.loads((path / "hetero_plan.json").read_text())
    assert plan["memory"]["Fast"]["estimate_bytes"] == _decoder_estimate(tiny_llama_dir, cfg, 4)
    cost = plan["compute_cost"]
    assert cost["dp"] and cost["seconds_per_example"] > 0
    entries = [json.loads(x) for x in (path / "hetero_timeline.jsonl").read_text().splitlines()]
    assert len(entries) == 4 * 2
    for e in entries:
        profile = assignment[int(e["client"])]
        assert e["status"] == {"Fast": "accepted", "Slow": "late", "Tiny": "declined"}[profile]
        if profile != "Tiny":
            assert e["estimated_compute_s"] == pytest.approx(cost["seconds_per_example"] * e["expected_batch"] *
                                                             e["steps"])
    fast = [e for e in entries if e["profile"] == "Fast"]
    slow = [e for e in entries if e["profile"] == "Slow"]
    assert {e["rank"] for e in fast} == {4} and {e["rank"] for e in slow} == {2}
    assert slow[0]["bytes_up"] < fast[0]["bytes_up"]  # rank 2 sends half of B's columns
    for name in ("sim_time_per_round", "client_timeline", "exact_match_vs_sim_time", "participation"):
        assert (path / "plots" / f"{name}.png").is_file(), name
