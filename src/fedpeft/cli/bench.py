"""``fedpeft bench``: run the ratio benchmarks of a source checkout (:mod:`benchmarks.suite`).

The benchmarks are repository code, not part of the installed package (they need the tests'
tiny model and write into ``benchmarks/results/``). With fedpeft installed from a checkout
(``make install``: editable, ``src/`` layout), the checkout is two levels above the package;
it is put first on ``sys.path`` so that ``benchmarks`` is the repository's package, not the
top-level ``benchmarks`` that Opacus installs into site-packages. Outside a checkout the
command says so in one line. ``python -m benchmarks`` from the repository root is the same.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

from fedpeft.cli.common import register_command

CHECKOUT = Path(__file__).resolve().parents[3]  # src/fedpeft/cli/bench.py -> the checkout


def _suite() -> ModuleType | None:
    """The checkout's ``benchmarks.suite``, or None when fedpeft is not installed from a checkout."""
    if not (CHECKOUT / "benchmarks" / "suite.py").is_file():
        return None
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    return importlib.import_module("benchmarks.suite")


def _add_args(p: argparse.ArgumentParser) -> None:
    suite = _suite()
    if suite is not None:
        suite.add_arguments(p)


def _run(args: argparse.Namespace) -> int:
    suite = _suite()
    if suite is None:
        print(f"fedpeft: error: fedpeft bench needs a source checkout ({CHECKOUT / 'benchmarks'} not found); "
              "install with `make install` from the repository", file=sys.stderr)
        return 2
    return int(suite.run_args(args))


register_command("bench", "run the ratio benchmarks (DP overhead, bytes, simulation overhead, scale, methods)",
                 _add_args, _run)
