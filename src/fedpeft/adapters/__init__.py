"""Adapter methods as plugins behind one registry.

* :mod:`~fedpeft.adapters.base` -- :class:`AdapterPlugin`, what every method implements;
* :mod:`~fedpeft.adapters.capabilities` -- optional hooks as Protocols, checked with ``isinstance``;
* :mod:`~fedpeft.adapters.options` -- typed, frozen options per method (``adapter.options``);
* :mod:`~fedpeft.adapters.common` -- helpers several methods share;
* one module per method (ICM-LoRA: a package), and :mod:`~fedpeft.adapters.registry`, which
  imports the shipped ones and registers their plugins.

Adding a method: subclass :class:`AdapterPlugin` (``name``, ``paper``, ``travels``,
``exact_average``; ``attach``; override ``trainable_state``/``aggregate``/... where the
method differs), declare options as a frozen dataclass of ``option(...)`` fields named by
``options_type``, list any capability Protocol among the base classes, and ``register`` one
instance (a shipped method is added to the registry's ``SHIPPED`` instead).
"""

from fedpeft.adapters.base import AdapterPlugin, hash_tensors, weighted_mean
from fedpeft.adapters.registry import get, names, plugins, register

__all__ = ["AdapterPlugin", "get", "hash_tensors", "names", "plugins", "register", "weighted_mean"]
