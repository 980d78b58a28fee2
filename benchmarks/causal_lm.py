"""Causal-LM benchmarks (SmolLM2-135M-Instruct by default): DP overhead, fedpeft vs a bare loop,
throughput, memory and upload bytes, all measured within one run.

One fixed batch (:meth:`LMBench.create`): ``batch`` rows of exactly ``seq`` real tokens (the
default instruction mix's prompts, tokenised and concatenated), the last ``completion`` tokens
of every row its completion (the targets), the rest prompt (``-100``) -- the shape of an
encoded instruction example (:func:`fedpeft.tasks.chat.encode_examples`) at full length. Every
variant gets that batch on the CPU and moves it to the device each step, as a loader would.

Variants (each on its own copy of the base model, same weights and dtype; FFA-LoRA rank 8 on
``q_proj,v_proj``, Adam):

* ``fedpeft non-DP`` -- the trainer's non-DP step (:func:`fedpeft.client.trainer._plain_step`);
* ``fedpeft DP hooks`` -- the trainer's DP step (``_dp_step``: the body of ``train_local``'s
  DP loop) after :func:`fedpeft.privacy.dpsgd.make_private` (Opacus hooks, node-secret noise);
* ``DP ghost`` -- Opacus ghost clipping (``PrivacyEngine.make_private(grad_sample_mode="ghost")``)
  with fedpeft's per-example completion loss as its criterion (:class:`CompletionLoss`):
  ghost clipping needs Opacus's loss wrapper, which ``make_private`` does not return;
* ``bare non-DP`` / ``bare DP hooks`` -- what a user writes without fedpeft: transformers'
  ``AutoModelForCausalLM`` (its default attention), PEFT's ``get_peft_model`` with the A
  matrices frozen, the model's own loss (``labels=``), and Opacus's ``PrivacyEngine``.

Timing: :func:`benchmarks.steps.interleaved_times` (every repetition runs one step of each
variant in a rotated order; the first step of each, which also checks that it runs, and
``warmup - 1`` more are untimed); ratios are medians of the variants' times, and the spread is
the range of the per-repetition ratios. The device is CUDA when present (each step ends with a
synchronisation; base weights in bfloat16 through ``model.dtype = auto``), else the CPU.
Memory: the process's resident set sampled every 20 ms during each timed step (its peak, and
that peak minus the resident set before the step), and on CUDA ``max_memory_allocated``.
"""

from __future__ import annotations

import statistics
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
import torch
from torch import nn

from fedpeft.adapters import get as get_plugin
from fedpeft.client.trainer import _dp_step, _plain_step, build_loader, make_optimizer
from fedpeft.config import RunConfig
from fedpeft.data.batching import Batch, BatchDataset
from fedpeft.data.instructions import load_instructions
from fedpeft.load import parse_config
from fedpeft.privacy.dpsgd import make_private
from fedpeft.privacy.randomness import NodeSecret, RoundRandomness
from fedpeft.tasks.causal_lm import completion_logits, completion_losses
from fedpeft.tasks.chat import IGNORE
from fedpeft.tasks.registry import get as get_task
from fedpeft.wire import state_nbytes

from .results import Measurement, Target
from .steps import SIGMA, Progress, Step, interleaved_times

__all__ = ["CompletionLoss", "LMBench", "RssWatch", "causal_lm", "expected_upload_ratio", "lm_upload_bytes"]

BENCH = "causal_lm"
NON_DP, DP_HOOKS, GHOST, BARE, BARE_DP = "fedpeft non-DP", "fedpeft DP hooks", "DP ghost", "bare non-DP", "bare DP hooks"


class RssWatch:
    """Peak resident set of this process between :meth:`start` and :meth:`peak`, sampled in a thread."""

    def __init__(self, period: float = 0.02) -> None:
        self._proc, self._period = psutil.Process(), period
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            rss = self._proc.memory_info().rss
            with self._lock:
                self._peak = max(self._peak, rss)

    def start(self) -> int:
        """Reset the peak to the resident set now, and return it."""
        rss = self._proc.memory_info().rss
        with self._lock:
            self._peak = rss
        return rss

    def peak(self) -> int:
        rss = self._proc.memory_info().rss
        with self._lock:
            self._peak = max(self._peak, rss)
            return self._peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class CompletionLoss(nn.Module):
    """fedpeft's per-example completion loss (:func:`fedpeft.tasks.causal_lm.completion_losses`,
    mean over each example's own completion tokens) as an Opacus ghost-clipping criterion:
    Opacus sets ``reduction = "none"`` to get the per-example losses it clips."""

    def __init__(self) -> None:
        super().__init__()
        self.reduction = "mean"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sums, counts = completion_losses(logits, labels)
        per_example = sums / counts.clamp(min=1)
        if self.reduction == "none":
            return per_example
        return per_example.sum() if self.reduction == "sum" else per_example.mean()


@dataclass
class LMBench:
    """The fixed batch, configuration and device every variant runs on."""

    cfg: RunConfig
    batch: Batch
    device: torch.device
    dtype: torch.dtype  # of the base weights, as fedpeft chooses them for the device (bare loops use the same)

    @classmethod
    def create(cls, model_path: str, batch_size: int, seq_len: int, completion: int, device: str = "") -> LMBench:
        """``model_path`` "" = the default causal LM (SmolLM2-135M-Instruct, cached conversion)."""
        cfg = parse_config({"task_type": "causal-lm", "model.path": model_path, "model.max_length": seq_len,
                            "train.batch_size": batch_size, "train.physical_batch_size": batch_size,
                            "privacy.epsilon": 6.0})
        task = get_task("causal-lm")
        tok = task.load_tokenizer(cfg.model)
        ids: list[int] = []
        for text in load_instructions(cfg.data).texts:  # the default mix (rt, bbc, trivia), in its order
            ids.extend(tok(text + "\n\n", add_special_tokens=False)["input_ids"])
            if len(ids) >= batch_size * seq_len:
                break
        if len(ids) < batch_size * seq_len:
            raise ValueError(f"the instruction mix has only {len(ids)} tokens for {batch_size} x {seq_len}")
        input_ids = torch.as_tensor(ids[: batch_size * seq_len], dtype=torch.long).view(batch_size, seq_len)
        labels = torch.full_like(input_ids, IGNORE)
        labels[:, seq_len - completion:] = input_ids[:, seq_len - completion:]
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = next(task.build_model(cfg.model, 0).parameters()).dtype
        return cls(cfg, batch, dev, dtype)

    @property
    def size(self) -> int:
        return int(self.batch["input_ids"].shape[0])

    @property
    def tokens(self) -> int:
        return int(self.batch["attention_mask"].sum())

    def shape(self) -> str:
        b, t = self.batch["input_ids"].shape
        done = int((self.batch["labels"][0] != IGNORE).sum())
        return f"batch {b} x {t} tokens ({done} completion tokens per row), {self.device}, {self.dtype}"

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _loader(self) -> Any:
        # 10 batches' worth of copies: Opacus's sample rate 1/len(loader) = 0.1, expected batch = the batch size
        return build_loader(BatchDataset({k: v.repeat(10, 1) for k, v in self.batch.items()}), self.size, 0)

    def fedpeft_model(self, method: str = "ffa_lora") -> tuple[Any, nn.Module, RunConfig]:
        """(plugin, adapted model on the device, config) as the ClientApp builds them."""
        cfg = parse_config({"task_type": "causal-lm", "model.path": self.cfg.model.path,
                            "model.max_length": self.cfg.model.max_length, "adapter.method": method})
        plugin = get_plugin(method)
        plugin.validate_config(cfg)
        model = plugin.attach(get_task("causal-lm").build_model(cfg.model, 0), cfg)
        return plugin, model.to(self.device).train(), cfg

    def fedpeft_step(self, dp: bool) -> Step:
        """One step of the trainer: ``_dp_step`` after ``make_private`` (hooks), or ``_plain_step``."""
        plugin, model, cfg = self.fedpeft_model()
        task = get_task("causal-lm")
        opt = make_optimizer(self.cfg, [p for p in model.parameters() if p.requires_grad])
        if not dp:
            return self._synced(lambda: _plain_step(model, opt, plugin, task, self.batch, self.size, self.device))
        parts = make_private(model, opt, self._loader(), SIGMA, self.cfg.privacy.clip,
                             RoundRandomness.derived(NodeSecret.generate(), "bench"))
        return self._synced(lambda: _dp_step(parts.module, parts.optimizer, plugin, task, self.batch, self.size,
                                             self.device))

    def ghost_step(self) -> Step:
        """One DP step with Opacus ghost clipping and fedpeft's per-example completion loss."""
        from opacus import PrivacyEngine

        _, model, _ = self.fedpeft_model()
        opt = make_optimizer(self.cfg, [p for p in model.parameters() if p.requires_grad])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net, dp_opt, criterion, _ = PrivacyEngine(accountant="prv").make_private(
                module=model, optimizer=opt, data_loader=self._loader(), noise_multiplier=SIGMA,
                max_grad_norm=self.cfg.privacy.clip, poisson_sampling=True, grad_sample_mode="ghost",
                criterion=CompletionLoss())

        def step() -> None:
            b = {k: v.to(self.device) for k, v in self.batch.items()}
            inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            loss = criterion(completion_logits(net, inputs, b["labels"]), b["labels"])
            loss.backward()
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)
        return self._synced(step)

    def bare_step(self, dp: bool) -> Step:
        """A plain PEFT (+ Opacus) loop: the model's own loss, no fedpeft code."""
        from opacus import PrivacyEngine
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        path = get_task("causal-lm").resolve_model(self.cfg.model)
        base = AutoModelForCausalLM.from_pretrained(str(path), dtype=self.dtype)
        a = self.cfg.adapter
        model = get_peft_model(base, LoraConfig(r=a.rank, lora_alpha=int(a.alpha), target_modules=list(a.target_modules),
                                                lora_dropout=0.0, task_type="CAUSAL_LM"))
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)  # FFA-LoRA: only B trains
        model.to(self.device).train()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=self.cfg.train.lr)
        net: nn.Module = model
        if dp:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                net, opt, _ = PrivacyEngine(accountant="prv").make_private(
                    module=model, optimizer=opt, data_loader=self._loader(), noise_multiplier=SIGMA,
                    max_grad_norm=self.cfg.privacy.clip, poisson_sampling=True)

        def step() -> None:
            b = {k: v.to(self.device) for k, v in self.batch.items()}
            net(**b).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return self._synced(step)

    def _synced(self, step: Callable[[], object]) -> Step:
        def run() -> None:
            step()
            self._sync()
        return run


def lm_upload_bytes(bench: LMBench) -> dict[str, int]:
    """Bytes one client uploads per round (the plugin's ``trainable_state``), FFA-LoRA and LoRA."""
    out = {}
    for method in ("ffa_lora", "lora"):
        plugin, model, _ = bench.fedpeft_model(method)
        out[method] = state_nbytes({k: v.detach().cpu().numpy() for k, v in plugin.trainable_state(model).items()})
    return out


def expected_upload_ratio(bench: LMBench) -> float:
    """FFA-LoRA / LoRA upload from the base model's shapes alone: FFA-LoRA sends each targeted
    projection's B (``out x r``), LoRA its A and B (``(in + out) x r``), so the ratio is
    sum(out) / sum(in + out) -- 0.5 only when every targeted projection is square (a
    grouped-query ``v_proj`` is narrower: SmolLM2's is 576 -> 192)."""
    base = get_task("causal-lm").build_model(bench.cfg.model, 0)
    targets = set(bench.cfg.adapter.target_modules)
    shapes = [(m.in_features, m.out_features) for name, m in base.named_modules()
              if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    return sum(o for _, o in shapes) / sum(i + o for i, o in shapes)


def _build(bench: LMBench, progress: Progress | None) -> tuple[dict[str, Step], dict[str, str]]:
    """Every variant, each run once (that must work; it is also the first warm-up step)."""
    builders: dict[str, Callable[[], Step]] = {
        NON_DP: lambda: bench.fedpeft_step(dp=False), DP_HOOKS: lambda: bench.fedpeft_step(dp=True),
        GHOST: bench.ghost_step, BARE: lambda: bench.bare_step(dp=False), BARE_DP: lambda: bench.bare_step(dp=True),
    }
    steps: dict[str, Step] = {}
    failed: dict[str, str] = {}
    for name, build in builders.items():
        try:
            step = build()
            step()
            steps[name] = step
        except Exception as exc:  # noqa: BLE001 - a variant that cannot run is a result to report
            lines = str(exc).strip().splitlines()
            failed[name] = f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"
        if progress:
            progress(f"{name}: failed, {failed[name]}" if name in failed else f"built {name}")
    return steps, failed


def _watched(steps: dict[str, Step], watch: RssWatch, device: torch.device) -> tuple[dict[str, Step], dict[str, dict]]:
    """``steps`` that also record their peak memory (RSS; CUDA allocator on a GPU)."""
    mem: dict[str, dict[str, float]] = {n: {"peak_rss_mb": 0.0, "step_rss_mb": 0.0, "cuda_max_mb": 0.0} for n in steps}

    def wrap(name: str, step: Step) -> Step:
        def run() -> None:
            before = watch.start()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            step()
            m, peak = mem[name], watch.peak()
            m["peak_rss_mb"] = max(m["peak_rss_mb"], peak / 1e6)
            m["step_rss_mb"] = max(m["step_rss_mb"], (peak - before) / 1e6)
            if device.type == "cuda":
                m["cuda_max_mb"] = max(m["cuda_max_mb"], torch.cuda.max_memory_allocated(device) / 1e6)
        return run
    return {n: wrap(n, s) for n, s in steps.items()}, mem


def _ratio(times: dict[str, list[float]], failed: dict[str, str], a: str, b: str, name: str,
           target: Target | None, common: dict[str, Any]) -> Measurement:
    """median(a) / median(b), with the per-repetition ratios (their range is the spread);
    a failure with the reason of the variant that could not run."""
    if a not in times or b not in times:
        which = a if a not in times else b
        return Measurement(BENCH, name, error=f"{which}: {failed.get(which, 'not run')}", detail=common)
    per_rep = [x / y for x, y in zip(times[a], times[b], strict=True)]
    value = statistics.median(times[a]) / statistics.median(times[b])
    return Measurement(BENCH, name, value, "x", target, detail={
        **common, f"{a} s": times[a], f"{b} s": times[b], "per_rep_ratio": [round(r, 4) for r in per_rep],
        "spread": [round(min(per_rep), 4), round(max(per_rep), 4)]})


def causal_lm(bench: LMBench, reps: int, warmup: int, progress: Progress | None = None) -> list[Measurement]:
    """Every causal-LM figure of one run (module doc); a variant that fails is reported as failed."""
    sizes = lm_upload_bytes(bench)
    common: dict[str, Any] = {"shape": bench.shape(), "reps": reps, "warmup": warmup}
    steps, failed = _build(bench, progress)
    watch = RssWatch()
    try:
        watched, mem = _watched(steps, watch, bench.device)
        times = interleaved_times(watched, reps, max(warmup - 1, 0), progress)
    finally:
        watch.close()
    out = [
        _ratio(times, failed, DP_HOOKS, NON_DP, "DP / non-DP step time, FFA-LoRA, Opacus hooks (fedpeft trainer)",
               Target("<=", 1.15), common),
        _ratio(times, failed, GHOST, NON_DP, "DP / non-DP step time, FFA-LoRA, Opacus ghost clipping", Target("<=", 1.15),
               common),
        _ratio(times, failed, DP_HOOKS, BARE_DP, "fedpeft DP step / bare PEFT + Opacus DP step (hooks)", Target("<=", 1.05),
               common),
        _ratio(times, failed, NON_DP, BARE, "fedpeft non-DP step / bare PEFT non-DP step", None, common),
        _ratio(times, failed, BARE_DP, BARE, "bare DP / bare non-DP step time (Opacus hooks, without fedpeft)", None, common),
    ]
    for name, t in times.items():
        med = statistics.median(t)
        out.append(Measurement(BENCH, f"training throughput, {name}", bench.tokens / med, "tok/s",
                               detail={**common, "step_s": med, "min_s": min(t), "max_s": max(t)}))
        out.append(Measurement(BENCH, f"peak RSS during a step, {name}", mem[name]["peak_rss_mb"], "MB",
                               detail={**common, "step_increase_mb": round(mem[name]["step_rss_mb"], 1)}))
        if bench.device.type == "cuda":
            out.append(Measurement(BENCH, f"CUDA max_memory_allocated, {name}", mem[name]["cuda_max_mb"], "MB",
                                   detail=common))
    detail = {"ffa_lora_bytes": sizes["ffa_lora"], "lora_bytes": sizes["lora"], "rank": bench.cfg.adapter.rank,
              "target_modules": ",".join(bench.cfg.adapter.target_modules)}
    expected = expected_upload_ratio(bench)
    out.append(Measurement(BENCH, "upload bytes per round, FFA-LoRA / LoRA", sizes["ffa_lora"] / sizes["lora"], "x",
                           Target("==", round(expected, 6), tol=1e-6), detail={**detail, "expected": expected}))
    out.append(Measurement(BENCH, "FFA-LoRA upload per client and round", float(sizes["ffa_lora"]), "bytes",
                           detail=detail))
    return out
