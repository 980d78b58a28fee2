"""Sub-commands of ``fedpeft`` beyond ``simulate`` and ``methods``.

Each module here calls :func:`simulations.cli.register_command` at import time; the CLI
imports all of them. One module per command family (compare, privacy, deploy, bench).
"""
