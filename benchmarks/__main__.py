"""``python -m benchmarks`` (from the repository root): the fedpeft benchmark suite."""

import sys

from .suite import main

sys.exit(main())
