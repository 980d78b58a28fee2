"""Downstream of the replies in DP runs (issue 16): a DP reply carries only accounted or
public metrics (no training loss, samples seen or wall time), so the server's per-task
rows and the compare report must neither read those nor turn their absence into NaN.
(The heterogeneous emulation's part is in test_hetero_models.py.)"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from fedpeft.load import parse_config
from fedpeft.server.setup import MultiTaskHook
from fedpeft.strategies.adapter_avg import RoundReport
from fedpeft.strategies.validation import ValidatedReply

DP_METRICS = {"num-examples": 10.0, "steps": 2, "epsilon": 0.5, "delta": 1e-5, "noise-multiplier": 1.1,
              "sample-rate": 0.5, "bytes-up": 64}


def _reply(client: str, task: str, metrics: dict[str, Any]) -> ValidatedReply:
    state = {"shared.lora_B": np.zeros((2, 2), np.float32), f"heads.task_{task}.weight": np.zeros(2, np.float32)}
    return ValidatedReply(client=client, state=state, weight=float(metrics["num-examples"]), metrics=metrics)


def _hook_row(epsilon: float, replies: list[ValidatedReply]) -> dict[str, Any]:
    cfg = parse_config({"privacy.epsilon": epsilon})
    setup = SimpleNamespace(cfg=cfg, tasks=[SimpleNamespace(name="rt"), SimpleNamespace(name="bbc")],
                            last_eval={"accuracy_per_task": {"rt": 0.5, "bbc": 0.5}}, plugin=object(),
                            public_step=lambda: None)
    report = RoundReport(server_round=1, accepted=replies, released=True)
    row: dict[str, Any] = {"accuracy": 0.5}
    MultiTaskHook(setup).on_round_end(1, row, report)  # type: ignore[arg-type]
    return row


def test_dp_rows_have_no_per_task_train_loss() -> None:
    """DP: ``train_loss_per_task`` is None (not NaN), even if a reply did carry a loss --
    the hook does not read client training statistics in a DP run."""
    replies = [_reply("0", "rt", DP_METRICS), _reply("1", "bbc", {**DP_METRICS, "train-loss": 0.7})]
    row = _hook_row(6.0, replies)
    assert row["train_loss_per_task"] is None
    assert row["clients_per_task"] == {"rt": 1, "bbc": 1}  # from tensor names, as before
    json.dumps(row, allow_nan=False)  # nothing non-finite in the row


def test_non_dp_rows_keep_per_task_train_loss_and_skip_missing() -> None:
    replies = [_reply("0", "rt", {**DP_METRICS, "train-loss": 0.4}),
               _reply("1", "rt", {**DP_METRICS, "train-loss": 0.6}),
               _reply("2", "bbc", DP_METRICS)]  # a reply without a loss: not averaged in as NaN
    row = _hook_row(math.inf, replies)
    assert row["train_loss_per_task"] == {"rt": pytest.approx(0.5), "bbc": None}
    assert row["clients_per_task"] == {"rt": 2, "bbc": 1}


def test_compare_report_reads_no_client_statistics(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A DP cell's rows have ``train_loss`` / ``train_loss_first`` None; the report is the
    same as with numbers there (it reads accuracy, epsilon, bytes and the server's ``seconds``)."""
    from fedpeft.server.run_dir import RunDir
    from fedpeft.sim.compare import SweepSpec, plan_cells, run_sweep, write_report

    base = {"model.path": str(tiny_model_dir), "train.rounds": 2, "train.batch_size": 32}

    def runner(losses: bool):  # type: ignore[no-untyped-def]
        def run(cfg, path: Path) -> None:  # type: ignore[no-untyped-def]
            rd = RunDir(path)
            rd.write_config(cfg)
            dp = cfg.privacy.enabled
            for r in (1, 2):
                rd.append_metrics({
                    "round": r, "accuracy": 0.6, "loss": 0.7, "epsilon": cfg.privacy.epsilon * r / 2 if dp else math.inf,
                    "delta": cfg.privacy.delta, "bytes_up": 1000, "seconds": 2.0, "accountant": "prv",
                    "clients_accepted": 2, "failed": {},
                    "train_loss": 0.5 if losses and not dp else None,
                    "train_loss_first": 0.6 if losses and not dp else None})
        return run

    outs = []
    for losses in (True, False):
        cells = plan_cells(SweepSpec(("ffa_lora",), (math.inf, 3.0), (0,), base), tmp_path / f"sweep-{losses}")
        run_sweep(cells, runner(losses))
        paths = write_report(cells, tmp_path / f"report-{losses}")
        with paths["csv"].open() as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 2 and all(r["final_accuracy"] == "0.6" for r in rows)
        outs.append([{k: v for k, v in r.items() if k not in ("run_dir", "wall_s")} for r in rows])
    assert outs[0] == outs[1]
