"""The benchmark suite: what runs, at which sizes, with progress, into ``results.json``.

``python -m benchmarks`` and ``fedpeft bench`` both call :func:`main`. Six benchmarks
(:data:`BENCHMARKS`), each a function of the :class:`Plan` returning
:class:`~benchmarks.results.Measurement` rows; ``--only`` picks some, ``--quick`` shrinks
every size to a smoke test (tiny random BERT from ``tests/tiny_model.py`` unless
``--model``). The report is written even when targets are missed (exit 0); a benchmark that
crashes is recorded as failed with its reason and the exit status is 1; bad options exit 2.

Sizes of the full run (about 10 to 15 minutes on 2 shared CPU cores, see docs/benchmarks.md):
MiniLM-L6 for step times (batch 32 x 64 tokens; the method matrix 8 x 32) and for the
simulation overhead (3 clients, 3 rounds, 2 local steps); the scale benchmark always uses
the tiny model unless ``--model`` is given (10,000 clients of MiniLM would measure the disk).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .results import Measurement, build_report, load_average, render_markdown, summary, write_report

__all__ = ["BENCHMARKS", "Plan", "add_arguments", "main", "plan_from_args", "run"]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results.json"
QUICK_OUTPUT = ROOT / "benchmarks" / "results-quick.json"


@dataclass(frozen=True)
class Plan:
    """Every size the suite uses. ``model`` "" = MiniLM-L6; ``scale_model`` "" = tiny BERT."""

    model: str = ""
    scale_model: str = ""
    step_batch: int = 32
    step_seq: int = 64
    step_reps: int = 7
    step_warmup: int = 2
    matrix_batch: int = 8
    matrix_seq: int = 32
    matrix_reps: int = 5
    matrix_methods: tuple[str, ...] = ()  # the method matrix's methods (and ffa_lora, its reference); () = all
    sim_reps: int = 2
    sim_rounds: int = 3
    sim_clients: int = 3
    sim_local_steps: int = 2
    sim_examples: int = 96
    sim_test_size: int = 200
    scale_sizes: tuple[int, ...] = (10, 1000, 10000)
    scale_rounds: int = 5  # 4 measured rounds (round 1 starts the workers) of several seconds each
    scale_reps: int = 3  # interleaved repetitions of every size: the ratio's spread
    scale_local_steps: int = 8  # rounds of seconds, not tenths (the grid polls replies every 0.1 s)
    lm_model: str = ""  # causal_lm: "" = SmolLM2-135M-Instruct (--quick: the tests' tiny Llama)
    lm_batch: int = 4
    lm_seq: int = 256
    lm_completion: int = 64  # target tokens at the end of every row (the rest is prompt)
    lm_reps: int = 5
    lm_warmup: int = 1  # untimed steps of each variant (the first also checks that it runs)
    quick: bool = False


QUICK = Plan(step_batch=8, step_seq=32, step_reps=2, step_warmup=1, matrix_reps=2, sim_reps=1, sim_rounds=2,
             sim_clients=2, sim_local_steps=1, sim_examples=32, sim_test_size=64, scale_sizes=(10, 30),
             scale_rounds=2, scale_reps=1, scale_local_steps=1, lm_batch=2, lm_seq=32, lm_completion=8, lm_reps=2, quick=True)

Progress = Callable[[str], None]


def _step_bench(plan: Plan, matrix: bool = False):  # type: ignore[no-untyped-def]
    from .steps import StepBench

    if matrix:
        return StepBench.create(plan.model, plan.matrix_batch, plan.matrix_seq)
    return StepBench.create(plan.model, plan.step_batch, plan.step_seq)


def _dp_overhead(plan: Plan, progress: Progress) -> list[Measurement]:
    from .steps import dp_overhead

    return dp_overhead(_step_bench(plan), plan.step_reps, plan.step_warmup, progress=progress)


def _ffa_vs_lora(plan: Plan, progress: Progress) -> list[Measurement]:
    from .steps import ffa_vs_lora

    return ffa_vs_lora(_step_bench(plan), plan.step_reps, plan.step_warmup, progress=progress)


def _communication(plan: Plan, progress: Progress) -> list[Measurement]:
    from .steps import communication

    return communication(_step_bench(plan))


def _sim_overhead(plan: Plan, progress: Progress) -> list[Measurement]:
    from .simbench import sim_overhead

    return sim_overhead(plan.model, plan.sim_reps, plan.sim_rounds, plan.sim_clients, plan.sim_local_steps,
                        plan.sim_examples, plan.sim_test_size, progress=progress)


def _scale(plan: Plan, progress: Progress) -> list[Measurement]:
    from .scale import scale

    return scale(plan.scale_model, plan.scale_sizes, plan.scale_rounds, plan.scale_reps, plan.scale_local_steps,
                 progress=progress)


def _causal_lm(plan: Plan, progress: Progress) -> list[Measurement]:
    from .causal_lm import LMBench, causal_lm

    bench = LMBench.create(plan.lm_model, plan.lm_batch, plan.lm_seq, plan.lm_completion)
    return causal_lm(bench, plan.lm_reps, plan.lm_warmup, progress=progress)


def _deploy_overhead(plan: Plan, progress: Progress) -> list[Measurement]:
    from .deploy_overhead import measure

    return measure(("tiny",) if plan.quick else ("tiny", "minilm"), rounds=2 if plan.quick else 4, progress=progress)


def _methods(plan: Plan, progress: Progress) -> list[Measurement]:
    from .steps import method_matrix

    return method_matrix(_step_bench(plan, matrix=True), plan.matrix_reps, 1, progress=progress,
                         only=plan.matrix_methods)


BENCHMARKS: dict[str, tuple[str, Callable[[Plan, Progress], list[Measurement]]]] = {
    "communication": ("upload bytes FFA-LoRA / LoRA, head share", _communication),
    "dp_overhead": ("DP-SGD / non-DP step time per Opacus mode", _dp_overhead),
    "ffa_vs_lora": ("FFA-LoRA / LoRA DP step time", _ffa_vs_lora),
    "methods": ("every adapter method vs FFA-LoRA: step time, upload bytes", _methods),
    "sim_overhead": ("Flower simulation / bare loop wall time", _sim_overhead),
    "scale": ("10 -> 10,000 virtual clients: CPU, wall time and memory per round", _scale),
    "deploy_overhead": ("deployed (SuperLink + 3 SuperNodes, TLS, warm workers) / simulated round, tiny and MiniLM",
                        _deploy_overhead),
    "causal_lm": ("causal LM (SmolLM2) at 256 tokens: DP / non-DP, fedpeft / bare loop, tokens/s, memory, bytes",
                  _causal_lm),
}
OPT_IN = ("causal_lm", "deploy_overhead")
"""Run only when named in ``--only`` (on 2 CPU cores one SmolLM2 step of 4 x 256 tokens takes ~0.5-2 min; a
deployment starts a SuperLink and three SuperNodes, minutes per model)."""


class BenchError(ValueError):
    """Bad options (one line; exit status 2)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", metavar="NAME[,NAME]", default="",
                   help=f"run only these benchmarks: {', '.join(BENCHMARKS)} (default: all but {', '.join(OPT_IN)})")
    p.add_argument("--quick", action="store_true",
                   help="smoke version: tiny sizes and the tests' tiny random BERT (unless --model); ~1-2 min")
    p.add_argument("--output", metavar="FILE", default="",
                   help=f"JSON results (Markdown table next to it, .md); default {DEFAULT_OUTPUT.relative_to(ROOT)} "
                        f"({QUICK_OUTPUT.relative_to(ROOT)} with --quick)")
    p.add_argument("--model", metavar="DIR", default="", help="model directory for every benchmark "
                   "(default: MiniLM-L6; the scale benchmark: the tiny random BERT)")
    p.add_argument("--methods", metavar="M[,M]", default="",
                   help="the methods benchmark times only these methods (and ffa_lora, the reference); default all")
    p.add_argument("--lm-model", metavar="PATH", default="", help="causal LM (directory or .gguf) of the causal_lm "
                   "benchmark (default: SmolLM2-135M-Instruct; with --quick: the tests' tiny Llama)")


