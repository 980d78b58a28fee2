"""Step-time and payload benchmarks: DP overhead per Opacus mode, FFA vs LoRA, every method.

All variants of one benchmark are built first (each on its own copy of the base model, with
the same weights) and then timed *interleaved*: every repetition runs one step of every
variant, in a rotated order, after ``warmup`` untimed steps of each. The figure is the median
over repetitions, and ratios are taken inside the run, so load from other jobs on a shared
machine hits all variants alike.

One step is what :func:`fedpeft.client.trainer.train_local` does per logical batch: the plugin's
loss, backward, optimizer step. DP steps use :func:`fedpeft.privacy.dpsgd.make_private` (Poisson
sampling, Adam wrapped in Opacus's ``DPOptimizer``) and then feed the one fixed batch to the
private module, so every variant sees identical tensors. Ghost clipping needs a loss wrapper
that our ``make_private`` does not return, so that mode calls Opacus's ``PrivacyEngine``
directly with a cross-entropy criterion.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedpeft.adapters import AdapterPlugin, plugins
from fedpeft.adapters import get as get_plugin
from fedpeft.client.trainer import build_loader, make_optimizer
from fedpeft.config import RunConfig
from fedpeft.data.sources import train_test_split_for
from fedpeft.load import parse_config
from fedpeft.privacy.dpsgd import make_private
from fedpeft.privacy.randomness import NodeSecret, RoundRandomness
from fedpeft.strategies.adapter_avg import state_nbytes
from fedpeft.tasks.model import load_tokenizer
from fedpeft.tasks.registry import head_prefixes, task_for
from fedpeft.tasks.seq_cls import load_base_model

from .results import Measurement, Target

__all__ = ["StepBench", "communication", "dp_overhead", "ffa_vs_lora", "interleaved_medians", "interleaved_times", "method_matrix", "upload_bytes"]

Step = Callable[[], None]
Progress = Callable[[str], None]
OPACUS_MODES = ("hooks", "ghost", "functorch", "ew")
SIGMA = 1.0  # any sigma costs the same: the noise tensor is drawn whatever its scale


def interleaved_times(steps: dict[str, Step], reps: int, warmup: int = 1,
                      progress: Progress | None = None) -> dict[str, list[float]]:
    """Seconds of every repetition of each step function, timed interleaved: ``warmup``
    untimed rounds first, then ``reps`` rounds, each in an order rotated by one."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
        if progress:
            progress(f"repetition {rep + 1}/{reps}")
    return times


def interleaved_medians(steps: dict[str, Step], reps: int, warmup: int = 1,
                        progress: Progress | None = None) -> dict[str, float]:
    """Median seconds of each step function, timed interleaved (rotated order per repetition)."""
    return {n: statistics.median(t) for n, t in interleaved_times(steps, reps, warmup, progress).items()}


