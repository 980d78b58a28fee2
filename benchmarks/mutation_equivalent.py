"""Surviving mutants of ``make mutation`` that no test can tell apart, with the reason.

Keys are mutmut's mutant names (``module.x_function__mutmut_N``; the numbering is stable while
the function's source is unchanged). A survivor not listed here is shown as needing a test in
``benchmarks/results/mutation.md``.
"""

from __future__ import annotations

EQUIVALENT: dict[str, str] = {
}
