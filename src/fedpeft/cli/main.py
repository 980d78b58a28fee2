"""``fedpeft`` command line: a thin layer over reusable components.

Every flag maps to one key of the typed configuration (see :mod:`fedpeft.config`); a TOML
file given with ``--config`` is the base layer and flags override it. Any invalid input
ends with exit status 2 and a single line ``fedpeft: error: ...`` -- never a traceback.
Each sub-command lives in its own module of :mod:`fedpeft.cli` and registers itself when
imported below (the order of these imports is the order of ``fedpeft --help``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from fedpeft.cli import (  # noqa: F401
    bench,
    compare,
    deploy,
    generate,
    hetero,
    privacy,
    report,
    simulate,  # noqa: F401  (first: simulate, methods)
)
from fedpeft.cli.common import COMMANDS, build_parser, config_from_args, resume_config
from fedpeft.cli.console import quiet_libraries
from fedpeft.config import ConfigError
from fedpeft.server.run_dir import RunDirReused
from fedpeft.sim.superlink import RuntimeFailed

__all__ = ["build_parser", "config_from_args", "main", "resume_config"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    quiet_run = args.command == "simulate" and not args.verbose  # its console prints the run (cli/console.py)
    level = logging.ERROR if (args.quiet and quiet_run) else logging.WARNING if (args.quiet or quiet_run) \
        else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fedpeft").setLevel(level)
    for noisy in ("alembic", "filelock", "urllib3"):  # Flower's state DB migrations log every plugin at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "simulate":
        quiet_libraries(bool(args.verbose))
    try:
        return COMMANDS[args.command][2](args)
    except (ConfigError, RunDirReused) as exc:
        print(f"fedpeft: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeFailed as exc:
        print(f"fedpeft: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedpeft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
