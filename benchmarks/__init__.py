"""Ratio benchmarks of fedpeft against its targets (DP overhead, bytes, simulation, scale).

Run with ``fedpeft bench`` or ``python -m benchmarks`` (see :mod:`benchmarks.suite`).
Note: Opacus also installs a top-level package named ``benchmarks``; ``fedpeft bench``
loads this one by path, and ``python -m benchmarks`` works from the repository root.
"""
