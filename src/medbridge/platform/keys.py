"""Platform keys (host key, user CA) and reading users' public keys."""

from __future__ import annotations

import os
from pathlib import Path

import asyncssh

from medbridge.errors import InvalidInput, NotInitialised

KEY_ALG = "ssh-ed25519"


def create_private_key(path: Path) -> asyncssh.SSHKey:
    """Write a new Ed25519 key readable by its owner only (never world-readable, not even briefly)."""
    key = asyncssh.generate_private_key(KEY_ALG)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key())
    path.with_name(path.name + ".pub").write_bytes(key.export_public_key())
    return key


def load_private_key(path: Path) -> asyncssh.SSHKey:
    try:
        return asyncssh.read_private_key(str(path))
    except FileNotFoundError as exc:
        raise NotInitialised(f"platform key {path} is missing") from exc
    except (OSError, asyncssh.KeyImportError) as exc:
        raise InvalidInput(f"cannot read key {path}: {exc}") from exc


def fingerprint(key: asyncssh.SSHKey) -> str:
    return key.get_fingerprint("sha256")


def public_line(key: asyncssh.SSHKey) -> str:
    """The key as one OpenSSH public-key line, without a comment."""
    return " ".join(key.convert_to_public().export_public_key().decode().split()[:2])


def read_public_key_file(path: str | os.PathLike[str]) -> asyncssh.SSHKey:
    """A user's public key from a file: a clear error if it is missing or not a key."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read key file {path}: {exc.strerror or exc}") from exc
    if b"PRIVATE KEY" in data:
        raise InvalidInput(f"{path} holds a private key; give the public key (.pub) instead")
    try:
        return asyncssh.import_public_key(data)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise InvalidInput(f"{path} is not an OpenSSH public key: {exc}") from exc


def read_private_key_file(path: str | os.PathLike[str]) -> asyncssh.SSHKey:
    """A user's enrolment key from a file, with a clear error for every way that fails."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read key file {path}: {exc.strerror or exc}") from exc
    try:
        return asyncssh.import_private_key(data)
    except asyncssh.KeyEncryptionError as exc:
        raise InvalidInput(f"{path} is passphrase-protected; medbridge needs an unencrypted enrolment key") from exc
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise InvalidInput(f"{path} is not an OpenSSH private key: {exc}") from exc
