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
from fedpeft.config import ConfigError
from fedpeft.server.run_dir import RunDirReused

__all__ = ["build_parser", "config_from_args", "main", "resume_config"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "filelock", "urllib3"):  # Flower's state DB migrations log every plugin at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command][2](args)
    except (ConfigError, RunDirReused) as exc:
        print(f"fedpeft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedpeft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
