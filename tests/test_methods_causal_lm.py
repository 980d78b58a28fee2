"""Every adapter method that is not classification-specific, on the causal-LM task type: a tiny
random Llama (q_proj/v_proj targets, no head, lm_head tied to embed_tokens).

Per method: what trains and what stays frozen (bit-identical after DP steps, the tied output
embedding included); that a few steps learn beyond a random update of the same size; exact
aggregation on the effective weights where the plugin claims it; Opacus's per-example
gradients (a sequence axis in every Linear input) equal to per-example autograd and clipped on
the trainer's DP path; exports that reload; a bfloat16 base. Also: methods that cannot apply
are refused in one line, TexForce's token-level surrogate, and ``fedpeft compare --task
causal-lm``. The federated-LoRA baselines (FedSA-LoRA, RoLoRA, FedEx-LoRA, FLoRA) run the same checks;
a fold method's global state carries its frozen delta, and its exactness is measured against W0.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft.tuners.lora import Linear as LoraLinear
from tiny_model import assert_learns_beyond_random, dp_rng
from tiny_model import to_numpy as _numpy
from torch import nn

from fedpeft.adapters import get as get_plugin
from fedpeft.adapters.abmll import LOCAL_NAMES, BayesLoraLinear
from fedpeft.adapters.base import AdapterPlugin
from fedpeft.adapters.capabilities import FrozenDelta
from fedpeft.adapters.delta_linear import DeltaLinear
from fedpeft.adapters.fedsa_lora import FedSaLoraPlugin
from fedpeft.adapters.ffa_lora_hetero import pad_state
from fedpeft.adapters.lora import LoraPlugin
from fedpeft.adapters.registry import plugins
from fedpeft.adapters.texforce import ppo_clipped_loss
from fedpeft.adapters.triadapt_lora import TriAdaptLinear
from fedpeft.client.trainer import train_local
from fedpeft.config import ConfigError, RunConfig
from fedpeft.data.batching import Batch
from fedpeft.load import parse_config
from fedpeft.tasks.chat import IGNORE
from fedpeft.tasks.registry import get as get_task

TASK = get_task("causal-lm")
CPU = torch.device("cpu")
METHODS = ("ffa_lora", "lora", "nola", "sara", "soka", "osft", "triadapt_lora", "abmll", "ffa_lora_hetero", "texforce",
           "fedsa_lora", "rolora", "fedex_lora", "flora")
PEFT_METHODS = {"ffa_lora", "lora", "ffa_lora_hetero", "texforce",  # exported with save_pretrained
                "fedsa_lora", "rolora", "fedex_lora", "flora"}
ADAPTED = (DeltaLinear, TriAdaptLinear, BayesLoraLinear, LoraLinear)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread: on a model this small, thread hand-offs cost more than they save
    (about 4x less CPU time for this file on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tiny_llama_dir: Path, instructions_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The shared configuration layer (small lengths and batches: the file must stay fast)."""
    return {"task_type": "causal-lm", "model.path": str(tiny_llama_dir), "model.max_length": 32,
            "model.max_new_tokens": 4, "data.path": str(instructions_file), "data.test_size": 12,
            "train.clients": 2, "train.rounds": 2, "train.batch_size": 8, "train.lr": 0.02,
            "output_dir": str(tmp_path_factory.mktemp("clm-methods") / "run")}


def _setup(base: dict[str, Any], method: str, **extra: Any) -> tuple[RunConfig, AdapterPlugin, nn.Module]:
    cfg = parse_config(base, {"adapter.method": method, **extra})
    plugin = get_plugin(method)
    torch.manual_seed(0)
    return cfg, plugin, plugin.attach(TASK.build_model(cfg.model, 0), cfg)


def _examples(cfg: RunConfig, n: int) -> Any:
    pool, _ = TASK.train_test_split(cfg.data, cfg.seed)
    return pool.subset(np.arange(n))


def _batch(cfg: RunConfig, n: int) -> Batch:
    """``n`` training examples as one batch trimmed to its longest row."""
    tok = TASK.load_tokenizer(cfg.model)
    return TASK.chunks(TASK.encode(tok, _examples(cfg, n), cfg.model.max_length), n)[0]