@dataclass
class StepBench:
    """The fixed batch and configuration every variant is timed on."""

    cfg: RunConfig
    batch: dict[str, torch.Tensor]
    labels: torch.Tensor
    num_labels: int

    @classmethod
    def create(cls, model_path: str, batch_size: int, seq_len: int, seed: int = 0) -> StepBench:
        """``batch_size`` real Rotten Tomatoes snippets padded/truncated to exactly ``seq_len`` tokens."""
        cfg = parse_config({"model.path": model_path, "model.max_length": seq_len, "data.test_size": 64,
                            "train.batch_size": batch_size, "train.physical_batch_size": batch_size, "seed": seed})
        pool, _ = train_test_split_for(cfg.data, cfg.seed)
        tok = load_tokenizer(cfg.model)
        texts = list(pool.texts[:batch_size])
        enc = tok(texts, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt")
        labels = torch.as_tensor(pool.labels[:batch_size], dtype=torch.long)
        return cls(cfg, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, labels,
                   pool.num_classes)

    def config(self, method: str, dp: bool) -> RunConfig:
        return parse_config({"model.path": self.cfg.model.path, "model.max_length": self.cfg.model.max_length,
                             "adapter.method": method, "privacy.epsilon": 6.0 if dp else "inf",
                             "train.batch_size": len(self.labels), "data.test_size": 64})

    def model(self, method: str, dp: bool) -> tuple[AdapterPlugin, nn.Module, RunConfig]:
        cfg = self.config(method, dp)
        plugin = get_plugin(method)
        plugin.validate_config(cfg)
        base = load_base_model(cfg.model, self.num_labels, head_seed=cfg.adapter.seed)
        model = plugin.attach(base, cfg)
        model.train()
        return plugin, model, cfg

    def _loader(self, cfg: RunConfig):  # type: ignore[no-untyped-def]
        # 10 batches' worth of copies: Opacus's sample rate 1/len(loader) = 0.1, expected batch = len(labels).
        n = 10 * len(self.labels)
        idx = torch.arange(n) % len(self.labels)
        ds = TensorDataset(self.batch["input_ids"][idx], self.batch["attention_mask"][idx], self.labels[idx])
        return build_loader(ds, len(self.labels), cfg.seed)

    def plain_step(self, method: str) -> Step:
        """One non-DP step (the trainer's non-DP path, one chunk)."""
        plugin, model, cfg = self.model(method, dp=False)
        opt = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])

        batch, task_type = {**self.batch, "labels": self.labels}, task_for(cfg)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            plugin.loss(model, batch, task_type).backward()
            opt.step()
        return step

    def dp_step(self, method: str, mode: str = "hooks", secure: bool = False) -> Step:
        """One DP-SGD step in Opacus ``mode`` (per-sample clip, noise from the node-secret
        CSPRNG, Adam); ``secure``: ``privacy.secure_mode`` (fresh keys, four-draw noise)."""
        plugin, model, cfg = self.model(method, dp=True)
        opt = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
        if mode == "ghost":
            return self._ghost_step(model, opt, cfg)
        rng = RoundRandomness.fresh_keys() if secure else RoundRandomness.derived(NodeSecret.generate(), "bench")
        parts = make_private(model, opt, self._loader(cfg), SIGMA, cfg.privacy.clip, rng,
                             grad_sample_mode=mode, secure_mode=secure)
        net, dp_opt = parts.module, parts.optimizer
        batch, task_type = {**self.batch, "labels": self.labels}, task_for(cfg)

        def step() -> None:
            plugin.loss(net, batch, task_type).backward()
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)
        return step

    def _ghost_step(self, model: nn.Module, opt: torch.optim.Optimizer, cfg: RunConfig) -> Step:
        from opacus import PrivacyEngine

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="prv", secure_mode=False)
            net, dp_opt, criterion, _ = engine.make_private(
                module=model, optimizer=opt, data_loader=self._loader(cfg), noise_multiplier=SIGMA,
                max_grad_norm=cfg.privacy.clip, poisson_sampling=True, grad_sample_mode="ghost",
                criterion=nn.CrossEntropyLoss())

        def step() -> None:
            loss = criterion(net(**self.batch).logits, self.labels)
            loss.backward()
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)
        return step


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _try_step(build: Callable[[], Step], probe: bool = True) -> tuple[Step | None, str | None]:
    """Build a step and run it once (a mode that cannot run fails here, not mid-timing)."""
    try:
        step = build()
        if probe:
            step()
        return step, None
    except Exception as exc:  # noqa: BLE001 - any failure of a mode is a result to report
        return None, _first_line(exc)


