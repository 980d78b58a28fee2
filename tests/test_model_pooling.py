"""Sentence-transformers pooling: `model.pooling=auto` follows the checkpoint's own
1_Pooling/config.json; mean pooling ignores padding and trains under DP-SGD."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_model import dp_rng

from fedpeft.adapters import get
from fedpeft.client.trainer import train_local
from fedpeft.config import ConfigError
from fedpeft.data.sources import train_test_split_for
from fedpeft.load import parse_config
from fedpeft.tasks.model import load_tokenizer
from fedpeft.tasks.pooling import MaskedMeanPooler, pooling_for
from fedpeft.tasks.seq_cls import load_base_model


@pytest.fixture()
def st_model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model declared as a sentence-transformers checkpoint with mean pooling."""
    target = tmp_path / "tiny-st"
    shutil.copytree(tiny_model_dir, target)
    (target / "1_Pooling").mkdir()
    (target / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return target


def test_auto_pooling_follows_the_checkpoint(tiny_model_dir: Path, st_model_dir: Path) -> None:
    assert pooling_for(parse_config({"model.path": str(tiny_model_dir)}).model) == "cls"
    assert pooling_for(parse_config({"model.path": str(st_model_dir)}).model) == "mean"
    assert pooling_for(parse_config({"model.path": str(st_model_dir), "model.pooling": "cls"}).model) == "cls"
    assert pooling_for(parse_config({}).model) == "mean"  # the packaged MiniLM declares mean pooling
    with pytest.raises(ConfigError, match="model.pooling"):
        parse_config({"model.pooling": "max"})


def test_mean_pooling_ignores_padding_and_copies_are_independent(st_model_dir: Path) -> None:
    cfg = parse_config({"model.path": str(st_model_dir)})
    model, other = load_base_model(cfg.model, 2), load_base_model(cfg.model, 2)
    assert isinstance(model.bert.pooler, MaskedMeanPooler)
    tok = load_tokenizer(cfg.model)
    alone = tok(["a quietly moving film"], return_tensors="pt")
    padded = tok(["a quietly moving film", "a much longer second review that forces padding on the first"],
                 padding=True, return_tensors="pt")
    with torch.no_grad():
        a = model(**alone).logits[0]
        b = model(**padded).logits[0]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert other.bert.pooler._mask is None  # the mask hook of one copy never feeds another


def test_mean_pooled_model_trains_under_dp(st_model_dir: Path, tmp_path: Path) -> None:
    cfg = parse_config({"model.path": str(st_model_dir), "model.max_length": 24, "data.examples_per_client": 64,
                        "data.test_size": 32, "train.batch_size": 16, "output_dir": str(tmp_path / "run")})
    pool, _ = train_test_split_for(cfg.data, cfg.seed)
    plugin = get("ffa_lora")
    model = plugin.attach(load_base_model(cfg.model, pool.num_classes), cfg)
    before = {k: v.clone() for k, v in plugin.trainable_state(model).items()}
    result = train_local(model, plugin, load_tokenizer(cfg.model), pool.subset(np.arange(64)),
                         dataclasses.replace(cfg), steps=2, device=torch.device("cpu"), noise_multiplier=1.0, seed=dp_rng(0))
    after = plugin.trainable_state(model)
    assert result.steps == 2 and np.isfinite(result.loss_last)
    assert any(not torch.equal(after[k], before[k]) for k in before if "lora_B" in k)
