"""``fedpeft report RUN_DIR``: (re)write a run directory's ``report.html`` and PNGs from its files.

Every run writes its report at the end (:mod:`fedpeft.server.report`); this command writes it
again -- for a run directory from an older fedpeft, one whose report failed, or after a resume
-- from the files in the directory alone. It prints the report's path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedpeft.cli.common import register_command


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="+", help="a run directory (holding metrics.jsonl)")


def _run(args: argparse.Namespace) -> int:
    from fedpeft.server.report import write_report

    status = 0
    for run_dir in args.run_dir:
        try:
            print(write_report(Path(run_dir)))
        except (ValueError, OSError) as exc:
            print(f"fedpeft: error: {exc}", file=sys.stderr)
            status = 2
    return status


register_command("report", "write a run directory's report.html and PNGs again, from its files", _add_args, _run)
