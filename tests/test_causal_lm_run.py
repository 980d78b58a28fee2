"""A causal-LM federation end to end on the tiny Llama: the run directory's contract (metrics
with the task's own columns, initial evaluation, samples, ledgers, checkpoint, PEFT adapter),
`fedpeft generate`, and the exported adapter reloaded by PEFT itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedpeft.cli.main import main


@pytest.fixture(scope="module")
def lm_run(tiny_llama_dir: Path, instructions_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two rounds, two clients (one source each, by-column), DP-SGD at epsilon 8."""
    out = tmp_path_factory.mktemp("lm-run") / "run"
    rc = main(["simulate", "--task", "causal-lm", "--model", str(tiny_llama_dir), "--data", str(instructions_file),
               "--clients", "2", "--rounds", "2", "--epsilon", "8", "--test-size", "12", "--local-steps", "2",
               "--batch-size", "8", "--max-length", "32", "--set", "model.max_new_tokens=4",
               "--output-dir", str(out)])
    assert rc == 0
    return out


def test_run_directory_has_the_tasks_columns_and_dp_accounting(lm_run: Path) -> None:
    rows = [json.loads(line) for line in (lm_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        for column in ("exact_match", "loss", "perplexity"):
            assert column in row
        assert set(row["exact_match_per_task"]) == {"colour", "count"}  # the held-out split's strata
        assert 0 < row["epsilon"] <= 8.0 + 1e-9 and row["epsilon_unit"].startswith("example-level")
        assert row["clients_accepted"] == 2
    initial = json.loads((lm_run / "initial_eval.json").read_text())
    assert initial["round"] == 0 and "exact_match" in initial
    assert rows[-1]["loss"] < initial["loss"]  # the federation learned something on held-out data
    samples = [json.loads(line) for line in (lm_run / "samples" / "round-002.jsonl").read_text().splitlines()]
    assert samples and {"task", "prompt", "reference", "generated"} <= set(samples[0])
    assert sorted(p.name for p in (lm_run / "ledger").glob("client-*.json")) == ["client-0.json", "client-1.json"]
    assert (lm_run / "checkpoint.npz").is_file()
    # the server decided model.dtype=auto once (this CPU host: float32) and sent that to every client
    assert 'dtype = "float32"' in (lm_run / "config.toml").read_text()


def test_the_server_decides_the_base_dtype_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16-capable GPU server resolves auto to bfloat16 for everyone (CPU-only clients would
    otherwise load float32 weights and derive other frozen factors); explicit values stay."""
    from fedpeft.load import parse_config
    from fedpeft.tasks.registry import task_for

    cfg = parse_config({"task_type": "causal-lm"})
    assert cfg.model.dtype == "auto"
    assert task_for(cfg).resolve_config(cfg).model.dtype == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    resolved = task_for(cfg).resolve_config(cfg)
    assert resolved.model.dtype == "bfloat16" and resolved.model.path == cfg.model.path
    explicit = parse_config({"task_type": "causal-lm", "model": {"dtype": "float32"}})
    assert task_for(explicit).resolve_config(explicit) == explicit
    seq = parse_config()
    assert task_for(seq).resolve_config(seq) == seq


def test_exported_adapter_reloads_with_peft_and_generates_what_fedpeft_generate_does(
        lm_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedpeft.server.generate import load_run_model
    from fedpeft.tasks.generation import generate_texts

    config = json.loads((lm_run / "adapter" / "adapter_config.json").read_text())
    base_dir = config["base_model_name_or_path"]
    assert (Path(base_dir) / "config.json").is_file()  # a directory transformers opens by itself
    prompt = "what colour is the red ball?"
    chat = load_run_model(lm_run)
    ours = chat.reply(prompt, 4)
    assert main(["generate", str(lm_run), "--prompt", prompt, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == ours

    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    for peft_model in (PeftModel.from_pretrained(base, lm_run / "adapter"),
                       AutoPeftModelForCausalLM.from_pretrained(lm_run / "adapter")):
        theirs = generate_texts(peft_model, tok, [chat.prompt_ids(prompt)], 4, torch.device("cpu"))[0]
        assert theirs == ours
    # the adapter matters: the trained B is not zero, so the federated weights were loaded
    lora_b = [p for n, p in PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), lm_run / "adapter").named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b)


def test_generate_refuses_a_classification_run(tiny_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fedpeft.config import config_to_toml

    run = tmp_path / "cls"
    run.mkdir()
    (run / "config.toml").write_text(config_to_toml(tiny_cfg))
    assert main(["generate", str(run), "--prompt", "hi"]) == 2


def test_task_and_tasks_are_never_abbreviations_of_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    from fedpeft.cli.common import build_parser

    args = build_parser().parse_args(["simulate", "--task", "causal-lm"])
    assert args.task == "causal-lm" and args.tasks is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "--ta", "causal-lm"])  # no prefix matching
    assert "unrecognized arguments" in capsys.readouterr().err