def _tiny_model(llama: bool = False) -> str:
    tests = ROOT / "tests"
    if not (tests / "tiny_model.py").is_file():
        raise BenchError("--quick needs tests/tiny_model.py (a source checkout) or --model DIR")
    sys.path.insert(0, str(tests))
    from tiny_model import make_tiny_llama, make_tiny_model

    make = make_tiny_llama if llama else make_tiny_model
    return str(make(Path(tempfile.mkdtemp(prefix="bench-tiny-"))))


def selected(only: str) -> list[str]:
    names = [n.strip() for n in only.split(",") if n.strip()] or [n for n in BENCHMARKS if n not in OPT_IN]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise BenchError(f"--only {only!r}: unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
    return list(dict.fromkeys(names))


def plan_from_args(args: argparse.Namespace) -> tuple[Plan, list[str], Path]:
    names = selected(args.only)
    plan = QUICK if args.quick else Plan()
    if args.model and not (Path(args.model) / "config.json").is_file():
        raise BenchError(f"--model {args.model!r}: not a Hugging Face model directory (no config.json)")
    if args.model:
        plan = replace(plan, model=args.model, scale_model=args.model)
    elif args.quick and set(names) - set(OPT_IN):
        tiny = _tiny_model()
        plan = replace(plan, model=tiny, scale_model=tiny)
    elif "scale" in names:
        plan = replace(plan, scale_model=_tiny_model())
    if args.methods:
        plan = replace(plan, matrix_methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()))
    if args.lm_model:
        plan = replace(plan, lm_model=args.lm_model)
    elif args.quick and "causal_lm" in names:
        plan = replace(plan, lm_model=_tiny_model(llama=True))
    output = Path(args.output) if args.output else (QUICK_OUTPUT if args.quick else DEFAULT_OUTPUT)
    if not args.output and not args.quick and set(names) <= set(OPT_IN):  # keep the full suite's results.json
        output = ROOT / "benchmarks" / "results" / f"{'+'.join(names)}.json"
    return plan, names, output


def run(plan: Plan, names: Sequence[str], output: Path) -> tuple[dict, int]:  # type: ignore[type-arg]
    """Run ``names`` with a progress display; write the report; return it and the exit status."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    os.environ.setdefault("FEDPEFT_PROGRESS", "0")  # the trainer's per-step bars would interleave
    for noisy in ("flwr", "fedpeft", "fedpeft.client"):  # per-round INFO lines would bury the progress display
        logging.getLogger(noisy).setLevel(logging.WARNING)
    console = Console(stderr=True)
    rows: list[Measurement] = []
    errors = 0
    load_before = load_average()
    t0 = time.perf_counter()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        overall = bar.add_task("benchmarks", total=len(names))
        for name in names:
            bar.update(overall, description=f"{name}: {BENCHMARKS[name][0]}")
            started = time.perf_counter()

            def progress(msg: str, _name: str = name) -> None:
                bar.update(overall, description=f"{_name}: {msg}")
                if not console.is_terminal:  # a log file gets one line per update instead of a live bar
                    console.print(f"[{time.perf_counter() - t0:6.0f} s] {_name}: {msg}")
            try:
                got = BENCHMARKS[name][1](plan, progress)
            except Exception as exc:  # noqa: BLE001 - recorded as a failed benchmark, exit status 1
                errors += 1
                console.print(f"[red]{name} failed:[/red] {type(exc).__name__}: {exc}")
                got = [Measurement(name, "benchmark", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                                   detail={"traceback": traceback.format_exc(limit=6)})]
            for m in got:
                m.detail.setdefault("benchmark_s", round(time.perf_counter() - started, 1))
            rows.extend(got)
            bar.advance(overall)
    notes = [f"all ratios are medians of interleaved repetitions inside this run; the machine is shared "
             f"(load average {load_before} at the start)"]
    report = build_report(rows, {**asdict(plan), "only": list(names)}, time.perf_counter() - t0, load_before, notes)
    md = write_report(report, output)
    print(render_markdown(report))
    s = summary(rows)
    print(f"fedpeft bench: targets met {s['met']}, missed {s['missed']}, failed {s['failed']}; "
          f"wrote {output} and {md} in {report['duration_s']:.0f} s")
    return report, 1 if errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="fedpeft ratio benchmarks")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_args(args)


def run_args(args: argparse.Namespace) -> int:
    """Shared by ``python -m benchmarks`` and ``fedpeft bench``."""
    try:
        plan, names, output = plan_from_args(args)
    except BenchError as exc:
        print(f"fedpeft: error: {exc}", file=sys.stderr)
        return 2
    return run(plan, names, output)[1]
