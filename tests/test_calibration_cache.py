"""Calibrated sigmas cached on disk (src/fedpeft/privacy/calibration_cache.py).

A plan calibrated once is read back by a fresh process (here: with the in-process cache
cleared) without calibrating again; another plan, a damaged file or a file recorded for
other arguments calibrates again; ``off`` writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import fedpeft.privacy.accounting as accounting
from fedpeft.privacy.accounting import calibrate_noise

PLAN = (6.0, 1e-5, 0.25, 4, "rdp")  # RDP (add-remove): milliseconds


def _cal(*plan: Any) -> Any:
    return calibrate_noise(*(plan or PLAN), relation="add-remove")


def _count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple[Any, ...]]:
    """Replace ``accounting.<name>`` by a wrapper that records each call's arguments."""
    seen: list[tuple[Any, ...]] = []
    real = getattr(accounting, name)

    def counting(*args: Any) -> Any:
        seen.append(args)
        return real(*args)

    monkeypatch.setattr(accounting, name, counting)
    return seen


@pytest.fixture()
def calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[Any, ...]]:
    monkeypatch.setenv("FEDPEFT_CALIBRATION_CACHE", str(tmp_path))
    seen = _count_calls(monkeypatch, "_calibrate")
    calibrate_noise.cache_clear()
    yield seen
    calibrate_noise.cache_clear()


def test_a_plan_is_calibrated_once_per_machine(calls: list[tuple[Any, ...]], tmp_path: Path) -> None:
    first = _cal()
    calibrate_noise.cache_clear()  # a fresh process
    assert _cal() == first and len(calls) == 1
    assert len(list(tmp_path.glob("*.json"))) == 1
    calibrate_noise.cache_clear()
    other = _cal(6.0, 1e-5, 0.25, 5, "rdp")  # another plan: calibrated
    assert len(calls) == 2 and other.noise_multiplier > first.noise_multiplier


@pytest.mark.parametrize("damage", ["garbage", "sigma-edited", "other-args"])
def test_a_damaged_or_foreign_file_is_not_trusted(calls: list[tuple[Any, ...]], tmp_path: Path, damage: str) -> None:
    good = _cal()
    (path,) = tmp_path.glob("*.json")
    doc = json.loads(path.read_text())
    if damage == "garbage":
        path.write_text("{not json")
    elif damage == "sigma-edited":  # a smaller sigma would spend more than planned
        doc["result"]["noise_multiplier"] *= 0.5
        path.write_text(json.dumps(doc))
    else:
        doc["args"]["steps"] = 400
        path.write_text(json.dumps(doc))
    calibrate_noise.cache_clear()
    assert _cal() == good and len(calls) == 2
    calibrate_noise.cache_clear()
    assert _cal() == good and len(calls) == 2  # rewritten good


def test_off_writes_nothing(calls: list[tuple[Any, ...]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDPEFT_CALIBRATION_CACHE", "off")
    _cal()
    calibrate_noise.cache_clear()
    _cal()
    assert len(calls) == 2 and not list(tmp_path.iterdir())


def test_an_epsilon_is_computed_once_per_machine_and_an_edited_one_is_not_trusted(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every simulation worker and every round's budget check asks for the same PLD figures
    (~0.5 s of CPU each): the first process computes one, the others read it (``epsilon/``)."""
    monkeypatch.setenv("FEDPEFT_CALIBRATION_CACHE", str(tmp_path))
    real = accounting._epsilon_uncached
    seen = _count_calls(monkeypatch, "_epsilon_uncached")
    history = [(1.1, 0.25, 4), (1.1, 0.25, 4)]  # merged to one entry of 8 steps before the lookup

    def fresh_process() -> tuple[float, str]:
        accounting._epsilon_of.cache_clear()
        return accounting.epsilon_for(history, 1e-5, "rdp", "add-remove")

    first = fresh_process()
    assert fresh_process() == first and seen == [(((1.1, 0.25, 8),), 1e-5, "rdp", "add-remove")]
    assert first == real(((1.1, 0.25, 8),), 1e-5, "rdp", "add-remove")
    (path,) = (tmp_path / "epsilon").glob("*.json")
    assert not list(tmp_path.glob("*.json"))  # calibrations are kept apart
    doc = json.loads(path.read_text())
    doc["result"]["epsilon"] *= 0.5  # an under-reported spend
    path.write_text(json.dumps(doc))
    assert fresh_process() == first and len(seen) == 2
    monkeypatch.setenv("FEDPEFT_CALIBRATION_CACHE", "off")
    assert fresh_process() == first and len(seen) == 3
    accounting._epsilon_of.cache_clear()
