"""``fedpeft bench``: run the ratio benchmarks (a thin wrapper over :mod:`benchmarks.suite`).

Opacus ships its own top-level ``benchmarks`` package in site-packages, which shadows the
repository's ``benchmarks/`` outside the repository root; this command therefore loads the
repository's package by path.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from simulations.cli import register_command

_PKG = Path(__file__).resolve().parents[2] / "benchmarks"


def _suite() -> ModuleType:
    """``benchmarks.suite`` of this repository, even where Opacus's ``benchmarks`` comes first."""
    loaded = sys.modules.get("benchmarks")
    if loaded is None or Path(getattr(loaded, "__file__", "") or "").resolve().parent != _PKG:
        spec = importlib.util.spec_from_file_location("benchmarks", _PKG / "__init__.py",
                                                      submodule_search_locations=[str(_PKG)])
        if spec is None or spec.loader is None:  # pragma: no cover - the package ships with the code
            raise ImportError(f"cannot load the benchmark package from {_PKG}")
        module = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks"] = module
        spec.loader.exec_module(module)
        for sub in [k for k in sys.modules if k.startswith("benchmarks.")]:
            del sys.modules[sub]
    return importlib.import_module("benchmarks.suite")


def _add_args(p: argparse.ArgumentParser) -> None:
    _suite().add_arguments(p)


def _run(args: argparse.Namespace) -> int:
    return int(_suite().run_args(args))


register_command("bench", "run the ratio benchmarks (DP overhead, bytes, simulation overhead, scale, methods)",
                 _add_args, _run)
