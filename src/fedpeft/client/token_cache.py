"""A client's encoded (tokenised) examples, cached in memory and on the node's own disk.

Every round trains on the same examples, so encoding them (:meth:`fedpeft.tasks.base.TaskType.encode`)
once is enough. The cache key is everything the encoding is a function of:

* the examples themselves (:func:`fedpeft.client.node_store.data_digest`: texts, labels, label
  names -- so a changed file, another column or another label mapping is another key),
* the tokenizer (:func:`tokenizer_fingerprint`: its class, its full serialisation -- vocabulary,
  normaliser, special tokens --, its chat template, init options and padding and truncation sides),
* ``max_length``, the task type's name and :data:`FORMAT`.

On disk (a deployed node: ``<ledger-dir>/cache/tokens-<key>.npz``, written atomically through
:func:`fedpeft.io.save_array_groups`, no pickles) a file is used only if its recorded key,
row count and SHA-256 of every array match; anything else -- a truncated or corrupted file,
another key, a missing array -- is logged, rebuilt and overwritten, never trusted.

Privacy: the cache holds only this node's own examples, on this node's disk, next to its
ledger; it contains no randomness and nothing the server sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeft.client.node_store import data_digest
from fedpeft.data.batching import Batch
from fedpeft.data.sources import TextDataset
from fedpeft.io import load_array_groups, save_array_groups
from fedpeft.tasks.base import TaskType

__all__ = ["FORMAT", "cache_key", "cached_encoding", "clear_memory", "tokenizer_fingerprint"]

log = logging.getLogger("fedpeft.client.token_cache")

FORMAT = 1
_MEMORY: OrderedDict[str, Batch] = OrderedDict()
_MEMORY_ENTRIES = 64  # a simulation worker serves many virtual clients; bounded
_FINGERPRINTS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of what a tokenizer encodes with (module doc), cached per tokenizer object."""
    with contextlib.suppress(TypeError, KeyError):
        return _FINGERPRINTS[tokenizer]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # less the call-time truncation/padding state the last encode call left behind
        spec = json.loads(backend.to_str())
        body = json.dumps({k: v for k, v in spec.items() if k not in ("truncation", "padding")}, sort_keys=True)
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = {"class": type(tokenizer).__name__, "body": hashlib.sha256(body.encode()).hexdigest(),
             "padding_side": getattr(tokenizer, "padding_side", None),
             "truncation_side": getattr(tokenizer, "truncation_side", None),
             "special": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
             "chat_template": getattr(tokenizer, "chat_template", None),
             "init": {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items() if k != "name_or_path"}}
    fp = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    with contextlib.suppress(TypeError):  # not weak-referenceable: computed again next time
        _FINGERPRINTS[tokenizer] = fp
    return fp


def cache_key(tokenizer: Any, data: TextDataset, max_length: int, task_type: TaskType) -> str:
    """The key of this encoding (module doc)."""
    parts = [f"format={FORMAT}", f"task={task_type.name}", f"max_length={max_length}",
             f"tokenizer={tokenizer_fingerprint(tokenizer)}", f"data={data_digest(data)}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _read(path: Path, key: str, rows: int) -> Batch | None:
    """The cached batch, or None when the file is absent or not exactly what ``key`` names."""
    if not path.is_file():
        return None
    try:
        meta, groups = load_array_groups(path, ("batch",))
        arrays = groups["batch"]
        ok = (meta.get("key") == key and meta.get("format") == FORMAT and meta.get("rows") == rows and arrays
              and all(a.shape[:1] == (rows,) for a in arrays.values()) and meta.get("sha256") == _checksum(arrays))
    except Exception:  # noqa: BLE001 - a damaged file of any kind is rebuilt, never trusted
        ok, arrays = False, {}
    if not ok:
        log.warning("token cache %s is damaged or stale; rebuilding it", path.name)
        return None
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def cached_encoding(tokenizer: Any, data: TextDataset, max_length: int, task_type: TaskType,
                    cache_dir: Path | None = None) -> Batch:
    """``task_type.encode(tokenizer, data, max_length)``, from memory, the node's disk, or computed.

    ``cache_dir`` None: memory only (a simulated client; nothing written).
    """
    key = cache_key(tokenizer, data, max_length, task_type)
    if key in _MEMORY:
        _MEMORY.move_to_end(key)
        return _MEMORY[key]
    path = cache_dir / f"tokens-{key[:32]}.npz" if cache_dir is not None else None
    batch = _read(path, key, len(data)) if path is not None else None
    if batch is None:
        batch = task_type.encode(tokenizer, data, max_length)
        if path is not None:
            arrays = {k: v.detach().cpu().numpy() for k, v in batch.items()}
            save_array_groups(path, {"key": key, "format": FORMAT, "rows": len(data), "sha256": _checksum(arrays)},
                              {"batch": arrays})
    _MEMORY[key] = batch
    while len(_MEMORY) > _MEMORY_ENTRIES:
        _MEMORY.popitem(last=False)
    return batch


def clear_memory() -> None:
    """Forget the in-memory entries (tests; a fresh process starts empty)."""
    _MEMORY.clear()
    _FINGERPRINTS.clear()
