"""The compare sweep: methods x epsilons x seeds, one run directory per cell, resumable.

Each cell is an ordinary run (:func:`fedpeft.sim.simulate.simulate`) whose directory is
``OUTPUT/<method>_eps-<epsilon>_seed-<seed>``. A cell counts as *finished* when its
``metrics.jsonl`` has the configured number of rounds, its ``config.toml`` has the same
:func:`~fedpeft.config.config_hash` as the cell's configuration now, and no ``cell.json``
records it as failed, and no round lost every client to a failure (unless the cell injects
faults on purpose); a finished cell is never
rerun, so an interrupted sweep continues where it stopped and a changed setting reruns only
the cells it changes. An unfinished cell's directory (partial metrics, and a ledger that
would otherwise carry its spent budget into the rerun) is deleted before the cell runs again.
After each cell, ``cell.json`` records the wall time and status; a failed cell is recorded
and the sweep goes on (it is retried on the next invocation). A sweep with a learning-rate
grid (``SweepSpec.lr_grid``) also has tuning cells under ``OUTPUT/tune/``, bookkept the same
way (:mod:`fedpeft.sim.compare.tuning`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.adapters import registry
from fedpeft.adapters.capabilities import PersonalEval
from fedpeft.config import ConfigError, RunConfig, config_hash
from fedpeft.load import config_from_toml, parse_config
from fedpeft.tasks.registry import task_for

__all__ = ["Cell", "CellResult", "SweepSpec", "cell_is_finished", "cell_problem", "check_methods", "eps_label",
           "judged_metric", "make_cell", "personal_layer", "plan_cells", "run_sweep"]

log = logging.getLogger("fedpeft.compare")

CellRunner = Callable[[RunConfig, Path], None]


def eps_label(epsilon: float) -> str:
    """Directory-safe label of an epsilon: ``inf``, ``6``, ``0.5``."""
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


@dataclass(frozen=True)
class SweepSpec:
    """What to sweep, and the configuration layer every cell shares."""

    methods: tuple[str, ...] = ("ffa_lora", "lora")
    epsilons: tuple[float, ...] = (math.inf, 6.0, 3.0, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    base: dict[str, Any] = field(default_factory=dict)  # flat dotted keys shared by all cells
    # Learning-rate tuning (:mod:`fedpeft.sim.compare.tuning`): a grid per method (empty = no
    # tuning, every cell uses the base train.lr), the tuning runs' seed, the validation split's
    # size, and the split seed every cell shares (one test and one validation set for all seeds).
    lr_grid: dict[str, tuple[float, ...]] = field(default_factory=dict)
    tune_seed: int = 100
    validation_size: int = 200
    split_seed: int = 0

    @property
    def tunes(self) -> bool:
        return bool(self.lr_grid)

    def selection_layer(self, evaluate_on: str) -> dict[str, Any]:
        """Keys every cell of a tuning sweep shares: the same validation split held out of the
        training pool, the same split seed; ``evaluate_on`` says which split the server scores."""
        if not self.tunes:
            return {}
        return {"data.validation_size": self.validation_size, "data.split_seed": self.split_seed,
                "data.evaluate_on": evaluate_on}


@dataclass(frozen=True)
class Cell:
    """One (method, epsilon, seed) run of the sweep."""

    method: str
    epsilon: float
    seed: int
    cfg: RunConfig
    path: Path

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class CellResult:
    """How one cell ended in this invocation: ``ran``, ``skipped`` (finished before) or ``failed``."""

    cell: Cell
    status: str
    wall_s: float = 0.0
    error: str = ""


def check_methods(methods: Sequence[str]) -> None:
    """Every method must be registered (one-line error naming the registered ones)."""
    from fedpeft.adapters import registry

    known = registry.names()
    for m in methods:
        if m not in known:
            raise ConfigError("--methods", m, f"unknown method; registered: {', '.join(known)}")


PERSONAL_EVAL_FRACTION = 0.2
"""Share of each client's data a method with a personalised evaluation (FedSA-LoRA) holds out
for it in a sweep: its cells are judged by ``personal_<metric>``, the clients' accounted release
(:mod:`fedpeft.client.personal_eval`), not by the server's model, which lacks their local parts."""


def personal_layer(method: str) -> dict[str, Any]:
    """The configuration entries that turn on ``method``'s personalised evaluation (none without one)."""
    return {"adapter.options.eval_fraction": PERSONAL_EVAL_FRACTION} if isinstance(registry.get(method), PersonalEval) else {}


def judged_metric(last: dict[str, Any], metric: str) -> str:
    """The metric a run is judged by, read from its last metrics row: ``personal_<metric>``
    when the row carries the clients' accounted personalised evaluation (a method whose clients
    keep part of the model, FedSA-LoRA's B: the server's model lacks it), else ``metric``.
    Tuning cells and evaluation cells use the same rule, so a rate is chosen on the metric the
    method is then judged by."""
    personal = f"personal_{metric}"
    return personal if last.get(personal) is not None else metric


def make_cell(spec: SweepSpec, method: str, eps: float, seed: int, path: Path, extra: dict[str, Any]) -> Cell:
    """One cell: the base layer, then the cell's method, epsilon, seeds, paths and ``extra``."""
    cfg = parse_config(spec.base, {
        "adapter.method": method, "privacy.epsilon": eps, "seed": seed, "adapter.seed": seed,
        "name": path.name, "output_dir": str(path), **personal_layer(method), **extra,
    })
    # host-dependent "auto"s made concrete now, as the server loop will: the cell's
    # config is then the one its config.toml is written with (finished = same hash)
    return Cell(method, eps, seed, task_for(cfg).resolve_config(cfg), path)


