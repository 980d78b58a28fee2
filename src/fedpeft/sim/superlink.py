"""Flower 1.42's supported simulation path: a private local SuperLink and ``flwr run``.

``flwr.simulation.run_simulation`` is deprecated in Flower 1.42 ("will be removed in a future
version"); the supported way to run a simulation is ``flwr run APP superlink`` against a
SuperLink started with ``--simulation``. The SuperLink's SuperExec then starts one
``flwr-simulation`` process that runs the ServerApp and the Ray clients
(``flwr/simulation/app.py``). :class:`LocalSuperLink` does exactly that, privately for one run:

* a free port on 127.0.0.1 (Control, Fleet and Runtime APIs share one HTTP port in 1.42);
* its own ``FLWR_HOME`` (a temporary directory: the connection in ``config.toml``, the FAB
  install) so nothing of the user's ``~/.flwr`` is read or written, and two runs never meet;
* readiness: ``GET /health`` on that port;
* every process it starts (SuperLink, SuperExec, ``flwr-simulation``, Ray's) is tracked by PID
  while it runs, and found afterwards by the private ``FLWR_HOME`` in its environment (what was
  re-parented or started between checks), and stopped in :meth:`LocalSuperLink.stop` -- on success, on failure, on
  Ctrl-C and on SIGTERM (:func:`terminate_as_interrupt`); the SuperLink also gets SIGTERM when
  this process dies (Linux ``PR_SET_PDEATHSIG``), whose SuperExec follows its parent.

All output of the runtime (Flower's DEBUG lines, Ray's warnings, per-client progress bars)
goes to one log file in the run directory, never to the console.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO, Any

__all__ = ["LocalSuperLink", "RuntimeFailed", "federation_config", "free_port", "runtime_env", "terminate_as_interrupt"]

READY_TIMEOUT_S = 60.0
SIMULATION_GONE_S = 90.0
"""``flwr run --stream`` returns once the run's logs are all in; if Flower's simulation process
died without reporting (killed from outside), it would wait forever: give up this long after."""


class RuntimeFailed(RuntimeError):
    """The local SuperLink or ``flwr run`` failed (the message is one line and names the log)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def runtime_env(verbose: bool = False) -> dict[str, str]:
    """The environment of the runtime's processes: the venv's ``bin`` first on PATH (the
    SuperLink starts ``flower-superexec``, that ``flwr-simulation``, through PATH), no runtime
    dependency installation (it would pip-install into the venv), no telemetry, no Ray
    FutureWarning about accelerator variables, no per-client progress bars unless verbose."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    env.setdefault("RAY_DEDUP_LOGS", "0")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")  # Flower's 1.0 s is paid once per run
    if not verbose:
        env.setdefault("FEDPEFT_PROGRESS", "0")
    src = Path(__file__).resolve().parents[2]  # a source checkout's src/: the processes run these sources too
    if src.name == "src":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH", "")) if p)
    return env


def federation_config(num_supernodes: int, backend: dict[str, Any]) -> str:
    """``flwr run --federation-config`` for ``backend`` (``client_resources``/``init_args``).

    Flower's SimulationConfig holds ``client_resources_num_cpus`` as an integer, so a
    fractional CPU share (3 actors on 2 cores) is written as ``init_args.num_cpus = actors``
    (Ray's logical CPUs) with 1 CPU per actor: the same pool size, one torch thread each."""
    res, init = dict(backend.get("client_resources", {})), dict(backend.get("init_args", {}))
    cpus = float(res.get("num_cpus", 1.0))
    pairs: dict[str, Any] = {"num-supernodes": int(num_supernodes)}
    if cpus.is_integer() and cpus >= 1:
        pairs["client-resources-num-cpus"] = int(cpus)
        if "num_cpus" in init:
            pairs["init-args-num-cpus"] = int(init["num_cpus"])
    else:  # the pool size Flower would compute: int(cores / share)
        cores = int(init.get("num_cpus", os.cpu_count() or 1))
        pairs["client-resources-num-cpus"] = 1
        pairs["init-args-num-cpus"] = max(1, int(cores / cpus + 1e-9))
    gpus = float(res.get("num_gpus", 0.0) or 0.0)
    pairs["client-resources-num-gpus"] = gpus
    if init.get("num_gpus"):
        pairs["init-args-num-gpus"] = int(init["num_gpus"])
    return " ".join(f"{k}={v}" for k, v in pairs.items())


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the SuperLink gets SIGTERM when the process that started it dies (even by SIGKILL)."""
    os.setsid()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalSuperLink:
    """A SuperLink in simulation mode for one run; use as a context manager (module doc)."""

    def __init__(self, keep_log: Path | None = None, verbose: bool = False) -> None:
        """``keep_log``: where the runtime's log is appended when the SuperLink stops (settable
        later, once the run directory is known to be this run's); until then it is written in
        the private FLWR_HOME (:attr:`live_log`)."""
        self.keep_log = keep_log
        self.verbose = verbose
        self.port = 0
        self.env: dict[str, str] = {}
        self.home: tempfile.TemporaryDirectory[str] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.run_proc: subprocess.Popen[bytes] | None = None
        self.known: dict[int, float] = {}  # pid -> create time (a reused pid is never signalled)
        self._log: IO[bytes] | None = None

    def __enter__(self) -> LocalSuperLink:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def home_path(self) -> Path:
        """The private FLWR_HOME (removed by :meth:`stop`): the run's app directory and launch file go here."""
        if self.home is None:
            raise RuntimeError("the SuperLink is not started")
        return Path(self.home.name)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def live_log(self) -> Path:
        """The log file the runtime's processes write while they run."""
        return self.home_path / "flower.log"

    @property
    def log_path(self) -> Path:
        """Where the log will be (what error messages name)."""
        return self.keep_log if self.keep_log is not None else self.live_log

    def start(self) -> None:
        """:meth:`launch`, then :meth:`wait_ready`."""
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the SuperLink; it gets ready while this process does other work."""
        self.home = tempfile.TemporaryDirectory(prefix="fedpeft-flwr-")
        self.port = free_port()
        (Path(self.home.name) / "config.toml").write_text(
            f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "{self.address}"\ninsecure = true\n',
            encoding="utf-8")
        self.env = {**runtime_env(self.verbose), "FLWR_HOME": self.home.name}
        self._log = self.live_log.open("ab")
        cmd = ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
               "--host", "127.0.0.1", "--port", str(self.port), "--disable-runtime-dependency-installation"]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)  # noqa: PLW1509

    def wait_ready(self) -> None:
        """Until ``GET /health`` answers (:class:`RuntimeFailed` if the SuperLink exits or takes too long)."""
        if self.proc is None:
            raise RuntimeError("the SuperLink is not launched")
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._healthy():
            self.track()
            if self.proc.poll() is not None:
                raise RuntimeFailed(f"flower-superlink exited with status {self.proc.returncode} before it was "
                                    f"ready; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeFailed(f"flower-superlink not ready within {READY_TIMEOUT_S:.0f} s; see {self.log_path}")
            time.sleep(0.1)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.address}/health", timeout=1.0) as r:  # noqa: S310
                return 200 <= int(r.status) < 300
        except OSError:
            return False

    def track(self) -> bool:
        """Remember the PIDs of every process below the SuperLink (and ``flwr run``) now; whether
        Flower's ``flwr-simulation`` process is among them."""
        import psutil

        simulating = False
        for proc in (self.proc, self.run_proc):
            if proc is None:
                continue
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        self.known.setdefault(child.pid, child.create_time())
                        simulating = simulating or any("flwr-simulation" in a for a in child.cmdline()[:3])
        return simulating

    def run(self, app_dir: Path, run_config: str, federation: str,
            poll: Callable[[], None] | None = None, poll_s: float = 0.2, finished: Path | None = None) -> None:
        """``flwr run APP_DIR sim --stream`` until the run ends, or until the file ``finished``
        exists (the ServerApp wrote it after its last output: :func:`fedpeft.sim.apps.finished_marker`;
        the caller then stops the runtime with :meth:`stop`, skipping Flower's own teardown);
        ``poll`` is called between checks (progress). Its output is appended to the log file; a
        non-zero exit is :class:`RuntimeFailed`."""
        cmd = [str(Path(sys.executable).with_name("flwr")), "run", str(app_dir), "sim", "--stream",
               "--run-config", run_config, "--federation-config", federation]
        self.run_proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        seen, gone_since = False, 0.0
        while self.run_proc.poll() is None:
            if finished is not None and finished.is_file():
                if poll is not None:
                    poll()
                return
            simulating = self.track()
            seen = seen or simulating
            gone_since = 0.0 if simulating else (gone_since or time.monotonic())
            if seen and gone_since and time.monotonic() - gone_since > SIMULATION_GONE_S:
                raise RuntimeFailed(f"flwr-simulation exited {SIMULATION_GONE_S:.0f} s ago but the run did not end; "
                                    f"see {self.log_path}")
            if poll is not None:
                poll()
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeFailed(f"flower-superlink exited with status {self.proc.returncode} during the run; "
                                    f"see {self.log_path}")
            time.sleep(poll_s)
        if poll is not None:
            poll()
        if self.run_proc.returncode != 0:
            raise RuntimeFailed(f"flwr run exited with status {self.run_proc.returncode}; see {self.log_path}")

    def _kill_marked(self, passes: int = 3) -> None:
        """SIGKILL every process whose environment names this run's private FLWR_HOME: what Ray or
        the SuperExec started after the last :meth:`track`, or re-parented to init when its parent
        died, is no longer below the SuperLink but still carries the environment it inherited."""
        import psutil

        if self.home is None:
            return
        for _ in range(passes):
            found = []
            for p in psutil.process_iter():
                with contextlib.suppress(psutil.Error):
                    if (p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE
                            and p.environ().get("FLWR_HOME") == self.home.name):
                        p.kill()
                        found.append(p)
            if not found:
                return
            psutil.wait_procs(found, timeout=5)

    def stop(self) -> None:
        """Stop everything started: ``flwr run``, the SuperLink (SIGTERM, then SIGKILL), and every
        process seen below them (SIGKILL by PID), then every process that still carries the run's
        FLWR_HOME in its environment (:meth:`_kill_marked`); remove the private FLWR_HOME."""
        import psutil

        self.track()
        for proc in (self.run_proc, self.proc):
            if proc is not None and proc.poll() is None:
                proc.terminate()
        alive = []  # killed while the SuperLink shuts down, not after: nothing below it is waited for
        for pid, created in sorted(self.known.items()):
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    p.kill()
                    alive.append(p)
        for proc in (self.run_proc, self.proc):
            if proc is not None:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        psutil.wait_procs(alive, timeout=5)
        self._kill_marked()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.home is not None and self.keep_log is not None and self.live_log.is_file():
            self.keep_log.parent.mkdir(parents=True, exist_ok=True)
            with self.keep_log.open("ab") as dst, self.live_log.open("rb") as src:
                dst.write(src.read())
        if self.home is not None:
            self.home.cleanup()
            self.home = None


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises KeyboardInterrupt in the main thread, so ``finally`` blocks
    (stopping the SuperLink) run as on Ctrl-C. Outside the main thread: nothing changes."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
