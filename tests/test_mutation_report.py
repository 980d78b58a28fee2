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
        "mutmut": "3.8.1", "max_children": 1,
    }))
    text = mutation.render()
    assert "| `src/fedpeft/m.py` | 8 | 2 | 0 | 0 | 0 | 10 | 1 | 12 | 2026-12-03 10:00 UTC | 1.0/2.0/3.0 |" in text
    assert "only a log message" in text and text.count("**not explained: needs a test**") == 1
    assert "mutmut 3.8.1" in text and "2 shared CPU cores" in text
