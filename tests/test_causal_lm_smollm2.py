"""The real default causal LM, SmolLM2-135M-Instruct (slow: converted once, ~135 M weights):
it answers through its own chat template, and one federated round with DP-SGD runs on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def test_smollm2_answers_through_its_chat_template() -> None:
    from fedpeft.config import ModelConfig
    from fedpeft.tasks.generation import generate_texts
    from fedpeft.tasks.lm_model import causal_lm_path, load_causal_lm, load_lm_tokenizer

    cfg = ModelConfig()
    path = causal_lm_path(cfg)
    assert (path / "config.json").is_file() and list(path.glob("*.safetensors"))
    model, tok = load_causal_lm(cfg), load_lm_tokenizer(cfg)
    assert 134_000_000 <= sum(p.numel() for p in model.parameters()) <= 135_500_000
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    answer = generate_texts(model, tok, [ids], 16, torch.device("cpu"))[0]
    assert "Paris" in answer


def test_one_dp_round_on_smollm2(tmp_path: Path) -> None:
    from fedpeft.cli.main import main

    out = tmp_path / "run"
    rc = main(["simulate", "--task", "causal-lm", "--rounds", "1", "--clients", "3", "--examples-per-client", "16",
               "--local-steps", "1", "--batch-size", "8", "--max-length", "64", "--test-size", "15",
               "--set", "model.max_new_tokens=8", "--output-dir", str(out)])
    assert rc == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["clients_accepted"] == 3 and 0 < row["epsilon"] <= 6.0 + 1e-9
    assert set(row["exact_match_per_task"]) == {"rt", "bbc", "trivia"}
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
