"""The ``kvstore`` command line: ``main`` is the click group the console script runs (defined in
``kvstore.cli.app``, one module per group of commands beside it)."""

from kvstore.cli.app import main

__all__ = ["main"]
