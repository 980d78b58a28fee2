"""Multi-task federations on ``task_type = "causal-lm"`` (issue 18): one instruction task per
client. The layout reads tasks with the task type's loader, the model gets no per-task heads
(the task-owned tensors are the adapter's: MTLoRA's task branches, MeteoRA's experts), replies
are the shared adapter plus the client's own task's modules, the server evaluates every task
routed to it with the causal-LM metrics, SMoRA's public step runs on prompts, ICM-LoRA refuses.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_model import dp_rng

from fedpeft.client.runtime import ClientIdentity, Runtime
from fedpeft.config import ConfigError, RunConfig
from fedpeft.config.schema import SHIPPED_TASKS_BY_TYPE
from fedpeft.config.tasks import TaskSpec
from fedpeft.data.instructions import SHIPPED_INSTRUCTION_TASKS, InstructionDataset
from fedpeft.data.layout import activate_task, owned_task, preflight_tasks, task_layout
from fedpeft.load import parse_config
from fedpeft.server.multitask import per_task_row
from fedpeft.server.setup import ServerSetup
from fedpeft.strategies.adapter_avg import RoundReport
from fedpeft.strategies.validation import Rejected, ValidatedReply
from fedpeft.tasks.registry import get as get_task_type
from fedpeft.tasks.registry import task_for

TASKS = ("colour", "count")
METRICS = ("exact_match", "loss", "perplexity")


def _rows(task: str, n: int) -> list[dict[str, str]]:
    colours, words = ["red", "green", "blue", "yellow"], ["one", "two", "three"]
    if task == "colour":
        return [{"prompt": f"ball {i} is {colours[i % 4]}. what colour is ball {i}?", "response": colours[i % 4]}
                for i in range(n)]
    return [{"prompt": f"item {i}: how many is {i % 3 + 1}?", "response": words[i % 3]} for i in range(n)]


@pytest.fixture(scope="module")
def task_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two instruction tasks of 40 prompt/response rows each (10 held out, 8 server-held, 22 per client)."""
    root = tmp_path_factory.mktemp("lm-tasks")
    out = {}
    for task in TASKS:
        out[task] = root / f"{task}.jsonl"
        out[task].write_text("".join(json.dumps(r) + "\n" for r in _rows(task, 40)), encoding="utf-8")
    return out


def _cfg(llama: Path, files: dict[str, Path], method: str, **extra: Any) -> RunConfig:
    return parse_config({
        "task_type": "causal-lm", "model.path": str(llama), "model.max_length": 32, "model.max_new_tokens": 4,
        "data.test_size": 10, "train.clients": 2, "train.rounds": 2, "train.batch_size": 8, "train.local_steps": 2,
        "tasks": {"public_size": 8, **{t: {"path": str(files[t])} for t in TASKS}}, "adapter.method": method,
        **extra,
    })


@pytest.fixture(scope="module")
def setups(tiny_llama_dir: Path, task_files: dict[str, Path]) -> Callable[[str], ServerSetup]:
    """The server setup of a method that runs on causal-lm (built on first use, shared by the tests)."""
    return functools.cache(lambda method: ServerSetup(_cfg(tiny_llama_dir, task_files, method)))


# ---- configuration and layout ------------------------------------------------------------
def test_task_names_are_the_task_types_shipped_tasks() -> None:
    assert set(SHIPPED_TASKS_BY_TYPE["causal-lm"]) == set(SHIPPED_INSTRUCTION_TASKS)
    base = {"task_type": "causal-lm", "train.clients": 2}
    cfg = parse_config({**base, "tasks.names": "rt,trivia"})  # instruction tasks by name
    assert [s.name for s in cfg.tasks.resolved()] == ["rt", "trivia"]
    with pytest.raises(ConfigError) as info:
        parse_config({**base, "tasks.names": "rt,nope"})
    msg = str(info.value)
    assert "tasks.names='nope'" in msg and "trivia" in msg and "causal-lm" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="shipped: rt, bbc, tweets"):  # trivia is no classification task
        parse_config({"train.clients": 2, "tasks.names": "rt,trivia"})


def test_a_shipped_instruction_task_loads_through_the_task_type() -> None:
    data = get_task_type("causal-lm").load_task(TaskSpec("trivia"))
    assert isinstance(data, InstructionDataset) and data.label_names == ("trivia",) and len(data) > 10
    assert all(r.strip() for r in data.responses)


def test_text_column_does_not_apply_to_instruction_files(tiny_llama_dir: Path, task_files: dict[str, Path]) -> None:
    tasks = {"public_size": 8, "colour": {"path": str(task_files["colour"]), "text_column": "body"},
             "count": {"path": str(task_files["count"])}}
    with pytest.raises(ConfigError, match="tasks.colour.text_column"):
        _cfg(tiny_llama_dir, task_files, "mtlora", tasks=tasks)


