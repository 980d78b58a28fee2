"""What ``fedpeft simulate`` prints (src/fedpeft/cli/console.py) and the supported runtime's
process hygiene (src/fedpeft/sim/superlink.py).

The fast tests drive the real CLI (``fedpeft.cli.main.main``) with the run itself replaced by a
fake that reports rounds as the server loop does (progress.json, metrics rows), so the header,
the per-round lines, the table and ``-q`` are checked in well under a second. The slow ones run
the real command on the tiny model through Flower's runtime and read its whole output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from fedpeft.sim import superlink

NOISE = ("DEBUG", "deprecated", "FutureWarning", "font cache", "Traceback", "WARNING")


def _rows(cfg: Any) -> list[dict[str, Any]]:
    return [{"round": r, "accuracy": 0.5 + r / 100, "loss": 0.69, "epsilon": 3.0 * r, "epsilon_unit":
             "example-level, per client", "epsilon_relation": "replace-one", "delta": 1e-5, "accountant": "pld",
             "clients_accepted": 3, "clients_sent": 3, "bytes_up": 13080, "seconds": 1.5, "skipped": False}
            for r in range(1, cfg.train.rounds + 1)]


@pytest.fixture()
def fake_simulate(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """``simulate`` that reports each round to the console as the watcher does; records its options."""
    from fedpeft.sim import simulate as sim

    calls: list[dict[str, Any]] = []

    def fake(cfg: Any, run_dir: Any = None, resume: bool = False, progress: Any = None, **kw: Any) -> Any:
        calls.append({"resume": resume, **kw})
        path = Path(cfg.output_dir)
        rows = _rows(cfg)
        progress.started(cfg, path, kw.get("runtime") or "superlink")
        for row in rows:
            progress.update(row["round"], 0, 1, 3)
            progress.round_done(row)
        return path, rows

    monkeypatch.setattr(sim, "simulate", fake)
    return calls


def _cli(tiny_model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["simulate", "--model", str(tiny_model_dir), "--rounds", "2", "--examples-per-client", "96",
            "--test-size", "64", "--batch-size", "32", "--local-steps", "2", "--max-length", "24",
            "--output-dir", str(out), *extra]


def test_default_output_is_header_round_lines_table_result(fake_simulate, tiny_model_dir: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from fedpeft.cli.main import main

    assert main(_cli(tiny_model_dir, tmp_path / "run")) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("fedpeft simulate: ffa_lora r=8")
    assert "example-level, per client: epsilon=6" in out[0] and f"run directory: {tmp_path / 'run'}" in out[0]
    assert out[1].startswith("round 1/2: accuracy=0.5100") and "epsilon=3.000" in out[1]
    assert out[2].startswith("round 2/2: accuracy=0.5200")
    assert out[3].split() == ["round", "accuracy", "loss", "epsilon", "clients", "bytes_up", "seconds"]
    assert out[4].split()[:2] == ["1", "0.5100"] and out[5].split()[:2] == ["2", "0.5200"]
    assert out[-1].startswith("fedpeft: 2 rounds done: accuracy=0.5200 epsilon=6.000") and len(out) == 7
    assert fake_simulate == [{"resume": False, "verbose": False, "runtime": None}]


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_prints_only_the_result(fake_simulate, tiny_model_dir: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                      capsys: pytest.CaptureFixture[str], where: str) -> None:
    from fedpeft.cli.main import main

    argv = ["-q", *_cli(tiny_model_dir, tmp_path / "run")] if where == "before" else \
        [*_cli(tiny_model_dir, tmp_path / "run"), "-q"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [captured.out.strip()]
    assert captured.out.startswith("fedpeft: 2 rounds done: accuracy=0.5200") and captured.err == ""


def test_verbose_and_runtime_reach_simulate(fake_simulate, tiny_model_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fedpeft.cli.main import main

    assert main([*_cli(tiny_model_dir, tmp_path / "run"), "-v", "--runtime", "inprocess"]) == 0
    assert fake_simulate == [{"resume": False, "verbose": True, "runtime": "inprocess"}]


def test_a_runtime_failure_is_one_line_exit_1(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path,
                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedpeft.cli.main import main
    from fedpeft.sim import simulate as sim

    def failing(cfg: Any, **kw: Any) -> Any:
        raise superlink.RuntimeFailed("flwr run exited with status 1; see RUN/flower.log: ValueError: bad")

    monkeypatch.setattr(sim, "simulate", failing)
    assert main(_cli(tiny_model_dir, tmp_path / "run")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedpeft: error: flwr run exited with status 1")


def test_watcher_reports_progress_and_new_rounds_only(tmp_path: Path) -> None:
    from fedpeft.sim.watch import RunWatcher

    seen: list[Any] = []

    class Spy:
        def update(self, *a: int) -> None:
            seen.append(("update", *a))

        def round_done(self, row: dict[str, Any]) -> None:
            seen.append(("done", row["round"]))

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n")  # a resumed run's round 1
    watcher = RunWatcher(tmp_path, Spy())
    (tmp_path / "progress.json").write_text(json.dumps({"round": 2, "attempt": 0, "replies": 1, "sent": 3}))
    watcher.poll()
    watcher.poll()  # unchanged: nothing new
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"round": 2}) + "\n")
    watcher.poll()
    assert seen == [("update", 2, 0, 1, 3), ("done", 2)]


@pytest.mark.parametrize(("backend", "expected"), [
    ({"client_resources": {"num_cpus": 0.666, "num_gpus": 0.0}, "init_args": {"num_cpus": 2, "num_gpus": 0}},
     "num-supernodes=3 client-resources-num-cpus=1 init-args-num-cpus=3 client-resources-num-gpus=0.0"),
    ({"client_resources": {"num_cpus": 1.0, "num_gpus": 0.25}, "init_args": {"num_cpus": 16, "num_gpus": 1}},
     "num-supernodes=3 client-resources-num-cpus=1 init-args-num-cpus=16 client-resources-num-gpus=0.25 "
     "init-args-num-gpus=1"),
])
def test_a_fractional_cpu_share_keeps_the_actor_pool_size(backend: dict[str, Any], expected: str) -> None:
    """Flower's SimulationConfig holds client CPUs as an integer: 3 actors on 2 cores become 3
    logical CPUs of 1 each (the pool size Flower computes from the share, int(2 / 0.666) = 3)."""
    assert superlink.federation_config(3, backend) == expected


def _alive(pids: dict[int, float]) -> list[int]:
    out = []
    for pid, created in pids.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


def test_the_run_returns_once_the_serverapp_marks_it_finished_and_stop_ends_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``flwr run`` (here a process that would outlive the test) is not waited for once the
    ServerApp's finished marker exists (:func:`fedpeft.sim.apps.write_finished`); :meth:`stop`
    then ends it. Without the marker the run would wait for it to exit."""
    import threading
    import time

    from fedpeft.sim.apps import finished_marker, write_finished

    real_popen = subprocess.Popen
    monkeypatch.setattr(superlink.subprocess, "Popen", lambda cmd, **kw: real_popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], **kw))
    link = superlink.LocalSuperLink(tmp_path / "flower.log")
    link.home = __import__("tempfile").TemporaryDirectory(prefix="fedpeft-flwr-")
    link._log = link.live_log.open("ab")
    launch = link.home_path / "launch.pickle"
    assert finished_marker(launch) == link.home_path / "finished"
    threading.Timer(1.0, write_finished, args=(launch,)).start()
    t0 = time.monotonic()
    link.run(tmp_path, 'launch=""', "num-supernodes=1", finished=finished_marker(launch))
    assert time.monotonic() - t0 < 30 and finished_marker(launch).read_text() == "finished\n"
    flwr_run = link.run_proc
    assert flwr_run is not None and flwr_run.poll() is None  # returned without waiting for it
    link.stop()
    assert flwr_run.poll() is not None and link.home is None


