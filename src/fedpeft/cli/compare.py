"""``fedpeft compare``: methods x epsilons x seeds on one task, resumable, with a report.

Defaults: ``ffa_lora,lora`` x ``inf,6,3,1`` x 3 seeds, with run sizes chosen so that the
24 runs of the default sweep finish in tens of minutes on 2 CPU cores (docs/compare.md has
the measured time). Any method of the plugin registry is accepted. Finished cells are never
rerun; ``--report-only`` rewrites the report from what is on disk. ``--lr-grid`` (and
``--lr-grid-for METHOD=LRS``) chooses the learning rate per method and epsilon on a
validation split first (:mod:`fedpeft.sim.compare.tuning`); the report then carries the
chosen rates, and paired tests against ffa_lora per epsilon in any case.

``--task`` picks the task type; runs are judged by its primary metric. A task type with
defaults of its own (``config.schema.TASK_TYPE_DEFAULTS``: causal-lm's lengths, batches and
held-out size) keeps them: the sweep then fixes only rounds, local steps and examples per
client. The report's baseline is the task type's closed form (sequence classification: the
majority class) or, for a task type that scores its initial model (causal-lm), the mean over
the cells of that score (``initial_eval.json``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from fedpeft.cli.common import FLAG_HELP, register_command
from fedpeft.config import ConfigError, load_config_file

# Sizes of one cell of the default sweep (see docs/compare.md for the measured time).
COMPARE_DEFAULTS: dict[str, Any] = {
    "train.rounds": 4,
    "data.examples_per_client": 256,
    "data.test_size": 500,
    "model.max_length": 32,
    "train.batch_size": 64,
    "train.physical_batch_size": 64,
    "train.local_steps": 4,
}
TASK_COMPARE_DEFAULTS: dict[str, dict[str, Any]] = {  # task types whose own defaults stay (module doc)
    "causal-lm": {key: COMPARE_DEFAULTS[key] for key in ("train.rounds", "train.local_steps", "data.examples_per_client")},
}
SIZE_FLAGS = {"rounds": "train.rounds", "examples_per_client": "data.examples_per_client",
              "test_size": "data.test_size", "max_length": "model.max_length", "batch_size": "train.batch_size",
              "local_steps": "train.local_steps", "clients": "train.clients", "lr": "train.lr",
              "model": "model.path", "data": "data.path", "delta": "privacy.delta"}


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default="ffa_lora,lora", help="comma-separated adapter methods (see `fedpeft methods`)")
    p.add_argument("--epsilons", default="inf,6,3,1", help="comma-separated epsilon targets; inf = no DP")
    p.add_argument("--seeds", default="3", help="N = seeds 0..N-1, or a comma-separated list (default: 3)")
    p.add_argument("--output-dir", default="runs/compare", help="sweep directory (default: runs/compare)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
    p.add_argument("--task", metavar="TASK_TYPE", help=f"task_type of every cell: {FLAG_HELP['task']}")
    t = p.add_argument_group("learning rate per method and epsilon, chosen on a validation split (docs/compare.md)")
    t.add_argument("--lr-grid", metavar="LRS", help="comma-separated learning rates tried for every method "
                   "(e.g. 5e-4,2e-3,8e-3); without it every cell uses train.lr")
    t.add_argument("--lr-grid-for", action="append", default=[], metavar="METHOD=LRS",
                   help="this method's own grid (repeatable), e.g. ffa_lora=2e-3,8e-3,3.2e-2")
    t.add_argument("--tune-seed", type=int, default=100, help="seed of the tuning runs (default: 100; not an "
                   "evaluation seed)")
    t.add_argument("--validation-size", type=int, default=200, help="examples held out of the training pool "
                   "for choosing the rate (default: 200)")
    t.add_argument("--split-seed", type=int, default=0, help="seed of the test and validation splits, shared "
                   "by every cell of a tuning sweep (default: 0)")
    g = p.add_argument_group("run sizes (defaults chosen for 2 CPU cores; see docs/compare.md)")
    for flag, key in SIZE_FLAGS.items():
        g.add_argument("--" + flag.replace("_", "-"), dest=flag, metavar=key.split(".")[-1].upper(),
                       help=f"{key} (default: {COMPARE_DEFAULTS.get(key, 'as fedpeft simulate')})")
    g.add_argument("--config", metavar="FILE", help="TOML base configuration for every cell")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="set any config key for every cell")


def _floats(text: str, flag: str) -> tuple[float, ...]:
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        try:
            value = float(item)
        except ValueError:
            raise ConfigError(flag, item, "expected numbers or inf, e.g. inf,6,3,1") from None
        if math.isnan(value) or value <= 0:
            raise ConfigError(flag, item, "each epsilon must be > 0 (or inf)")
        out.append(value)
    if not out:
        raise ConfigError(flag, text, "expected at least one value")
    return tuple(dict.fromkeys(out))


def _seeds(text: str) -> tuple[int, ...]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or not all(x.isdigit() for x in items):
        raise ConfigError("--seeds", text, "expected a count N (seeds 0..N-1) or a comma-separated list of seeds >= 0")
    if len(items) == 1:
        if int(items[0]) < 1:
            raise ConfigError("--seeds", text, "the count must be >= 1")
        return tuple(range(int(items[0])))
    return tuple(dict.fromkeys(int(x) for x in items))


def lr_grids(args: argparse.Namespace, methods: tuple[str, ...]) -> dict[str, tuple[float, ...]]:
    """The learning-rate grid of every method ({} = no tuning): ``--lr-grid`` for all,
    ``--lr-grid-for METHOD=LRS`` for one; a method of neither keeps train.lr (no grid is
    an error once any method has one, so that every method is tuned alike or none is)."""
    shared = _rates(args.lr_grid, "--lr-grid") if getattr(args, "lr_grid", None) else None
    own: dict[str, tuple[float, ...]] = {}
    for item in getattr(args, "lr_grid_for", []) or []:
        method, sep, values = item.partition("=")
        if not sep or method.strip() not in methods:
            raise ConfigError("--lr-grid-for", item, f"expected METHOD=LRS with METHOD one of {', '.join(methods)}")
        own[method.strip()] = _rates(values, "--lr-grid-for")
    if shared is None and not own:
        return {}
    if getattr(args, "lr", None) is not None:
        raise ConfigError("--lr", args.lr, "a tuning sweep chooses the rate from --lr-grid; drop --lr")
    untuned = [m for m in methods if m not in own and shared is None]
    if untuned:
        raise ConfigError("--lr-grid-for", ",".join(untuned), "every method needs a grid: add --lr-grid LRS "
                          "for the others or --lr-grid-for for each")
    return {m: own.get(m, shared or ()) for m in methods}


def _rates(text: str, flag: str) -> tuple[float, ...]:
    rates = _floats(text, flag)
    if any(math.isinf(r) for r in rates):
        raise ConfigError(flag, text, "learning rates must be finite numbers > 0, e.g. 5e-4,2e-3,8e-3")
    return tuple(sorted(rates))


def base_layer(args: argparse.Namespace) -> dict[str, Any]:
    """Compare defaults (of the sweep's task type) < --config file < size flags < --set pairs
    (flat dotted keys)."""
    file_layer: dict[str, Any] = {}
    if getattr(args, "config", None):
        for section, table in load_config_file(args.config).items():
            if isinstance(table, dict):
                file_layer.update({f"{section}.{k}": v for k, v in table.items()})
            else:
                file_layer[section] = table
    flags = {key: getattr(args, flag) for flag, key in SIZE_FLAGS.items() if getattr(args, flag, None) is not None}
    if getattr(args, "task", None):
        flags["task_type"] = args.task
    sets: dict[str, Any] = {}
    for item in getattr(args, "set", []) or []:
        if "=" not in item:
            raise ConfigError("--set", item, "expected KEY=VALUE")
        key, value = item.split("=", 1)
        sets[key.strip()] = value.strip()
    task = str(sets.get("task_type") or flags.get("task_type") or file_layer.get("task_type") or "")
    layer: dict[str, Any] = dict(TASK_COMPARE_DEFAULTS.get(task, COMPARE_DEFAULTS))
    for upper in (file_layer, flags, sets):
        layer.update(upper)
    return layer


def _baseline(cells: list[Any]) -> float | None:
    """The primary metric of learning nothing, from the task type: the initial model's score
    (mean over the cells' ``initial_eval.json``) for a task type that measures it, else its
    closed form (sequence classification: the share of the test set's most common class)."""
    import json

    from fedpeft.server.samples import INITIAL_EVAL
    from fedpeft.tasks.registry import task_for

    task_type = task_for(cells[0].cfg)
    if task_type.evaluates_initial_model:
        scores = [json.loads((c.path / INITIAL_EVAL).read_text(encoding="utf-8")).get(task_type.primary_metric)
                  for c in cells if (c.path / INITIAL_EVAL).is_file()]
        found = [float(v) for v in scores if v is not None]
        return sum(found) / len(found) if found else None
    try:
        test = task_type.task_layout(cells[0].cfg)[0].test  # the split the cells score
    except (OSError, ValueError):
        return None
    return task_type.baseline(test)


def _spec(args: argparse.Namespace) -> Any:
    from fedpeft.sim.compare import SweepSpec

    methods = tuple(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    if not methods:
        raise ConfigError("--methods", args.methods, "expected at least one method")
    grids = lr_grids(args, methods)
    if grids:
        if args.validation_size < 10:
            raise ConfigError("--validation-size", args.validation_size, "must be >= 10")
        if args.split_seed < 0:
            raise ConfigError("--split-seed", args.split_seed, "must be >= 0")
    seeds = _seeds(args.seeds)
    if grids and args.tune_seed in seeds:
        raise ConfigError("--tune-seed", args.tune_seed, f"must not be an evaluation seed ({seeds})")
    return SweepSpec(methods, _floats(args.epsilons, "--epsilons"), seeds, base_layer(args), grids,
                     args.tune_seed, args.validation_size, args.split_seed)


def _run(args: argparse.Namespace) -> int:
    from fedpeft.sim.compare import plan_cells, write_report
    from fedpeft.sim.compare.tuning import choose_lrs, plan_tuning_cells, run_compare

    spec = _spec(args)
    out = Path(args.output_dir)
    tuning = plan_tuning_cells(spec, out)  # every configuration checked before anything runs
    cells = plan_cells(spec, out, {k: c.lr for k, c in choose_lrs(tuning).items()})
    failed = 0
    if not args.report_only:
        total = len(spec.methods) * len(spec.epsilons) * len(spec.seeds)
        print(f"fedpeft compare: {total} runs ({len(spec.methods)} methods x {len(spec.epsilons)} epsilons x "
              f"{len(spec.seeds)} seeds)" + (f" after {len(tuning)} tuning runs (validation split)" if tuning else "")
              + f" in {out}; finished runs are kept")
        cells, tuning, results = run_compare(spec, out)
        failed = sum(r.status == "failed" for r in results)
        ran = [r for r in results if r.status == "ran"]
        print(f"fedpeft compare: ran {len(ran)}, kept {sum(r.status == 'skipped' for r in results)}, failed {failed}"
              + (f"; {sum(r.wall_s for r in ran):.0f} s for the runs made now" if ran else ""))
    paths = write_report(cells, out, title=f"fedpeft compare: {', '.join(spec.methods)}",
                         baseline=_baseline(cells) if cells else None, tuning=tuning)
    print(f"fedpeft compare: report {paths['html']} (also {paths['md'].name}, {paths['csv'].name}, plots/)")
    return 1 if failed else 0


register_command("compare", "sweep methods x epsilons x seeds and write a report (CSV, Markdown, HTML, plots)",
                 _add_args, _run)
