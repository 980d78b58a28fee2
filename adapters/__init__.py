"""Adapter methods as plugins behind one registry (see :mod:`adapters.base`)."""

from adapters.base import AdapterPlugin, hash_tensors, weighted_mean
from adapters.registry import get, names, plugins, register

__all__ = ["AdapterPlugin", "get", "hash_tensors", "names", "plugins", "register", "weighted_mean"]
