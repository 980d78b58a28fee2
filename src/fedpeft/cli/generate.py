"""``fedpeft generate RUN_DIR``: try a causal-LM run's federated model, one prompt or a chat.

``--prompt TEXT`` prints one greedy answer (repeatable: one answer per prompt, each on its
own); without ``--prompt`` it is an interactive chat that keeps the conversation (``/reset``
clears it, ``/exit`` or end of input leaves). ``--base`` answers with the initial model
instead, for a side-by-side look at what federated tuning changed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedpeft.cli.common import register_command


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a causal-lm run directory (config.toml + checkpoint.npz)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="answer TEXT and exit (repeatable); without it: interactive chat")
    p.add_argument("--system", default="", metavar="TEXT", help="system prompt (chat-template models)")
    p.add_argument("--max-new-tokens", type=int, default=0, metavar="N",
                   help="generation cap (default: the run's model.max_new_tokens)")
    p.add_argument("--base", action="store_true", help="use the initial model (no federated training)")
    p.add_argument("--route", default="", metavar="TASK", help="multi-task runs: the task whose modules answer")
    p.add_argument("--device", default="", metavar="DEVICE", help="auto | cpu | cuda (default: the run's)")


def _run(args: argparse.Namespace) -> int:
    from fedpeft.config import ConfigError
    from fedpeft.server.generate import load_run_model

    if args.max_new_tokens < 0:
        raise ConfigError("--max-new-tokens", args.max_new_tokens, "must be >= 1 (0 = the run's setting)")
    chat = load_run_model(Path(args.run_dir), base=args.base, route=args.route, device=args.device)
    chat.system = args.system
    limit = args.max_new_tokens or None
    if args.prompt:
        for prompt in args.prompt:
            print(chat.reply(prompt, limit))
        return 0
    which = "initial model" if args.base else f"round {chat.server_round}"
    print(f"fedpeft: chatting with {args.run_dir} ({which}); /reset clears the conversation, /exit leaves",
          file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            chat.history.clear()
            continue
        if line:
            print(chat.reply(line, limit, remember=True))


register_command("generate", "answer prompts with a causal-lm run's federated model (or chat with it)", _add_args,
                 _run)
