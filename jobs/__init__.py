"""Thin drivers: one module per `sonoray` subcommand, and the CLI that dispatches to them.

Each job module exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a
``run(args) -> int`` function. Drivers parse flags, call into ``cluster/`` and ``ultrasound/``, print
progress on stderr and, with ``--json``, one JSON object last on stdout.
"""
