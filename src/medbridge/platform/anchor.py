"""The audit's signing key, its checkpoints, and the anchors an operator publishes.

The key (``keys/audit_ed25519`` in the home) signs nothing but checkpoints: it is not
the user CA, whose signature opens data, so holding it lets no one in, and either can
be replaced without the other.  A checkpoint is an ``audit.checkpoint`` entry that
signs the entry before it; its anchor (the same statement as a file) is what an
operator ships off the platform.  ``audit verify --anchor FILE`` then finds a chain
that was cut below the anchor or rewritten up to it, and ``--from FILE`` verifies
only what came after a checkpoint verified before.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import asyncssh

from medbridge.config import Home
from medbridge.control.audit import Anchor, SignatureCheck, checkpoint_message
from medbridge.control.store import Store
from medbridge.errors import InvalidInput
from medbridge.platform.keys import create_private_key, fingerprint, load_private_key, read_public_key_file


def audit_key(home: Home) -> asyncssh.SSHKey:
    """The home's audit signing key, made on first use (homes made before it existed have none)."""
    if not home.audit_key.exists():
        try:
            return create_private_key(home.audit_key)
        except FileExistsError:  # another worker made it first
            pass
    return load_private_key(home.audit_key)


def signer(key: asyncssh.SSHKey) -> Callable[[int, str], Anchor]:
    """Signs ``(seq, hash)`` into an :class:`Anchor`."""
    fpr = fingerprint(key)

    def sign(seq: int, hash: str) -> Anchor:
        signature = base64.b64encode(key.sign(checkpoint_message(seq, hash), key.algorithm)).decode()
        return Anchor(seq=seq, hash=hash, at=datetime.now(UTC).isoformat(), key=fpr, signature=signature)

    return sign


def checker(public: asyncssh.SSHKey) -> SignatureCheck:
    """Accepts a signature by ``public`` alone."""
    fpr = fingerprint(public)

    def check(key: str, message: bytes, signature: str) -> bool:
        if key != fpr:
            return False
        try:
            return bool(public.verify(message, base64.b64decode(signature, validate=True)))
        except (binascii.Error, ValueError, TypeError):  # not base64, not a signature, not even a string
            return False

    return check


def public_key(home: Home, path: str | os.PathLike[str] | None) -> asyncssh.SSHKey:
    """The key checkpoints must verify with: ``path`` (a copy kept off the platform) or the home's."""
    if path is not None:
        return read_public_key_file(path)
    return audit_key(home).convert_to_public()


def checkpoint(home: Home, store: Store, key: asyncssh.SSHKey | None = None) -> Anchor:
    """Sign the head of the chain into it, write the home's anchor file, and return the anchor."""
    anchor = store.checkpoint(signer(key or audit_key(home)), datetime.now(UTC))
    write_anchor(home.audit_anchor, anchor)
    return anchor


def write_anchor(path: Path, anchor: Anchor) -> None:
    """Replace ``path`` at once (a reader never sees half a file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(anchor.to_json())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_anchor(path: str | os.PathLike[str], check: SignatureCheck) -> Anchor:
    """An anchor file whose signature verifies; InvalidInput says why not."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read anchor {path}: {exc}") from exc
    try:
        anchor = Anchor.from_json(text)
    except ValueError as exc:
        raise InvalidInput(f"anchor {path}: {exc}") from exc
    if not check(anchor.key, anchor.message(), anchor.signature):
        raise InvalidInput(f"anchor {path}: its signature does not verify with the audit key")
    return anchor
