"""Mutation testing of the modules that carry fedpeft's guarantees (``make mutation``).

mutmut (3.8) changes one thing at a time in a module (an operator, a constant, a call's
argument, a ``return``) and runs the tests that reach the changed function; a mutant that no
test notices ("survived") is a behaviour the suite does not pin down. Each module runs on its
own, against only the fast tests that cover it (:data:`MODULES`), so that a mutant costs
seconds: one ``mutmut run`` per module in a fresh ``mutants/`` copy of the repository, in a
child process (mutmut's state is global). Per-module results go to
``benchmarks/results/mutation/<module>.json``; :func:`render` joins them with the reasons in
:mod:`benchmarks.mutation_equivalent` into ``benchmarks/results/mutation.md``.

``python -m benchmarks.mutation [--modules src/fedpeft/privacy/plan.py,...] [--max-children 1]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results" / "mutation"
REPORT = ROOT / "benchmarks" / "results" / "mutation.md"

# module -> the fast test files that cover it. A test over ~20 s is deselected (``DESELECT``):
# a mutant of a function it reaches would cost minutes; what it checks is named in the report.
# Keep a module's list fixed between its run and its ``--rerun-survivors``: mutmut resets every
# cached result when the test selection changes (add new tests to files already listed).
MODULES: dict[str, list[str]] = {
    "src/fedpeft/privacy/plan.py": ["tests/test_privacy_plan.py",
                                    "tests/test_privacy_audit.py::test_plan_matches_the_ledger_the_clients_keep",
                                    "tests/test_privacy_audit.py::test_plan_cli"],
    # test_releases.py checks what releases hands the calibration with a recorder in its place; the
    # ICM-LoRA tests that calibrate for real are left out (calibration-after-a-release-fits-the-budget
    # 134 s, release-reaches-the-ledger 35 s, client-releases-once 40 s on the loaded 2 cores).
    "src/fedpeft/privacy/releases.py": [
        "tests/test_releases.py",
        *(f"tests/test_icm_lora.py::test_{t}" for t in (
            "clipped_noisy_mean_clips_and_adds_the_stated_noise",
            "release_epsilon_matches_the_analytic_gaussian_mechanism"))],
    "src/fedpeft/privacy/central.py": ["tests/test_central_dp.py", "tests/test_strategy_state.py"],
    "src/fedpeft/privacy/dpsgd.py": ["tests/test_dp_mechanism.py", "tests/test_ffa_lora.py"],
    # test_randomness.py pins every variate against an independent ChaCha20/HMAC computation. The
    # DP-training tests (test_dp_mechanism, test_ffa_lora, test_attacks' noise and replay tests) reach
    # every stream function and cost ~1 min each per mutant on the loaded 2 cores: left out here.
    "src/fedpeft/privacy/randomness.py": [
        "tests/test_randomness.py", "tests/test_attacks.py::test_server_side_code_never_touches_node_secrets"],
    # test_privacy.py's other tests and test_reliability's checkpoint tests never reach the ledger;
    # test_reliability's rerun-round-is-not-charged-twice trains a client (minutes per mutant here):
    # left out, its replay rule is covered by ledger-counts-a-replay-once.
    "src/fedpeft/privacy/ledger.py": [
        "tests/test_ledger.py", "tests/test_ledger_plan.py", "tests/test_privacy.py::test_budget_refusal_before_exceeding",
        "tests/test_reliability.py::test_ledger_counts_a_replay_once_and_anything_else_again"],
    "src/fedpeft/privacy/accounting.py": ["tests/test_accounting.py", "tests/test_privacy.py", "tests/test_ledger.py"],
    "src/fedpeft/strategies/validation.py": ["tests/test_validation.py", "tests/test_server_replies.py",
                                             "tests/test_fuzz.py::test_a_corrupted_reply_never_reaches_the_average"],
    "src/fedpeft/strategies/adapter_avg.py": ["tests/test_strategy_state.py", "tests/test_validation.py",
                                              "tests/test_server_replies.py", "tests/test_server_optimisers.py"],
    # test_reliability's three round-loop simulations (20-40 s each) are left out: the in-process
    # resume test drives the same save/load/restore path in one process.
    "src/fedpeft/server/checkpoint.py": ["tests/test_checkpoint.py", "tests/test_strategy_state.py",
                                         *(f"tests/test_reliability.py::test_{t}" for t in (
                                             "checkpoint_round_trip", "crash_during_write_keeps_previous_checkpoint",
                                             "corrupt_checkpoint_is_a_clear_error",
                                             "resume_takes_the_runs_own_configuration",
                                             "resume_with_a_different_configuration_is_refused",
                                             "resume_refuses_missing_or_finished_runs")),
                                         "tests/test_server_optimisers.py", "tests/test_central_dp.py",
                                         "tests/test_resume_inprocess.py"],
    "src/fedpeft/data/partition.py": ["tests/test_data.py", "tests/test_task_layout.py", "tests/test_partition.py"],
    "src/fedpeft/client/trainer.py": ["tests/test_trainer.py", "tests/test_fedprox.py", "tests/test_dp_mechanism.py"],
    # test_client_app_units.py calls each step of the round handler on real Flower messages with the
    # trainer's entry point replaced by a recorder and PLD by a closed form (~0.1 s a test). The
    # end-to-end files (test_client_app.py, test_client_mods.py: a real training round each, ~30 s per
    # mutant on the loaded 2 cores) are left out: every app.py behaviour they check is pinned there too.
    "src/fedpeft/client/app.py": ["tests/test_client_app_units.py"],
}

DESELECT: list[str] = [
    # PLD/PRV accounting over many rounds (20-50 s each on 2 shared cores).
    "tests/test_ledger.py::test_changed_batch_size_is_accounted_at_the_q_that_ran",
    "tests/test_ledger.py::test_audit_refuses_an_under_reported_replace_one_epsilon",
    "tests/test_ledger.py::test_run_dir_with_ledgers_of_another_config_is_not_reused",
    "tests/test_privacy.py::test_grid_prv_accountant_matches_opacus_and_reuses_few_fft_lengths",
    "tests/test_privacy.py::test_ledger_accumulates_and_survives_restarts",
    "tests/test_privacy.py::test_calibration_agrees_with_opacus_bisection",
]


def module_key(module: str) -> str:
    """``src/fedpeft/privacy/plan.py`` -> ``privacy.plan`` (the results file's name)."""
    return module.removeprefix("src/fedpeft/").removesuffix(".py").replace("/", ".")


def workdir(module: str) -> Path:
    """``runs/mutation/<module>/``: the module's own cwd for mutmut (its ``mutants/`` copy and
    cache stay there, so ``--rerun-survivors`` can retest only what survived)."""
    return ROOT / "runs" / "mutation" / module_key(module)


def _run_one(module: str, max_children: int, rerun: list[str], summarise_only: bool = False,
             resume: bool = False) -> dict[str, Any]:
    """Run mutmut on ``module`` in this process and summarise it: all mutants in a fresh
    ``mutants/``, or (``rerun``) only the named ones against the current tests, or
    (``summarise_only``) nothing: what an interrupted run had checked (the rest: not checked)."""
    work = workdir(module)
    if not (rerun or summarise_only or resume):
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    for name in ("src", "tests", "benchmarks", "pyproject.toml"):  # mutmut copies them into mutants/
        if not (work / name).exists():
            (work / name).symlink_to(ROOT / name)
    os.chdir(work)
    from mutmut import configuration

    cfg = configuration.config()
    cfg.only_mutate = [module]
    cfg.pytest_add_cli_args_test_selection = list(MODULES[module])
    cfg.pytest_add_cli_args = [*cfg.pytest_add_cli_args, *(f"--deselect={t}" for t in DESELECT)]
    import mutmut.__main__ as mm
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.stats import status_by_exit_code

    seeded = 0
    if resume and not (Path("mutants") / f"{module}.meta").exists() and _result_path(module).exists():
        seeded = _seed_from_results(module, mm)
    start = time.monotonic()
    if summarise_only:  # wall time of the interrupted run: from its work dir to its last result
        meta = Path("mutants") / f"{module}.meta"
        start -= meta.stat().st_mtime - (work / "src").lstat().st_mtime
    else:
        try:
            mm.cli(["run", "--max-children", str(max_children), *rerun], standalone_mode=False)
        except SystemExit as e:  # mutmut exits on a failed clean run or no covering tests
            if e.code not in (0, None):
                raise
    elapsed = time.monotonic() - start
    data = SourceFileMutationData(path=Path(module))
    data.load()
    counts: dict[str, int] = {}
    survivors: dict[str, str] = {}
    for name, code in sorted(data.exit_code_by_key.items()):
        status = status_by_exit_code[code]
        counts[status] = counts.get(status, 0) + 1
        if status in ("survived", "no tests", "suspicious", "timeout", "not checked"):
            survivors[name] = f"{status}\n{mm.get_diff_for_mutant(name, path=module)}"
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    result: dict[str, Any] = {
        "module": module, "tests": MODULES[module], "deselected": DESELECT,
        "counts": counts, "total": sum(counts.values()), "mutants_not_killed": survivors,
        "seconds": round(elapsed, 1), "date": now,
        "load": os.getloadavg(), "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "mutmut": _mutmut_version(), "max_children": max_children,
    }
    if resume and _result_path(module).exists():  # the interrupted run's time counts too
        old = json.loads(_result_path(module).read_text())
        result["seconds"] = round(result["seconds"] + old["seconds"], 1)
        if seeded or old.get("seeded"):
            result["seeded"] = [*old.get("seeded", []), *([{"killed": seeded, "from": old["date"]}] if seeded else [])]
    if rerun:  # the full run's figures stay; the counts are after the retest
        old = json.loads(_result_path(module).read_text())
        result.update({k: old[k] for k in ("seconds", "date", "load")})
        earlier = old.get("rerun", [])
        result["rerun"] = [*(earlier if isinstance(earlier, list) else [earlier]),
                           {"mutants": len(rerun), "seconds": round(elapsed, 1), "date": now, "load": os.getloadavg()}]
    return result


def _seed_from_results(module: str, mm: Any) -> int:
    """Rebuild a lost ``mutants/`` cache from the module's stored results so ``--resume`` goes on
    where the interrupted run stopped (``runs/`` is not kept between machines).

    The mutants are generated afresh; a mutant the stored run killed is marked killed (exit 1),
    every other one (survived, timed out, not checked) is left to be tested again. If the module
    was changed in a commit since that run, kills carry over only in the functions whose source
    is the same as then (mutmut numbers mutants per function, and keeps verdicts the same way
    when a function's hash is unchanged); every mutant of a changed or new function is tested.
    Refused for uncommitted edits (the stored run's source must be recoverable) and when the
    generated names do not match the stored ones. Returns how many verdicts were carried over
    (the result JSON records it under ``seeded``).
    """
    from mutmut.mutation.data import SourceFileMutationData

    old = json.loads(_result_path(module).read_text())
    since = old["date"].replace(" UTC", "Z")
    changed = subprocess.run(["git", "log", "--since", since, "--format=%h", "--", module],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", module], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.strip()
    if dirty:
        raise SystemExit(f"cannot resume {module}: it has uncommitted edits since its stored run of {old['date']}; "
                         "commit them or run it afresh without --resume")
    same: Callable[[str], bool] = lambda name: True  # noqa: E731 -- every function as in the stored run
    if changed:
        then = subprocess.run(["git", "rev-list", "-1", f"--before={since}", "HEAD", "--", module],
                              cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        if not then:
            raise SystemExit(f"cannot resume {module}: no commit of it before its stored run of {old['date']}")
        before = _function_sources(subprocess.run(["git", "show", f"{then}:{module}"], cwd=ROOT, capture_output=True,
                                                  text=True, check=True).stdout)
        now = _function_sources((ROOT / module).read_text())
        same = lambda name: (f := _mutant_function(name)) in now and before.get(f) == now[f]  # noqa: E731
    Path("mutants").mkdir(exist_ok=True)
    mm.set_mutant_under_test("mutant_generation")
    mm.copy_src_dir()
    mm.copy_also_copy_files()
    mm.setup_source_paths()
    mm.store_lines_covered_by_tests()
    mm.create_mutants(1)
    data = SourceFileMutationData(path=Path(module))
    data.load()
    names, alive = set(data.exit_code_by_key), set(old["mutants_not_killed"])
    kept = {n for n in alive if same(n)}
    if (not changed and len(names) != old["total"]) or not kept <= names:
        raise SystemExit(f"cannot resume {module}: {len(names)} mutants generated, the stored run had "
                         f"{old['total']} ({len(kept - names)} of its names missing); run it afresh")
    data.exit_code_by_key = {n: 1 if same(n) and n not in alive else None for n in sorted(names)}
    data.save()
    return sum(1 for code in data.exit_code_by_key.values() if code == 1)


def _mutant_function(name: str) -> str:
    """``pkg.m.xǁLedgerǁfrom_json__mutmut_12`` -> ``xǁLedgerǁfrom_json`` (mutmut's mangled name)."""
    return name.rpartition(".")[2].partition("__mutmut_")[0]


def _function_sources(source: str) -> dict[str, str]:
    """Each top-level function's and method's source text (decorators included), by mutmut's
    mangled name (``x_f``, ``xǁClassǁmethod``): what decides whether a stored verdict still holds."""
    import ast

    tree, out = ast.parse(source), {}
    lines = source.splitlines()

    def text(node: ast.AST) -> str:
        first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])  # type: ignore[attr-defined]
        return "\n".join(lines[first - 1:node.end_lineno])  # type: ignore[attr-defined]

    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            out[f"x_{node.name}"] = text(node)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    out[f"xǁ{node.name}ǁ{item.name}"] = text(item)
    return out


def _result_path(module: str) -> Path:
    return RESULTS_DIR / f"{module_key(module)}.json"


def _mutmut_version() -> str:
    from importlib.metadata import version

    return version("mutmut")


def render() -> str:
    """The results table and every mutant not killed, with its reason if it is equivalent."""
    from benchmarks.mutation_equivalent import EQUIVALENT, KILLED_SINCE

    rows, details, notes = [], [], []
    for path in sorted(RESULTS_DIR.glob("*.json")):
        r = json.loads(path.read_text())
        c = r["counts"]
        listed = sum(1 for n in r["mutants_not_killed"] if n in EQUIVALENT or n in KILLED_SINCE)
        load = "/".join(f"{x:.1f}" for x in r["load"])
        rows.append(f"| `{r['module']}` | {c.get('killed', 0)} | {c.get('survived', 0)} | "
                    f"{c.get('timeout', 0)} | {c.get('no tests', 0)} | {c.get('not checked', 0)} | {r['total']} | {listed} | "
                    f"{r['seconds']:.0f} | {r['date']} | {load} |")
        reruns = r.get("rerun", [])
        for rr in reruns if isinstance(reruns, list) else [reruns]:
            notes.append(f"- `{r['module']}`: the {rr['mutants']} mutants still alive were retested against the "
                         f"tests added since, on {rr['date']} ({rr['seconds']:.0f} s, load "
                         f"{'/'.join(f'{x:.1f}' for x in rr['load'])}); the counts are after the last retest.")
        for seed in r.get("seeded", []):
            notes.append(f"- `{r['module']}`: resumed without the earlier run's cache: {seed['killed']} kills carried "
                         f"over from its results of {seed['from']} (only in functions unchanged since), every "
                         "other mutant tested again.")
        if c.get("not checked"):
            notes.append(f"- `{r['module']}`: the run was stopped before it had checked every mutant "
                         f"({c['not checked']} not checked).")
        unchecked = [n for n, d in r["mutants_not_killed"].items() if d.startswith("not checked")]
        if unchecked:
            details.append(f"#### `{r['module']}`: {len(unchecked)} mutants not checked (run stopped)\n\n"
                           + ", ".join(f"`{n.rpartition('.')[2]}`" for n in unchecked) + "\n")
        for name, diff in r["mutants_not_killed"].items():
            if name in unchecked:
                continue
            reason = EQUIVALENT.get(name, "**not explained: needs a test**")
            if name in KILLED_SINCE:
                reason = (f"Killed since by `{KILLED_SINCE[name]}`, added after the run (fails with this "
                          "mutant applied by hand; not yet retested by mutmut).")
            status, _, body = diff.partition("\n")
            details.append(f"#### `{name}` ({status})\n\n{reason}\n\n```diff\n{body.strip()}\n```\n")
    results = [json.loads(p.read_text()) for p in sorted(RESULTS_DIR.glob("*.json"))]
    first = results[0] if results else {}
    children = "/".join(str(n) for n in sorted({r.get("max_children", "?") for r in results}, key=str)) or "?"
    head = [
        "# Mutation testing",
        "",
        "Written by `make mutation` (`benchmarks/mutation.py`); do not edit by hand. "
        f"Tool: mutmut {first.get('mutmut', '?')}, `--max-children` {children} (per module in its JSON), "
        f"{first.get('cpus', '?')} shared CPU cores, no GPU. Each module runs against only the "
        "fast tests listed in `benchmarks/mutation.py` (`-m \"not slow and not deployment\"`, "
        "the slowest accounting tests deselected); load is the 1/5/15-min load average at the end "
        "of the module's run.",
        "",
        "| module | killed | survived | timeout | no tests | not checked | total | survivors explained | seconds | date | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *notes,
        "",
        "## Mutants not killed",
        "",
        "Each is either equivalent (the reason says why no test can tell it apart) or needs a test.",
        "",
    ]
    return "\n".join(head + details) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mutation", description=__doc__.splitlines()[0])
    parser.add_argument("--modules", default="", help="comma-separated module paths (default: all of MODULES)")
    parser.add_argument("--max-children", type=int, default=1)
    parser.add_argument("--render-only", action="store_true", help="rewrite the report from the stored results")
    parser.add_argument("--rerun-survivors", action="store_true",
                        help="retest only the mutants the last run of each module did not kill (after adding tests)")
    parser.add_argument("--resume", action="store_true",
                        help="go on with the mutants an interrupted run of each module had not checked")
    parser.add_argument("--summarise-only", action="store_true",
                        help="write the results of an interrupted run as they stand (unrun mutants: not checked)")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # the child process: one module
    args = parser.parse_args(argv)
    # One thread per mutant: 2 shared cores, and libgomp's pool is not fork-safe.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    if args.one:
        rerun = []
        if args.rerun_survivors:
            # the mutants a run checked and did not kill; those it never reached are --resume's
            rerun = sorted(n for n, d in json.loads(_result_path(args.one).read_text())["mutants_not_killed"].items()
                           if not d.startswith("not checked"))
            if not rerun:
                return 0
        result = _run_one(args.one, args.max_children, rerun, args.summarise_only, args.resume)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        _result_path(args.one).write_text(json.dumps(result, indent=1) + "\n")
        return 0
    modules = [m.strip() for m in args.modules.split(",") if m.strip()] or list(MODULES)
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        print(f"unknown module(s) {unknown}; allowed: {', '.join(MODULES)}", file=sys.stderr)
        return 2
    if not args.render_only:
        for module in modules:
            print(f"== mutation testing {module}", flush=True)
            rc = subprocess.call([sys.executable, "-m", "benchmarks.mutation", "--one", module,
                                  "--max-children", str(args.max_children),
                                  *(["--rerun-survivors"] if args.rerun_survivors else []),
                                  *(["--summarise-only"] if args.summarise_only else []),
                                  *(["--resume"] if args.resume else [])], cwd=ROOT)
            if rc != 0:
                print(f"mutmut failed on {module} (exit {rc})", file=sys.stderr)
                return rc
    REPORT.write_text(render())
    print(f"wrote {REPORT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
