"""Shared fixtures: a tiny random BERT (fast) and small configs on the real data."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FEDPEFT_PROGRESS", "0")
# Simulated clients' node secrets (src/fedpeft/client/node_store.py): never in the user's home from tests.
os.environ.setdefault("FEDPEFT_SECRET_HOME", tempfile.mkdtemp(prefix="fedpeft-test-secrets-"))
# Calibrations are computed, not read from a disk cache (tests/test_calibration_cache.py switches it on).
os.environ.setdefault("FEDPEFT_CALIBRATION_CACHE", "off")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import make_tiny_llama, make_tiny_model, write_instructions  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def still_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT without dropout: per-example gradients are then exactly reproducible."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert-nodrop"), dropout=0.0)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama decoder with a chat template (the causal-LM task type's test model)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def instructions_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 prompt/response pairs in two sources (``colour``, ``count``), one-word answers."""
    return write_instructions(tmp_path_factory.mktemp("instructions") / "train.jsonl")


@pytest.fixture()
def lm_cfg(tiny_llama_dir: Path, instructions_file: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A small, fast causal-LM configuration: the tiny Llama on the two-source instruction file."""
    from fedpeft.load import parse_config

    return parse_config({
        "task_type": "causal-lm", "model.path": str(tiny_llama_dir), "model.max_length": 32,
        "model.max_new_tokens": 4, "data.path": str(instructions_file), "data.test_size": 12,
        "train.clients": 2, "train.rounds": 2, "train.batch_size": 8, "train.local_steps": 2, "train.lr": 0.01,
        "output_dir": str(tmp_path / "run"),
    })


@pytest.fixture()
def tiny_cfg(tiny_model_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A small, fast configuration on Rotten Tomatoes with the tiny model."""
    from fedpeft.load import parse_config

    return parse_config({
        "model.path": str(tiny_model_dir), "model.max_length": 24,
        "data.examples_per_client": 96, "data.test_size": 64,
        "train.rounds": 2, "train.batch_size": 32, "train.local_steps": 2,
        "output_dir": str(tmp_path / "run"),
    })


@pytest.fixture()
def flwr_identity():  # type: ignore[no-untyped-def]
    """Flower's Message() needs a task identity outside its runtimes (as run_simulation sets)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    yield TaskIdentity
