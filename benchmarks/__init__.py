"""Ratio benchmarks of fedpeft against its targets (DP overhead, bytes, simulation, scale).

Repository code, not installed with the package. Run with ``python -m benchmarks`` from the
repository root or ``fedpeft bench`` (see :mod:`benchmarks.suite`).
"""
