"""Fast checks of the deployment helpers (no Flower processes): certificates, SuperNode
keys, the printed commands (parsed back with Flower's own argument parsers), and the
client-side pieces a deployed node relies on (label mapping, its own epsilon cap)."""

from __future__ import annotations

import shlex
import socket
import ssl
import stat
import threading
import tomllib
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedpeft.cli.main import main
from fedpeft.deploy.certs import DeployError, make_certs
from fedpeft.deploy.commands import TUNED_ENV, make_plan, node_config_arg, render, superlink_argv, supernode_argv
from fedpeft.deploy.keys import make_keys


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    make_certs(out, ["10.1.2.3", "server.example", "[::1]"])
    return out


def test_certs_files_modes_and_sans(certs: Path) -> None:
    assert _mode(certs / "ca.key") == 0o600 and _mode(certs / "server.key") == 0o600
    assert _mode(certs / "ca.crt") == 0o644
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((certs / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "server.example"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3", "::1"}


def _handshake(certs: Path, ca_file: Path, server_hostname: str) -> None:
    """A real TLS handshake on loopback: server with server.crt/key, client trusting ``ca_file``."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs / "server.crt", certs / "server.key")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        client_ctx = ssl.create_default_context(cafile=str(ca_file))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                assert tls.recv(2) == b"ok"
        finally:
            thread.join(timeout=10)


def test_tls_handshake_verifies_with_the_ca_only(certs: Path, tmp_path: Path) -> None:
    _handshake(certs, certs / "ca.crt", "localhost")
    _handshake(certs, certs / "ca.crt", "127.0.0.1")
    _handshake(certs, certs / "ca.crt", "server.example")
    with pytest.raises(ssl.SSLCertVerificationError):  # a name not in the SANs
        _handshake(certs, certs / "ca.crt", "other.example")
    other = make_certs(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError):  # another deployment's CA
        _handshake(certs, other.ca_cert, "localhost")


def test_certs_refuse_overwrite_unless_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy", "certs", str(tmp_path)]) == 0
    before = (tmp_path / "ca.key").read_bytes()
    capsys.readouterr()
    assert main(["deploy", "certs", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedpeft: error:") and "--force" in err and "\n" not in err
    assert (tmp_path / "ca.key").read_bytes() == before
    assert main(["deploy", "certs", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "ca.key").read_bytes() != before and _mode(tmp_path / "ca.key") == 0o600
    with pytest.raises(DeployError):
        make_certs(tmp_path / "x", ["bad host"])


def test_keys_load_with_flowers_own_loaders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.cli.supernode.register import try_load_public_key

    assert main(["deploy", "keys", str(tmp_path), "--nodes", "3"]) == 0
    pubs = set()
    for i in (1, 2, 3):
        key = serialization.load_ssh_private_key((tmp_path / f"node-{i}.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)  # what flower-supernode requires
        assert _mode(tmp_path / f"node-{i}.key") == 0o600
        registered = try_load_public_key(tmp_path / f"node-{i}.pub")  # what `flwr supernode register` sends
        own = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert registered == own
        pubs.add(registered)
    assert len(pubs) == 3
    capsys.readouterr()
    assert main(["deploy", "keys", str(tmp_path), "--nodes", "1"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["deploy", "keys", str(tmp_path / "y"), "--nodes", "0"]) == 2


def test_printed_commands_parse_with_flowers_parsers(certs: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from flwr.common.config import parse_config_args
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    make_keys(tmp_path / "keys", 2)
    argv = ["deploy", "print-commands", "--certs", str(certs), "--keys", str(tmp_path / "keys"),
            "--superlink", "10.1.2.3:9093", "--nodes", "2", "--data-path", "/data/node {i}.csv",
            "--text-column", "review", "--label-column", "sentiment", "--max-epsilon", "3.5"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "WARNING" not in out.err
    lines = [ln for ln in out.out.splitlines() if ln and not ln.startswith("#")]
    link = shlex.split(next(ln for ln in lines if ln.startswith("flower-superlink")))
    args = _parse_args_run_superlink().parse_args(link[1:])
    assert args.enable_supernode_auth and not args.insecure and args.port == 9093
    assert args.ssl_certfile.endswith("server.crt") and args.ssl_ca_certfile.endswith("ca.crt")
    nodes = [shlex.split(ln) for ln in lines if ln.startswith("flower-supernode")]
    assert len(nodes) == 2
    for i, node in enumerate(nodes, start=1):
        a = _parse_args_run_supernode().parse_args(node[1:])
        assert a.superlink == "10.1.2.3:9093" and not a.insecure
        assert a.auth_supernode_private_key.endswith(f"node-{i}.key") and a.root_certificates.endswith("ca.crt")
        conf = parse_config_args([a.node_config])
        assert conf == {"data-path": f"/data/node {i}.csv", "text-column": "review", "label-column": "sentiment",
                        "ledger-dir": "/var/lib/fedpeft/ledger", "client-id": f"node-{i}", "max-epsilon": 3.5,
                        "max-delta": 1e-5}
    assert sum(ln.startswith("flwr supernode register") for ln in lines) == 2
    toml_text = out.out.split("<<'EOF'\n", 1)[1].split("\nEOF", 1)[0]
    conn = tomllib.loads(toml_text)["superlink"]
    assert conn["default"] == "fedpeft" and conn["fedpeft"]["address"] == "10.1.2.3:9093"
    assert conn["fedpeft"]["root-certificates"].endswith("ca.crt")
    assert any(ln.startswith("flwr run . fedpeft") for ln in lines)
    for key, value in TUNED_ENV.items():  # the tuned Flower settings go to the server host and every node host
        assert sum(shlex.split(ln, comments=True) == ["export", f"{key}={value}"] for ln in lines) == 1 + 2


def test_print_commands_insecure_needs_flag_and_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy", "print-commands", "--superlink", "h:1", "--nodes", "1"]) == 2  # no certs, no --insecure
    assert "--certs" in capsys.readouterr().err
    assert main(["deploy", "print-commands", "--superlink", "h:1", "--nodes", "1", "--insecure"]) == 0
    out = capsys.readouterr()
    assert "WARNING" in out.err and "--insecure" in out.out
    assert "--enable-supernode-auth" not in out.out and "--auth-supernode-private-key" not in out.out
    assert main(["deploy", "print-commands", "--superlink", "nohostport", "--nodes", "1", "--insecure"]) == 2
    with pytest.raises(DeployError):
        node_config_arg(make_plan("h:1", 1, data_path="/it's/bad.csv").nodes[0])


def test_argv_builders_default_to_tls_and_auth() -> None:
    plan = make_plan("h:9", 1)
    link, node = superlink_argv("/c"), supernode_argv(plan.nodes[0], plan.superlink, plan.ca_cert)
    assert "--enable-supernode-auth" in link and "--insecure" not in link
    assert "--auth-supernode-private-key" in node and "--insecure" not in node
    assert "--insecure" in render(make_plan("h:9", 1, insecure=True))


# ---- the client-side pieces a deployed node relies on ----------------------------------

def test_node_labels_map_by_name_into_the_federation_vocabulary() -> None:
    from fedpeft.config import ConfigError
    from fedpeft.data.sources import TextDataset, with_label_names

    fed = ("fresh", "plot", "rotten")
    node = TextDataset(("a", "b", "c"), np.array([1, 0, 1]), ("fresh", "rotten"))  # node file lacks "plot"
    mapped = with_label_names(node, fed)
    assert mapped.label_names == fed and mapped.labels.tolist() == [2, 0, 2]
    with pytest.raises(ConfigError, match="unknown to the federation"):
        with_label_names(TextDataset(("a", "b"), np.array([0, 1]), ("fresh", "meh")), fed)


def test_client_identity_reads_the_servers_label_list() -> None:
    from fedpeft.client.runtime import ClientIdentity

    ident = ClientIdentity.from_node({"data-path": "/d.csv", "client-id": "n1", "ledger-dir": "/l"},
                                     {"label-names": '["neg", "pos"]', "ledger-dir": "/server"})
    assert ident.label_names == ("neg", "pos") and ident.partition_id is None and str(ident.ledger_dir) == "/l"


def test_node_epsilon_cap_refuses_a_plan_above_it() -> None:
    from fedpeft.client.app import node_budget_refusal
    from fedpeft.load import parse_config
    from fedpeft.privacy.ledger import Ledger

    cfg = parse_config({"train.rounds": 2, "privacy.accountant": "pld"})
    ledger = Ledger("n1", cfg.privacy.epsilon, 1e-5, "pld", noise_multiplier=1.0, sample_rate=0.25)
    plan, _ = ledger.epsilon_if(2 * 2)  # rounds 1..2, 2 steps each: the accountant's figure
    assert node_budget_refusal({}, cfg, ledger, 2, 1) == ""  # no cap: the run's budget rules
    assert node_budget_refusal({"max-epsilon": plan * 1.01}, cfg, ledger, 2, 1) == ""
    reason = node_budget_refusal({"max-epsilon": plan * 0.99}, cfg, ledger, 2, 1)
    assert "max-epsilon" in reason and "would reach" in reason
    assert node_budget_refusal({"max-epsilon": plan * 0.99}, cfg, ledger, 2, 2) == ""  # only round 2 left
    assert "no DP" in node_budget_refusal({"max-epsilon": 1.0}, cfg, None, 2, 1)
    assert "not a number" in node_budget_refusal({"max-epsilon": "lots"}, cfg, ledger, 2, 1)
