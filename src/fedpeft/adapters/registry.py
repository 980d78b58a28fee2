"""Registry of adapter plugins: one name, one plugin; duplicates are refused."""

from __future__ import annotations

from fedpeft.adapters.base import AdapterPlugin

__all__ = ["get", "names", "register", "plugins"]

_REGISTRY: dict[str, AdapterPlugin] = {}


def register(plugin: AdapterPlugin) -> AdapterPlugin:
    """Add ``plugin`` under ``plugin.name``; a second plugin with that name is an error."""
    if not plugin.name:
        raise ValueError("an adapter plugin needs a non-empty name")
    if plugin.name in _REGISTRY:
        raise ValueError(f"adapter method {plugin.name!r} is already registered")
    _REGISTRY[plugin.name] = plugin
    return plugin


def _ensure_builtins() -> None:
    import fedpeft.adapters.builtin  # noqa: F401  (registers the shipped methods on import)


def get(name: str) -> AdapterPlugin:
    """The plugin registered as ``name`` (KeyError naming the allowed ones otherwise)."""
    _ensure_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown adapter method {name!r}; allowed: {', '.join(names())}") from None


def names() -> list[str]:
    """Registered method names, sorted."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def plugins() -> list[AdapterPlugin]:
    _ensure_builtins()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]
