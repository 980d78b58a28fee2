"""The README's "Extending fedpeft" examples run, and what they register works.

Each example is the Python block after a ``<!-- example: NAME -->`` marker in README.md. The
test executes it as written, then uses what it registered through the real entry points (the
validated configuration, ``train_local``, the strategy registry and the round's aggregation),
and unregisters it. An example that no longer runs, or no longer does what the README says,
fails here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"<!-- example: (\w+) -->\n```python\n(.*?)```", re.S)


def _examples() -> dict[str, str]:
    return {name: code for name, code in _BLOCK.findall(README.read_text(encoding="utf-8"))}


def test_the_readme_has_the_three_examples() -> None:
    assert set(_examples()) == {"method", "strategy", "task"}


@pytest.fixture()
def run_example() -> Iterator[Any]:
    """Execute a README example in a fresh namespace; undo its registrations afterwards."""
    from fedpeft.adapters import registry as adapters
    from fedpeft.strategies import registry as strategies
    from fedpeft.tasks import registry as tasks

    before = (set(adapters._REGISTRY), set(strategies.STRATEGIES), set(tasks.names()))

    def run(name: str) -> dict[str, Any]:
        namespace: dict[str, Any] = {"__name__": f"readme_example_{name}"}
        exec(compile(_examples()[name], f"README.md:{name}", "exec"), namespace)  # noqa: S102
        return namespace

    yield run
    for key in set(adapters._REGISTRY) - before[0]:
        del adapters._REGISTRY[key]
    for key in set(strategies.STRATEGIES) - before[1]:
        strategies.STRATEGIES.pop(key)
        strategies.MULTITASK_STRATEGIES.pop(key, None)
    for key in set(tasks.names()) - before[2]:
        tasks.unregister(key)


def _cfg(tiny_cfg: Any, **extra: Any) -> Any:
    from fedpeft.config import config_to_dict
    from fedpeft.load import parse_config

    return parse_config(config_to_dict(tiny_cfg), extra)


def _train(cfg: Any) -> tuple[Any, Any, Any]:
    """Two local steps of the configured method on client 0's data; (plugin, model, result)."""
    from fedpeft.adapters import get
    from fedpeft.client.runtime import ClientIdentity, Runtime
    from fedpeft.client.trainer import train_local

    rt = Runtime(cfg)
    data = rt.data_for(ClientIdentity("0", 0, "", Path("unused")), {})
    result = train_local(rt.model, get(cfg.adapter.method), rt.tokenizer, data, cfg, 2, rt.device, None, 0)
    return rt.plugin, rt.model, result


def test_the_method_example_registers_a_method_that_trains_only_biases(run_example, tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    run_example("method")
    cfg = _cfg(tiny_cfg, **{"adapter.method": "bitfit", "privacy.epsilon": "inf"})
    plugin, model, result = _train(cfg)
    names = set(plugin.trainable_state(model))
    assert names and all(n.endswith(".bias") or n.split(".")[0] == "classifier" for n in names)
    assert any(".encoder." in n for n in names)  # the backbone's biases, not only the head
    assert result.steps == 2 and np.isfinite(result.loss_mean)


def test_the_strategy_example_aggregates_with_the_median(run_example, tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    from fedpeft.adapters import get
    from fedpeft.strategies.registry import build_base
    from fedpeft.strategies.validation import StateSpec

    namespace = run_example("strategy")
    cfg = _cfg(tiny_cfg, **{"strategy.name": "fedmedian"})
    states = [{"w": np.array([1.0, 10.0], dtype=np.float32)}, {"w": np.array([2.0, 0.0], dtype=np.float32)},
              {"w": np.array([100.0, 5.0], dtype=np.float32)}]
    spec = StateSpec.from_state(states[0], "frozen")
    strategy = build_base(cfg, get(cfg.adapter.method), spec, "", "h")
    assert type(strategy) is namespace["FedMedian"]
    out = strategy.aggregate_states(states, [1.0, 1.0, 10.0])
    assert out["w"].tolist() == [2.0, 5.0] and out["w"].dtype == np.float32


def test_the_task_example_changes_the_training_loss(run_example, tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    import torch

    from fedpeft.tasks import registry

    run_example("task")
    cfg = _cfg(tiny_cfg, **{"task_type": "seq-cls-smooth", "privacy.epsilon": "inf"})
    smooth, plain = registry.get("seq-cls-smooth"), registry.get("seq-cls")
    plugin, model, result = _train(cfg)
    assert result.steps == 2 and np.isfinite(result.loss_mean)
    batch = {"input_ids": torch.tensor([[101, 2000, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             plain.target_key: torch.tensor([1])}
    model.eval()
    with torch.no_grad():
        assert float(smooth.loss(model, batch)) != pytest.approx(float(plain.loss(model, batch)))
