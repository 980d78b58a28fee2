"""Calibrated noise multipliers and epsilon figures kept on this machine's disk, shared by its processes.

Calibrating sigma (:func:`fedpeft.privacy.accounting.calibrate_noise`) takes seconds (about
15 accountant evaluations) and every fresh process paid it again: each simulation worker
for its clients, each ``fedpeft simulate`` or ``compare`` cell. The result is a pure
function of public arguments (target epsilon, delta, sample rate, steps, accountant, prior
history, relation) and of the accountant code, so it is cached once per distinct plan in
``$FEDPEFT_CALIBRATION_CACHE`` (default ``$XDG_CACHE_HOME/fedpeft/calibration``, i.e.
``~/.cache/...``; ``off`` disables it). Processes that ask for the same plan at once take a
lock per plan: one calibrates, the others read its result. Epsilon figures
(:func:`fedpeft.privacy.accounting.epsilon_for`, ~0.5 s of CPU each with PLD) are kept the same
way, in its ``epsilon/`` subfolder, keyed by the merged history, delta, accountant and relation.

A file is used only when its recorded arguments equal the requested ones exactly and its
SHA-256 matches; anything else is ignored and overwritten. No randomness is involved and
nothing the server sends is stored: the arguments are the run's public plan.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fedpeft.io import atomic_write_text, file_lock

__all__ = ["FORMAT", "cache_dir", "cached"]

log = logging.getLogger("fedpeft.privacy")

# 2 (2026-12-04): the sigma search's stopping rule was fixed; a format-1 calibration could lie
# up to twice the tolerance below its target (never above it), so those are computed again.
FORMAT = 2


def cache_dir() -> Path | None:
    """Where calibrations are cached, or None when switched off (module doc)."""
    raw = os.environ.get("FEDPEFT_CALIBRATION_CACHE", "")
    if raw.strip().lower() == "off":
        return None
    if raw:
        return Path(raw).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedpeft" / "calibration"


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("opacus", "dp-accounting"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _read(path: Path, args: dict[str, Any]) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
        ok = doc["args"] == args and doc["sha256"] == _digest([doc["args"], doc["result"]])
    except (OSError, ValueError, KeyError, TypeError):
        ok, doc = False, {}
    if not ok:
        if path.exists():
            log.warning("calibration cache %s is damaged or stale; calibrating again", path.name)
        return None
    return dict(doc["result"])


def _locked(path: Path) -> contextlib.AbstractContextManager[None]:
    """One lock file per ``path`` (``.lock`` beside it)."""
    return file_lock(path.with_suffix(".lock"))


def cached(args: dict[str, Any], compute: Callable[[], dict[str, Any]], kind: str = "") -> dict[str, Any]:
    """``compute()`` for these JSON ``args``, from the disk cache when it holds them (module doc);
    ``kind`` names a subfolder (``epsilon``) so each kind of figure is kept apart."""
    root = cache_dir()
    if root is None:
        return compute()
    root = root / kind if kind else root
    args = {**args, "format": FORMAT, "versions": _versions()}
    try:
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"{_digest(args)[:32]}.json"
        with _locked(path):
            if (hit := _read(path, args)) is not None:
                return hit
            result = compute()
            atomic_write_text(path, json.dumps({"args": args, "result": result, "sha256": _digest([args, result])}))
            return result
    except OSError as exc:  # an unwritable cache only costs time
        log.warning("calibration cache unusable (%s); calibrating without it", exc)
        return compute()
