"""The exact commands of a deployment, as argument lists (for tests) and as text (for people).

One SuperLink host and N SuperNode hosts, Flower 1.42:

* the SuperLink serves its Fleet, Control and Runtime APIs on one HTTPS port
  (``--host``/``--port``); TLS needs ``--ssl-ca-certfile``, ``--ssl-certfile`` and
  ``--ssl-keyfile``; ``--enable-supernode-auth`` accepts only SuperNodes whose public key
  was registered with ``flwr supernode register PUBKEY <connection>`` (the old
  ``--auth-list-public-keys`` CSV is rejected by 1.42);
* each SuperNode dials ``--superlink HOST:PORT`` with ``--root-certificates ca.crt`` and
  ``--auth-supernode-private-key node-<i>.key``; its ``--node-config`` names the local
  data file, its columns, its privacy ledger directory, its client id and optionally its
  own epsilon cap ``max-epsilon`` (see ``src/fedpeft/client/app.py``);
* ``flwr`` (``flwr supernode register``, ``flwr run . <connection>``) reads the connection
  from ``$FLWR_HOME/config.toml`` (default ``~/.flwr``), including ``root-certificates``.

The integration test (``tests/test_deployment.py``) starts its processes from these same
argument lists, so what is printed is what is tested. TLS and SuperNode authentication
are on unless ``insecure`` is set explicitly.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

import fedpeft.wire as wire
from fedpeft.deploy.certs import DeployError
from fedpeft.deploy.keys import MAX_NODES

__all__ = [
    "INSECURE_WARNING",
    "TUNED_ENV",
    "DeployPlan",
    "NodeSpec",
    "connection_toml",
    "flwr_run_argv",
    "node_config_arg",
    "parse_superlink",
    "register_argv",
    "render",
    "superlink_argv",
    "supernode_argv",
]

INSECURE_WARNING = ("WARNING: --insecure: no TLS and no SuperNode authentication. Model updates travel in clear "
                    "text and any process that reaches the SuperLink can join the federation as a client. "
                    "Use this only on a trusted, isolated network.")


TUNED_ENV: dict[str, str] = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}
"""Flower settings fedpeft exports on every host (measured: benchmarks/deploy_overhead.py).

