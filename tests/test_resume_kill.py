"""Crash-resume with a real SIGKILL: a run killed mid-way and resumed with ``--resume`` ends
bit-identical to an uninterrupted run, and no client's privacy ledger is reset or charged
twice. Real processes (the ``fedpeft`` CLI, Flower's simulation engine, Ray workers); every
process the test starts is killed by PID, even on failure."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from safetensors.numpy import load_file
from tiny_model import hetero_scenario

from fedpeft.server.checkpoint import load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.guarantee]

ROUNDS = 3


def _fedpeft(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "fedpeft"), "-q", "simulate", *args]


def _cmd(model: Path, out: Path, *extra: str) -> list[str]:
    return [*_fedpeft(), "--model", str(model), "--rounds", str(ROUNDS), "--examples-per-client", "96",
            "--test-size", "64", "--batch-size", "32", "--local-steps", "6", "--max-length", "24",
            "--output-dir", str(out), *extra]


def _env(secrets: Path) -> dict[str, str]:
    env = dict(os.environ, FEDPEFT_PROGRESS="0", HF_HUB_OFFLINE="1", FEDPEFT_SECRET_HOME=str(secrets))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _kill_tree(proc: psutil.Process, known: set[int]) -> None:
    """SIGKILL ``proc`` and every descendant seen now or earlier (``known``), by PID."""
    with contextlib.suppress(psutil.Error):
        known |= {c.pid for c in proc.children(recursive=True)}
    for pid in [proc.pid, *sorted(known)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _adapter(run: Path) -> dict[str, np.ndarray]:
    files = sorted((run / "adapter").glob("*.safetensors"))
    assert files, f"no adapter written in {run}"
    out: dict[str, np.ndarray] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _ledgers(run: Path) -> dict[str, list[tuple[int, int]]]:
    return {p.name: [(e["round"], e["steps"]) for e in json.loads(p.read_text())["entries"]]
            for p in sorted((run / "ledger").glob("client-*.json"))}


def _same_nodes(secrets: Path, reference: Path, crashed: Path, clients: int = 3) -> None:
    """Give the crashed run's simulated clients the reference run's node secrets: the same
    nodes doing the same run twice. (Each simulated client's secret is keyed by its ledger
    directory, so two run directories are two sets of nodes, with different DP noise.) A
    client that never trained (an emulated device that declines) may have none."""
    import shutil

    from fedpeft.client.node_store import secret_path

    for cid in map(str, range(clients)):
        src, dst = secret_path(reference / "ledger", cid, False), secret_path(crashed / "ledger", cid, False)
        if not src.is_file():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def _run_then_kill(cmd: list[str], env: dict[str, str], run: Path) -> int | None:
    """Start ``cmd``; SIGKILL it and all its processes as soon as ``run`` has a checkpoint (a
    round is then in flight); the checkpointed round, or None if the run was never interrupted."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ps, seen = psutil.Process(proc.pid), set()
    killed_after = None
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                seen |= {c.pid for c in ps.children(recursive=True)}
            ckpt = run / "checkpoint.npz"
            if ckpt.is_file():
                killed_after = load_checkpoint(ckpt).server_round
                _kill_tree(ps, seen)  # round killed_after + 1 is in flight
                break
            time.sleep(0.05)
    finally:
        _kill_tree(ps, seen)
        proc.wait(timeout=30)
    return killed_after


