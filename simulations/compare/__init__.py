"""``fedpeft compare``: sweep methods x epsilons x seeds and report (see docs/compare.md).

* :mod:`simulations.compare.sweep` -- the cell grid, resumable bookkeeping, the runner;
* :mod:`simulations.compare.report` -- results.csv, report.md, self-contained report.html;
* :mod:`simulations.compare.plots` -- the PNG plots.
"""

from simulations.compare.report import collect, write_report
from simulations.compare.sweep import Cell, SweepSpec, cell_is_finished, plan_cells, run_sweep

__all__ = ["Cell", "SweepSpec", "cell_is_finished", "collect", "plan_cells", "run_sweep", "write_report"]