def dp_overhead(bench: StepBench, reps: int, warmup: int, modes: tuple[str, ...] = OPACUS_MODES,
                progress: Progress | None = None) -> list[Measurement]:
    """FFA-LoRA: DP step / non-DP step, for every Opacus grad-sample mode (failures reported)."""
    steps: dict[str, Step] = {}
    base, err = _try_step(lambda: bench.plain_step("ffa_lora"))
    if base is None:
        return [Measurement("dp_overhead", "non-DP FFA-LoRA step", error=err)]
    steps["non-DP"] = base
    failed: dict[str, str] = {}
    for mode in modes:
        step, err = _try_step(lambda m=mode: bench.dp_step("ffa_lora", m))  # type: ignore[misc]
        if step is None:
            failed[mode] = err or "unknown error"
        else:
            steps[mode] = step
        if progress:
            progress(f"built {mode}")
    if "hooks" in steps:  # privacy.secure_mode: fresh OS-entropy keys and Opacus's four-draw noise
        steps["hooks-secure"] = bench.dp_step("ffa_lora", "hooks", secure=True)
    med = interleaved_medians(steps, reps, warmup, progress)
    shape = f"batch {len(bench.labels)} x seq {bench.batch['input_ids'].shape[1]}"
    out = [Measurement("dp_overhead", f"DP / non-DP step time, FFA-LoRA, Opacus {mode}",
                       med[mode] / med["non-DP"], "x", Target("<=", 1.10) if mode == "hooks" else None,
                       detail={"dp_step_s": med[mode], "non_dp_step_s": med["non-DP"], "shape": shape, "reps": reps})
           for mode in modes if mode in med]
    out += [Measurement("dp_overhead", f"DP / non-DP step time, FFA-LoRA, Opacus {mode}", error=reason,
                        detail={"shape": shape}) for mode, reason in failed.items()]
    if "hooks-secure" in med:
        out.append(Measurement("dp_overhead", "secure_mode / default DP step time, FFA-LoRA, Opacus hooks",
                               med["hooks-secure"] / med["hooks"], "x", None,
                               detail={"secure_step_s": med["hooks-secure"], "dp_step_s": med["hooks"],
                                       "shape": shape, "reps": reps}))
    out.append(Measurement("dp_overhead", "non-DP FFA-LoRA step (median)", med["non-DP"], "s",
                           detail={"shape": shape, "reps": reps}))
    return out


def ffa_vs_lora(bench: StepBench, reps: int, warmup: int, progress: Progress | None = None) -> list[Measurement]:
    """FFA-LoRA DP step / LoRA DP step on the same batch (hooks mode)."""
    steps = {m: bench.dp_step(m) for m in ("ffa_lora", "lora")}
    med = interleaved_medians(steps, reps, warmup, progress)
    shape = f"batch {len(bench.labels)} x seq {bench.batch['input_ids'].shape[1]}"
    return [Measurement("ffa_vs_lora", "FFA-LoRA / LoRA DP step time", med["ffa_lora"] / med["lora"], "x",
                        Target("<=", 1.00), detail={"ffa_step_s": med["ffa_lora"], "lora_step_s": med["lora"],
                                                    "shape": shape, "reps": reps, "mode": "hooks"})]


def upload_bytes(plugin: AdapterPlugin, model: nn.Module) -> tuple[int, int]:
    """(adapter bytes, head bytes) of one upload: the plugin's trainable state, split at the head."""
    state = {k: v.detach().cpu().numpy() for k, v in plugin.trainable_state(model).items()}
    head = {k: v for k, v in state.items() if _is_head(k)}
    return state_nbytes(state) - state_nbytes(head), state_nbytes(head)


def _is_head(name: str) -> bool:
    parts = name.split(".")
    return any(p in parts for p in head_prefixes())


