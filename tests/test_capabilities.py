"""The plugin interface: declared capabilities (src/fedpeft/adapters/capabilities.py), typed
method options (src/fedpeft/adapters/options.py), the registry and the adapters' import web."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fedpeft.adapters import AdapterPlugin, get, names, plugins, register
from fedpeft.adapters import registry as reg
from fedpeft.adapters.capabilities import (
    CAPABILITIES,
    DataRelease,
    ReleaseParams,
    ServerRoundWork,
    capabilities_of,
)
from fedpeft.adapters.options import option, option_specs, parse_options
from fedpeft.config import AdapterConfig, ConfigError, RunConfig, TasksConfig

ADAPTERS = Path(__file__).resolve().parents[1] / "src" / "fedpeft" / "adapters"

# What each shipped method can do beyond AdapterPlugin (a method not listed has no capability).
EXPECTED = {
    "fedex_lora": {"frozen_delta"},
    "fedsa_lora": {"personal_eval"},
    "ffa_lora_hetero": {"rank_tiers"},
    "flora": {"rank_tiers", "frozen_delta"},
    "icm_lora": {"data_release", "server_round_work"},
    "meteora": {"reply_variants", "server_state", "multitask_aggregation", "server_round_work"},
    "rolora": {"reply_variants", "server_state", "multitask_aggregation"},
    "smora": {"server_state", "public_step"},
}


def _members(proto: type) -> list[str]:
    return [n for n, v in vars(proto).items() if callable(v) and not n.startswith("_")]


def _declared(plugin: AdapterPlugin, proto: type) -> bool:
    return proto in type(plugin).__mro__


def _implemented(plugin: AdapterPlugin, proto: type, member: str) -> bool:
    """``member`` is defined by a class of the plugin's MRO that is not a Protocol stub."""
    for klass in type(plugin).__mro__:
        if member in vars(klass):
            return not getattr(klass, "_is_protocol", False)
    return False


# ---- capabilities -------------------------------------------------------------------------
@pytest.mark.parametrize("plugin", plugins(), ids=lambda p: p.name)
def test_declared_capabilities_match_what_the_plugin_implements(plugin: AdapterPlugin) -> None:
    for name, proto in CAPABILITIES.items():
        declared = _declared(plugin, proto)
        has = isinstance(plugin, proto)
        assert has == declared, f"{plugin.name}: isinstance({name}) is {has} but declared is {declared}"
        if declared:
            missing = [m for m in _members(proto) if not _implemented(plugin, proto, m)]
            assert not missing, f"{plugin.name} declares {name} without implementing {missing}"
    assert set(capabilities_of(plugin)) == EXPECTED.get(plugin.name, set())


class _Half(AdapterPlugin):
    """Two of DataRelease's three methods, and the old ``server_round_end`` hook name."""

    name = "half"

    def attach(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        return model

    def release_vectors(self, model: nn.Module, tokenizer: Any, data: Any, cfg: RunConfig) -> torch.Tensor:
        return torch.zeros(1, 1)

    def install_release(self, model: nn.Module, task: str, vector: torch.Tensor) -> None:
        return None

    def server_round_end(self, setup: Any, server_round: int, report: Any) -> dict[str, Any]:
        return {}


def test_a_plugin_missing_a_protocol_method_does_not_have_the_capability() -> None:
    half = _Half()
    assert not isinstance(half, DataRelease) and not isinstance(half, ServerRoundWork)
    assert capabilities_of(half) == []

    class Whole(_Half):
        def release_params(self, cfg: RunConfig) -> ReleaseParams:
            return ReleaseParams("t", 1.0, 1.0)

    assert isinstance(Whole(), DataRelease) and capabilities_of(Whole()) == ["data_release"]  # structural


def test_the_multitask_server_skips_a_half_release_plugin(tiny_model_dir: Path) -> None:
    """The call sites ask by type: the old ``getattr`` on ``release_vectors`` would have
    started a release for a plugin that cannot say its noise."""
    from fedpeft.client.runtime import ClientIdentity, Runtime

    base = RunConfig()
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, path=str(tiny_model_dir)),
                              data=dataclasses.replace(base.data, examples_per_client=16, test_size=20),
                              train=dataclasses.replace(base.train, clients=2), tasks=TasksConfig(names=("rt", "bbc")))
    rt = Runtime(cfg)
    rt.plugin = _Half()
    model = nn.Linear(2, 2)
    rt.activate(model, ClientIdentity("0", 0, "", Path("/nonexistent")))  # no release attempted: no ledger dir needed


