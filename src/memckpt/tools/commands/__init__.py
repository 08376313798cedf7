"""Subcommands of ``memckpt`` beyond the catalog ones, one module each.

A module here defines ``register(subparsers)`` that adds its parser and sets
``fn=handler`` (``handler(args) -> int``); ``memckpt.tools.cli`` finds it by name.
Shared output helpers live in ``memckpt.tools.tables``.
"""