def method_matrix(bench: StepBench, reps: int, warmup: int, progress: Progress | None = None,
                  only: tuple[str, ...] = ()) -> list[Measurement]:
    """Every registered method (or those in ``only``, plus FFA-LoRA, the reference): DP step
    time and upload bytes relative to FFA-LoRA (same batch).

    A method that cannot run DP-SGD (``supports_dp`` False) is timed without DP against FFA-LoRA
    without DP, and says so.
    """
    dp_steps: dict[str, Step] = {}
    plain_steps: dict[str, Step] = {}
    sizes: dict[str, int] = {}
    failed: dict[str, str] = {}
    chosen = [p for p in plugins() if not only or p.name in only or p.name == "ffa_lora"]
    unknown = set(only) - {p.name for p in plugins()}
    if unknown:
        raise ValueError(f"unknown method {sorted(unknown)[0]!r} for the method matrix")
    for plugin in chosen:
        name = plugin.name
        try:
            p, model, _ = bench.model(name, dp=False)
            adapter, head = upload_bytes(p, model)
            sizes[name] = adapter + head
            del model
            if plugin.supports_dp:
                step, err = _try_step(lambda n=name: bench.dp_step(n))  # type: ignore[misc]
                target = dp_steps
            else:
                step, err = _try_step(lambda n=name: bench.plain_step(n))  # type: ignore[misc]
                target = plain_steps
            if step is None:
                failed[name] = err or "unknown error"
            else:
                target[name] = step
        except Exception as exc:  # noqa: BLE001 - a method that fails to build is reported
            failed[name] = _first_line(exc)
        if progress:
            progress(f"built {name}")
    if plain_steps and "ffa_lora" not in plain_steps:
        plain_steps["ffa_lora"] = bench.plain_step("ffa_lora")
    med = interleaved_medians({**{f"dp:{k}": v for k, v in dp_steps.items()},
                               **{f"plain:{k}": v for k, v in plain_steps.items()}}, reps, warmup, progress)
    out: list[Measurement] = []
    ffa_bytes = sizes.get("ffa_lora")
    for plugin in chosen:
        name = plugin.name
        detail: dict[str, Any] = {"upload_bytes": sizes.get(name), "reps": reps,
                                  "shape": f"batch {len(bench.labels)} x seq {bench.batch['input_ids'].shape[1]}"}
        if name in failed:
            out.append(Measurement("methods", f"{name}: step time / FFA-LoRA", error=failed[name], detail=detail))
        else:
            kind = "dp" if name in dp_steps else "plain"
            detail.update(step_s=med[f"{kind}:{name}"], ffa_step_s=med[f"{kind}:ffa_lora"],
                          dp=kind == "dp", note="" if kind == "dp" else f"no DP-SGD: {plugin.dp_refusal}")
            label = "DP step" if kind == "dp" else "non-DP step (method refuses DP)"
            out.append(Measurement("methods", f"{name}: {label} time / FFA-LoRA",
                                   med[f"{kind}:{name}"] / med[f"{kind}:ffa_lora"], "x", detail=detail))
        if ffa_bytes and name in sizes:
            out.append(Measurement("methods", f"{name}: upload bytes / FFA-LoRA", sizes[name] / ffa_bytes, "x",
                                   detail={"upload_bytes": sizes[name], "ffa_upload_bytes": ffa_bytes}))
    return out


def communication(bench: StepBench) -> list[Measurement]:
    """Upload bytes per client and round: FFA-LoRA / LoRA for the adapter part (head excluded),
    and the head's share of the default FFA-LoRA payload."""
    sizes = {}
    for method in ("ffa_lora", "lora"):
        plugin, model, _ = bench.model(method, dp=False)
        sizes[method] = upload_bytes(plugin, model)
    (ffa_a, ffa_h), (lora_a, lora_h) = sizes["ffa_lora"], sizes["lora"]
    detail = {"ffa_adapter_bytes": ffa_a, "ffa_head_bytes": ffa_h, "lora_adapter_bytes": lora_a,
              "lora_head_bytes": lora_h, "rank": bench.cfg.adapter.rank,
              "target_modules": ",".join(bench.cfg.adapter.target_modules)}
    return [
        Measurement("communication", "upload bytes per round, adapter part, FFA-LoRA / LoRA", ffa_a / lora_a, "x",
                    Target("==", 0.5), detail=detail),
        Measurement("communication", "classifier head share of the FFA-LoRA upload", 100.0 * ffa_h / (ffa_a + ffa_h),
                    "%", Target("<=", 10.0), detail=detail),
        Measurement("communication", "FFA-LoRA upload per client and round", float(ffa_a + ffa_h), "bytes",
                    detail=detail),
    ]
