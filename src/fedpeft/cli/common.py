"""Shared pieces of the ``fedpeft`` command line: flags, config from flags, the command registry.

Every flag maps to one key of the typed configuration (see :mod:`fedpeft.config`); a TOML
file given with ``--config`` is the base layer and flags override it. Any invalid input
ends with exit status 2 and a single line ``fedpeft: error: ...`` -- never a traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NoReturn

from fedpeft.config import ConfigError, RunConfig, load_config_file

__all__ = ["COMMANDS", "add_output_options", "add_run_options", "add_simulate_options", "build_parser", "config_from_args", "register_command",
           "resume_config"]

# flag -> config key
FLAG_KEYS: dict[str, str] = {
    "rounds": "train.rounds",
    "clients": "train.clients",
    "clients_per_round": "train.clients_per_round",
    "local_epochs": "train.local_epochs",
    "local_steps": "train.local_steps",
    "batch_size": "train.batch_size",
    "physical_batch_size": "train.physical_batch_size",
    "lr": "train.lr",
    "optimizer": "train.optimizer",
    "method": "adapter.method",
    "rank": "adapter.rank",
    "alpha": "adapter.alpha",
    "target_modules": "adapter.target_modules",
    "adapter_seed": "adapter.seed",
    "epsilon": "privacy.epsilon",
    "delta": "privacy.delta",
    "clip": "privacy.clip",
    "accountant": "privacy.accountant",
    "secure_mode": "privacy.secure_mode",
    "partition": "data.partition",
    "dirichlet_alpha": "data.dirichlet_alpha",
    "label_proportions": "data.label_proportions",
    "data": "data.path",
    "text_column": "data.text_column",
    "label_column": "data.label_column",
    "test_size": "data.test_size",
    "examples_per_client": "data.examples_per_client",
    "model": "model.path",
    "max_length": "model.max_length",
    "pooling": "model.pooling",
    "fail_rate": "faults.fail_rate",
    "min_clients": "faults.min_clients",
    "on_too_few": "faults.on_too_few",
    "seed": "seed",
    "output_dir": "output_dir",
    "name": "name",
    "device": "device",
    "tasks": "tasks.names",
    "task": "task_type",
}


FLAG_HELP: dict[str, str] = {
    "method": "see `fedpeft methods`",
    "epsilon": "a number, or inf for no DP",
    "test_size": "0 = auto: 20 %% of the data, at most 1000 (logged); an explicit size must fit",
    "partition": "iid | dirichlet | label-proportions | by-column",
    "pooling": "auto | cls | mean; auto = the checkpoint's sentence-transformers pooling, else [CLS]",
    "label_proportions": "rows of class fractions, e.g. 0.1,0.9;0.9,0.1;0.5,0.5",
    "optimizer": "adam | sgd",
    "accountant": "pld (dp-accounting, replace-one neighbours)",
    "secure_mode": "true | false; fresh OS entropy each round and Opacus's floating-point-safe noise",
    "data": "CSV/TSV/JSONL file; empty = Rotten Tomatoes (causal-lm: the rt/bbc/trivia instruction mix)",
    "model": "local Hugging Face model directory (causal-lm: or a .gguf file); empty = MiniLM-L6 "
             "(causal-lm: SmolLM2-135M-Instruct)",
    "local_steps": "0 = derive from local-epochs",
    "clients_per_round": "0 = all",
    "examples_per_client": "0 = the whole partition",
    "device": "auto | cpu | cuda",
    "target_modules": "comma-separated module names",
    "fail_rate": "simulation: probability a client crashes or times out in a round (seeded)",
    "min_clients": "fewest valid replies a round needs (0 = 1)",
    "on_too_few": "retry | skip, when a round has fewer than min-clients valid replies",
    "tasks": "multi-task federation: comma-separated tasks (rt, bbc, tweets, or [tasks.NAME] tables)",
    "task": "task type: what is learned (seq-cls = sequence classification, causal-lm = instruction tuning "
            "of a decoder; its defaults differ, see `fedpeft tasks`)",
}


def _defaults() -> dict[str, Any]:
    from fedpeft.config import config_to_dict

    flat: dict[str, Any] = {}
    for section, value in config_to_dict(RunConfig()).items():
        if isinstance(value, dict):
            flat.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            flat[section] = value
    if "data.label_proportions" in flat:
        flat["data.label_proportions"] = ";".join(",".join(map(str, r)) for r in flat["data.label_proportions"])
    return flat


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and no prefix matching: ``--task`` (the task type) and
    ``--tasks`` (a multi-task federation's datasets) must never be read as each other, and a
    misspelt flag is an error, not a guess."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"fedpeft: error: {message} (see --help)\n")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The run-configuration flags shared by ``simulate`` and other run commands."""
    g = p.add_argument_group("run configuration (each flag overrides the --config file)")
    g.add_argument("--config", metavar="FILE", help="TOML file with [model] [data] [adapter] [privacy] [train] tables")
    defaults = _defaults()
    for flag, key in FLAG_KEYS.items():
        extra = FLAG_HELP.get(flag, "")
        g.add_argument("--" + flag.replace("_", "-"), dest=flag, metavar=key.split(".")[-1].upper(),
                       help=f"{key} (default: {defaults.get(key, '')!s}){'; ' + extra if extra else ''}")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config key, e.g. --set adapter.options.kl_weight=0.1")


