"""Simulation benchmarks: Flower's overhead over a bare loop, and scale in virtual clients.

*Overhead* compares :func:`fedpeft.sim.simulate.simulate` (the supported runtime: a local
SuperLink, ``flwr run``, Ray, ServerApp, ClientApp, ledgers, validation, checkpoints) with :func:`bare_federation`, one
process doing the same work with no Flower: per round, every client's
:func:`fedpeft.client.trainer.train_local` call with the same data, steps, seed and calibrated
sigma, the plugin's aggregation and the server's evaluation. The two are run interleaved
(bare, simulated, bare, ...) and compared by median wall time; the ratio of the steady
rounds (all but the first, whose time includes each Ray actor loading the model) is reported
separately, clearly labelled, as is the one-off start-up. Wall time on a shared machine moves
with its load, so CPU seconds are reported too, per process kind of the simulation
(:func:`_cpu_by_kind`: SuperLink, SuperExec, ServerApp, client actors, Ray's daemons) against
the bare loop's: where the overhead goes, in a unit that load does not inflate.

*Scale* (10 to 10,000 virtual clients) is :mod:`benchmarks.scale`.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .results import Measurement, Target

__all__ = ["bare_federation", "sim_overhead"]

Progress = Callable[[str], None]


def bare_federation(cfg: Any) -> list[float]:
    """The federation's training, aggregation and evaluation in one process, no Flower.

    Returns the wall seconds of each round; round 1 includes loading the model from disk
    and calibrating sigma (the in-process caches are cleared first, as a fresh Flower worker
    starts cold).
    """
    from fedpeft.adapters import get as get_plugin
    from fedpeft.client.trainer import local_steps, train_local
    from fedpeft.data.partition import client_partition
    from fedpeft.data.sources import train_test_split_for
    from fedpeft.privacy.accounting import calibrate_noise
    from fedpeft.privacy.plan import sample_rate_for
    from fedpeft.privacy.randomness import NodeSecret, RoundRandomness
    from fedpeft.tasks import model as task_model
    from fedpeft.tasks import seq_cls
    from fedpeft.tasks.model import load_tokenizer, pick_device
    from fedpeft.tasks.seq_cls import evaluate, load_base_model

    seq_cls._load_base.cache_clear()
    task_model._load_tokenizer.cache_clear()
    calibrate_noise.cache_clear()  # a fresh worker calibrates its clients' sigma, so does the bare loop
    t0 = time.perf_counter()
    plugin = get_plugin(cfg.adapter.method)
    device = pick_device(cfg.device)
    tok = load_tokenizer(cfg.model)
    pool, test = train_test_split_for(cfg.data, cfg.seed)
    model = plugin.attach(load_base_model(cfg.model, pool.num_classes, head_seed=cfg.adapter.seed), cfg).to(device)
    state = {k: v.detach().cpu().numpy().copy() for k, v in plugin.trainable_state(model).items()}
    data = [client_partition(pool, cfg.data, cfg.train.clients, i, cfg.seed) for i in range(cfg.train.clients)]
    sigmas: dict[int, float | None] = {}
    secrets_of: dict[int, NodeSecret] = {}
    seconds: list[float] = []
    for server_round in range(1, cfg.train.rounds + 1):
        states, weights = [], []
        for i, part in enumerate(data):
            steps = local_steps(cfg, len(part))
            if i not in sigmas:  # calibrated once per client, as the ClientApp does
                q = sample_rate_for(len(part), cfg.train.batch_size)
                sigmas[i] = calibrate_noise(cfg.privacy.epsilon, cfg.privacy.delta, q, steps * cfg.train.rounds,
                                            cfg.privacy.accountant).noise_multiplier if cfg.privacy.enabled else None
            plugin.load_state(model, state)
            # each bare client draws its DP randomness from a secret of its own, as a node does
            seed: int | RoundRandomness = RoundRandomness.derived(secrets_of.setdefault(i, NodeSecret.generate()),
                                                                  str(server_round)) if sigmas[i] else server_round
            res = train_local(model, plugin, tok, part, cfg, steps, device, sigmas[i], seed)
            states.append({k: v.detach().cpu().numpy().copy() for k, v in plugin.trainable_state(model).items()})
            weights.append(float(res.examples))
        state = plugin.server_step(server_round, plugin.aggregate(states, weights, state), cfg)
        plugin.load_state(model, state)
        evaluate(model, tok, test, cfg.model.max_length, device)
        seconds.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
    return seconds


KINDS = (("flower-superlink", "SuperLink"), ("flower-superexec", "SuperExec"), ("flwr run", "flwr run"),
         ("flwr-simulation", "ServerApp (flwr-simulation)"), ("ClientAppActor", "client actors"))


def _kind(cmdline: list[str]) -> str:
    """Which part of the runtime a process of the simulation is (by its command line)."""
    text = " ".join(cmdline[:4])
    return next((label for key, label in KINDS if key in text), "Ray daemons and other")


def _cpu_by_kind(run: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """``run()``, sampling every process below this one every 0.3 s; the CPU seconds (user +
    system) each had when last seen, summed by :func:`_kind`, with this process's own as
    ``driver``. A process that ends between samples loses at most its last 0.3 s.

    A process keeps the first specific kind it was seen with: a Ray worker starts as
    ``ray::IDLE`` before it becomes a client actor, and an exiting process's command line
    reads empty, so the kind of its last sample alone would book an actor's whole CPU time
    under Ray's daemons (it did, before 2026-12-03 20:00 UTC: 44 s of "Ray daemons" were
    mostly actors)."""
    import psutil

    fallback = _kind([])
    me = psutil.Process()
    seen: dict[tuple[int, float], tuple[str, float]] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for p in me.children(recursive=True):
                try:
                    with p.oneshot():
                        t = p.cpu_times()
                        key = (p.pid, p.create_time())
                        kind = _kind(p.cmdline())
                        if kind == fallback and key in seen:
                            kind = seen[key][0]
                        seen[key] = (kind, t.user + t.system)
                except psutil.Error:
                    pass
            done.wait(0.3)

    before = me.cpu_times()
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        out = run()
    finally:
        done.set()
        watcher.join()
    after = me.cpu_times()
    cpu = {"driver": (after.user - before.user) + (after.system - before.system)}
    for kind, seconds in seen.values():
        cpu[kind] = cpu.get(kind, 0.0) + seconds
    return out, {k: round(v, 1) for k, v in cpu.items()}


def _bare_cpu(cfg: Any) -> tuple[list[float], float]:
    """:func:`bare_federation` and the CPU seconds this process spent on it."""
    t = time.process_time()
    seconds = bare_federation(cfg)
    return seconds, time.process_time() - t


def _simulated(cfg: Any, run_dir: Path) -> tuple[float, list[float], dict[str, float]]:
    from fedpeft.sim.simulate import simulate

    t0 = time.perf_counter()
    (_, rows), cpu = _cpu_by_kind(lambda: simulate(cfg, run_dir))
    return time.perf_counter() - t0, [float(r["seconds"]) for r in rows], cpu


def sim_overhead(model_path: str, reps: int, rounds: int, clients: int, local_steps: int, examples: int,
                 test_size: int, progress: Progress | None = None) -> list[Measurement]:
    """Simulated run / bare loop, total and steady-state (rounds after the first)."""
    from fedpeft.load import parse_config

    tmp = Path(tempfile.mkdtemp(prefix="bench-sim-"))
    cfg = parse_config({"model.path": model_path, "train.rounds": rounds, "train.clients": clients,
                        "train.local_steps": local_steps, "train.batch_size": 32, "data.examples_per_client": examples,
                        "data.test_size": test_size, "output_dir": str(tmp)})
    bare: list[list[float]] = []
    bare_cpu: list[float] = []
    sim: list[tuple[float, list[float], dict[str, float]]] = []
    previous = os.environ.get("FEDPEFT_CALIBRATION_CACHE")
    try:
        for rep in range(reps):
            # each run calibrates its distinct plans once (fedpeft.privacy.calibration_cache), none from an earlier run
            os.environ["FEDPEFT_CALIBRATION_CACHE"] = str(tmp / f"calibration-bare-{rep}")
            seconds, cpu = _bare_cpu(cfg)
            bare.append(seconds)
            bare_cpu.append(cpu)
            if progress:
                progress(f"bare loop {rep + 1}/{reps}: {sum(bare[-1]):.1f} s")
            os.environ["FEDPEFT_CALIBRATION_CACHE"] = str(tmp / f"calibration-sim-{rep}")
            sim.append(_simulated(cfg, tmp / f"sim-{rep}"))
            if progress:
                progress(f"simulation {rep + 1}/{reps}: {sim[-1][0]:.1f} s")
    finally:
        if previous is None:
            os.environ.pop("FEDPEFT_CALIBRATION_CACHE", None)
        else:
            os.environ["FEDPEFT_CALIBRATION_CACHE"] = previous
        shutil.rmtree(tmp, ignore_errors=True)
    bare_total = statistics.median(sum(b) for b in bare)
    sim_total = statistics.median(s[0] for s in sim)
    bare_steady = statistics.median(sum(b[1:]) for b in bare) if rounds > 1 else math.nan
    sim_steady = statistics.median(sum(s[1][1:]) for s in sim) if rounds > 1 else math.nan
    sim_rounds = statistics.median(sum(s[1]) for s in sim)
    detail = {"model": model_path or "MiniLM-L6 (default)", "clients": clients, "rounds": rounds,
              "local_steps": local_steps, "batch_size": 32, "examples_per_client": examples, "test_size": test_size,
              "dp": f"epsilon={cfg.privacy.epsilon:g}", "reps": reps, "bare_total_s": bare_total,
              "sim_total_s": sim_total, "bare_steady_s": bare_steady, "sim_steady_s": sim_steady,
              "sim_startup_s": sim_total - sim_rounds, "bare_round_s": bare, "sim_round_s": [s[1] for s in sim],
              "sim_wall_s": [s[0] for s in sim], "bare_cpu_s": bare_cpu, "sim_cpu_s_by_process": [s[2] for s in sim]}
    sim_cpu = statistics.median(sum(s[2].values()) for s in sim)
    return [
        Measurement("sim_overhead", "simulated run / bare loop, wall time (incl. Ray start-up)",
                    sim_total / bare_total, "x", Target("<=", 1.3), detail=detail),
        Measurement("sim_overhead", "simulated / bare, rounds after the first (start-up and model loads excluded)",
                    sim_steady / bare_steady, "x", Target("<=", 1.10), detail=detail),
        Measurement("sim_overhead", "one-off simulation start-up (Ray, ServerApp set-up) before round 1",
                    sim_total - sim_rounds, "s", detail=detail),
        Measurement("sim_overhead", "simulated run / bare loop, CPU seconds (every process of the runtime; "
                    "by process in the JSON)", sim_cpu / statistics.median(bare_cpu), "x", detail=detail),
    ]
