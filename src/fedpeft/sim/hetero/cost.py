"""The server's own price of a training step, for the emulated compute time.

Why: a client's measured training time is a timing side channel in a DP run (it depends on
the private Poisson batch sizes and snippet lengths; see :mod:`fedpeft.sim.hetero.timing`),
so the emulation prices compute with a measurement the *server* makes once, at the start
of the run, on its own copy of the model and its own held-out data -- public to it, and
covered by nothing the clients release.

What is timed: ``steps`` logical steps (after one untimed warm-up step) of the run's
training recipe on the first ``min(train.batch_size, len(test))`` held-out examples --
the same task-type encoding and length-bucketed chunks of at most ``train.physical_batch_size``
as the trainer (:meth:`fedpeft.tasks.base.TaskType.chunks`), the plugin's loss, the run's optimizer, and,
when DP is on, Opacus's per-sample gradients, per-sample clipping, accumulation across
chunks and one noise draw per step (``GradSampleModule`` + ``DPOptimizer``, as the
clients' DP-SGD; the noise here is the server's throw-away torch noise, not a client's
CSPRNG). The result is seconds per example of a step,
:class:`~fedpeft.sim.hetero.timing.StepCost`.

The model is a deep copy, and the torch RNG state is restored afterwards, so the global
model, its evaluation and the run's other random draws are untouched. Nothing here imports
the client package (whose trainer holds the node secret's randomness): encoding and chunking are
the task type's (:mod:`fedpeft.tasks`), the trainer's own, from the floor below both.
"""

from __future__ import annotations

import copy
import time
import warnings

import torch

from fedpeft.data.batching import batch_len, to_device
from fedpeft.data.layout import activate_task
from fedpeft.server.setup import ServerSetup
from fedpeft.sim.hetero.timing import StepCost
from fedpeft.tasks.registry import task_for

__all__ = ["measure_step_cost"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step_cost(setup: ServerSetup, steps: int = 2) -> StepCost:
    """Time ``steps`` training steps of ``setup``'s recipe on its held-out data (module doc)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cfg, plugin, device = setup.cfg, setup.plugin, setup.device
    n = min(cfg.train.batch_size, len(setup.test))
    if n < 1:
        raise ValueError("the server has no held-out examples to price a training step with")
    data = setup.test.subset(list(range(n)))
    task_type = task_for(cfg)
    enc = task_type.encode(setup.tokenizer, data, cfg.model.max_length)
    chunks = task_type.chunks(enc, cfg.train.physical_batch_size)
    dp = cfg.privacy.enabled
    model = copy.deepcopy(setup.model)
    if setup.layout.per_task:  # multi-task server model: train one task's head, as a client does
        activate_task(model, setup.layout[0].name)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = (torch.optim.SGD(params, lr=cfg.train.lr, momentum=0.9)
                                        if cfg.train.optimizer == "sgd" else torch.optim.Adam(params, lr=cfg.train.lr))
    net: torch.nn.Module = model
    if dp:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = GradSampleModule(model)
            optimizer = DPOptimizer(optimizer, noise_multiplier=1.0, max_grad_norm=cfg.privacy.clip,
                                    expected_batch_size=n)

    def step() -> None:
        for j, chunk in enumerate(chunks):
            last = j == len(chunks) - 1
            if dp and not last:
                optimizer.signal_skip_step(do_skip=True)  # type: ignore[attr-defined]
            loss = plugin.loss(net, to_device(chunk, device), task_type)
            (loss if dp else loss * (batch_len(chunk) / n)).backward()
            if dp and not last:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cuda = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            step()  # warm-up: lazy buffers, kernels, optimizer state
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            seconds = time.perf_counter() - t0
    finally:
        if dp:
            net._close()  # type: ignore[operator]  # remove Opacus's hooks; the copy is dropped on return
    return StepCost(seconds_per_example=seconds / (steps * n), batch=n, steps=steps, dp=dp, device=str(device))
