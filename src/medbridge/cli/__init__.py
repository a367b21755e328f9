"""The ``medbridge`` command: parse, call, print, exit code — nothing else."""

from medbridge.cli.main import main

__all__ = ["main"]