# ---- typed options ------------------------------------------------------------------------------
def _with_options(method: str, rank: int = 8, **options: Any) -> RunConfig:
    """The default configuration with ``method``, ``rank`` and these ``adapter.options`` (unchecked)."""
    return dataclasses.replace(RunConfig(), adapter=AdapterConfig(method=method, rank=rank,
                                                                  options=tuple(sorted(options.items()))))


def test_options_are_typed_frozen_and_read_from_cli_strings() -> None:
    opts = get("smora").settings(_with_options("smora", top_k="3", bias_rate="0.5"))  # type: ignore[attr-defined]
    assert (opts.top_k, opts.bias_rate) == (3, 0.5) and type(opts.top_k) is int and type(opts.bias_rate) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.top_k = 1
    nola = get("nola").settings(_with_options("nola", train_a="true"))  # type: ignore[attr-defined]
    assert nola.train_a is True and nola.num_basis == 256  # the default
    default = get("triadapt_lora").settings(_with_options("triadapt_lora", rank=12))  # type: ignore[attr-defined]
    assert default.init_rank == 3  # a run-dependent default: rank // 4


@pytest.mark.parametrize("plugin", [p for p in plugins() if p.options_type is not None], ids=lambda p: p.name)
def test_every_method_with_options_declares_a_frozen_dataclass(plugin: AdapterPlugin) -> None:
    assert plugin.options_type is not None
    params = plugin.options_type.__dataclass_params__  # type: ignore[attr-defined]
    assert params.frozen, f"{plugin.name}: options must be frozen"
    assert option_specs(plugin.options_type), f"{plugin.name}: no option fields"
    cfg = _with_options(plugin.name)
    plugin.validate_config(cfg)  # the defaults are valid
    assert isinstance(plugin.settings(cfg), plugin.options_type)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("method", "options", "needle"), [
    ("smora", {"topk": 2}, "invalid config adapter.options.topk=2: unknown option for smora; allowed: top_k, bias_rate"),
    ("smora", {"top_k": "x"}, "invalid config adapter.options.top_k='x': expected an integer"),
    ("smora", {"top_k": "2.5"}, "adapter.options.top_k='2.5': must be an integer in [1, 8]"),
    ("smora", {"top_k": "inf"}, "adapter.options.top_k='inf': must be an integer in [1, 8]"),
    ("smora", {"bias_rate": "fast"}, "invalid config adapter.options.bias_rate='fast': expected a number"),
    ("smora", {"bias_rate": 2}, "adapter.options.bias_rate=2: must be in [0, 1]"),
    ("nola", {"train_a": "maybe"}, "adapter.options.train_a='maybe': expected true or false"),
    ("mtlora", {"task_modules": "shared"}, "adapter.options.task_modules='shared': allowed: group, local"),
])
def test_bad_options_are_one_line_errors(method: str, options: dict[str, Any], needle: str) -> None:
    cfg = _with_options(method, **options)
    plugin = get(method)
    with pytest.raises(ConfigError) as info:
        plugin.validate_config(cfg)
    assert needle in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError):  # the same check wherever the options are read
        parse_options(method, plugin.options_type, cfg)  # type: ignore[arg-type]


def test_an_options_field_must_be_declared_with_option() -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Bad:
        size: int = 3

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Listy:
        sizes: list = option(0)  # type: ignore[type-arg]

    for klass in (Bad, Listy):
        with pytest.raises(TypeError, match="option()"):
            option_specs(klass)
    assert typing.get_type_hints(Listy)["sizes"] is list


