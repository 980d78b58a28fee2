"""Result bookkeeping for the benchmark suite: measurements, targets, JSON and Markdown.

A benchmark produces :class:`Measurement` rows. A row may carry a :class:`Target`; whether it
is met is decided here, once, by :meth:`Target.met` -- never inside a benchmark. A row whose
measurement failed keeps its ``error`` (the reason) and is reported as failed, not hidden.
:func:`build_report` adds the date, the hardware (CPU model from ``/proc/cpuinfo``, cores,
GPU), the library versions and the machine load, and :func:`render_markdown` turns a
report into the table the README shows.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Measurement", "Target", "build_report", "hardware", "render_markdown", "summary", "write_report"]

_OPS = ("<=", ">=", "==")


@dataclass(frozen=True)
class Target:
    """``value op bound`` (``==`` compares within ``tol``), e.g. ``Target("<=", 1.10)``."""

    op: str
    bound: float
    tol: float = 1e-9

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"target operator {self.op!r} is not one of {', '.join(_OPS)}")

    def met(self, value: float | None) -> bool | None:
        """True / False, or None when there is no finite value to judge."""
        if value is None or not math.isfinite(value):
            return None
        if self.op == "<=":
            return value <= self.bound + self.tol
        if self.op == ">=":
            return value >= self.bound - self.tol
        return abs(value - self.bound) <= self.tol

    def text(self, unit: str = "") -> str:
        return f"{'=' if self.op == '==' else self.op} {self.bound:g}{unit}"


@dataclass
class Measurement:
    """One measured figure (or one failure) of one benchmark."""

    benchmark: str  # suite key, e.g. "dp_overhead"
    name: str  # what was measured, e.g. "DP / non-DP step, hooks"
    value: float | None = None
    unit: str = "x"  # "x" (ratio), "%", "MB", "s", "bytes"
    target: Target | None = None
    error: str | None = None  # why it could not be measured
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        if self.error is not None or self.target is None:
            return None
        return self.target.met(self.value)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["met"] = self.met
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        target = Target(**data["target"]) if data.get("target") else None
        return cls(data["benchmark"], data["name"], data.get("value"), data.get("unit", "x"), target,
                   data.get("error"), dict(data.get("detail") or {}))


def _fmt_value(m: Measurement) -> str:
    if m.error is not None:
        return f"failed: {m.error}"
    if m.value is None or not math.isfinite(m.value):
        return "n/a"
    if m.unit == "x":
        return f"{m.value:.3f}x"
    if m.unit == "%":
        return f"{m.value:.2f} %"
    if m.unit == "bytes":
        return f"{m.value:,.0f} B"
    return f"{m.value:.4g} {m.unit}"


def _fmt_met(m: Measurement) -> str:
    if m.error is not None:
        return "failed"
    return {True: "yes", False: "**no**", None: "-"}[m.met]


def summary(rows: list[Measurement]) -> dict[str, int]:
    """Counts of targets met / missed, failed measurements and rows without a target."""
    return {
        "met": sum(m.met is True for m in rows),
        "missed": sum(m.met is False for m in rows),
        "failed": sum(m.error is not None for m in rows),
        "informational": sum(m.error is None and m.target is None for m in rows),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def hardware() -> dict[str, Any]:
    """CPU model, cores, GPU (if any), Python and library versions of this machine."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": _cpu_model(), "cores": os.cpu_count() or 1, "gpu": gpu, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "platform": platform.platform(),
        "versions": {d: _version(d) for d in ("torch", "opacus", "flwr", "transformers", "peft")},
    }


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (other jobs on a shared machine), or [] where unknown."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def build_report(rows: list[Measurement], options: dict[str, Any], seconds: float,
                 load_before: list[float], notes: list[str] | None = None) -> dict[str, Any]:
    """The JSON document written to ``benchmarks/results.json``."""
    return {
        "date": time.strftime("%Y-%m-%d"), "time_utc": time.strftime("%H:%M:%S", time.gmtime()),
        "hardware": hardware(), "load_average": {"before": load_before, "after": load_average()},
        "options": options, "duration_s": round(seconds, 1), "summary": summary(rows),
        "notes": list(notes or []), "results": [m.to_dict() for m in rows],
    }


def render_markdown(report: dict[str, Any]) -> str:
    """Markdown table (benchmark, measured, target, met) with the run's date and hardware."""
    rows = [Measurement.from_dict(r) for r in report["results"]]
    hw = report["hardware"]
    load = report.get("load_average", {})
    lines = [
        f"Benchmarks run {report['date']} on {hw['cpu']} ({hw['cores']} cores, GPU: {hw['gpu']}); "
        f"torch {hw['versions']['torch']}, opacus {hw['versions']['opacus']}, flwr {hw['versions']['flwr']}. "
        f"Load average before/after: {load.get('before')} / {load.get('after')}. "
        f"Duration {report['duration_s']:.0f} s{' (quick)' if report['options'].get('quick') else ''}.",
        "",
        "| Benchmark | Measured | Target | Met |",
        "|---|---|---|---|",
    ]
    for m in rows:
        target = m.target.text("x" if m.unit == "x" else (" %" if m.unit == "%" else "")) if m.target else "-"
        lines.append(f"| {m.benchmark}: {m.name} | {_fmt_value(m).replace('|', '/')} | {target} | {_fmt_met(m)} |")
    s = report["summary"]
    lines += ["", f"Targets met: {s['met']}, missed: {s['missed']}, failed measurements: {s['failed']}."]
    if report.get("notes"):
        lines += ["", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], json_path: Path) -> Path:
    """Write the JSON report and its Markdown table next to it (same stem, ``.md``)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(json_path)
    md = json_path.with_suffix(".md")
    md.write_text(render_markdown(report), encoding="utf-8")
    return md
