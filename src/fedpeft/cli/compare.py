"""``fedpeft compare``: methods x epsilons x seeds on one task, resumable, with a report.

Defaults: ``ffa_lora,lora`` x ``inf,6,3,1`` x 3 seeds, with run sizes chosen so that the
24 runs of the default sweep finish in tens of minutes on 2 CPU cores (docs/compare.md has
the measured time). Any method of the plugin registry is accepted. Finished cells are never
rerun; ``--report-only`` rewrites the report from what is on disk.

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
        _, test = task_type.train_test_split(cells[0].cfg.data, cells[0].cfg.seed)
    except (OSError, ValueError):
        return None
    return task_type.baseline(test)


def _run(args: argparse.Namespace) -> int:
    from fedpeft.sim.compare import SweepSpec, plan_cells, run_sweep, write_report

    methods = tuple(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    if not methods:
        raise ConfigError("--methods", args.methods, "expected at least one method")
    spec = SweepSpec(methods, _floats(args.epsilons, "--epsilons"), _seeds(args.seeds), base_layer(args))
    out = Path(args.output_dir)
    cells = plan_cells(spec, out)
    failed = 0
    if not args.report_only:
        print(f"fedpeft compare: {len(cells)} runs ({len(methods)} methods x {len(spec.epsilons)} epsilons x "
              f"{len(spec.seeds)} seeds) in {out}; finished runs are kept")
        results = run_sweep(cells)
        failed = sum(r.status == "failed" for r in results)
        ran = [r for r in results if r.status == "ran"]
        print(f"fedpeft compare: ran {len(ran)}, kept {sum(r.status == 'skipped' for r in results)}, failed {failed}"
              + (f"; {sum(r.wall_s for r in ran):.0f} s for the runs made now" if ran else ""))
    paths = write_report(cells, out, title=f"fedpeft compare: {', '.join(methods)}",
                         baseline=_baseline(cells))
    print(f"fedpeft compare: report {paths['html']} (also {paths['md'].name}, {paths['csv'].name}, plots/)")
    return 1 if failed else 0


register_command("compare", "sweep methods x epsilons x seeds and write a report (CSV, Markdown, HTML, plots)",
                 _add_args, _run)
