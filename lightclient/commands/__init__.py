"""The subcommands of the ``lightclient`` console script (see :mod:`lightclient.cli`).

Each module adds its subparsers in ``register(subparsers)`` and runs through the public library API
only. Nothing in the library imports this package.
"""