def _frozen(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    out.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return out


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _adapted(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ADAPTED)}


def _base(layer: nn.Module) -> nn.Module:
    return layer.base_layer if hasattr(layer, "base_layer") else layer.base  # type: ignore[return-value]


@torch.no_grad()
def _base_outputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """base(I) of every adapted layer now (before a fold method moves its frozen weight)."""
    model.eval()
    return {n: _base(m)(torch.eye(_base(m).in_features)) for n, m in _adapted(model).items()}  # type: ignore[operator]


@torch.no_grad()
def _delta_w(model: nn.Module, ref: dict[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """Effective weight update of every adapted layer, probed in eval mode: layer(I) - base(I), or
    layer(I) - ``ref`` (the base outputs before a fold method's server folded a delta into it)."""
    model.eval()
    out = {}
    for name, layer in _adapted(model).items():
        lin = _base(layer)
        eye = torch.eye(lin.in_features)  # type: ignore[arg-type]
        out[name] = (layer(eye) - (lin(eye) if ref is None else ref[name])).double().numpy()
    return out


def _global(plugin: AdapterPlugin, model: nn.Module) -> dict[str, np.ndarray]:
    """The model's global state: its reply, plus a fold method's frozen delta (sent down only)."""
    state = _numpy(plugin.trainable_state(model))
    if isinstance(plugin, FrozenDelta):
        state.update(_numpy(plugin.frozen_delta(model)))
    return state


@torch.no_grad()
def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    model.eval()
    return model(**TASK.model_inputs(batch)).logits


@torch.no_grad()
def _eval_loss(model: nn.Module, batch: Batch) -> float:
    model.eval()
    return float(TASK.loss(model, batch))


def _perturb(plugin: AdapterPlugin, model: nn.Module, scale: float = 0.1, seed: int = 0) -> dict[str, np.ndarray]:
    """Install the trainable state plus Gaussian noise (B != 0: every path is exercised). FedSA-LoRA's
    B is local state, not in the reply: it gets one fixed random B (the same for every ``seed``:
    its exactness claim is for a client's own fixed B)."""
    gen = np.random.default_rng(seed)
    state = {k: (v + scale * gen.standard_normal(v.shape)).astype(v.dtype)
             for k, v in _numpy(plugin.trainable_state(model)).items()}
    plugin.load_state(model, {**_global(plugin, model), **state})  # a fold method's delta kept
    if isinstance(plugin, FedSaLoraPlugin):
        fixed = np.random.default_rng(1000)
        plugin.load_local_state(model, {k: (scale * fixed.standard_normal(v.shape)).astype(v.dtype)
                                        for k, v in plugin.local_state(model).items()})
    return state


# ---- what trains ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_attach_adapts_the_targets_and_freezes_the_rest(base: dict[str, Any], method: str) -> None:
    cfg, plugin, model = _setup(base, method)
    adapted = _adapted(model)
    assert sorted(n.split(".")[-1] for n in adapted) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    trainable = _trainable(model)
    assert trainable and all(any(n.startswith(a + ".") for a in adapted) for n in trainable), sorted(trainable)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert inner.lm_head.weight is inner.model.embed_tokens.weight  # still tied, and frozen
    assert not inner.lm_head.weight.requires_grad
    state = plugin.trainable_state(model)
    assert set(state) <= set(trainable) and state
    assert not any(k.rsplit(".", 1)[-1] in LOCAL_NAMES for k in state)
    if method == "rolora":  # round 1 trains B alone (with B = 0, A's gradient is zero)
        assert trainable and all(".lora_B." in n for n in trainable), sorted(trainable)
    if method == "fedsa_lora":  # A and B train; B is local state and never in the reply
        b = {n for n in trainable if ".lora_B." in n}
        assert b and b == set(plugin.local_state(model)) and not b & set(state) and len(state) == len(b)
    plain = TASK.build_model(cfg.model, 0)  # every method starts at the base model
    batch = _batch(cfg, 3)
    torch.testing.assert_close(_logits(model, batch), _logits(plain, batch), rtol=1e-4, atol=1e-4)
    _, _, again = _setup(base, method)
    assert plugin.frozen_fingerprint(model) == plugin.frozen_fingerprint(again)


@pytest.mark.parametrize("method", METHODS)
def test_only_the_configured_target_modules_are_adapted(base: dict[str, Any], method: str) -> None:
    _, _, model = _setup(base, method, **{"adapter.target_modules": "k_proj,down_proj"})
    assert sorted(n.split(".")[-1] for n in _adapted(model)) == ["down_proj", "down_proj", "k_proj", "k_proj"]
    with pytest.raises(ConfigError, match="adapter.target_modules"):
        _setup(base, method, **{"adapter.target_modules": "query,value"})  # BERT's names: nothing on a Llama


# ---- it learns -----------------------------------------------------------------------------
LEARN_OPTIONS = {  # more trainable entries than the defaults give on a 32-wide model
    "sara": {"adapter.options.fraction": 0.1}, "triadapt_lora": {"adapter.options.init_rank": 8},
}


@pytest.mark.parametrize("method", [m for m in METHODS if m != "texforce"])
def test_a_few_steps_learn_beyond_a_random_update_of_the_same_size(base: dict[str, Any], method: str) -> None:
    """Six plain steps on one fixed batch lower its completion loss by more than 0.5 % and by more
    than three times what a random direction of the same norm (per tensor, on the entries the
    training changed) does. TexForce is tested below instead: on a random 30 k-token vocabulary
    its reward (the sampled token is the reference) is almost never earned."""
    cfg, plugin, model = _setup(base, method, **LEARN_OPTIONS.get(method, {}))
    if method == "ffa_lora_hetero":
        plugin.set_client_rank(model, 4)  # type: ignore[attr-defined]  # a half-rank client learns too
    data = _examples(cfg, 8)
    batch = _batch(cfg, 8)
    assert_learns_beyond_random(
        _trainable(model), lambda: train_local(model, plugin, TASK.load_tokenizer(cfg.model), data, cfg, steps=6,
                                               device=CPU, noise_multiplier=None, seed=0),
        lambda: _eval_loss(model, batch), label=method, min_drop=0.005)


def test_texforce_token_surrogate_is_an_unbiased_gradient_of_the_expected_reward() -> None:
    """At pi = pi_old the PPO surrogate's expected gradient is that of the expected reward, here
    each example's mean over its own completion tokens of pi(reference token) (position t
    predicting token t+1), averaged over examples: a Monte-Carlo check on a 4-token vocabulary."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4, requires_grad=True)
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 2, IGNORE], [IGNORE, 1, 3, 0, IGNORE]])  # 1 and 3 tokens
    probs = logits[:, :-1].softmax(-1).gather(2, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    keep = labels[:, 1:] != IGNORE
    (exact,) = torch.autograd.grad(-((probs * keep).sum(1) / keep.sum(1)).mean(), logits)
    draws = 20000  # the batch repeated: the batch mean is the Monte-Carlo mean over draws
    loss = ppo_clipped_loss(logits.repeat(draws, 1, 1), logits.detach().repeat(draws, 1, 1), labels.repeat(draws, 1),
                            clip=0.2)
    (estimate,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(estimate, exact, rtol=0.0, atol=0.1 * float(exact.abs().max()))
    assert float(exact.abs().max()) > 1e-2


def test_texforce_logs_the_completion_loss_and_trains_only_b(base: dict[str, Any]) -> None:
    cfg, plugin, model = _setup(base, "texforce")
    _perturb(plugin, model)
    batch = _batch(cfg, 4)
    model.eval()  # no dropout in the tiny Llama: the values are comparable
    loss = plugin.loss(model, batch, TASK)
    assert float(loss.detach()) == pytest.approx(float(TASK.loss(model, batch)), rel=1e-5)
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0}
    assert grads and all("lora_B" in n for n in grads)


# ---- frozen parts under DP -----------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_dp_steps_keep_frozen_parts_bit_identical_and_move_the_adapter(base: dict[str, Any], method: str) -> None:
    cfg, plugin, model = _setup(base, method)
    frozen, before = _frozen(model), _numpy(plugin.trainable_state(model))
    result = train_local(model, plugin, TASK.load_tokenizer(cfg.model), _examples(cfg, 16), cfg, steps=2, device=CPU,
                         noise_multiplier=1.0, seed=dp_rng(1))
    assert result.steps == 2 and np.isfinite(result.loss_first) and np.isfinite(result.loss_last)
    now = _frozen(model)
    assert set(now) == set(frozen)
    for name, tensor in now.items():  # the base (tied embeddings too) and seeded/W0-derived parts
        assert torch.equal(tensor, frozen[name]), name
    after = _numpy(plugin.trainable_state(model))
    assert any(not np.array_equal(after[k], before[k]) for k in before)
    assert not any(getattr(p, "grad_sample", None) is not None for p in model.parameters())


# ---- per-example gradients and clipping ----------------------------------------------------
class Replay:
    """Record a random torch function's draws in a batched pass and give each example its own
    draws back in its single-example pass (ABMLL's weight samples, TexForce's actions)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, rows: Callable[[int], slice]) -> None:
        self.real, self.rows = getattr(torch, name), rows
        self.calls: list[torch.Tensor] = []
        self.example: int | None = None
        self.index = 0
        monkeypatch.setattr(torch, name, self)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.example is None:
            self.calls.append(self.real(*args, **kwargs))
            return self.calls[-1]
        out = self.calls[self.index][self.rows(self.example)]
        self.index += 1
        return out

    @contextmanager
    def single(self, example: int) -> Iterator[None]:
        self.example, self.index = example, 0
        try:
            yield
        finally:
            self.example = None


def _replay(monkeypatch: pytest.MonkeyPatch, method: str, batch: Batch) -> Replay | None:
    if method == "abmll":  # one weight sample per example per layer: rows = examples
        return Replay(monkeypatch, "randn", lambda i: slice(i, i + 1))
    if method == "texforce":  # one action per completion token, example after example
        counts = (batch["labels"][:, 1:] != IGNORE).sum(1).tolist()
        ends = np.cumsum([0, *counts])
        return Replay(monkeypatch, "multinomial", lambda i: slice(int(ends[i]), int(ends[i + 1])))
    return None


@pytest.mark.parametrize("method", METHODS)
def test_per_example_gradients_equal_autograd_and_dp_clips_each(base: dict[str, Any], method: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Opacus's per-sample gradients of the plugin's loss (hooks on (batch, seq, hidden) inputs)
    are each example's own gradient, and the DP optimizer applies the mean of those gradients
    each clipped to norm C (noise 0 here)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    cfg, plugin, model = _setup(base, method)
    params = _trainable(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every trainable tensor, ABMLL's local posterior included, away from its start
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    plugin.load_state(model, _global(plugin, model))  # TexForce: pi_old = this policy
    batch = _batch(cfg, 3)
    n = 3
    replay = _replay(monkeypatch, method, batch)
    model.train()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    dp_opt = DPOptimizer(torch.optim.SGD(list(params.values()), lr=0.0), noise_multiplier=0.0, max_grad_norm=1.0,
                         expected_batch_size=n, loss_reduction="mean")
    plugin.loss(gsm, batch, TASK).backward()
    per_sample = {k: p.grad_sample.detach().clone() for k, p in params.items()}
    norms = torch.sqrt(sum((g.reshape(n, -1).double() ** 2).sum(1) for g in per_sample.values()))
    clip = float(norms.median())  # one example is clipped, one is not
    dp_opt.max_grad_norm = clip
    dp_opt.pre_step()
    applied = {k: p.grad.detach().clone() for k, p in params.items()}
    gsm._close()
    own = []
    for i in range(n):
        model.zero_grad(set_to_none=True)
        with replay.single(i) if replay is not None else nullcontext():
            plugin.loss(model, {k: v[i:i + 1] for k, v in batch.items()}, TASK).backward()
        own.append({k: p.grad.detach().clone() for k, p in params.items()})
        scale = max(float(g.abs().max()) for g in own[i].values())
        assert scale > 0, (method, i)
        for k in params:
            torch.testing.assert_close(per_sample[k][i], own[i][k], rtol=1e-4, atol=1e-5 * scale)
    for k in params:
        # Opacus's flat clipping: factor min(1, C / (norm + 1e-6)) per example
        want = sum(g[k] * min(1.0, clip / (float(norms[i]) + 1e-6)) for i, g in enumerate(own)) / n
        torch.testing.assert_close(applied[k], want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in applied.values()))
    assert 0 < float(total) <= clip * (1 + 1e-6)


# ---- aggregation ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", [m for m in METHODS if get_plugin(m).exact_average])
def test_aggregation_is_exact_on_the_effective_weights(base: dict[str, Any], method: str) -> None:
    """The aggregated (and server-stepped) global state's dW equals the weighted mean of the
    clients' dW; ffa_lora_hetero's clients have ranks 8, 4 and 2 (zero-padded by the server)."""
    cfg, plugin, model = _setup(base, method)
    start = _global(plugin, model)
    ref = _base_outputs(model)  # W0: a fold method's server moves the frozen weight
    full = {k: v.shape for k, v in _numpy(plugin.trainable_state(model)).items()}
    states, deltas = [], []
    for k, rank in enumerate((8, 4, 2)):
        plugin.load_state(model, start)
        if method == "ffa_lora_hetero":
            plugin.set_client_rank(model, rank)  # type: ignore[attr-defined]
            with torch.no_grad():
                for p in _trainable(model).values():
                    p[:, :rank].add_(0.05 * torch.randn(p.shape[0], rank, generator=torch.Generator().manual_seed(k)))
        else:
            _perturb(plugin, model, 0.05, seed=k)
        sent = _numpy(plugin.trainable_state(model))  # what the client replies
        states.append(pad_state(sent, full) if method == "ffa_lora_hetero" else sent)
        deltas.append(_delta_w(model, ref))
    weights = [10.0, 30.0, 60.0]
    merged = plugin.server_step(1, plugin.aggregate(states, weights, start), cfg)
    plugin.load_state(model, merged)
    got = _delta_w(model, ref)
    w = np.asarray(weights) / sum(weights)
    assert len(got) == 4
    for name, value in got.items():
        want = sum(wk * d[name] for wk, d in zip(w, deltas, strict=True))
        assert np.abs(want).max() > 1e-4, "the perturbation must change dW"
        np.testing.assert_allclose(value, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


# ---- export --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_the_export_reloads_to_the_same_model(base: dict[str, Any], method: str, tmp_path: Path) -> None:
    """PEFT methods: ``PeftModel.from_pretrained`` on the plain causal LM; the others: their
    file installed with ``load_state`` into a freshly attached model. Same logits either way."""
    cfg, plugin, model = _setup(base, method)
    state = _perturb(plugin, model)
    if method == "triadapt_lora":  # grown ranks: the export must carry the server's masks
        plugin.load_state(model, plugin.server_step(cfg.train.rounds - 1, state, cfg))
    batch = _batch(cfg, 3)
    want = _logits(model, batch)
    plugin.export(model, tmp_path / "adapter")
    if method in PEFT_METHODS:
        from peft import PeftModel

        config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        assert config["task_type"] == "CAUSAL_LM" and set(config["target_modules"]) == {"q_proj", "v_proj"}
        reloaded: nn.Module = PeftModel.from_pretrained(TASK.build_model(cfg.model, 0), tmp_path / "adapter")
    else:
        files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
        if "adapter_model.safetensors" in files:
            from safetensors.numpy import load_file

            state = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
            meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
            assert meta["method"] == method and meta["frozen_fingerprint"] == plugin.frozen_fingerprint(model)
            assert meta["target_modules"] == ["q_proj", "v_proj"] and len(meta["layers"]) == 4
        else:
            assert files == ["adapter_state.npz"]
            with np.load(tmp_path / "adapter" / "adapter_state.npz") as npz:
                state = {k: npz[k] for k in npz.files}
        assert set(plugin.trainable_state(model)) <= set(state)
        _, _, reloaded = _setup(base, method)
        plugin.load_state(reloaded, state)
    torch.testing.assert_close(_logits(reloaded, batch), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, _logits(TASK.build_model(cfg.model, 0), batch), atol=1e-4)  # it matters


# ---- bfloat16 base -------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_a_bfloat16_base_trains_a_float32_adapter(base: dict[str, Any], method: str) -> None:
    """``model.dtype = bfloat16`` (what ``auto`` gives on a GPU): the adapter's tensors stay
    float32 (so small steps accumulate), the base stays bfloat16 and bit-identical, a DP step
    runs through the custom grad samplers."""
    cfg, plugin, model = _setup(base, method, **{"model.dtype": "bfloat16"})
    assert {p.dtype for p in _trainable(model).values()} == {torch.float32}
    assert any(p.dtype == torch.bfloat16 for p in model.parameters())
    frozen, before = _frozen(model), _numpy(plugin.trainable_state(model))
    result = train_local(model, plugin, TASK.load_tokenizer(cfg.model), _examples(cfg, 8), cfg, steps=1, device=CPU,
                         noise_multiplier=1.0, seed=dp_rng(2))
    assert np.isfinite(result.loss_last)
    assert all(torch.equal(t, frozen[n]) for n, t in _frozen(model).items())
    after = _numpy(plugin.trainable_state(model))
    assert any(not np.array_equal(after[k], before[k]) for k in before)
    assert _logits(model, _batch(cfg, 2)).dtype == torch.bfloat16


def test_a_bfloat16_base_does_not_round_the_update_away() -> None:
    """Each entry of this dW is below half a bfloat16 step of its W0 entry, so ``W0 + dW`` in
    bfloat16 is W0 again; the layer computes ``x (W0 + dW)^T`` in float32 and keeps the update."""
    from fedpeft.adapters.sara import SaraLinear

    torch.manual_seed(0)
    base = nn.Linear(4096, 4, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        base.weight.normal_()
    layer = SaraLinear(base, fraction=1.0)  # every entry trainable, in W0's (row-major) order
    delta = (base.weight.float().abs() * 2.0**-10).flatten()
    assert torch.equal((base.weight.float() + delta.view(4, 4096)).to(torch.bfloat16), base.weight)
    with torch.no_grad():
        layer.values.copy_(delta)
    x = torch.ones(2, 4096, dtype=torch.bfloat16)
    with torch.no_grad():
        change = (layer(x).float() - base(x).float())[0]
        want = (x.float() @ delta.view(4, 4096).T)[0]  # about 3.2 per output: 2 to 6 bfloat16 steps of y
    assert layer.values.dtype == torch.float32 and layer(x).dtype == torch.bfloat16
    torch.testing.assert_close(change, want, rtol=0.25, atol=0.0)


# ---- refusals ------------------------------------------------------------------------------
class _LabelsOnly(LoraPlugin):
    name = "labels_only_test"
    task_types = ("seq-cls",)
    task_type_refusal = "it reads class labels"


def test_a_method_declared_for_seq_cls_only_is_refused_in_one_line(base: dict[str, Any], tiny_model_dir: Path) -> None:
    plugin = _LabelsOnly()
    cfg = parse_config(base)
    with pytest.raises(ConfigError) as err:
        plugin.validate_config(cfg)
    message = str(err.value)
    assert "\n" not in message and "adapter.method" in message and "it reads class labels" in message
    assert "causal-lm" in message and "seq-cls" in message
    plugin.validate_config(parse_config({"model.path": str(tiny_model_dir)}))  # the task it declares: fine
    assert "task types: seq-cls (it reads class labels)" in plugin.describe()


def test_every_registered_method_applies_to_causal_lm_or_says_why_not(base: dict[str, Any]) -> None:
    for plugin in plugins():
        if plugin.task_types is None or "causal-lm" in plugin.task_types:
            continue
        assert plugin.task_type_refusal.strip() and "\n" not in plugin.task_type_refusal, plugin.name
        with pytest.raises(ConfigError, match="adapter.method"):
            parse_config(base, {"adapter.method": plugin.name})
    for method in METHODS:  # the methods this file tests are not refused
        declared = get_plugin(method).task_types
        assert declared is None or "causal-lm" in declared, method
        parse_config(base, {"adapter.method": method})


# ---- fedpeft compare -----------------------------------------------------------------------
def test_compare_keeps_the_task_types_defaults_and_reads_the_initial_score(base: dict[str, Any],
                                                                           tmp_path: Path) -> None:
    from fedpeft.cli.common import build_parser
    from fedpeft.cli.compare import _baseline, base_layer
    from fedpeft.sim.compare import SweepSpec, plan_cells

    args = build_parser().parse_args(["compare", "--task", "causal-lm", "--model", base["model.path"],
                                      "--data", base["data.path"], "--test-size", "12"])
    layer = base_layer(args)
    cfg = parse_config(layer)
    assert cfg.task_type == "causal-lm" and cfg.train.rounds == 4 and cfg.train.local_steps == 4
    assert cfg.model.max_length == 128 and cfg.train.batch_size == 16  # causal-lm's own, not seq-cls's sweep sizes
    cells = plan_cells(SweepSpec(("ffa_lora", "sara"), (8.0,), (0,), layer), tmp_path)
    assert _baseline(cells) is None  # nothing measured yet
    for cell, score in zip(cells, (0.25, 0.75), strict=True):
        cell.path.mkdir(parents=True)
        (cell.path / "initial_eval.json").write_text(json.dumps({"round": 0, "exact_match": score}))
    assert _baseline(cells) == pytest.approx(0.5)
    seq = parse_config(base_layer(build_parser().parse_args(["compare", "--model", base["model.path"]])))
    assert seq.task_type == "seq-cls" and seq.model.max_length == 32 and seq.train.batch_size == 64


@pytest.mark.slow
def test_compare_on_the_causal_lm_task_type(tiny_llama_dir: Path, instructions_file: Path, tmp_path: Path) -> None:
    """2 methods x 1 epsilon x 1 seed: the report is judged by exact match and names the initial
    model's score (initial_eval.json) as the baseline."""
    import csv

    from fedpeft.cli.main import main

    out = tmp_path / "sweep"
    rc = main(["-q", "compare", "--task", "causal-lm", "--model", str(tiny_llama_dir), "--data", str(instructions_file),
               "--methods", "ffa_lora,sara", "--epsilons", "8", "--seeds", "1", "--rounds", "1", "--clients", "2",
               "--local-steps", "1", "--batch-size", "8", "--test-size", "12", "--max-length", "32",
               "--set", "model.max_new_tokens=4", "--output-dir", str(out)])
    assert rc == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["method"] for r in rows} == {"ffa_lora", "sara"} and "final_exact_match" in rows[0]
    initial = [json.loads((out / r["run_dir"] / "initial_eval.json").read_text())["exact_match"] for r in rows]
    md = (out / "report.md").read_text()
    assert f"The initial model (round 0: the base model for adapters that start at zero) scores " \
           f"{float(np.mean(initial)):.3f}." in md
    assert "| method | epsilon_target | seeds | lr | exact_match_mean |" in md
    assert all(0 < float(r["epsilon_spent"]) <= 8.0 for r in rows)



def test_a_compare_cell_written_by_the_server_loop_counts_as_finished(base: dict[str, Any], tmp_path: Path) -> None:
    """The server loop writes config.toml with ``model.dtype = auto`` made concrete; the sweep's
    cell must carry the same resolved configuration, or every finished causal-lm cell reads as
    "written under another configuration" (the CI failure of 2026-12-02)."""
    from fedpeft.server.run_dir import RunDir
    from fedpeft.sim.compare import SweepSpec, plan_cells
    from fedpeft.sim.compare.sweep import cell_problem
    from fedpeft.tasks.registry import task_for

    layer = {**base, "model.dtype": "auto", "train.rounds": 1}
    (cell,) = plan_cells(SweepSpec(("ffa_lora",), (8.0,), (0,), layer), tmp_path)
    assert cell.cfg.model.dtype in ("float32", "bfloat16")  # decided once, as the server will
    unresolved = parse_config({**layer, "adapter.method": "ffa_lora", "privacy.epsilon": 8.0, "seed": 0,
                               "adapter.seed": 0, "name": cell.path.name, "output_dir": str(cell.path)})
    assert unresolved.model.dtype == "auto"
    cell.path.mkdir(parents=True)
    RunDir(cell.path).write_config(task_for(unresolved).resolve_config(unresolved))  # what run_federation writes
    (cell.path / "metrics.jsonl").write_text(json.dumps({"round": 1, "clients_accepted": 2}) + "\n")
    assert cell_problem(cell) is None
