"""The heterogeneous-client memory model for decoders (src/fedpeft/sim/hetero/memory_decoder.py):
the family dispatch, parameter counts against real models, the terms' scaling, and the
estimate against measured peak RSS of causal-LM training steps on CPU (the tiny test Llama,
an activation-heavy random Llama, and, slow, the real SmolLM2-135M)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fedpeft.config import ConfigError
from fedpeft.sim.hetero.memory import (
    DecoderShape,
    EncoderShape,
    TrainShape,
    estimate,
    model_shape,
    model_shape_from_dir,
    model_type_of,
)

QV = ("q_proj", "v_proj")
RSS_TOLERANCE = 0.10
"""Estimate / measured peak-RSS increase must lie in [1 - tol, 1 + tol] (docs/causal-lm.md says the same)."""

SMOL = DecoderShape(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152,
                    tied_embeddings=True)


# ---- dispatch -----------------------------------------------------------------------------------
def test_family_is_chosen_from_the_config() -> None:
    bert = SimpleNamespace(model_type="bert", num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                           intermediate_size=64, vocab_size=100)
    assert isinstance(model_shape(bert, 2, "seq-cls"), EncoderShape)
    llama = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 64, "vocab_size": 100}
    shape = model_shape(SimpleNamespace(model_type="llama", **llama), 0, "causal-lm", "bfloat16")
    assert isinstance(shape, DecoderShape) and shape.dtype == "bfloat16" and shape.head_dim == 8
    # no model_type: the architectures entry names the family
    assert model_type_of(SimpleNamespace(architectures=["LlamaForCausalLM"])) == "llama"
    assert model_type_of(SimpleNamespace(architectures=["XLMRobertaForSequenceClassification"])) == "xlm-roberta"
    assert isinstance(model_shape(SimpleNamespace(architectures=["MistralForCausalLM"], **llama), 0, "causal-lm"),
                      DecoderShape)
    with pytest.raises(ConfigError, match=r"model\.path='gpt2'.*knows model_type .*llama"):
        model_shape(SimpleNamespace(model_type="gpt2"), 0, "causal-lm")
    with pytest.raises(ConfigError, match="no model_type"):
        model_shape(SimpleNamespace(), 0, "causal-lm")
    with pytest.raises(ConfigError, match="model.dtype"):
        model_shape(SimpleNamespace(model_type="llama", **llama), 0, "causal-lm", "float16")
    with pytest.raises(ValueError, match="float32 only"):
        model_shape(bert, 2, "seq-cls", "bfloat16")
    with pytest.raises(ValueError, match="no language-model head"):
        model_shape(bert, 0, "causal-lm")
    with pytest.raises(ConfigError, match=r"adapter\.target_modules='query'"):
        estimate(SMOL, TrainShape(1, 8, 4, ("query",)))


def test_model_dir_and_torch_dtype_names(tiny_llama_dir: Path) -> None:
    shape = model_shape_from_dir(tiny_llama_dir, 0, "causal-lm", "torch.bfloat16")
    assert isinstance(shape, DecoderShape) and shape.dtype == "bfloat16" and shape.tied_embeddings
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.head_dim) == (2, 32, 2, 1, 16)


# ---- parameters against real models --------------------------------------------------------------
@pytest.mark.parametrize("variant", [
    {}, {"tie_word_embeddings": False}, {"attention_bias": True, "mlp_bias": True},
    {"num_key_value_heads": 4, "head_dim": 24},
])
def test_parameter_count_is_the_models(variant: dict[str, Any]) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    conf = LlamaConfig(**{"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
                          "num_labels": 3, **variant})
    lm = LlamaForCausalLM(conf)
    shape = model_shape(conf, 0, "causal-lm")
    assert shape.base_params == sum(p.numel() for p in lm.parameters())
    half = model_shape(conf, 0, "causal-lm", "bfloat16")
    lora_a = 2 * (64 + 64)  # one row of A per target per layer, float32
    assert estimate(half, TrainShape(1, 4, 1, QV)).weights == sum(p.nbytes for p in lm.to(torch.bfloat16).parameters()) + 4 * lora_a
    # a decoder classifier: no LM head (tied or not); the task type's head instead
    cls = LlamaForSequenceClassification(conf)
    seq = model_shape(conf, 3, "seq-cls")
    pooler = 64 * 64 + 64  # seq-cls's head_memory counts BERT's pooler and a bias: a small over-count
    assert seq.base_params == sum(p.numel() for p in cls.parameters()) + pooler + 3


# ---- scaling ------------------------------------------------------------------------------------------
def test_decoder_terms_scale_as_documented() -> None:
    base = estimate(SMOL, TrainShape(8, 128, 8, QV))
    assert base.logits == 12 * 8 * 128 * 49152  # three float32 copies of the vocabulary logits
    double_b = estimate(SMOL, TrainShape(16, 128, 8, QV))
    assert double_b.logits == 2 * base.logits and double_b.activations == 2 * base.activations
    assert double_b.weights == base.weights and double_b.optimizer == base.optimizer
    # the attention scores are quadratic in the sequence length, the rest linear
    s2 = estimate(SMOL, TrainShape(8, 256, 8, QV))
    quadratic = 30 * 8 * 9 * 4  # layers x batch x heads x float32, per s**2
    assert s2.activations - 2 * base.activations == quadratic * (256**2 - 2 * 128**2)
    # GQA: v_proj's B is kv_heads * head_dim = 192 rows, q_proj's 576
    assert base.adapter == 4 * 2 * 30 * 8 * (576 + 192)
    assert estimate(SMOL, TrainShape(8, 128, 8, QV, dp=False)).dp_per_sample == 0
    assert base.dp_per_sample == 4 * 9 * 30 * 8 * (576 + 192)
    # bfloat16: half the frozen weights, LoRA A still float32; logits the same (the loss upcasts)
    half = estimate(replace(SMOL, dtype="bfloat16"), TrainShape(8, 128, 8, QV))
    lora_a = 4 * 30 * 8 * 2 * 576
    assert half.weights - lora_a == (base.weights - lora_a) // 2 and half.logits == base.logits
    assert half.activations < base.activations
    # untied: the LM head's V x h more weights; the weights alone are the model card's 135 M
    assert estimate(replace(SMOL, tied_embeddings=False), TrainShape(8, 128, 8, QV)).weights - base.weights \
        == 4 * 49152 * 576
    assert 134e6 < SMOL.base_params < 135e6
    # small LMs: the logits beat the activations kept for backward at this length
    assert base.logits > 0.5 * base.activations and base.workspace == 0


# ---- against measured peak RSS ----------------------------------------------------------------------
def _measure(cases: list[dict[str, Any]], repeats: int, timeout: int) -> list[dict[str, Any]]:
    """Run tests/decoder_rss_probe.py in a fresh process with glibc's mmap threshold fixed
    (freed tensors leave RSS, so the peak tracks live memory; see the BERT check in
    tests/test_hetero_models.py) and a minimal environment."""
    keep = ("PATH", "HOME", "LANG", "TMPDIR", "FEDPEFT_CACHE")
    root = Path(__file__).parents[1]
    env = {**{k: os.environ[k] for k in keep if k in os.environ}, "HF_HUB_OFFLINE": "1",
           "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}"}
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("decoder_rss_probe.py")), json.dumps(cases),
                          str(repeats)], capture_output=True, text=True, env=env, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def _check(results: list[dict[str, Any]]) -> list[str]:
    """Every case's estimate against its measurement; returns a line per case (for the failure message)."""
    lines, bad = [], []
    for got in results:
        shape = model_shape_from_dir(got["model"], 0, "causal-lm", got["dtype"])
        # the probe's rows are half prompt: the loss reads the logits from the first target on
        kept = (got["s"] - got["s"] // 2 + 1) / got["s"]
        est = estimate(shape, TrainShape(got["b"], got["s"], got["r"], tuple(got["targets"]), got["dp"],
                                         loss_positions=kept))
        ratio = est.batch_dependent / got["measured"]
        line = (f"{Path(got['model']).name} {got['dtype']} dp={got['dp']} b={got['b']} s={got['s']}: "
                f"estimate {est.batch_dependent / 1e6:.1f} MB (logits {est.logits / 1e6:.1f}, activations "
                f"{est.activations / 1e6:.1f}) vs measured {got['measured'] / 1e6:.1f} MB -> {ratio:.3f}")
        lines.append(line)
        if not (1 - RSS_TOLERANCE <= ratio <= 1 + RSS_TOLERANCE):
            bad.append(line)
        assert got["measured"] > 10e6  # large enough to dominate RSS noise
        # the weights and the trainable values are exact: the real model's tensors, dtype included
        assert est.weights == got["frozen_bytes"], line
        assert est.adapter == 2 * 4 * got["trainable"], line
    assert not bad, "\n".join(["outside the tolerance:", *bad, "all:", *lines])
    return lines


def _random_llama(path: Path, **conf: Any) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(max_position_embeddings=1024, **conf)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shaped_llama_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two random Llamas that stress the other terms: ``wide`` (3 layers, a 512-token
    vocabulary, untied: the kept activations outweigh the logits) and ``heads`` (one layer of
    8 heads of 8: at 512 tokens the last layer's score gradients set the peak, the workspace)."""
    root = tmp_path_factory.mktemp("shaped-llamas")
    return {
        "wide": _random_llama(root / "wide", vocab_size=512, hidden_size=128, intermediate_size=384,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                              tie_word_embeddings=False),
        "heads": _random_llama(root / "heads", vocab_size=256, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2,
                               tie_word_embeddings=True),
    }


@pytest.mark.slow  # measures peak RSS in child processes, ~40-50 s on 2 cores
@pytest.mark.guarantee  # the README's memory-model claim: CI always runs it
def test_decoder_estimate_matches_measured_cpu_peak(tiny_llama_dir: Path, shaped_llama_dirs: dict[str, Path]) -> None:
    """The batch-dependent part (per-sample gradients + activations + logits + workspace)
    against the peak-RSS increase of one forward+backward+Adam step, with and without DP,
    float32 and bfloat16: the tiny test Llama (its 30 k-token vocabulary: the logits
    dominate) and the two shaped Llamas (activations; workspace)."""
    tiny = {"model": str(tiny_llama_dir), "r": 4, "targets": list(QV), "b": 8, "s": 64}
    wide = {"model": str(shaped_llama_dirs["wide"]), "r": 8, "targets": ["q_proj", "v_proj", "down_proj"],
            "b": 8, "s": 192}
    heads = {"model": str(shaped_llama_dirs["heads"]), "r": 8, "targets": list(QV), "b": 2, "s": 512}
    cases = [{**tiny, "dtype": "float32", "dp": True}, {**tiny, "dtype": "float32", "dp": False},
             {**wide, "dtype": "float32", "dp": True}, {**wide, "dtype": "bfloat16", "dp": True},
             {**heads, "dtype": "float32", "dp": False}, {**heads, "dtype": "bfloat16", "dp": True}]
    print("\n".join(_check(_measure(cases, repeats=2, timeout=600))))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_smollm2_estimate_matches_measured_cpu_peak() -> None:
    """The same check on the real SmolLM2-135M (the default causal LM, 30 layers, GQA, tied
    embeddings), float32 with and without DP, at 4 x 64 and 2 x 128 tokens. (bfloat16 is
    checked on the wide Llama above: a SmolLM2 bfloat16 step takes minutes on a CPU without
    bfloat16 matrix units.)"""
    from fedpeft.config import ModelConfig
    from fedpeft.tasks.lm_model import causal_lm_path

    smol = {"model": str(causal_lm_path(ModelConfig())), "r": 8, "targets": list(QV), "dtype": "float32"}
    cases = [{**smol, "dp": True, "b": 4, "s": 64}, {**smol, "dp": False, "b": 4, "s": 64},
             {**smol, "dp": True, "b": 2, "s": 128}]
    print("\n".join(_check(_measure(cases, repeats=2, timeout=1800))))
