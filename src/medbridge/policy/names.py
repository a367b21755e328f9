"""Validation of the names users, groups, datasets and jobs may carry."""

from __future__ import annotations

import re

from medbridge.errors import InvalidInput

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_name(kind: str, value: str) -> str:
    """Return ``value`` if it is a safe name (it becomes a path part and a principal)."""
    if kind == "user" and value.startswith("medbridge-cert-"):
        raise InvalidInput(f"invalid user name {value!r}: the prefix 'medbridge-cert-' is reserved for certificates")
    if not _NAME.fullmatch(value or "") or value in {".", ".."}:
        raise InvalidInput(
            f"invalid {kind} name {value!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value
