"""``fedpeft compare``: sweep methods x epsilons x seeds and report (see docs/compare.md).

* :mod:`fedpeft.sim.compare.sweep` -- the cell grid, resumable bookkeeping, the runner;
* :mod:`fedpeft.sim.compare.tuning` -- the learning rate per (method, epsilon) chosen on a
  validation split, and the whole sweep (:func:`run_compare`);
* :mod:`fedpeft.sim.compare.stats` -- paired significance tests against a reference method;
* :mod:`fedpeft.sim.compare.report` -- results.csv, report.md, self-contained report.html;
* :mod:`fedpeft.sim.compare.plots` -- the PNG plots.
"""

from fedpeft.sim.compare.report import collect, write_report
from fedpeft.sim.compare.sweep import Cell, SweepSpec, cell_is_finished, plan_cells, run_sweep
from fedpeft.sim.compare.tuning import run_compare

__all__ = ["Cell", "SweepSpec", "cell_is_finished", "collect", "plan_cells", "run_compare", "run_sweep",
           "write_report"]
