"""Learning rate chosen per (method, epsilon) on a validation split, never on the test set.

One shared ``train.lr`` can decide a comparison by itself: the FFA-LoRA paper tunes
FFA-LoRA's rate on a grid about an order of magnitude above LoRA's. A tuning sweep
(:attr:`SweepSpec.lr_grid`) therefore first runs, for every (method, epsilon) and every rate
of that method's grid, one *tuning cell* ``OUTPUT/tune/<method>_eps-<e>_lr-<lr>``:

* seed ``spec.tune_seed`` (not one of the evaluation seeds);
* ``data.validation_size`` examples held out of the training pool and ``data.evaluate_on =
  "validation"``: the server scores the validation split and never touches the test split
  (:func:`fedpeft.data.sources.carve_validation`);
* ``data.split_seed`` shared by every cell, tuning and evaluation: one test set and one
  validation set for all seeds, so no tuning cell's validation examples are any evaluation
  cell's test examples, and no client of any cell trains on either.

The rate with the best *final* validation value of the task type's primary metric is chosen
(for a method judged by its clients' personalised evaluation, FedSA-LoRA, the same metric
measured on the clients' held-out splits of their own data: ``personal_<metric>``, the value
its evaluation cells are judged by; :func:`~fedpeft.sim.compare.sweep.judged_metric})
(ties: the smaller rate; a non-finite score ranks last), once every grid point of that
(method, epsilon) has finished. The evaluation cells (:func:`plan_cells`) then run every
evaluation seed with the chosen rate and ``evaluate_on = "test"``. Tuning cells are ordinary
compare cells: finished ones are never rerun, so a tuning sweep resumes like any other; a
rerun tuning cell that changes the choice changes the evaluation cells' configuration, which
reruns exactly them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.sim.compare.sweep import (
    Cell,
    CellResult,
    CellRunner,
    SweepSpec,
    cell_is_finished,
    check_methods,
    eps_label,
    judged_metric,
    make_cell,
    plan_cells,
    run_sweep,
)
from fedpeft.tasks.registry import task_for

__all__ = ["TUNE_DIR", "Choice", "choose_lrs", "lr_label", "plan_tuning_cells", "run_compare", "tuning_rows"]

TUNE_DIR = "tune"


def lr_label(lr: float) -> str:
    """Directory-safe label of a learning rate: ``0.002``, ``1e-05``."""
    return f"{lr:g}"


@dataclass(frozen=True)
class Choice:
    """The rate chosen for one (method, epsilon) and the validation score of every grid point."""

    method: str
    epsilon: float
    lr: float
    scores: tuple[tuple[float, float], ...]  # (lr, final validation metric), grid order


def plan_tuning_cells(spec: SweepSpec, output_dir: Path) -> list[Cell]:
    """Every tuning cell of ``spec`` (none without a grid), validated before anything runs."""
    if not spec.tunes:
        return []
    check_methods(spec.methods)
    extra = spec.selection_layer("validation")
    cells = []
    for method in spec.methods:
        for eps in spec.epsilons:
            for lr in spec.lr_grid[method]:
                path = Path(output_dir) / TUNE_DIR / f"{method}_eps-{eps_label(eps)}_lr-{lr_label(lr)}"
                cells.append(make_cell(spec, method, eps, spec.tune_seed, path, {**extra, "train.lr": lr}))
    return cells


def _final(cell: Cell, metric: str) -> tuple[float, str]:
    """(the tuning cell's final validation score, the metric it is read from): ``metric`` on the
    server's validation split, or for a method judged by its clients' personalised evaluation
    (:func:`judged_metric`) ``personal_<metric>``, measured on the clients' held-out splits of
    their own training data -- also never the test split."""
    rows = [json.loads(x) for x in (cell.path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
            if x.strip()]
    judged = judged_metric(rows[-1], metric)
    value = rows[-1].get(judged)
    return (float(value) if value is not None else math.nan), judged


def choose_lrs(cells: Sequence[Cell]) -> dict[tuple[str, float], Choice]:
    """The chosen rate per (method, epsilon) whose tuning cells have all finished.

    Only tuning cells are read, and they score the validation split (``evaluate_on`` is
    checked: a tuning cell that scored the test split is refused, not silently used)."""
    if not cells:
        return {}
    task_type = task_for(cells[0].cfg)
    metric, sign = task_type.primary_metric, (1.0 if task_type.higher_is_better else -1.0)
    groups: dict[tuple[str, float], list[Cell]] = {}
    for cell in cells:
        if cell.cfg.data.evaluate_on != "validation":
            raise ValueError(f"tuning cell {cell.name} scores the {cell.cfg.data.evaluate_on} split; "
                             "a learning rate may only be chosen on the validation split")
        groups.setdefault((cell.method, cell.epsilon), []).append(cell)
    out = {}
    for key, group in groups.items():
        if not all(cell_is_finished(c) for c in group):
            continue
        scores = tuple((c.cfg.train.lr, _final(c, metric)[0]) for c in group)
        ranked = sorted(scores, key=lambda s: (-sign * s[1] if math.isfinite(s[1]) else math.inf, s[0]))
        out[key] = Choice(key[0], key[1], ranked[0][0], scores)
    return out


def tuning_rows(cells: Sequence[Cell], choices: dict[tuple[str, float], Choice]) -> list[dict[str, Any]]:
    """One row per tuning cell: method, epsilon target, lr, seed, final validation metric
    (empty while unfinished), the metric it was read from and whether it is the chosen rate."""
    metric = task_for(cells[0].cfg).primary_metric if cells else "accuracy"
    rows = []
    for c in cells:
        done = cell_is_finished(c)
        choice = choices.get((c.method, c.epsilon))
        score, judged = _final(c, metric) if done else (math.nan, "")
        rows.append({"method": c.method, "epsilon_target": c.epsilon, "lr": c.cfg.train.lr, "seed": c.seed,
                     f"validation_{metric}": score, "judged_by": judged,
                     "status": "finished" if done else "not finished",
                     "chosen": bool(choice and choice.lr == c.cfg.train.lr), "run_dir": f"{TUNE_DIR}/{c.name}"})
    return rows


def _seed_major(cells: Sequence[Cell]) -> list[Cell]:
    """Cells ordered seed by seed, so that an interrupted sweep leaves complete pairs."""
    return sorted(cells, key=lambda c: c.seed)


def run_compare(spec: SweepSpec, output_dir: Path, runner: CellRunner | None = None
                ) -> tuple[list[Cell], list[Cell], list[CellResult]]:
    """Run a sweep: (evaluation cells, tuning cells, what happened to every cell run now).

    Without a grid: :func:`run_sweep` over :func:`plan_cells`. With one, epsilon by epsilon
    (so an interrupted sweep leaves whole epsilons behind): that epsilon's tuning cells, the
    choice (:func:`choose_lrs`), then its evaluation cells seed by seed with the chosen rates.
    """
    tune = plan_tuning_cells(spec, output_dir)
    if not spec.tunes:
        cells = plan_cells(spec, output_dir)
        return cells, [], run_sweep(cells, runner)
    results: list[CellResult] = []
    for eps in spec.epsilons:
        results += run_sweep([c for c in tune if c.epsilon == eps], runner)
        chosen = {k: v.lr for k, v in choose_lrs(tune).items()}
        results += run_sweep(_seed_major([c for c in plan_cells(spec, output_dir, chosen) if c.epsilon == eps]),
                             runner)
    return plan_cells(spec, output_dir, {k: v.lr for k, v in choose_lrs(tune).items()}), tune, results