@pytest.mark.slow
def test_the_local_superlink_starts_and_leaves_nothing_running(tmp_path: Path) -> None:
    with superlink.LocalSuperLink(tmp_path / "flower.log") as link:
        assert link._healthy()
        home = link.home_path
        assert (home / "config.toml").read_text().count(link.address) == 1
        link.track()
        pid = link.proc.pid  # type: ignore[union-attr]
        started = {pid: psutil.Process(pid).create_time(), **link.known}
    assert not _alive(started), "processes left running"
    assert not home.exists()


MARK = f"fedpeft-test-{os.getpid()}"  # every process the CLI starts inherits it (other jobs' processes do not)


def _ours_alive() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("FEDPEFT_TEST_MARK") == MARK and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def _fedpeft(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", FEDPEFT_TEST_MARK=MARK)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([sys.executable, "-m", "fedpeft.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_a_real_run_prints_no_noise_and_quiet_only_the_result(tiny_model_dir: Path, tmp_path: Path) -> None:
    proc = _fedpeft(*_cli(tiny_model_dir, tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    for word in NOISE:
        assert word not in text, (word, text[-3000:])
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("fedpeft simulate:") and "runtime: superlink" in lines[0]
    assert [x.split(":")[0] for x in lines[1:3]] == ["round 1/2", "round 2/2"]
    assert lines[-1].startswith("fedpeft: 2 rounds done:")
    assert "DEBUG" in (tmp_path / "run" / "flower.log").read_text()  # the details are kept, in the run directory
    quiet = _fedpeft("-q", *_cli(tiny_model_dir, tmp_path / "run-q", "--rounds", "1"))
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stdout.splitlines() == [quiet.stdout.strip()] and quiet.stdout.startswith("fedpeft: 1 rounds done")
    assert quiet.stderr == ""
    assert not _ours_alive(), "processes of the run left running"


@pytest.mark.slow
def test_sigterm_mid_round_stops_everything_the_run_started(tiny_model_dir: Path, tmp_path: Path) -> None:
    """SIGTERM to the command while a round is in flight: exit status 130, one line on stderr,
    and no process it started (SuperLink, SuperExec, flwr-simulation, Ray) is left."""
    import signal
    import time

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", FEDPEFT_TEST_MARK=MARK)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fedpeft.cli.main", *_cli(tiny_model_dir, out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (out / "progress.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before a round was in flight"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "fedpeft: interrupted", err[-2000:]
    assert not _ours_alive(), "processes of the run left running"
