"""Bounded, typed reads of the files a user names (PIN, key, certificate chain, CA bundle).

A path can name anything: ``/dev/zero`` would fill memory, a FIFO would block forever, a directory
gives a confusing ``IsADirectoryError``. So every such file is opened without blocking, checked to be a
regular file, and read up to a cap that fits its content (one byte more tells "too large" apart).
"""
from __future__ import annotations

import os
import stat
import tempfile
from typing import Type

from .exceptions import ConfigError, LightClientError

KiB = 1024
MiB = 1024 * KiB

#: Caps per kind of content: generous for what the file holds, far below what hurts a device.
PIN_LIMIT = 4 * KiB
KEY_LIMIT = 64 * KiB
CHAIN_LIMIT = 1 * MiB
CA_BUNDLE_LIMIT = 8 * MiB
CSR_LIMIT = 64 * KiB

_KINDS = {
    stat.S_ISDIR: "a directory",
    stat.S_ISFIFO: "a FIFO (named pipe)",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISSOCK: "a socket",
}


def _kind(mode: int) -> str:
    for test, name in _KINDS.items():
        if test(mode):
            return name
    return "not a regular file"


def _open_regular(path: str, what: str, limit: int, unreadable: Type[LightClientError], hint: str) -> int:
    """An fd for the regular file ``path`` of at most ``limit`` bytes (see read_user_file for errors)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except IsADirectoryError:
        raise ConfigError(f"{what} is a directory: it must be a regular file") from None
    except OSError as exc:
        raise unreadable(f"cannot read {what}: {exc.strerror or exc}{hint}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} is {_kind(st.st_mode)}: it must be a regular file")
        if st.st_size > limit:
            raise ConfigError(f"{what} is too large ({st.st_size} bytes; at most {limit} expected)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_user_file(path: str, *, what: str, limit: int,
                   unreadable: Type[LightClientError] = ConfigError, hint: str = "") -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them.

    ``what`` is the caller's name for the file, e.g. ``"the PIN file '/etc/pin'"``. A file that is
    missing or cannot be read raises ``unreadable`` (the caller's error for its kind of content, with
    ``hint`` appended); a directory, FIFO, device or socket, or a file over ``limit``, raises
    ConfigError. Opening with O_NONBLOCK means a FIFO with no writer returns at once instead of
    hanging; fstat() then refuses it. No message ever contains a byte of the file.
    """
    fd = _open_regular(path, what, limit, unreadable, hint)
    try:
        chunks = []
        remaining = limit + 1   # one byte more than allowed tells a file that grew past the cap
        while remaining > 0:
            try:
                chunk = os.read(fd, min(remaining, 64 * KiB))
            except OSError as exc:
                raise unreadable(f"cannot read {what}: {exc.strerror or exc}{hint}") from None
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise ConfigError(f"{what} is too large (more than {limit} bytes)")
        return data
    finally:
        os.close(fd)


def check_user_file(path: str, *, what: str, limit: int,
                    unreadable: Type[LightClientError] = ConfigError, hint: str = "") -> None:
    """Raise as :func:`read_user_file` would, without reading: for files another library reads itself."""
    os.close(_open_regular(path, what, limit, unreadable, hint))


def open_user_file(path: str, *, what: str, limit: int,
                   unreadable: Type[LightClientError] = ConfigError, hint: str = "") -> int:
    """A read-only fd of the regular file ``path`` (at most ``limit`` bytes), checked as :func:`read_user_file`
    checks, for content streamed in parts (file upload) rather than read whole. The caller closes it."""
    return _open_regular(path, what, limit, unreadable, hint)


def prepare_private_file(path: str, *, what: str) -> None:
    """Make sure ``path`` exists as a regular file only its owner can read, before a secret goes in.

    Creates it with mode 0600 (never following a symlink), or accepts an existing regular file of
    this user whose mode gives group and others nothing. An existing file readable by others is
    refused rather than tightened: it may already hold secrets that others could read, and the
    user should know. Raises ConfigError naming ``what`` and the fix.
    """
    flags = (os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if getattr(os, "O_NOFOLLOW", 0) and os.path.islink(path):
            raise ConfigError(f"{what} is a symbolic link: give the path of a regular file") from None
        raise ConfigError(f"cannot create {what}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} is {_kind(st.st_mode)}: it must be a regular file")
        if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
            raise ConfigError(f"{what} belongs to another user: give a new file of your own")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"{what} can be read by other users (mode {stat.S_IMODE(st.st_mode):04o}) but will hold "
                f"secrets: run `chmod 600 {path}` or give a new file")
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` so that a crash or power cut leaves the old or the new content, never
    a mix: a temporary file in the same directory with ``mode`` from the start, fsync, rename, fsync of
    the directory (so the rename itself is durable)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".lightclient-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