def config_from_args(args: argparse.Namespace, *base: dict[str, Any]) -> RunConfig:
    """Layer ``base`` (e.g. a scenario's run config), the config file, the flags and --set
    pairs, then validate once."""
    from fedpeft.load import parse_config  # lazily: it loads every plugin; `fedpeft --help` needs none

    layers: list[dict[str, Any]] = [*base]
    if getattr(args, "config", None):
        layers.append(load_config_file(args.config))
    flags = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag, None) is not None}
    layers.append(flags)
    sets: dict[str, Any] = {}
    for item in getattr(args, "set", []) or []:
        if "=" not in item:
            raise ConfigError("--set", item, "expected KEY=VALUE")
        key, value = item.split("=", 1)
        sets[key.strip()] = value.strip()
    layers.append(sets)
    return parse_config(*layers)


def add_output_options(p: argparse.ArgumentParser) -> None:
    """``-q`` / ``-v`` after the command too (``fedpeft simulate -q``); SUPPRESS keeps a flag
    given before the command (``fedpeft -q simulate``) from being reset by the sub-command."""
    g = p.add_argument_group("output")
    g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="print only the result")
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="also the details: fedpeft's and Flower's log, Ray's, per-client progress")


def add_simulate_options(p: argparse.ArgumentParser) -> None:
    add_run_options(p)
    add_output_options(p)
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue RUN_DIR from its last completed round (its config.toml is the base layer; "
                        "a flag that changes the configuration is refused)")
    p.add_argument("--runtime", choices=("superlink", "inprocess"), default=None,
                   help="superlink (default): `flwr run` on a private local SuperLink, Flower 1.42's supported "
                        "path; inprocess: the ServerApp in this process (Flower's deprecated run_simulation)")


def resume_config(args: argparse.Namespace) -> RunConfig:
    """The configuration of ``--resume RUN_DIR``: the run's own config.toml, then --config and
    flags; refused (ConfigError) when that differs from the checkpointed configuration."""
    from pathlib import Path

    from fedpeft.config import config_hash, config_to_dict
    from fedpeft.load import parse_config
    from fedpeft.server.checkpoint import load_checkpoint

    run_dir = Path(args.resume)
    if not (run_dir / "config.toml").is_file():
        raise ConfigError("--resume", str(run_dir), "not a fedpeft run directory (no config.toml)")
    ckpt_path = run_dir / "checkpoint.npz"
    if not ckpt_path.is_file():
        raise ConfigError("--resume", str(run_dir), "has no checkpoint (no round finished); start a new run")
    try:
        ckpt = load_checkpoint(ckpt_path)
    except ValueError as exc:
        raise ConfigError("--resume", str(run_dir), str(exc)) from None
    stored = load_config_file(run_dir / "config.toml")
    cfg = config_from_args(args, stored, {"output_dir": str(run_dir)})
    if config_hash(cfg) != ckpt.config_hash:
        old, new = _flat(config_to_dict(parse_config(stored))), _flat(config_to_dict(cfg))
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in ("output_dir", "name"))
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4]) or "code version"
        raise ConfigError("--resume", str(run_dir), f"the configuration differs from the run's ({detail}); "
                                                    "resume with the same configuration or start a new run")
    if ckpt.server_round >= cfg.train.rounds:
        raise ConfigError("--resume", str(run_dir), f"the run is complete ({ckpt.server_round} of "
                                                    f"{cfg.train.rounds} rounds)")
    return cfg


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


ORDER = ("simulate", "methods", "strategies")  # listed first in `fedpeft --help`, the rest as registered
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def register_command(
    name: str, help_text: str, add_args: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> None:
    """Add a sub-command; each module of :mod:`fedpeft.cli` registers its own at import time."""
    COMMANDS[name] = (help_text, add_args, run)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedpeft", description="Federated parameter-efficient fine-tuning with DP (FFA-LoRA).")
    parser.add_argument("-q", "--quiet", action="store_true", help="less logging (simulate: only the result)")
    parser.add_argument("-v", "--verbose", action="store_true", help="more logging (simulate: Flower's and Ray's too)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    first = [n for n in ORDER if n in COMMANDS]
    for name in first + [n for n in COMMANDS if n not in first]:
        help_text, add_args, _ = COMMANDS[name]
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser
