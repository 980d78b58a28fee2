"""Measure the peak-RSS increase of one causal-LM training step (run as a fresh subprocess by
tests/test_hetero_decoder.py; argv[1] is a JSON list of cases, the result one JSON line).

Each case builds the model through fedpeft's own path (config -> task type -> adapter
plugin), trains two one-example steps (weights, optimizer state and lazy buffers are then
resident), resets the peak (``/proc/self/clear_refs`` 5: VmHWM := VmRSS) and measures one
step of ``b`` examples of ``s`` tokens -- forward, backward, (Opacus per-sample gradients
under DP), Adam step -- ``repeats`` times, keeping the smallest increase (others' activity
can only add). Run with ``MALLOC_MMAP_THRESHOLD_`` fixed so that freed tensors leave RSS.
"""

from __future__ import annotations

import gc
import json
import sys
import warnings
from typing import Any

import torch

from fedpeft.adapters import get
from fedpeft.load import parse_config
from fedpeft.tasks.registry import task_for


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status("VmRSS")


def measure(case: dict[str, Any], repeats: int) -> dict[str, Any]:
    cfg = parse_config({"task_type": "causal-lm", "model.path": case["model"], "model.dtype": case["dtype"],
                        "adapter.method": "ffa_lora", "adapter.rank": case["r"],
                        "adapter.target_modules": case["targets"]})
    task_type, plugin = task_for(cfg), get("ffa_lora")
    torch.manual_seed(0)
    model = plugin.attach(task_type.build_model(cfg.model, 0), cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    opt = torch.optim.Adam(params, lr=1e-3)
    net: torch.nn.Module = model
    if case["dp"]:
        from opacus import GradSampleModule

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = GradSampleModule(model)
    vocab, s = int(model.config.vocab_size), int(case["s"])

    def step(n: int) -> None:
        ids = torch.randint(3, vocab, (n, s))
        labels = ids.clone()
        labels[:, : s // 2] = -100  # the prompt half: no targets, as a completion-only batch
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        plugin.loss(net, batch, task_type).backward()
        if case["dp"]:
            for p in params:
                p.grad = p.grad_sample.sum(0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if case["dp"]:
            for p in params:
                p.grad_sample = None

    step(1)
    step(1)
    peaks = []
    for _ in range(repeats):
        gc.collect()
        before = _reset_peak()
        step(int(case["b"]))
        peaks.append(_status("VmHWM") - before)
    if case["dp"]:
        net._close()  # type: ignore[operator]
    return {**case, "measured": min(peaks), "peaks": peaks, "frozen_bytes": frozen_bytes,
            "trainable": sum(p.numel() for p in params)}


def main() -> None:
    torch.set_num_threads(1)
    cases = json.loads(sys.argv[1])
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    out = []
    for case in cases:
        out.append(measure(case, repeats))
        gc.collect()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
