"""The run directory's view of a generative task: the initial model's score and sample outputs.

For a task type that asks for it (:attr:`fedpeft.tasks.base.TaskType.evaluates_initial_model`,
causal-LM instruction tuning) the server scores the *initial* global model -- the base model,
for adapters that start at zero (LoRA's B = 0) -- on the held-out split before round 1 and
writes ``initial_eval.json``: the gain a run shows is measured against it, on the same data,
not remembered from elsewhere. Every round it also writes ``samples/round-NNN.jsonl``
(:meth:`~fedpeft.tasks.base.TaskType.samples`: a few held-out prompts, their references and
the model's greedy answers; round 0 is the initial model). All of it is computed on the
server's own held-out data from the released global state: nothing a client sent beyond what
the accountant covers.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fedpeft.io import atomic_write_text
from fedpeft.server.run_dir import RunDir, jsonable

__all__ = ["INITIAL_EVAL", "SamplesHook"]

log = logging.getLogger("fedpeft")

INITIAL_EVAL = "initial_eval.json"


class SamplesHook:
    """A :class:`~fedpeft.server.setup.RoundHook`: initial evaluation and per-round samples."""

    def __init__(self, setup: Any) -> None:  # a ServerSetup (not imported: setup.py imports this module)
        self.setup = setup
        self.run_dir: RunDir | None = None

    def on_start(self, setup: Any, strategy: Any, run_dir: RunDir) -> None:
        self.run_dir = run_dir
        path = run_dir.path / INITIAL_EVAL
        if self.setup.task_type.evaluates_initial_model and not path.is_file():  # a resume keeps the first one
            ev = self.setup.evaluate()
            atomic_write_text(path, json.dumps(jsonable({"round": 0, **ev}), indent=1) + "\n")
            names = self.setup.task_type.metric_names
            log.info("round 0 (initial model): %s", " ".join(f"{n}={ev[n]:.4f}" for n in names))
            self._write_samples(0)

    def on_round_end(self, server_round: int, row: dict[str, Any], report: Any) -> None:
        self._write_samples(server_round)

    def on_end(self, rows: list[dict[str, Any]]) -> None:
        return None

    def _write_samples(self, server_round: int) -> None:
        setup, rd = self.setup, self.run_dir
        assert rd is not None
        samples = setup.samples()  # a multi-task layout: every task's, routed to it
        if samples:
            out = rd.path / "samples" / f"round-{server_round:03d}.jsonl"
            out.parent.mkdir(exist_ok=True)
            atomic_write_text(out, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
