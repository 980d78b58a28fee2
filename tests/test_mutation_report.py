"""`make mutation`'s bookkeeping (benchmarks/mutation.py): what it runs and how it reports.

No mutation run here (that takes hours on 2 cores); the report is rendered from fake results.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import mutation


def test_every_module_in_scope_exists_and_has_fast_tests() -> None:
    root = Path(mutation.__file__).resolve().parent.parent
    for module, tests in mutation.MODULES.items():
        assert (root / module).is_file(), module
        assert tests and all((root / t.partition("::")[0]).is_file() for t in tests), module
    assert mutation.module_key("src/fedpeft/privacy/plan.py") == "privacy.plan"


def test_unknown_module_is_one_line_naming_the_allowed(capsys: pytest.CaptureFixture[str]) -> None:
    assert mutation.main(["--modules", "src/fedpeft/nope.py", "--render-only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "src/fedpeft/nope.py" in err and "src/fedpeft/privacy/plan.py" in err


def test_report_counts_and_lists_each_survivor_with_its_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mutation, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr("benchmarks.mutation_equivalent.EQUIVALENT", {"m.x_f__mutmut_1": "only a log message"})
    monkeypatch.setattr("benchmarks.mutation_equivalent.KILLED_SINCE", {})
    (tmp_path / "m.json").write_text(json.dumps({
        "module": "src/fedpeft/m.py", "counts": {"killed": 8, "survived": 2}, "total": 10,
        "mutants_not_killed": {"m.x_f__mutmut_1": "survived\n-a\n+b", "m.x_f__mutmut_2": "survived\n-c\n+d"},
        "seconds": 12.0, "date": "2026-12-03 10:00 UTC", "load": [1.0, 2.0, 3.0], "cpus": 2,
        "mutmut": "3.8.1", "max_children": 1, "seeded": [{"killed": 8, "from": "2026-12-02 09:00 UTC"}],
    }))
    text = mutation.render()
    assert "8 kills carried over from its results of 2026-12-02 09:00 UTC (only in functions unchanged" in text
    assert "| `src/fedpeft/m.py` | 8 | 2 | 0 | 0 | 0 | 10 | 1 | 12 | 2026-12-03 10:00 UTC | 1.0/2.0/3.0 |" in text
    assert "only a log message" in text and text.count("**not explained: needs a test**") == 1
    assert "mutmut 3.8.1" in text and "2 shared CPU cores" in text


def _fake_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, generated: list[str],
                  total: int = 4) -> tuple[object, str]:
    """A git repository holding one module committed before its stored run (2026-12-03 10:00 UTC),
    the run's results beside it, and a stand-in for mutmut that "generates" ``generated``."""
    import os
    import subprocess
    from types import SimpleNamespace

    from mutmut.mutation.data import SourceFileMutationData

    repo, module = tmp_path / "repo", "src/pkg/m.py"
    (repo / "src/pkg").mkdir(parents=True)
    (repo / module).write_text("def f():\n    return 1\n\n\nclass C:\n    def g(self):\n        return 2\n")
    env = {"GIT_AUTHOR_DATE": "2026-12-03T09:00:00Z", "GIT_COMMITTER_DATE": "2026-12-03T09:00:00Z"}
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "m"], cwd=repo, check=True, env={**os.environ, **env})
    monkeypatch.setattr(mutation, "ROOT", repo)
    monkeypatch.setattr(mutation, "RESULTS_DIR", tmp_path / "results")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "m.json").write_text(json.dumps({
        "module": module, "total": total, "date": "2026-12-03 10:00 UTC", "seconds": 5.0,
        "mutants_not_killed": {"pkg.m.x_f__mutmut_2": "survived\n-a\n+b", "pkg.m.x_f__mutmut_4": "not checked\n"},
    }))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    def create_mutants(children: int) -> None:
        data = SourceFileMutationData(path=Path(module))
        Path(data.meta_path).parent.mkdir(parents=True, exist_ok=True)
        data.exit_code_by_key = dict.fromkeys(generated)
        data.save()

    mm = SimpleNamespace(set_mutant_under_test=lambda name: None, copy_src_dir=lambda: None,
                         copy_also_copy_files=lambda: None, setup_source_paths=lambda: None,
                         store_lines_covered_by_tests=lambda: None, create_mutants=create_mutants)
    monkeypatch.setattr(mutation, "_result_path", lambda m: tmp_path / "results" / "m.json")
    return mm, module


def test_resume_without_a_cache_carries_over_only_what_the_stored_run_killed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--resume`` on a fresh machine (``runs/`` gone): the stored run's kills stand, its
    survivors and unchecked mutants are tested again."""
    from mutmut.mutation.data import SourceFileMutationData

    names = [f"pkg.m.x_f__mutmut_{i}" for i in range(1, 5)]
    mm, module = _fake_run_dir(tmp_path, monkeypatch, names)
    assert mutation._seed_from_results(module, mm) == 2
    data = SourceFileMutationData(path=Path(module))
    data.load()
    assert data.exit_code_by_key == {names[0]: 1, names[1]: None, names[2]: 1, names[3]: None}


def test_resume_without_a_cache_is_refused_when_the_module_or_its_mutants_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"pkg.m.x_f__mutmut_{i}" for i in range(1, 5)]
    mm, module = _fake_run_dir(tmp_path, monkeypatch, names[:3])  # one mutant fewer than the stored run had
    with pytest.raises(SystemExit, match=r"^cannot resume src/pkg/m.py: 3 mutants generated, the stored run had 4 "):
        mutation._seed_from_results(module, mm)
    (mutation.ROOT / module).write_text("def f():\n    return 2\n")  # edited since the run, not committed
    with pytest.raises(SystemExit, match=r"^cannot resume src/pkg/m.py: it has uncommitted edits since its stored run"):
        mutation._seed_from_results(module, mm)


def test_resume_after_a_committed_change_retests_every_mutant_of_the_changed_functions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fix committed after the stored run (C.g edited): f's kills stand, its survivor and
    unchecked mutant are retested, and every mutant of C.g (renumbered by the edit) is tested."""
    import os
    import subprocess

    from mutmut.mutation.data import SourceFileMutationData

    f = [f"pkg.m.x_f__mutmut_{i}" for i in range(1, 5)]
    g = [f"pkg.m.xǁCǁg__mutmut_{i}" for i in range(1, 4)]
    mm, module = _fake_run_dir(tmp_path, monkeypatch, f + g, total=6)
    source = (mutation.ROOT / module).read_text()
    (mutation.ROOT / module).write_text(source.replace("return 2", "return 2 + 0"))
    later = {**os.environ, "GIT_AUTHOR_DATE": "2026-12-03T11:00:00Z", "GIT_COMMITTER_DATE": "2026-12-03T11:00:00Z"}
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "fix g"], cwd=mutation.ROOT,
                   check=True, env=later)
    assert mutation._seed_from_results(module, mm) == 2
    data = SourceFileMutationData(path=Path(module))
    data.load()
    assert data.exit_code_by_key == {f[0]: 1, f[1]: None, f[2]: 1, f[3]: None, **dict.fromkeys(g)}
    assert mutation._function_sources(source) == {"x_f": "def f():\n    return 1", "xǁCǁg": "    def g(self):\n        return 2"}
