"""A run directory's federated model, ready to talk to: what ``fedpeft generate`` runs.

The model is rebuilt exactly as the server held it after its last completed round: the
run's ``config.toml`` (base model, adapter, task layout), then the global state of
``checkpoint.npz`` installed with the plugin's own ``load_state`` -- so every adapter method
works, not only those PEFT can reload, and an unfinished run can be tried at its last round.
For PEFT methods the exported ``adapter/`` directory holds the same weights (a test checks
that ``PeftModel.from_pretrained(base, RUN_DIR/adapter)`` generates the same tokens).

Replies are greedy (:mod:`fedpeft.tasks.generation`): the same prompt gives the same answer,
so a user can compare the federated adapter with the base model (``base=True``) line by line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedpeft.config import ConfigError, RunConfig, load_config_file
from fedpeft.data.layout import activate_task
from fedpeft.load import parse_config
from fedpeft.server.checkpoint import load_checkpoint
from fedpeft.tasks.base import TaskType
from fedpeft.tasks.chat import messages_prompt_ids
from fedpeft.tasks.generation import generate_texts

__all__ = ["Chat", "load_run_model"]


@dataclass
class Chat:
    """A run's model, its tokenizer and a conversation (``history`` of role/content turns)."""

    cfg: RunConfig
    task_type: TaskType
    model: nn.Module
    tokenizer: Any
    device: torch.device
    server_round: int
    system: str = ""
    history: list[dict[str, str]] = field(default_factory=list)

    def messages(self, prompt: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history, {"role": "user", "content": prompt}]

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids the model is given for ``prompt`` after the conversation so far."""
        ids = messages_prompt_ids(self.tokenizer, self.messages(prompt))
        return ids[-self.cfg.model.max_length * 8:]  # a long chat keeps its most recent turns

    def reply(self, prompt: str, max_new_tokens: int | None = None, remember: bool = False) -> str:
        """The model's greedy answer to ``prompt``; ``remember`` adds both turns to the history."""
        limit = max_new_tokens or self.cfg.model.max_new_tokens
        answer = generate_texts(self.model, self.tokenizer, [self.prompt_ids(prompt)], limit, self.device)[0]
        if remember:
            self.history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        return answer


def load_run_model(run_dir: Path, base: bool = False, route: str = "", device: str = "") -> Chat:
    """The model of ``run_dir`` after its last checkpointed round (``base``: the initial global
    model, i.e. the base model for adapters that start at zero). ``route`` names the task of
    a multi-task run whose task-owned modules answer (default: its first task)."""
    from fedpeft.server.setup import ServerSetup  # lazily: it loads every plugin

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise ConfigError("RUN_DIR", str(run_dir), "not a fedpeft run directory (no config.toml)")
    layers: list[dict[str, Any]] = [load_config_file(run_dir / "config.toml")]
    if device:
        layers.append({"device": device})
    cfg = parse_config(*layers)
    setup = ServerSetup(cfg)
    if not setup.task_type.evaluates_initial_model:
        raise ConfigError("RUN_DIR", str(run_dir), f"is a {cfg.task_type} run; generate needs a generative task type "
                                                  "(task_type = causal-lm)")
    server_round = 0
    if not base:
        ckpt_path = run_dir / "checkpoint.npz"
        if not ckpt_path.is_file():
            raise ConfigError("RUN_DIR", str(run_dir), "has no checkpoint (no round finished); use --base to try the "
                                                      "base model")
        ckpt = load_checkpoint(ckpt_path)
        setup.set_state(ckpt.state)
        server_round = ckpt.server_round
    if setup.layout.per_task:
        names = [t.name for t in setup.layout]
        if route and route not in names:
            raise ConfigError("--route", route, f"allowed: {', '.join(names)}")
        activate_task(setup.model, route or names[0])
    setup.model.eval()
    return Chat(cfg, setup.task_type, setup.model, setup.tokenizer, setup.device, server_round)
