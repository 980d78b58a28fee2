"""Configuration by role: the ground floor needs nothing above it, and a node does not need
the server's files (issue 17).

On real separate hosts the server's ``data.path`` (its held-out test file) exists only on the
server; each deployed node re-parses the configuration the server sends and must not refuse it
for a file it never reads (docs/deploy.md). The deployment tests share one filesystem and
cannot see that, so :func:`test_node_without_the_servers_data_file_trains_and_replies` gives
each role a directory of its own, with the server's file named by a relative path that exists
only in the server's.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, Context, Message, RecordDict

from fedpeft.client import runtime
from fedpeft.client.app import handle_train
from fedpeft.config import ConfigError, build_config, config_hash, config_to_toml
from fedpeft.data import sources
from fedpeft.load import config_from_toml, parse_config
from fedpeft.server.loop import ServerSetup
from fedpeft.strategies.adapter_avg import AdapterAvg, state_to_arrayrecord
from fedpeft.strategies.validation import validate_reply

CONFIG_PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fedpeft" / "config"
SERVER_FILE = "server-held-out-roles.csv"  # relative: resolved in the server's working directory
MISSING = "invalid config data.path='server-held-out-roles.csv': file not found; pass an existing CSV or JSONL file"


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``: top level, inside functions and
    under ``TYPE_CHECKING`` alike (relative imports resolved against the package)."""
    package = "fedpeft.config"
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.append((node.lineno, f"{base}.{node.module}" if node.module else base))
            else:
                found.append((node.lineno, str(node.module)))
    return found


def test_config_package_imports_nothing_else_of_fedpeft() -> None:
    files = sorted(CONFIG_PACKAGE.glob("*.py"))
    assert {p.name for p in files} >= {"__init__.py", "schema.py", "parse.py", "tasks.py"}
    bad = [f"{p.name}:{line} imports {name}" for p in files for line, name in _imported_modules(p)
           if (name == "fedpeft" or name.startswith("fedpeft.")) and not
           (name == "fedpeft.config" or name.startswith("fedpeft.config."))]
    assert not bad, "the configuration is the ground floor: " + "; ".join(bad)


def test_build_config_needs_no_registry_and_no_files(tmp_path: Path) -> None:
    """In a fresh interpreter: building and round-tripping a configuration loads no other
    fedpeft module, and what only the registry or the disk can judge is left to fedpeft.load."""
    code = (
        "import sys\n"
        "from fedpeft.config import build_config, config_from_toml, config_hash, config_to_toml\n"
        "cfg = build_config({'adapter.method': 'not_registered', 'data.path': 'absent.csv', "
        "'model.path': 'absent-dir', 'tasks.names': 'rt,bbc', 'train.clients': 2})\n"
        "assert config_from_toml(config_to_toml(cfg)) == cfg and config_hash(cfg)\n"
        "others = sorted(m for m in sys.modules if m.startswith('fedpeft.') and not m.startswith('fedpeft.config'))\n"
        "print(others)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    with pytest.raises(ConfigError, match="adapter.method"):
        parse_config({"adapter.method": "not_registered"})


def test_build_config_still_checks_ranges() -> None:
    with pytest.raises(ConfigError, match=r"adapter.rank=0"):
        build_config({"adapter.rank": 0})
    with pytest.raises(ConfigError, match=r"central.mode='client'"):
        build_config({"central.mode": "client"})
    with pytest.raises(ConfigError, match=r"faults.fail_rate"):
        build_config({"faults.fail_rate": 1.0})


def test_server_role_refuses_a_missing_data_path_with_the_same_message(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for kwargs in ({}, {"role": "server"}):
        with pytest.raises(ConfigError) as err:
            parse_config({"data.path": SERVER_FILE}, **kwargs)
        assert str(err.value) == MISSING
    text = config_to_toml(build_config({"data.path": SERVER_FILE}))
    with pytest.raises(ConfigError) as err:
        config_from_toml(text)
    assert str(err.value) == MISSING
    assert config_from_toml(text, role="node").data.path == SERVER_FILE  # a node does not read it
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(ConfigError, match="allowed formats"):
        parse_config({"data.path": "notes.txt"})


def test_node_role_skips_the_servers_task_files_but_checks_its_model(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    layer = {"tasks.names": "rt", "tasks.mine.path": "server-task.csv", "train.clients": 2}
    with pytest.raises(ConfigError, match=r"tasks.mine.path='server-task.csv': file not found"):
        parse_config(layer)
    assert [s.path for s in parse_config(layer, role="node").tasks.resolved()] == ["", "server-task.csv"]
    with pytest.raises(ConfigError, match="model.path='no-model-here'"):
        parse_config({"model.path": "no-model-here"}, role="node")  # the node loads the model itself
    with pytest.raises(ValueError, match="unknown validation role 'client'"):
        parse_config({}, role="client")


def _write_csv(path: Path, rows: int, offset: int = 0) -> None:
    words = ("good fine great lovely", "bad awful dull boring")
    lines = ["text,label"] + [f"{words[i % 2]} film number {i + offset},{('pos', 'neg')[i % 2]}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _fresh_host() -> None:
    """Forget what this process loaded as the server (a node on another host never had it)."""
    sources.train_test_split_for.cache_clear()
    sources._load_cached.cache_clear()


def test_node_without_the_servers_data_file_trains_and_replies(tiny_model_dir: Path, tmp_path: Path, flwr_identity,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]

    server_dir, node_dir = tmp_path / "server-host", tmp_path / "node-host"
    server_dir.mkdir()
    node_dir.mkdir()
    # --- the server host: its held-out file, the ServerApp's parse (role="server") and round 1's message
    monkeypatch.chdir(server_dir)
    _write_csv(server_dir / SERVER_FILE, 80)
    cfg = parse_config({"model.path": str(tiny_model_dir), "model.max_length": 24, "data.path": SERVER_FILE,
                        "data.test_size": 20, "train.rounds": 1, "train.batch_size": 16, "train.local_steps": 2,
                        "output_dir": str(server_dir / "run")})
    setup = ServerSetup(cfg)
    strategy = AdapterAvg.from_config(setup.plugin, cfg, setup.spec, config_to_toml(cfg), config_hash(cfg),
                          extra_config={"ledger-dir": str(server_dir / "run" / "ledger"),  # as run_federation sends
                                        "label-names": json.dumps(list(setup.test.label_names))})
    msg = Message(content=RecordDict({"arrays": state_to_arrayrecord(setup.state),
                                      "config": strategy.round_config(1)}), dst_node_id=7, message_type="train")
    # --- a node host: its own file, ledger and secret; the server's file does not exist here
    monkeypatch.chdir(node_dir)
    _fresh_host()
    monkeypatch.setattr(runtime, "_RUNTIMES", {})  # a fresh ClientApp process
    monkeypatch.setenv("FEDPEFT_SECRET_HOME", str(node_dir / "secret"))
    _write_csv(node_dir / "own.csv", 48, offset=1000)
    assert not Path(SERVER_FILE).exists()
    node = {"data-path": "own.csv", "ledger-dir": "ledger", "client-id": "n1"}
    reply = handle_train(msg, Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={}))
    assert "status" not in reply.content, dict(reply.content["status"])
    assert len([v for v in reply.content.values() if isinstance(v, ArrayRecord)]) == 1
    rep = validate_reply(reply.content, setup.spec)
    assert rep.weight == 48 and 0 < rep.metrics["epsilon"] <= cfg.privacy.epsilon
    assert (node_dir / "ledger" / "client-n1.json").is_file()
    assert not (node_dir / SERVER_FILE).exists()