def test_layout_reads_every_task_with_the_task_types_loader(tiny_llama_dir: Path, task_files: dict[str, Path]) -> None:
    cfg = _cfg(tiny_llama_dir, task_files, "mtlora")
    layout = task_for(cfg).task_layout(cfg)
    assert layout.per_task and [t.name for t in layout] == list(TASKS)
    for task in layout:
        assert all(isinstance(d, InstructionDataset) for d in (task.pool, task.test, task.public))
        assert (len(task.test), len(task.public), len(task.pool)) == (10, 8, 22)
        test, public, pool = (set(d.texts) for d in (task.test, task.public, task.pool))
        assert not (test & public) and not (test & pool) and not (public & pool)
        assert set(task.client_data(cfg, task.clients[0]).responses) <= {r["response"] for r in _rows(task.name, 40)}
    assert preflight_tasks(cfg, layout) == [22, 22]
    with pytest.raises(ConfigError, match="text"):  # the classification loader cannot read these files
        task_layout(cfg)


# ---- model, replies, client training -------------------------------------------------------
@pytest.mark.parametrize("method", ["mtlora", "meteora"])
def test_no_heads_and_a_reply_is_shared_plus_own_task(setups: Callable[[str], ServerSetup], method: str) -> None:
    setup = setups(method)
    names = [n for n, _ in setup.model.named_parameters()]
    assert not any(n.split(".")[0] in ("classifier", "score") for n in names)  # no classification head
    assert not any(type(m).__name__ == "MultiTaskHead" for m in setup.model.modules())
    specs = setup.spec.task_specs  # type: ignore[attr-defined]
    assert {k.split("@")[0] for k in specs} == set(TASKS)
    shared = set.intersection(*(set(s.tensors) for s in specs.values()))
    for task in TASKS:
        owned = set(specs[task].tensors) - shared
        assert owned and {owned_task(k) for k in owned} == {task}  # the adapter's task modules, its own only
    with pytest.raises(Rejected):
        setup.spec.task_of(set(specs["colour"].tensors) | set(specs["count"].tensors))  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", ["mtlora", "meteora"])
def test_client_trains_shared_and_own_task_only_with_dp(setups: Callable[[str], ServerSetup], method: str) -> None:
    from fedpeft.client.trainer import train_local

    setup = setups(method)
    rt = Runtime(setup.cfg)
    ident = ClientIdentity("1", 1, "", Path("ledger"))  # partition 1 holds the second task
    assert rt.task_of(ident).name == "count"
    model = rt.model
    rt.activate(model, ident)
    rt.plugin.load_state(model, setup.state)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_local(model, rt.plugin, rt.tokenizer, rt.data_for(ident, {}), setup.cfg, 2, rt.device, 1.0, seed=dp_rng(0))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert {owned_task(n) for n in moved} <= {None, "count"} and "count" in {owned_task(n) for n in moved}
    assert set(rt.plugin.trainable_state(model)) == set(setup.spec.task_specs["count"].tensors)  # type: ignore[attr-defined]
    activate_task(model, None)


def test_server_evaluates_every_task_routed_to_it(setups: Callable[[str], ServerSetup]) -> None:
    setup = setups("mtlora")
    ev = setup.evaluate()
    for metric in METRICS:
        assert set(ev[f"{metric}_per_task"]) == set(TASKS)
        assert ev[metric] == pytest.approx(np.mean(list(ev[f"{metric}_per_task"].values())))
    # a change to one task's branch changes that task's score only: evaluation is routed per task
    state = dict(setup.state)
    key = next(k for k in state if owned_task(k) == "colour" and k.endswith(".up.weight"))
    state[key] = np.full_like(state[key], 0.5)
    setup.set_state(state)
    after = setup.evaluate()
    assert after["loss_per_task"]["colour"] != pytest.approx(ev["loss_per_task"]["colour"], abs=1e-6)
    assert after["loss_per_task"]["count"] == pytest.approx(ev["loss_per_task"]["count"], abs=1e-6)
    samples = setup.samples()
    assert {s["task"] for s in samples} == set(TASKS) and all("generated" in s for s in samples)
    assert {s.get("source") for s in samples} <= {None, "mtbench"}  # single-stratum tasks: no stratum key
    tests = {t.name: set(t.test.texts) for t in setup.tasks}
    assert all(s["prompt"] in tests[s["task"]] for s in samples if "source" not in s)  # the task's own held-out prompts


