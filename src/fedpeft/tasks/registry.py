"""Registry of task types: one name, one task type; ``seq-cls`` is the default, ``causal-lm`` the second.

The registry imports the shipped task types (they do not import it) and registers them;
``task_type`` in the configuration names one. A task type defined elsewhere (a test, a
plugin module) registers itself with :func:`register` before the configuration is parsed.
"""

from __future__ import annotations

from fedpeft.config import RunConfig
from fedpeft.tasks.base import TaskType
from fedpeft.tasks.causal_lm import CausalLM
from fedpeft.tasks.seq_cls import SequenceClassification

__all__ = ["DEFAULT", "get", "head_prefixes", "names", "register", "task_for", "unregister"]

DEFAULT = "seq-cls"

_REGISTRY: dict[str, TaskType] = {}


def register(task_type: TaskType) -> TaskType:
    """Add ``task_type`` under its name; a second task type with that name is an error."""
    if not task_type.name:
        raise ValueError("a task type needs a non-empty name")
    if task_type.name in _REGISTRY:
        raise ValueError(f"task type {task_type.name!r} is already registered")
    _REGISTRY[task_type.name] = task_type
    return task_type


def unregister(name: str) -> None:
    """Remove a task type registered at run time (tests); the shipped ones stay."""
    if name == DEFAULT:
        raise ValueError(f"the default task type {DEFAULT!r} cannot be removed")
    _REGISTRY.pop(name, None)


def get(name: str) -> TaskType:
    """The task type registered as ``name`` (KeyError naming the allowed ones otherwise)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown task type {name!r}; allowed: {', '.join(names())}") from None


def task_for(cfg: RunConfig) -> TaskType:
    """The task type of a run (``cfg.task_type``)."""
    return get(cfg.task_type)


def names() -> list[str]:
    """Registered task type names, sorted."""
    return sorted(_REGISTRY)


def head_prefixes() -> tuple[str, ...]:
    """Every registered task type's :attr:`~TaskType.head_prefixes`, in registration order.

    For code that sees only a model or a parameter name (an adapter's freeze rule, an upload
    split): a model carries only its own task type's heads, so the union names them."""
    return tuple(dict.fromkeys(p for t in _REGISTRY.values() for p in t.head_prefixes))


register(SequenceClassification())
register(CausalLM())
