"""A tiny random BERT with MiniLM's tokenizer, for fast tests of the real code paths."""

from __future__ import annotations

import shutil
from pathlib import Path


def make_tiny_model(directory: Path, layers: int = 2, hidden: int = 32) -> Path:
    """Write a randomly initialised BERT (a few hundred thousand weights) to ``directory``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from task.model import default_model_path

    src = default_model_path()
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, directory / name)
    config = BertConfig(
        vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=128, num_labels=2,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory
