"""Registry of adapter plugins: one name, one plugin; duplicates are refused.

This module imports every shipped method module and registers one plugin object of each
(the plugin modules do not import the registry). A third-party method registers its own
plugin with :func:`register`; a second plugin under a name already taken is an error and
leaves the registered one in place.
"""

from __future__ import annotations

from fedpeft.adapters.abmll import AbmllPlugin
from fedpeft.adapters.base import AdapterPlugin
from fedpeft.adapters.fedex_lora import FedExLoraPlugin
from fedpeft.adapters.fedsa_lora import FedSaLoraPlugin
from fedpeft.adapters.ffa_lora import FfaLoraPlugin
from fedpeft.adapters.ffa_lora_hetero import FfaLoraHeteroPlugin
from fedpeft.adapters.flora import FloraPlugin
from fedpeft.adapters.icm_lora.plugin import IcmLoraPlugin
from fedpeft.adapters.lora import LoraPlugin
from fedpeft.adapters.meteora import MeteoraPlugin
from fedpeft.adapters.mtlora import MTLoraPlugin
from fedpeft.adapters.nola import NolaPlugin
from fedpeft.adapters.osft import OsftPlugin
from fedpeft.adapters.rolora import RoloraPlugin
from fedpeft.adapters.sara import SaraPlugin
from fedpeft.adapters.smora import SmoraPlugin
from fedpeft.adapters.soka import SokaPlugin
from fedpeft.adapters.texforce import TexForcePlugin
from fedpeft.adapters.triadapt_lora import TriAdaptLoraPlugin

__all__ = ["SHIPPED", "get", "names", "plugins", "register"]

_REGISTRY: dict[str, AdapterPlugin] = {}


def register(plugin: AdapterPlugin) -> AdapterPlugin:
    """Add ``plugin`` under ``plugin.name``; a second plugin with that name is an error."""
    if not plugin.name:
        raise ValueError("an adapter plugin needs a non-empty name")
    if plugin.name in _REGISTRY:
        raise ValueError(f"adapter method {plugin.name!r} is already registered")
    _REGISTRY[plugin.name] = plugin
    return plugin


def get(name: str) -> AdapterPlugin:
    """The plugin registered as ``name`` (KeyError naming the allowed ones otherwise)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown adapter method {name!r}; allowed: {', '.join(names())}") from None


def names() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def plugins() -> list[AdapterPlugin]:
    """Registered plugins, in name order."""
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


SHIPPED: tuple[AdapterPlugin, ...] = (
    LoraPlugin(), FfaLoraPlugin(), FfaLoraHeteroPlugin(), NolaPlugin(), SaraPlugin(), SokaPlugin(), OsftPlugin(),
    TriAdaptLoraPlugin(), AbmllPlugin(), TexForcePlugin(), MTLoraPlugin(), SmoraPlugin(), MeteoraPlugin(),
    IcmLoraPlugin(), FedSaLoraPlugin(), RoloraPlugin(), FedExLoraPlugin(), FloraPlugin(),
)
for _plugin in SHIPPED:
    register(_plugin)