# ---- SMoRA: shared-only replies, public step on prompts -----------------------------------
def test_smora_public_step_runs_on_server_held_prompts(setups: Callable[[str], ServerSetup]) -> None:
    setup = setups("smora")
    batches = list(setup.public_batches())
    assert {name for name, _ in batches} == set(TASKS)
    assert all(set(b) == {"input_ids", "attention_mask"} for _, b in batches)  # model inputs only, no targets
    before = {k: v.copy() for k, v in setup.state.items() if k.endswith(".route_bias")}
    setup.public_step()
    assert before and any(not np.array_equal(setup.state[k], v) for k, v in before.items())


@pytest.mark.parametrize("method", ["smora", "lora"])
def test_shared_only_replies_are_not_attributed_to_a_task(setups: Callable[[str], ServerSetup], method: str) -> None:
    """SMoRA (and any single-task adapter) on a head-less task type owns nothing per task:
    every task's reply is the same shared tensors, and says nothing of its task."""
    specs = setups(method).spec.task_specs  # type: ignore[attr-defined]
    assert specs["colour"].tensors == specs["count"].tensors and not any(owned_task(k) for k in specs["colour"].tensors)
    state = {"a.lora_B": np.zeros(2, np.float32)}
    replies = [ValidatedReply(client=str(i), state=state, weight=1.0, metrics={"num-examples": 1.0}) for i in range(2)]
    row = per_task_row(setups(method).tasks, True, RoundReport(server_round=1, accepted=replies, released=True))
    assert row["clients_per_task"] == {"colour": 0, "count": 0} and row["clients_task_unknown"] == 2


# ---- refusal ------------------------------------------------------------------------------
def test_icm_lora_refuses_causal_lm_in_one_line(tiny_llama_dir: Path, task_files: dict[str, Path]) -> None:
    with pytest.raises(ConfigError) as info:
        _cfg(tiny_llama_dir, task_files, "icm_lora")
    msg = str(info.value)
    assert "adapter.method='icm_lora'" in msg and "causal-lm" in msg and "head" in msg and "\n" not in msg


# ---- real Flower simulations ---------------------------------------------------------------
def _simulate(llama: Path, files: dict[str, Path], out: Path, method: str,
              **extra: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(metrics rows, initial evaluation) of a 2-round run, 1 client per task, checked for the
    per-task columns every multi-task causal-LM run has."""
    from fedpeft.sim.simulate import simulate

    cfg = _cfg(llama, files, method, output_dir=str(out), **extra)
    path, _ = simulate(cfg, out)
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        for metric in METRICS:
            assert set(row[f"{metric}_per_task"]) == set(TASKS)
            assert row[metric] == pytest.approx(np.mean(list(row[f"{metric}_per_task"].values())))
        assert row["clients_accepted"] == 2 and not row["rejected"]
    initial = json.loads((path / "initial_eval.json").read_text())
    assert initial["loss_per_task"].keys() == set(TASKS) and rows[0]["tasks"] == list(TASKS)
    samples = [json.loads(x) for x in (path / "samples" / "round-002.jsonl").read_text().splitlines()]
    assert {s["task"] for s in samples} == set(TASKS)
    return rows, initial


@pytest.mark.slow  # a real Ray simulation, ~2 min on 2 cores: CI runs it in its slow step
def test_simulation_mtlora_dp(tiny_llama_dir: Path, task_files: dict[str, Path], tmp_path: Path) -> None:
    rows, initial = _simulate(tiny_llama_dir, task_files, tmp_path / "run", "mtlora", **{"privacy.epsilon": 8.0})
    for row in rows:
        assert row["clients_per_task"] == {"colour": 1, "count": 1} and row["clients_task_unknown"] == 0
        assert row["train_loss_per_task"] is None and 0 < row["epsilon"] <= 8.0 + 1e-9
    assert rows[1]["epsilon"] > rows[0]["epsilon"]
    assert rows[-1]["loss"] < initial["loss"]  # the federation learned something on held-out data


@pytest.mark.slow
def test_simulation_meteora_experts_then_gate(tiny_llama_dir: Path, task_files: dict[str, Path],
                                             tmp_path: Path) -> None:
    rows, _ = _simulate(tiny_llama_dir, task_files, tmp_path / "run", "meteora")
    assert [r["meteora_phase"] for r in rows] == ["experts", "gate"]
    assert rows[0]["clients_per_task"] == {"colour": 1, "count": 1}  # experts name their task
    assert rows[1]["clients_task_unknown"] == 2  # gate replies carry only shared tensors (no heads)
    assert set(rows[1]["meteora_routing_own_expert"]) == set(TASKS)


@pytest.mark.slow
def test_simulation_smora_dp(tiny_llama_dir: Path, task_files: dict[str, Path], tmp_path: Path) -> None:
    rows, _ = _simulate(tiny_llama_dir, task_files, tmp_path / "run", "smora", **{"privacy.epsilon": 8.0})
    assert all(r["clients_task_unknown"] == 2 for r in rows)
    assert (tmp_path / "run" / "adapter" / "adapter_state.npz").is_file()
