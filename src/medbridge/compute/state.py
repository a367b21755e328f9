"""What ``job run`` leaves for the Slurm epilog: files in the user's own folder, made and read by descriptor.

The state folder (``/var/spool/medbridge``, mode 1733 like /tmp) is shared by every
user of the node, so a name in it proves nothing: another user may have made it
first, as a file anyone can read or write, or as a link to elsewhere.  So each user
keeps their state in a folder of their own, ``<state>/<uid>``, mode 0700:

- ``job run`` makes that folder (or opens the one it made before) without following
  links, and refuses one that another user owns or that others may write, saying why;
  it then creates each file there with ``O_EXCL`` (never a file someone else made).
- The epilog (root) opens ``<state>/<uid>`` of the job's uid the same way, and reads a
  file only if it is a regular file of that uid, not a link, and not too large.

A user can thus only mislead the epilog about their own job, which it handles as
that user (see :mod:`medbridge.compute.slurm`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import stat
from pathlib import Path

from medbridge.errors import InvalidInput

DEFAULT_STATE_DIR = Path("/var/spool/medbridge")
#: The most the epilog reads of one state file.
MAX_STATE_BYTES = 1 << 20
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _describe_owner(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _open_top(state_dir: Path) -> int:
    """The shared state folder: one that nobody but its owner (root, or the user) can rearrange."""
    fd = os.open(state_dir, _DIR)
    try:
        st = os.fstat(fd)
        if st.st_uid not in (0, os.geteuid()):
            raise InvalidInput(f"state folder {state_dir} is owned by {_describe_owner(st.st_uid)}, not root")
        if st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
            raise InvalidInput(
                f"state folder {state_dir} is writable by anyone without the sticky bit, so others could replace "
                f"what is in it; make it like /tmp: chmod 1733 {state_dir}"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Held:
    """A folder held open by descriptor: names in it are reached through that, never by a path again."""

    _fd = -1

    def remove(self, name: str) -> None:
        """Unlink ``name`` in the folder (whatever is there is the folder owner's)."""
        if self._fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class UserFolder(_Held):
    """This user's folder under the state folder, held open by descriptor for the job's lifetime."""

    def __init__(self, state_dir: Path, fd: int):
        self.path = state_dir / str(os.geteuid())
        self._fd = fd

    @classmethod
    def claim(cls, state_dir: Path) -> UserFolder:
        """Make (or reopen) ``<state_dir>/<uid>``, private to this user; refuse one that is not."""
        uid = os.geteuid()
        name = str(uid)
        where = state_dir / name
        top = _open_top(state_dir)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=top)
            try:
                fd = os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=top)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise InvalidInput(
                        f"{where} is not a folder but a link or a file (someone else may have made it); "
                        "refusing to leave state there"
                    ) from exc
                raise
        finally:
            os.close(top)
        st = os.fstat(fd)
        problem = None
        if st.st_uid != uid:
            problem = f"is owned by {_describe_owner(st.st_uid)}, not you"
        elif st.st_mode & 0o022:
            problem = f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
        if problem is not None:
            os.close(fd)
            raise InvalidInput(
                f"{where} {problem}: someone else could plant or read the job's state there; refusing to use it "
                "(the node's administrators should remove it; job run makes it again, mode 0700)"
            )
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o700)  # our own folder, readable by others: private from now on
        return cls(state_dir, fd)

    def write(self, name: str, data: bytes) -> Path:
        """Create ``name`` afresh (``O_EXCL``, mode 0600) with ``data``; a stale one of ours is replaced."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, 0o600, dir_fd=self._fd)
        except FileExistsError:
            # Only this user (or root) can put anything in a 0700 folder of theirs: a leftover of an earlier run.
            os.unlink(name, dir_fd=self._fd)
            fd = os.open(name, flags, 0o600, dir_fd=self._fd)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return self.path / name


class StateReader(_Held):
    """The epilog's view of one uid's state folder: files read only if that uid made them, never through a link."""

    def __init__(self, state_dir: Path, uid: int):
        self.folder = state_dir / str(uid)
        self.uid = uid
        self.notes: list[str] = []
        try:
            top = os.open(state_dir, _DIR)
        except OSError as exc:
            self.notes.append(f"no state folder {state_dir}: {exc.strerror}")
            return
        try:
            fd = os.open(str(uid), _DIR | os.O_NOFOLLOW, dir_fd=top)
        except FileNotFoundError:
            return
        except OSError as exc:
            self.notes.append(f"ignored {self.folder}: not a folder ({exc.strerror})")
            return
        finally:
            os.close(top)
        st = os.fstat(fd)
        if st.st_uid != uid or st.st_mode & 0o022:
            os.close(fd)
            self.notes.append(
                f"ignored {self.folder}: owned by {_describe_owner(st.st_uid)}, mode "
                f"{stat.S_IMODE(st.st_mode):04o} (must be uid {uid}'s and writable by no one else)"
            )
            return
        self._fd = fd

    def read(self, name: str, limit: int = MAX_STATE_BYTES) -> bytes | None:
        """A regular file of the uid's, at most ``limit`` bytes; ``None`` (with a note) for anything else."""
        if self._fd < 0:
            return None
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self._fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.notes.append(f"ignored {self.folder / name}: {exc.strerror}")
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != self.uid:
                self.notes.append(f"ignored {self.folder / name}: not a regular file of uid {self.uid}")
                return None
            if st.st_size > limit:
                self.notes.append(f"ignored {self.folder / name}: {st.st_size} bytes, more than {limit}")
                return None
            return f.read(limit + 1)[:limit]