def plan_cells(spec: SweepSpec, output_dir: Path, lrs: dict[tuple[str, float], float] | None = None) -> list[Cell]:
    """Resolve and validate every evaluation cell's configuration (a bad value fails before
    anything runs). In a tuning sweep (``spec.lr_grid``) a cell gets the learning rate chosen
    for its (method, epsilon) in ``lrs``; one without a choice yet is left out."""
    check_methods(spec.methods)
    cells = []
    for method in spec.methods:
        for eps in spec.epsilons:
            if spec.tunes and (method, eps) not in (lrs or {}):
                continue
            extra = spec.selection_layer("test")
            if spec.tunes:
                extra["train.lr"] = (lrs or {})[(method, eps)]
            for seed in spec.seeds:
                path = Path(output_dir) / f"{method}_eps-{eps_label(eps)}_seed-{seed}"
                cells.append(make_cell(spec, method, eps, seed, path, extra))
    return cells


def cell_problem(cell: Cell) -> str | None:
    """Why ``cell`` does not count as finished, or None when it does.

    Finished means: metrics for every configured round, written under the same
    configuration, no ``cell.json`` saying failed, and -- unless the cell injects faults on
    purpose (``faults.fail_rate`` > 0) -- no round in which every client failed. Such a
    round (e.g. Ray killing the workers when the machine ran out of memory) leaves the
    global state unchanged and would enter the comparison as an untrained model.
    """
    metrics, conf = cell.path / "metrics.jsonl", cell.path / "config.toml"
    if not (metrics.is_file() and conf.is_file()):
        return "no metrics.jsonl/config.toml"
    try:
        rows = [json.loads(x) for x in metrics.read_text(encoding="utf-8").splitlines() if x.strip()]
        done_cfg = config_from_toml(conf.read_text(encoding="utf-8"))
        info = cell.path / "cell.json"
        if info.is_file() and json.loads(info.read_text(encoding="utf-8")).get("status") == "failed":
            return "cell.json records a failure"  # e.g. complete metrics, but the run failed afterwards (export)
    except (ValueError, ConfigError) as exc:
        return f"unreadable run files ({exc})"
    if len(rows) != cell.cfg.train.rounds or [r.get("round") for r in rows] != list(range(1, len(rows) + 1)):
        return f"{len(rows)} of {cell.cfg.train.rounds} rounds in metrics.jsonl"
    if config_hash(done_cfg) != config_hash(cell.cfg):
        return "written under another configuration"
    if cell.cfg.faults.fail_rate <= 0:
        for r in rows:
            if not r.get("clients_accepted") and r.get("failed"):
                reason = str(next(iter(r["failed"].values())))[:160]
                return f"round {r['round']}: every client failed ({len(r['failed'])}; e.g. {reason})"
    return None


def cell_is_finished(cell: Cell) -> bool:
    """True when :func:`cell_problem` finds nothing wrong."""
    return cell_problem(cell) is None


def _simulate_cell(cfg: RunConfig, path: Path) -> None:
    """The real runner: one Flower simulation (Ray) for the cell."""
    from fedpeft.sim.simulate import simulate

    simulate(cfg, path)


def _write_cell_json(cell: Cell, status: str, wall_s: float, error: str = "") -> None:
    from fedpeft.io import atomic_write_text

    atomic_write_text(cell.path / "cell.json", json.dumps({
        "method": cell.method, "epsilon": eps_label(cell.epsilon), "seed": cell.seed, "status": status,
        "wall_s": wall_s, "error": error, "config_hash": config_hash(cell.cfg),
    }, indent=1))


def _progress(total: int) -> Any:
    from tqdm import tqdm

    disable = os.environ.get("FEDPEFT_PROGRESS", "1") == "0"
    return tqdm(total=total, desc="compare", unit="cell", file=sys.stderr, disable=disable, dynamic_ncols=True)


def run_sweep(cells: Sequence[Cell], runner: CellRunner | None = None) -> list[CellResult]:
    """Run every unfinished cell in order; return what happened to each."""
    run = runner or _simulate_cell
    results: list[CellResult] = []
    with _progress(len(cells)) as bar:
        for cell in cells:
            bar.set_postfix_str(cell.name)
            if cell_is_finished(cell):
                results.append(CellResult(cell, "skipped"))
                bar.update(1)
                continue
            if cell.path.exists():
                log.info("compare: %s is unfinished; removing it (partial metrics and ledgers) to rerun", cell.name)
                shutil.rmtree(cell.path)
            t0 = time.perf_counter()
            try:
                run(cell.cfg, cell.path)
                problem = cell_problem(cell)
                if problem is not None:
                    raise RuntimeError(f"run ended unusable: {problem}")
            except (RuntimeError, ValueError, OSError) as exc:
                wall = time.perf_counter() - t0
                msg = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
                log.error("compare: cell %s failed after %.0f s: %s", cell.name, wall, msg)
                cell.path.mkdir(parents=True, exist_ok=True)
                _write_cell_json(cell, "failed", wall, msg)
                results.append(CellResult(cell, "failed", wall, msg))
            else:
                wall = time.perf_counter() - t0
                _write_cell_json(cell, "finished", wall)
                results.append(CellResult(cell, "ran", wall))
                log.info("compare: cell %s finished in %.0f s", cell.name, wall)
            bar.update(1)
    return results