def test_methods_without_options_leave_them_unchecked() -> None:
    """lora / ffa_lora read no options; as before, their adapter.options are not checked."""
    get("ffa_lora").validate_config(_with_options("ffa_lora", anything="x"))


# ---- registry ---------------------------------------------------------------------------------
def test_registry_refuses_duplicates_and_keeps_the_first() -> None:
    first = get("meteora")
    with pytest.raises(ValueError, match="'meteora' is already registered"):
        register(type(first)())
    assert get("meteora") is first and names().count("meteora") == 1
    assert all(get(p.name) is p for p in reg.SHIPPED) and {p.name for p in reg.SHIPPED} <= set(names())


# ---- the import web ---------------------------------------------------------------------------
METHOD_MODULES = {"abmll", "ffa_lora", "ffa_lora_hetero", "icm_lora", "lora", "meteora", "mtlora", "nola", "osft",
                  "sara", "smora", "soka", "texforce", "triadapt_lora"}
BASES = {"ffa_lora": {"lora"}, "ffa_lora_hetero": {"ffa_lora", "lora"}, "texforce": {"lora"},
         "nola": {"delta_linear"}, "sara": {"delta_linear"}, "soka": {"delta_linear"}, "osft": {"delta_linear"}}
METHOD_MODULES |= {"fedex_lora", "flora", "lora_fold"}  # lora_fold: the true base of both (on lora)
BASES |= {"lora_fold": {"lora"}, "fedex_lora": {"lora_fold"}, "flora": {"lora", "lora_fold"}}
METHOD_MODULES |= {"fedsa_lora", "rolora"}
BASES |= {"fedsa_lora": {"lora"}, "rolora": {"lora"}}


def _adapter_imports(path: Path) -> set[str]:
    """Second component of every ``fedpeft.adapters.X`` a module imports (any scope)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        for module in modules:
            parts = module.split(".")
            if parts[:2] == ["fedpeft", "adapters"] and len(parts) > 2:
                out.add(parts[2])
    return out


def test_method_modules_import_only_their_true_base_and_never_the_registry() -> None:
    for path in sorted(ADAPTERS.rglob("*.py")):
        rel = path.relative_to(ADAPTERS)
        if rel.name in ("registry.py", "__init__.py") and len(rel.parts) == 1:
            continue
        own = rel.parts[0].removesuffix(".py")
        imported = _adapter_imports(path) - {own}
        assert "registry" not in imported, f"{rel} imports the registry"
        methods = imported & (METHOD_MODULES | {"delta_linear"})
        assert methods <= BASES.get(own, set()), f"{rel} imports method modules {sorted(methods)}"


def test_a_third_party_method_with_options_and_a_capability_registers() -> None:
    """The path a newcomer takes (fedpeft/adapters/__init__.py): options dataclass, one
    capability Protocol among the bases, ``register``; the registry checks the rest."""
    from fedpeft.adapters.capabilities import ServerState

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class ScaleOptions:
        scale: float = option(0.5, low=0.0, high=1.0)

    class ScalePlugin(AdapterPlugin, ServerState):
        name, paper, travels = "scale_demo", "none", "nothing"
        options_type = ScaleOptions

        def attach(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
            return model

        def server_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
            return {}

    plugin = register(ScalePlugin())
    try:
        assert get("scale_demo") is plugin and capabilities_of(plugin) == ["server_state"]
        assert parse_options("scale_demo", ScaleOptions, _with_options("scale_demo", scale="0.25")).scale == 0.25
        assert "options: scale | capabilities: server_state" in plugin.describe()
        with pytest.raises(ConfigError, match="unknown option for scale_demo; allowed: scale"):
            plugin.validate_config(_with_options("scale_demo", size=1))
        with pytest.raises(ValueError, match="already registered"):
            register(ScalePlugin())
    finally:
        del reg._REGISTRY["scale_demo"]
