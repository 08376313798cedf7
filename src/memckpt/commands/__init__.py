"""Subcommands of ``memckpt`` beyond the catalog ones, one module each.

A module here defines ``register(subparsers)`` that adds its parser and sets
``fn=handler`` (``handler(args) -> int``); ``memckpt.cli`` finds it by name.
Shared output helpers live in ``memckpt.cli`` (``_table``, ``_human``).
"""
