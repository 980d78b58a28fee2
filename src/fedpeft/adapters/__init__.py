"""Adapter methods as plugins behind one registry (see :mod:`fedpeft.adapters.base`)."""

from fedpeft.adapters.base import AdapterPlugin, hash_tensors, weighted_mean
from fedpeft.adapters.registry import get, names, plugins, register

__all__ = ["AdapterPlugin", "get", "hash_tensors", "names", "plugins", "register", "weighted_mean"]
