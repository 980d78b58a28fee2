"""The ``fedpeft`` command line (:mod:`fedpeft.cli.main`).

One module per command family (simulate/methods, compare, privacy, deploy, bench, hetero);
each calls :func:`fedpeft.cli.common.register_command` at import time and
:mod:`fedpeft.cli.main` imports them all.
"""
