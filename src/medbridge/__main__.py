"""``python -m medbridge``."""

from medbridge.cli.main import entry

entry()
