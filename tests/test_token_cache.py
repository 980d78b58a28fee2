"""The client's token cache (src/fedpeft/client/token_cache.py): hits, invalidation, damage.

Each test counts the task type's ``encode`` calls: a hit encodes nothing; a changed input
(examples, labels, tokenizer, max length) encodes again; a damaged or tampered cache file
is rebuilt (and rewritten), never used.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedpeft.client import token_cache as tc
from fedpeft.data.sources import TextDataset
from fedpeft.io import load_array_groups, save_array_groups
from fedpeft.tasks.registry import get as get_task

SEQ_CLS = get_task("seq-cls")
_REAL_ENCODE = type(SEQ_CLS).encode


def _fresh(tok: Any, data: TextDataset, max_length: int) -> Any:
    """The encoding computed now, uncounted."""
    return _REAL_ENCODE(SEQ_CLS, tok, data, max_length)


@pytest.fixture()
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture()
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of real encodings, counted; memory emptied before and after."""
    tc.clear_memory()
    seen: list[int] = []
    def counting(self: Any, tok: Any, data: TextDataset, max_length: int) -> Any:
        seen.append(len(data))
        return _REAL_ENCODE(self, tok, data, max_length)

    monkeypatch.setattr(type(SEQ_CLS), "encode", counting)
    yield seen
    tc.clear_memory()


def _data(texts: tuple[str, ...] = ("a good film", "dull and long", "fine"), labels: tuple[int, ...] = (1, 0, 1)
          ) -> TextDataset:
    return TextDataset(texts, np.asarray(labels, dtype=np.int64), ("rotten", "fresh"))


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hits_from_memory_then_from_disk(tokenizer: Any, calls: list[int], tmp_path: Path) -> None:
    first = tc.cached_encoding(tokenizer, _data(), 16, SEQ_CLS, tmp_path)
    assert calls == [3] and len(list(tmp_path.glob("tokens-*.npz"))) == 1
    assert tc.cached_encoding(tokenizer, _data(), 16, SEQ_CLS, tmp_path) is first  # memory
    tc.clear_memory()  # a fresh process: the node's disk
    again = tc.cached_encoding(tokenizer, _data(), 16, SEQ_CLS, tmp_path)
    assert calls == [3] and _equal(again, first)
    assert _equal(first, _fresh(tokenizer, _data(), 16))


@pytest.mark.parametrize("change", ["text", "label", "label-names", "max-length", "tokenizer-vocab",
                                    "tokenizer-padding-side"])
def test_a_changed_input_is_encoded_again(tokenizer: Any, calls: list[int], tmp_path: Path, change: str) -> None:
    tc.cached_encoding(tokenizer, _data(), 16, SEQ_CLS, tmp_path)
    tc.clear_memory()
    data, max_length, tok = _data(), 16, tokenizer
    if change == "text":
        data = _data(texts=("a good film", "dull and long", "fine!"))
    elif change == "label":
        data = _data(labels=(1, 1, 1))
    elif change == "label-names":
        data = TextDataset(data.texts, data.labels, ("negative", "positive"))
    elif change == "max-length":
        max_length = 8
    elif change == "tokenizer-vocab":
        tok = copy.deepcopy(tokenizer)
        tok.add_tokens(["dull"])  # "dull" now encodes as one new id
    else:
        tok = copy.deepcopy(tokenizer)
        tok.padding_side = "left"
    got = tc.cached_encoding(tok, data, max_length, SEQ_CLS, tmp_path)
    assert calls == [3, 3], f"{change}: the old encoding was reused"
    assert _equal(got, _fresh(tok, data, max_length))
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 2


def _damage_bytes(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _tamper_arrays(path: Path) -> None:  # a valid file whose ids changed but whose checksum did not
    meta, groups = load_array_groups(path, ("batch",))
    groups["batch"]["input_ids"][0, 1] += 1
    save_array_groups(path, meta, groups)


def _other_key(path: Path) -> None:  # a valid file recorded for another key
    meta, groups = load_array_groups(path, ("batch",))
    save_array_groups(path, {**meta, "key": "0" * 64}, groups)


@pytest.mark.parametrize("damage", [_damage_bytes, _tamper_arrays, _other_key, lambda p: p.write_bytes(b""),
                                    lambda p: p.write_bytes(p.read_bytes()[:100])],
                         ids=["flipped-byte", "tampered-ids", "other-key", "empty", "truncated"])
def test_a_damaged_cache_file_is_rebuilt_not_trusted(tokenizer: Any, calls: list[int], tmp_path: Path,
                                                     damage: Any) -> None:
    good = tc.cached_encoding(tokenizer, _data(), 16, SEQ_CLS, tmp_path)
    (path,) = tmp_path.glob("tokens-*.npz")
    damage(path)
    tc.clear_memory()
    got = tc.cached_encoding(tokenizer, _data(), 16, SEQ_CLS, tmp_path)
    assert calls == [3, 3] and _equal(got, good)
    tc.clear_memory()  # and the rebuilt file is good again
    assert _equal(tc.cached_encoding(tokenizer, _data(), 16, SEQ_CLS, tmp_path), good) and calls == [3, 3]


def test_a_simulated_client_writes_nothing(tokenizer: Any, calls: list[int], tmp_path: Path) -> None:
    tc.cached_encoding(tokenizer, _data(), 16, SEQ_CLS, None)
    assert tc.cached_encoding(tokenizer, _data(), 16, SEQ_CLS, None) is not None and calls == [3]
    assert not list(tmp_path.iterdir())
