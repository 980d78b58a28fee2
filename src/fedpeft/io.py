"""Atomic file writes and the one ``.npz`` format fedpeft stores arrays in (ground floor).

Ledgers, checkpoints, stored releases, run files and reports are written through
:func:`atomic_write`: readers see the old file or the new one, never a mix, and a crash
mid-write leaves the old one. Arrays go to disk only as :func:`save_array_groups` writes them:
named groups in one ``.npz`` plus a JSON object, read back without pickles.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["atomic_write", "atomic_write_text", "file_lock", "load_array_groups", "save_array_groups"]


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(fh)`` on a temporary file next to ``path``, fsync it, rename it over ``path``.

    Readers see the old or the new file, never a mix; a crash mid-write leaves the old one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created; blocks until free; released on exit or death)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    data = text.encode("utf-8")
    atomic_write(path, lambda fh: fh.write(data))


_META = "__meta__"


def save_array_groups(path: Path, meta: dict[str, Any], groups: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """An ``.npz`` of named array groups (``group/name``) plus one JSON object, written atomically."""
    arrays: dict[str, np.ndarray] = {_META: np.array(json.dumps(meta))}
    for group, named in groups.items():
        arrays.update({f"{group}/{k}": np.ascontiguousarray(v) for k, v in named.items()})
    atomic_write(path, lambda fh: np.savez(fh, **arrays))  # type: ignore[arg-type]


def load_array_groups(path: Path, groups: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """``(meta, {group: arrays})`` of a file written by :func:`save_array_groups` (no pickles)."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data[_META]))
        out = {g: {k[len(g) + 1:]: data[k].copy() for k in data.files if k.startswith(g + "/")} for g in groups}
    return meta, out
