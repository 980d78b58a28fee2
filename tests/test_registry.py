"""The adapter registry: one name per plugin, and every plugin describes itself."""

from __future__ import annotations

import importlib

import pytest

from fedpeft.adapters import AdapterPlugin, get, names, plugins, register
from fedpeft.adapters import registry as reg


def test_duplicate_names_are_refused() -> None:
    existing = get(names()[0])
    with pytest.raises(ValueError, match="already registered"):
        register(existing)

    class Dup(AdapterPlugin):
        name = existing.name

        def attach(self, model, cfg):  # type: ignore[no-untyped-def]
            return model

    with pytest.raises(ValueError, match="already registered"):
        register(Dup())
    assert get(existing.name) is existing, "a refused duplicate must not replace the registered plugin"


def test_nameless_plugin_is_refused() -> None:
    class NoName(AdapterPlugin):
        def attach(self, model, cfg):  # type: ignore[no-untyped-def]
            return model

    with pytest.raises(ValueError, match="non-empty name"):
        register(NoName())


def test_unknown_method_error_names_the_allowed_ones() -> None:
    with pytest.raises(KeyError, match="allowed: .*ffa_lora"):
        get("no-such-method")


def test_builtin_methods_are_registered() -> None:
    assert {"lora", "ffa_lora", "triadapt_lora", "abmll", "texforce"} <= set(names())


@pytest.mark.parametrize("plugin", plugins(), ids=lambda p: p.name)
def test_every_plugin_has_its_descriptive_attributes(plugin: AdapterPlugin) -> None:
    assert plugin.name and plugin.name == plugin.name.strip() and " " not in plugin.name
    assert reg._REGISTRY[plugin.name] is plugin
    assert plugin.paper.strip(), f"{plugin.name}: paper missing"
    assert plugin.travels.strip(), f"{plugin.name}: what travels missing"
    assert isinstance(plugin.exact_average, bool)
    assert isinstance(plugin.supports_dp, bool)
    if not plugin.supports_dp:
        assert plugin.dp_refusal.strip(), f"{plugin.name}: refuses DP without saying why"
    module_doc = (importlib.import_module(type(plugin).__module__).__doc__ or "").lower()
    for topic in ("paper", "travel", "averag"):
        assert topic in module_doc, f"{plugin.name}: module docstring says nothing about {topic!r}"
    line = plugin.describe()
    assert plugin.name in line and plugin.paper in line and plugin.travels in line
    assert ("averaging exact" in line) == plugin.exact_average and ("DP ok" in line or "no DP" in line)


def test_methods_command_lists_every_method(capsys: pytest.CaptureFixture[str]) -> None:
    from fedpeft.cli.main import main

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    for name in names():
        matching = [ln for ln in lines if ln.split()[0] == name]
        assert len(matching) == 1, f"{name} not listed exactly once"
        assert "travels:" in matching[0] and "averaging" in matching[0]