``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` is how often the SuperExec that a SuperNode (and the
SuperLink, for the ServerApp) starts asks for a new task before it launches the
``flwr-clientapp`` process (Flower 1.42 default 1.0 s). The SuperNode's own idle poll
(3 s) and heartbeat (30 s) are constants in Flower's code; the server's reply poll is
fedpeft's own (``fedpeft.server.loop.PULL_INTERVAL_S``)."""


def parse_superlink(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) -> (host, port); one-line error otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise DeployError(f"invalid --superlink {address!r}: expected HOST:PORT, e.g. 10.0.0.1:9093")
    if "://" in host:
        raise DeployError(f"invalid --superlink {address!r}: no scheme, just HOST:PORT")
    return host, int(port)


@dataclass(frozen=True)
class NodeSpec:
    """One SuperNode host: its key and its node config (paths on that host)."""

    index: int
    client_id: str
    data_path: str
    text_column: str = "text"
    label_column: str = "label"
    ledger_dir: str = "~/.fedpeft/ledger"
    max_epsilon: float | None = None
    max_delta: float = 1e-5  # the delta at which max_epsilon holds (the node's own, not the server's)
    private_key: str = ""  # path on the node host
    public_key: str = ""  # path on the SuperLink host (for registration)
    runtime_port: int | None = None  # SuperNode's local Runtime API port; only when several share a host
    extra: tuple[tuple[str, str], ...] = field(default=())  # further node-config keys (e.g. task)


def _literal(key: str, value: str) -> str:
    if "'" in value or "\n" in value:
        raise DeployError(f"invalid node config {key}={value!r}: must not contain a single quote or a newline")
    return f"{key}='{value}'"


def node_config_arg(node: NodeSpec) -> str:
    """The ``--node-config`` value: space-separated ``key='value'`` pairs (TOML literal strings)."""
    pairs = [_literal(wire.DATA_PATH, node.data_path), _literal(wire.TEXT_COLUMN, node.text_column),
             _literal(wire.LABEL_COLUMN, node.label_column), _literal(wire.LEDGER_DIR, node.ledger_dir),
             _literal(wire.CLIENT_ID, node.client_id)]
    if node.max_epsilon is not None:
        pairs.append(f"{wire.MAX_EPSILON}={float(node.max_epsilon)!r}")
        pairs.append(f"{wire.MAX_DELTA}={float(node.max_delta)!r}")
    pairs.extend(_literal(k, v) for k, v in node.extra)
    return " ".join(pairs)


def superlink_argv(certs_dir: str, host: str = "0.0.0.0", port: int = 9093, insecure: bool = False,
                   database: str = "", exe: str = "flower-superlink") -> list[str]:
    """``flower-superlink`` with TLS + SuperNode authentication (or ``--insecure``)."""
    argv = [exe, "--host", host, "--port", str(port)]
    if insecure:
        argv.append("--insecure")
    else:
        d = certs_dir.rstrip("/")
        argv += ["--ssl-ca-certfile", f"{d}/ca.crt", "--ssl-certfile", f"{d}/server.crt",
                 "--ssl-keyfile", f"{d}/server.key", "--enable-supernode-auth"]
    if database:
        argv += ["--database", database]
    return argv


def supernode_argv(node: NodeSpec, superlink: str, ca_cert: str, insecure: bool = False,
                   exe: str = "flower-supernode") -> list[str]:
    """``flower-supernode`` for one node (TLS-verified, authenticated, with its node config)."""
    argv = [exe, "--superlink", superlink]
    if insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", ca_cert, "--auth-supernode-private-key", node.private_key]
    if node.runtime_port is not None:
        argv += ["--port", str(node.runtime_port)]
    argv += ["--node-config", node_config_arg(node)]
    return argv


def register_argv(public_key: str, connection: str, exe: str = "flwr") -> list[str]:
    """Register one SuperNode's public key with the SuperLink (Flower 1.42 ``flwr supernode register``)."""
    return [exe, "supernode", "register", public_key, connection]


def flwr_run_argv(connection: str, run_config: str = "", app_dir: str = ".", exe: str = "flwr",
                  stream: bool = True) -> list[str]:
    """``flwr run APP_DIR CONNECTION [--stream] [--run-config ...]``."""
    argv = [exe, "run", app_dir, connection]
    if stream:
        argv.append("--stream")
    if run_config:
        argv += ["--run-config", run_config]
    return argv


def connection_toml(name: str, address: str, ca_cert: str, insecure: bool = False) -> str:
    """A ``$FLWR_HOME/config.toml`` naming one SuperLink connection (the default one)."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    lines.append("insecure = true" if insecure else f'root-certificates = "{ca_cert}"')
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class DeployPlan:
    """Everything :func:`render` prints; paths are as they will be on each host."""

    superlink: str  # HOST:PORT the SuperNodes and flwr dial
    nodes: tuple[NodeSpec, ...]
    remote_dir: str = "/etc/fedpeft"  # where certificates and keys are copied on every host
    certs_dir: str = ""  # local directory made by `fedpeft deploy certs` (for the copy instructions)
    keys_dir: str = ""  # local directory made by `fedpeft deploy keys`
    connection: str = "fedpeft"
    run_config: str = ""
    insecure: bool = False

    def __post_init__(self) -> None:
        parse_superlink(self.superlink)
        if not 1 <= len(self.nodes) <= MAX_NODES:
            raise DeployError(f"invalid --nodes {len(self.nodes)}: must be between 1 and {MAX_NODES}")
        if not all(c.isalnum() or c in "-_" for c in self.connection):
            raise DeployError(f"invalid --connection {self.connection!r}: letters, digits, - and _ only")

    @property
    def ca_cert(self) -> str:
        return f"{self.remote_dir}/ca.crt"


def make_plan(superlink: str, nodes: int, certs_dir: str = "", keys_dir: str = "", remote_dir: str = "/etc/fedpeft",
              data_path: str = "/data/fedpeft/train.csv", text_column: str = "text", label_column: str = "label",
              ledger_dir: str = "/var/lib/fedpeft/ledger", max_epsilon: float | None = None,
              connection: str = "fedpeft", run_config: str = "", insecure: bool = False,
              max_delta: float = 1e-5) -> DeployPlan:
    """A plan with ``nodes`` identical-looking node hosts; ``{i}`` in a path is the node number."""
    if not 1 <= nodes <= MAX_NODES:
        raise DeployError(f"invalid --nodes {nodes}: must be between 1 and {MAX_NODES}")
    if max_epsilon is not None and not max_epsilon > 0:
        raise DeployError(f"invalid --max-epsilon {max_epsilon}: must be > 0")
    if not 0 < max_delta < 1:
        raise DeployError(f"invalid --max-delta {max_delta}: must be in (0, 1)")
    remote = remote_dir.rstrip("/") or "/"
    specs = tuple(NodeSpec(
        index=i, client_id=f"node-{i}", data_path=data_path.replace("{i}", str(i)), text_column=text_column,
        label_column=label_column, ledger_dir=ledger_dir.replace("{i}", str(i)), max_epsilon=max_epsilon,
        max_delta=max_delta,
        private_key=f"{remote}/node-{i}.key", public_key=f"{remote}/node-{i}.pub",
    ) for i in range(1, nodes + 1))
    return DeployPlan(superlink, specs, remote, certs_dir, keys_dir, connection, run_config, insecure)


def _quote(arg: str) -> str:
    """Shell-quote readably: double quotes around ``key='value'`` lists when that is safe."""
    quoted = shlex.quote(arg)
    if quoted == arg or any(c in arg for c in '"$`\\!'):
        return quoted
    return f'"{arg}"'


