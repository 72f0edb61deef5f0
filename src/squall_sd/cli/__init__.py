"""The ``squall`` command line."""

from squall_sd.cli._main import main

__all__ = ["main"]
