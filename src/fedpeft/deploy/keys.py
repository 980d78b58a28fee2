"""SuperNode authentication key pairs in the format Flower 1.42 expects.

Flower 1.42 authenticates SuperNodes by an EC key pair on a NIST curve:

* the SuperNode gets ``--auth-supernode-private-key FILE``, an OpenSSH-format EC private
  key (``flwr.supernode.cli.flower_supernode`` loads it with ``load_ssh_private_key``);
* the SuperLink runs with ``--enable-supernode-auth`` (which requires TLS) and learns
  the public keys through ``flwr supernode register PUBKEY <connection>``, an
  OpenSSH-format public key (``flwr.cli.supernode.register.try_load_public_key``). The
  older ``--auth-list-public-keys`` CSV is rejected by 1.42's SuperLink.

:func:`make_keys` writes ``node-<i>.key`` (mode 0600) and ``node-<i>.pub`` for
``i = 1..N`` using ECDSA P-384 (the curve Flower's docs use).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedpeft.deploy.certs import DeployError, write_private, write_public

__all__ = ["MAX_NODES", "NodeKey", "make_keys", "node_key_paths"]

MAX_NODES = 10_000


@dataclass(frozen=True)
class NodeKey:
    """One SuperNode's key files."""

    index: int
    private: Path
    public: Path


def node_key_paths(keys_dir: Path, index: int) -> NodeKey:
    """Where node ``index`` (1-based)'s key pair lives in ``keys_dir``."""
    return NodeKey(index, Path(keys_dir) / f"node-{index}.key", Path(keys_dir) / f"node-{index}.pub")


def make_keys(keys_dir: Path, nodes: int, force: bool = False) -> list[NodeKey]:
    """Create ``nodes`` key pairs in ``keys_dir``; refuse (before writing anything) to
    overwrite an existing private key unless ``force``."""
    if not 1 <= nodes <= MAX_NODES:
        raise DeployError(f"invalid --nodes {nodes}: must be between 1 and {MAX_NODES}")
    paths = [node_key_paths(keys_dir, i) for i in range(1, nodes + 1)]
    if not force:
        for p in paths:
            if p.private.exists():
                raise DeployError(f"{p.private} exists; refusing to overwrite a key (pass --force to replace it)")
    for p in paths:
        key = ec.generate_private_key(ec.SECP384R1())
        write_private(p.private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()), force)
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        write_public(p.public, pub + f" fedpeft-node-{p.index}\n".encode())
    return paths