def _cmd(argv: list[str]) -> str:
    return " ".join(_quote(a) for a in argv)


def _tuned_exports() -> list[str]:
    return [f"export {k}={shlex.quote(v)}  # Flower setting tuned for fedpeft (docs/deploy.md)"
            for k, v in TUNED_ENV.items()]


def render(plan: DeployPlan) -> str:
    """The step-by-step commands for the server host and every node host, as text."""
    host, port = parse_superlink(plan.superlink)
    r, certs, keys = plan.remote_dir, plan.certs_dir or "CERTS", plan.keys_dir or "KEYS"
    out: list[str] = []
    if plan.insecure:
        out += [f"# {INSECURE_WARNING}", ""]
    out += ["# ==== 1. Server host (SuperLink) " + "=" * 40]
    if not plan.insecure:
        out += [f"# copy {certs}/ca.crt, {certs}/server.crt, {certs}/server.key (0600) and every "
                f"{keys}/node-<i>.pub to {r}/ on the server host",
                f"mkdir -p {shlex.quote(r)} && chmod 700 {shlex.quote(r)}"]
    out += ["export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1  # the app's dependencies are installed already",
            *_tuned_exports(),
            _cmd(superlink_argv(r, "0.0.0.0", port, plan.insecure, database="/var/lib/fedpeft/superlink.db")), ""]
    out += ["# ==== 2. Operator (server host or any machine that reaches it): Flower CLI connection "
            + "=" * 4,
            "# $FLWR_HOME/config.toml (default ~/.flwr/config.toml):",
            "mkdir -p \"${FLWR_HOME:-$HOME/.flwr}\" && cat > \"${FLWR_HOME:-$HOME/.flwr}/config.toml\" <<'EOF'",
            connection_toml(plan.connection, plan.superlink, plan.ca_cert, plan.insecure).rstrip("\n"), "EOF"]
    if not plan.insecure:
        out += ["# register every SuperNode's public key (once; SuperNodes with other keys are refused)"]
        out += [_cmd(register_argv(n.public_key, plan.connection)) for n in plan.nodes]
    out += [""]
    for n in plan.nodes:
        out += [f"# ==== 3.{n.index} Node host {n.index} (SuperNode {n.client_id}) " + "=" * 30]
        if not plan.insecure:
            out += [f"# copy {certs}/ca.crt and {keys}/node-{n.index}.key (0600) to {r}/ on this host; "
                    f"the data file {n.data_path} stays here"]
        out += ["export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1", *_tuned_exports(),
                _cmd(supernode_argv(n, plan.superlink, plan.ca_cert, plan.insecure)), ""]
    out += ["# ==== 4. Start the run (from the fedpeft project directory, where `flwr` is configured) " + "=" * 2,
            "# the server's data.path holds its held-out test set and must exist on the server host",
            _cmd(flwr_run_argv(plan.connection, plan.run_config)),
            "# the run directory (metrics.jsonl, adapter/) is written on the server host under output_dir "
            "(default runs/<name>), relative to the ServerApp's working directory; "
            "each node's privacy ledger stays in its ledger-dir"]
    if host in ("localhost", "127.0.0.1", "::1", "[::1]"):
        out.insert(0, "# note: --superlink is a loopback address; SuperNodes on other hosts cannot reach it")
    return "\n".join(out) + "\n"
