"""A client-level central-DP run interrupted mid-round resumes (issue 17): it completes all its
rounds, the client-level accountant goes on where the checkpoint stopped (epsilon equals an
uninterrupted run's), the re-run round draws fresh server noise, and no file of the run
directory holds the noise or generator state that could regenerate it.

The federation runs in-process: the real round loop (``run_federation``) with a grid that hands
each instruction to the real ClientApp (``tests/inprocess_grid.py``); a round hook raises after round 2's
aggregation (before its checkpoint), as a crashed server would stop there."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.supercore.differential_privacy import compute_stdv
from inprocess_grid import LocalGrid, Releases
from safetensors.numpy import load_file

from fedpeft.load import parse_config
from fedpeft.server.checkpoint import load_checkpoint
from fedpeft.server.loop import run_federation

CLIENTS, ROUNDS, SIGMA, CLIP = 3, 3, 1.0, 0.05


class Aggregates:
    """Wrapper inside central DP: records the clipped, un-noised aggregate of every round."""

    def __init__(self, strategy: Any, out: dict[int, dict[str, np.ndarray]]) -> None:
        self.strategy, self.out = strategy, out

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        self.out[server_round] = {k: v.numpy().copy() for k, v in arrays.items()}
        return arrays, metrics


def _cfg(model: Path, out: Path):  # type: ignore[no-untyped-def]
    return parse_config({
        "model.path": str(model), "model.max_length": 24, "data.examples_per_client": 96, "data.test_size": 64,
        "train.rounds": ROUNDS, "train.batch_size": 32, "train.local_steps": 2, "output_dir": str(out),
        "privacy.epsilon": "inf",  # client-side DP-SGD is beside the point here (and slow)
        "central.mode": "server", "central.noise_multiplier": SIGMA, "central.clip": CLIP,
    })


def _keys(tree: Any, skip: str = "rows") -> list[str]:
    if isinstance(tree, dict):
        return [k for key, v in tree.items() if key != skip for k in [key, *_keys(v)]]
    return [k for v in tree for k in _keys(v)] if isinstance(tree, list) else []


@pytest.fixture(scope="module")
def resumed(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # as the flwr_identity fixture
    tmp = tmp_path_factory.mktemp("central-resume")
    reference = run_federation(LocalGrid(CLIENTS, first_node=101), _cfg(tiny_model_dir, tmp / "reference"), tmp / "reference")  # type: ignore[arg-type]
    cfg, run = _cfg(tiny_model_dir, tmp / "run"), tmp / "run"
    first, first_agg = Releases(crash_after=2), dict[int, dict[str, np.ndarray]]()
    with pytest.raises(RuntimeError, match="server killed"):
        run_federation(LocalGrid(CLIENTS, first_node=101), cfg, run, hooks=[first],  # type: ignore[arg-type]
                       wrap_strategy=lambda s: Aggregates(s, first_agg))  # type: ignore[arg-type,return-value]
    assert load_checkpoint(run / "checkpoint.npz").server_round == 1
    again, again_agg = Releases(), dict[int, dict[str, np.ndarray]]()
    rows = run_federation(LocalGrid(CLIENTS, first_node=101), cfg, run, hooks=[again], resume=True,  # type: ignore[arg-type]
                          wrap_strategy=lambda s: Aggregates(s, again_agg))  # type: ignore[arg-type,return-value]
    return run, reference, rows, (first, first_agg), (again, again_agg)


def test_resumed_run_completes_and_the_accountant_continues(resumed) -> None:  # type: ignore[no-untyped-def]
    run, reference, rows, _, _ = resumed
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    # equal client sizes, all accepted: the same events as the uninterrupted run, none lost or doubled
    assert [r["central_releases"] for r in rows] == [1, 2, 3]
    assert [r["epsilon_client_level"] for r in rows] == [r["epsilon_client_level"] for r in reference]
    assert rows[-1]["epsilon_client_level"] > rows[0]["epsilon_client_level"] > 0


def test_the_rerun_round_draws_fresh_noise(resumed) -> None:  # type: ignore[no-untyped-def]
    _, _, _, (first, first_agg), (again, again_agg) = resumed
    std = compute_stdv(SIGMA, CLIP, CLIENTS)
    for name, agg in first_agg[2].items():
        np.testing.assert_array_equal(agg, again_agg[2][name])  # the same clipped aggregate (replayed clients)
        noise_a, noise_b = first.released[2][name] - agg, again.released[2][name] - agg
        if agg.size >= 200:
            assert noise_a.std() == pytest.approx(std, rel=0.25) and noise_b.std() == pytest.approx(std, rel=0.25)
        assert not np.allclose(noise_a, noise_b, atol=std / 10), f"{name}: the re-run round repeated its noise"


def test_nothing_in_the_run_directory_holds_the_noise(resumed) -> None:  # type: ignore[no-untyped-def]
    run, _, _, _, (again, again_agg) = resumed
    ckpt_path = run / "checkpoint.npz"
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt.server_round == ROUNDS
    # the global state and the kept previous release are the noised release, not the pre-noise aggregate
    for name, agg in again_agg[ROUNDS].items():
        np.testing.assert_array_equal(ckpt.state[name], again.released[ROUNDS][name])
        np.testing.assert_array_equal(ckpt.previous[name], again.released[ROUNDS][name])
        assert not np.allclose(ckpt.state[name], agg)
    assert ckpt.strategy[0] == ["CentralDPFixedClipping", {}]  # no noise, no generator state
    # no key of any component names a generator, a seed or noise (the accountant's composed events
    # name their noise_multiplier; the base strategy's client sampler is seeded by the public run seed)
    with np.load(ckpt_path, allow_pickle=False) as data:
        names = list(data.files)
        meta = json.loads(str(data[next(f for f in names if not f.startswith(("state/", "parts/")))]))
    suspicious = re.compile(r"rng|random|generator|seed|entropy|noise(?!_multiplier)", re.IGNORECASE)
    assert not [k for k in [*names, *_keys(meta)] if suspicious.search(k)]
    # the bytes of this run's last noise and of its pre-noise aggregate appear in no file
    noise = {k: again.released[ROUNDS][k] - v for k, v in again_agg[ROUNDS].items()}
    probes = [a.astype(np.float32).tobytes()[:32] for group in (noise, again_agg[ROUNDS]) for a in group.values()
              if a.size >= 8]
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files) and ckpt_path in files
    for path in files:
        blob = path.read_bytes()
        assert not any(probe in blob for probe in probes), f"{path.relative_to(run)} holds noise or the aggregate"
    # the released adapter is the noised release (each of its tensors), never the pre-noise aggregate
    exported = [v for p in (run / "adapter").glob("*.safetensors") for v in load_file(str(p)).values()]
    for name, released in again.released[ROUNDS].items():
        assert any(v.shape == released.shape and np.array_equal(v, released) for v in exported), name
        assert not any(v.shape == released.shape and np.allclose(v, again_agg[ROUNDS][name]) for v in exported)
