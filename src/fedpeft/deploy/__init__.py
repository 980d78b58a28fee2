"""Deployment helpers: TLS certificates, SuperNode keys and the exact commands to run
Flower's SuperLink and SuperNodes on separate hosts (``fedpeft deploy ...``)."""

from fedpeft.deploy.certs import CertFiles, DeployError, make_certs
from fedpeft.deploy.commands import DeployPlan, NodeSpec, make_plan, render
from fedpeft.deploy.keys import NodeKey, make_keys

__all__ = ["CertFiles", "DeployError", "DeployPlan", "NodeKey", "NodeSpec", "make_certs", "make_keys", "make_plan",
           "render"]
