"""`flwr run .` runs the same app with the same defaults as `fedpeft simulate`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import psutil
import pytest

from fedpeft.load import parse_config
from fedpeft.server.app import config_from_run_config

ROOT = Path(__file__).resolve().parents[1]


def _app_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_run_config_equals_the_cli_defaults() -> None:
    assert config_from_run_config(_app_config()) == parse_config()


def test_flwr_run_with_the_causal_lm_task_type_gets_its_defaults() -> None:
    """The app's task-type-dependent keys are "" (unset), so `--run-config task_type='causal-lm'`
    resolves exactly as `fedpeft simulate --task causal-lm` (not seq-cls's module names)."""
    cfg = config_from_run_config({**_app_config(), "task_type": "causal-lm"})
    assert cfg == parse_config({"task_type": "causal-lm"})
    assert cfg.adapter.target_modules == ("q_proj", "v_proj")


def test_every_config_key_is_overridable_with_flwr_run() -> None:
    """`flwr run --run-config` only accepts keys listed in pyproject; list them all."""
    from fedpeft.config import config_to_dict

    listed = set(_app_config())
    for section, value in config_to_dict(parse_config()).items():
        if isinstance(value, dict):
            for key in value:
                if key != "options":
                    assert f"{section}.{key}" in listed, f"{section}.{key} missing from [tool.flwr.app.config]"
        else:
            assert section in listed, f"{section} missing from [tool.flwr.app.config]"


def _stop_processes_under(flwr_home: Path) -> None:
    """Stop, by PID, every process whose command line names our FLWR_HOME (the local SuperLink)."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(flwr_home) in part for part in proc.info["cmdline"] or []):
                os.kill(proc.info["pid"], signal.SIGTERM)
                proc.wait(timeout=10)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired, ProcessLookupError):
            pass


@pytest.mark.slow
def test_flwr_run_local_simulation(tiny_model_dir: Path, tmp_path: Path) -> None:
    flwr_home = tmp_path / "flwr-home"
    # `flwr` launches `flower-superlink` through PATH: make sure the venv's bin/ is on it even
    # when the venv is not activated (CI calls .venv/bin/python directly).
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "FLWR_HOME": str(flwr_home),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    flwr = str(Path(sys.executable).with_name("flwr"))
    out = tmp_path / "run"
    overrides = (f"model.path='{tiny_model_dir}' train.rounds=2 data.examples_per_client=64 data.test_size=50 "
                 f"train.local_steps=1 train.batch_size=32 model.max_length=24 output_dir='{out}'")
    try:
        subprocess.run([flwr, "federation", "simulation-config", "@none/default", "local",
                        "--num-supernodes", "3", "--client-resources-num-cpus", "1"],
                       cwd=ROOT, env=env, check=True, timeout=120, capture_output=True)
        proc = subprocess.run([flwr, "run", ".", "local", "--stream", "--run-config", overrides],
                              cwd=ROOT, env=env, timeout=600, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        _stop_processes_under(flwr_home)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert len(list((out / "ledger").glob("client-*.json"))) == 3
