"""``fedpeft deploy``: certificates, SuperNode keys and the commands for a real deployment.

``fedpeft deploy certs DIR [--host NAME_OR_IP ...]``   CA + SuperLink server certificate
``fedpeft deploy keys DIR --nodes N``                  SuperNode authentication key pairs
``fedpeft deploy print-commands --certs DIR --keys DIR --superlink HOST:PORT --nodes N``

Bad input (an existing key without ``--force``, a malformed address) ends with exit
status 2 and one line ``fedpeft: error: ...``. ``--insecure`` must be given explicitly
and prints a warning on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedpeft.cli.common import register_command
from fedpeft.deploy.certs import DeployError, make_certs
from fedpeft.deploy.commands import INSECURE_WARNING, make_plan, render
from fedpeft.deploy.keys import make_keys


def _add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="deploy_command", metavar="STEP", parser_class=type(p))
    c = sub.add_parser("certs", help="create a CA and a SuperLink TLS certificate signed by it")
    c.add_argument("dir", type=Path, help="output directory (ca.crt, ca.key, server.crt, server.key)")
    c.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                   help="a host name or IP address SuperNodes use to reach the SuperLink (repeatable; "
                        "localhost and 127.0.0.1 are always included)")
    c.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    c.add_argument("--force", action="store_true", help="overwrite existing keys")
    k = sub.add_parser("keys", help="create SuperNode authentication key pairs (node-<i>.key / node-<i>.pub)")
    k.add_argument("dir", type=Path, help="output directory")
    k.add_argument("--nodes", type=int, required=True, help="number of SuperNodes")
    k.add_argument("--force", action="store_true", help="overwrite existing keys")
    pc = sub.add_parser("print-commands", help="print the exact commands for the server host and every node host")
    pc.add_argument("--certs", type=Path, help="directory made by `fedpeft deploy certs`")
    pc.add_argument("--keys", type=Path, help="directory made by `fedpeft deploy keys`")
    pc.add_argument("--superlink", required=True, metavar="HOST:PORT", help="address the SuperNodes dial")
    pc.add_argument("--nodes", type=int, required=True, help="number of SuperNodes")
    pc.add_argument("--remote-dir", default="/etc/fedpeft", help="where certificates/keys live on each host")
    pc.add_argument("--data-path", default="/data/fedpeft/train.csv",
                    help="each node's data file on its host; {i} is replaced by the node number")
    pc.add_argument("--text-column", default="text")
    pc.add_argument("--label-column", default="label")
    pc.add_argument("--ledger-dir", default="/var/lib/fedpeft/ledger",
                    help="each node's privacy-ledger directory on its host ({i} = node number)")
    pc.add_argument("--max-epsilon", type=float, default=None,
                    help="each node's own epsilon cap (node config max-epsilon); unset = the run's budget")
    pc.add_argument("--max-delta", type=float, default=1e-5,
                    help="the delta at which each node's cap holds (node config max-delta; a run asking for a "
                         "larger delta is refused)")
    pc.add_argument("--connection", default="fedpeft", help="name of the Flower CLI connection")
    pc.add_argument("--run-config", default="", help="passed to `flwr run --run-config` (existing keys only)")
    for parser in (pc,):
        parser.add_argument("--insecure", action="store_true",
                            help="no TLS, no SuperNode authentication (prints a warning; trusted networks only)")


def _check_dir(path: Path | None, names: list[str], flag: str) -> None:
    if path is None:
        raise DeployError(f"{flag} DIR is required unless --insecure")
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise DeployError(f"{flag} {path}: missing {', '.join(missing)}; create it with `fedpeft deploy "
                          f"{flag.lstrip('-')} {path}`")


def _run(args: argparse.Namespace) -> int:
    try:
        if args.deploy_command == "certs":
            files = make_certs(args.dir, args.host, force=args.force, days=args.days)
            print(f"fedpeft: wrote {files.ca_cert}, {files.ca_key} (0600), {files.server_cert}, "
                  f"{files.server_key} (0600); server names: {', '.join(files.hosts)}")
            print(f"fedpeft: keep {files.ca_key} offline; the SuperLink host needs ca.crt, server.crt, server.key; "
                  f"every SuperNode and `flwr` need ca.crt only")
            return 0
        if args.deploy_command == "keys":
            keys = make_keys(args.dir, args.nodes, force=args.force)
            print(f"fedpeft: wrote {len(keys)} SuperNode key pairs in {args.dir}: node-<i>.key (0600, stays on "
                  f"node i) and node-<i>.pub (register with `flwr supernode register`)")
            return 0
        if args.deploy_command == "print-commands":
            if args.insecure:
                print(f"fedpeft: {INSECURE_WARNING}", file=sys.stderr)
            else:
                _check_dir(args.certs, ["ca.crt", "server.crt", "server.key"], "--certs")
                _check_dir(args.keys, [f"node-{i}.pub" for i in range(1, max(args.nodes, 0) + 1)], "--keys")
            plan = make_plan(args.superlink, args.nodes, str(args.certs or ""), str(args.keys or ""),
                             args.remote_dir, args.data_path, args.text_column, args.label_column, args.ledger_dir,
                             args.max_epsilon, args.connection, args.run_config, args.insecure, args.max_delta)
            sys.stdout.write(render(plan))
            return 0
        print("fedpeft: error: deploy needs a step: certs, keys or print-commands", file=sys.stderr)
        return 2
    except DeployError as exc:
        print(f"fedpeft: error: {exc}", file=sys.stderr)
        return 2


register_command("deploy", "deployment helpers: TLS certificates, SuperNode keys, commands for each host",
                 _add_args, _run)