def test_sigkill_then_resume_is_bit_identical(tiny_model_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's nodes keep their secrets (outside the run directory) across the SIGKILL, so the
    resumed run ends exactly where an uninterrupted run of the same nodes ends."""
    reference, crashed, secrets = tmp_path / "reference", tmp_path / "crashed", tmp_path / "node-secrets"
    monkeypatch.setenv("FEDPEFT_SECRET_HOME", str(secrets))
    subprocess.run(_cmd(tiny_model_dir, reference), env=_env(secrets), check=True, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _same_nodes(secrets, reference, crashed)

    killed_after = _run_then_kill(_cmd(tiny_model_dir, crashed), _env(secrets), crashed)
    assert killed_after is not None and killed_after < ROUNDS, "the run was not interrupted mid-way"
    assert not (crashed / "adapter").exists()

    resumed = subprocess.run(_fedpeft("--resume", str(crashed)),
                             env=_env(secrets), timeout=600, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a, b = _adapter(reference), _adapter(crashed)
    assert set(a) == set(b) and a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)  # bit-identical
    rows_a = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows_b] == list(range(1, ROUNDS + 1))
    assert [r["accuracy"] for r in rows_a] == [r["accuracy"] for r in rows_b]
    assert [r["epsilon"] for r in rows_a] == [r["epsilon"] for r in rows_b]
    # every client's ledger: each round once, nothing reset, nothing charged twice
    assert _ledgers(crashed) == _ledgers(reference)
    assert all(len(v) == ROUNDS for v in _ledgers(crashed).values())


def test_resume_with_another_configuration_exits_2(tiny_model_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.run(_cmd(tiny_model_dir, run, "--rounds", "1"), env=_env(tmp_path / "node-secrets"), timeout=600,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = subprocess.run(_fedpeft("--resume", str(run), "--lr", "0.5"), env=_env(tmp_path / "node-secrets"), timeout=120,
                           capture_output=True, text=True)
    assert again.returncode == 2 and "differs" in again.stderr and "train.lr" in again.stderr
    assert "Traceback" not in again.stderr


SCENARIO = hetero_scenario("resume-hetero")


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_scenario_run_sigkill_then_resume_is_bit_identical(tiny_model_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A heterogeneous-scenario run killed mid-way resumes (``--resume RUN --scenario S``) to the
    uninterrupted run's adapter, rows and timeline; the emulator goes on with its simulated clock
    and the step cost it measured at the first start (a re-measured cost would show as other
    compute estimates for the same work in the resumed rounds)."""
    reference, crashed, secrets = tmp_path / "reference", tmp_path / "crashed", tmp_path / "node-secrets"
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(SCENARIO)
    monkeypatch.setenv("FEDPEFT_SECRET_HOME", str(secrets))
    extra = ("--scenario", str(scenario), "--local-steps", "2")
    subprocess.run(_cmd(tiny_model_dir, reference, *extra), env=_env(secrets), check=True, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _same_nodes(secrets, reference, crashed, clients=4)

    killed_after = _run_then_kill(_cmd(tiny_model_dir, crashed, *extra), _env(secrets), crashed)
    assert killed_after is not None and killed_after < ROUNDS, "the run was not interrupted mid-way"
    plan = (crashed / "hetero_plan.json").read_text()

    without = subprocess.run(_fedpeft("--resume", str(crashed)), env=_env(secrets), timeout=120,
                             capture_output=True, text=True)
    assert without.returncode == 2 and "--scenario" in without.stderr and "Traceback" not in without.stderr
    resumed = subprocess.run(_fedpeft("--resume", str(crashed), "--scenario", str(scenario)),
                             env=_env(secrets), timeout=600, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a, b = _adapter(reference), _adapter(crashed)
    assert set(a) == set(b) and a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)  # bit-identical
    rows_a, rows_b = _lines(reference / "metrics.jsonl"), _lines(crashed / "metrics.jsonl")
    assert [r["round"] for r in rows_b] == list(range(1, ROUNDS + 1))
    for key in ("accuracy", "epsilon", "sim_seconds", "sim_clock", "hetero", "clients_accepted", "bytes_up_actual"):
        assert [r[key] for r in rows_a] == [r[key] for r in rows_b], key
    assert rows_b[-1]["sim_clock"] == pytest.approx(sum(r["sim_seconds"] for r in rows_b))
    # the timeline: every round once, every client's fate as in the uninterrupted run
    fate = ("round", "client", "profile", "status", "rank", "physical_batch", "bytes_up", "steps", "reason")
    line_a, line_b = _lines(reference / "hetero_timeline.jsonl"), _lines(crashed / "hetero_timeline.jsonl")
    assert [e["round"] for e in line_b] == [r for r in range(1, ROUNDS + 1) for _ in range(4)]
    assert [[e[k] for k in fate] for e in line_a] == [[e[k] for k in fate] for e in line_b]
    # the same work is priced alike before and after the resume: the step cost came back
    for client in {e["client"] for e in line_b if e["steps"]}:
        assert len({e["estimated_compute_s"] for e in line_b if e["client"] == client}) == 1, client
    assert (crashed / "hetero_plan.json").read_text() == plan
    assert (crashed / "plots" / "client_timeline.png").is_file()
    assert _ledgers(crashed) == _ledgers(reference)
