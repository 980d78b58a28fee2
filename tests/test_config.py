"""Configuration parsing: defaults, layering, round trip, and one-line errors with exit 2."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from fedpeft.cli.main import main
from fedpeft.config import ConfigError, RunConfig, config_hash, config_to_toml
from fedpeft.load import config_from_toml, parse_config


def test_defaults_match_the_design() -> None:
    cfg = parse_config()
    assert cfg.adapter.method == "ffa_lora" and cfg.adapter.rank == 8 and cfg.adapter.alpha == 8
    assert cfg.adapter.target_modules == ("query", "value")
    assert cfg.privacy.epsilon == 6 and cfg.privacy.delta == 1e-5 and cfg.privacy.clip == 1.0
    assert cfg.train.clients == 3
    assert cfg.data.partition == "label-proportions"
    assert cfg.data.label_proportions == ((0.1, 0.9), (0.9, 0.1), (0.5, 0.5))


def test_layers_flat_and_nested_later_wins(tmp_path: Path) -> None:
    cfg = parse_config({"privacy": {"epsilon": 3}}, {"privacy.epsilon": "inf", "train.rounds": "7"})
    assert math.isinf(cfg.privacy.epsilon) and not cfg.privacy.enabled
    assert cfg.train.rounds == 7


def test_toml_round_trip_and_hash() -> None:
    cfg = parse_config({"adapter.rank": 4, "privacy.epsilon": "inf", "data.label_proportions": "0.2,0.8;0.8,0.2;0.5,0.5"})
    text = config_to_toml(cfg)
    tomllib.loads(text)  # valid TOML
    again = config_from_toml(text)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(parse_config({"adapter.rank": 5})) != config_hash(cfg)


def test_label_proportions_tiled_for_other_client_counts() -> None:
    cfg = parse_config({"train.clients": 5})
    assert len(cfg.data.label_proportions) == 5
    assert cfg.data.label_proportions[3] == (0.1, 0.9)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"privacy.epsilon": -1}, "privacy.epsilon"),
        ({"privacy.epsilon": 0}, "privacy.epsilon"),
        ({"privacy.delta": 1}, "privacy.delta"),
        ({"adapter.rank": 0}, "adapter.rank"),
        ({"adapter.rank": 2.5}, "adapter.rank"),
        ({"adapter.method": "nope"}, "adapter.method"),
        ({"data.partition": "random"}, "data.partition"),
        ({"data.path": "/definitely/missing.csv"}, "data.path"),
        ({"train.lr": "fast"}, "train.lr"),
        ({"train.bogus": 1}, "train.bogus"),
        ({"nonsense": 1}, "nonsense"),
        ({"data.label_proportions": "0.5,0.6;0.5,0.5;0.5,0.5"}, "data.label_proportions"),
        ({"train.clients": 2, "data.label_proportions": "0.5,0.5;0.5,0.5;0.5,0.5"}, "data.label_proportions"),
        # huge values are one-line errors, never allocations (the fuzzer once OOM-killed CI
        # with train.clients ~ 10**12: the paper's mixes were tiled per client first)
        ({"train.clients": 10**12}, "train.clients"),
        ({"train.local_steps": 10**12}, "train.local_steps"),
        ({"train.local_epochs": 1e9}, "train.local_epochs"),
        ({"tasks.names": ["rt", "bbc"], "tasks.clients_per_task": 10**12}, "tasks.clients_per_task"),
    ],
)
def test_invalid_values_name_the_key(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert info.value.key == key
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "--epsilon", "-1"],
        ["simulate", "--delta", "1.5"],
        ["simulate", "--rank", "0"],
        ["simulate", "--method", "unknown"],
        ["simulate", "--data", "/no/such/file.csv"],
        ["simulate", "--batch-size", "many"],
        ["simulate", "--set", "novalue"],
        ["simulate", "--unknown-flag", "1"],
        ["simulate", "--config", "/no/such.toml"],
    ],
)
def test_cli_exits_2_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        code = main(argv)
        raise SystemExit(code)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedpeft: error:") and len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_data_columns_and_single_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text("sentence,label\nhello,a\nworld,a\n")
    assert main(["simulate", "--data", str(csv)]) == 2
    assert "data.text_column" in capsys.readouterr().err
    assert main(["simulate", "--data", str(csv), "--text-column", "sentence", "--partition", "iid"]) == 2
    err = capsys.readouterr().err
    assert "at least 2 classes" in err and len(err.strip().splitlines()) == 1


def test_config_file_layer(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[adapter]\nrank = 4\n[privacy]\nepsilon = "inf"\n')
    from fedpeft.cli.main import build_parser, config_from_args

    args = build_parser().parse_args(["simulate", "--config", str(f), "--rank", "16"])
    cfg = config_from_args(args)
    assert cfg.adapter.rank == 16 and not cfg.privacy.enabled
    assert isinstance(cfg, RunConfig)
