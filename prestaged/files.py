"""Reading the small files a user names: config, campaign and credential files.

Each is read whole, so a path to something that is no such file must not hang or exhaust memory:
``/dev/zero`` as a config read gigabytes, a named pipe as the proxy waited for a writer forever.
``read_small`` opens without blocking (a pipe with no writer reads as empty) and reads at most
one byte more than its limit, so that the caller can say "larger than ...".
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path
from typing import Optional, Union

from prestaged.errors import ConfigError

__all__ = ["exposed_beyond", "exposed_mode", "file_stamp", "read_small", "read_small_text",
           "size_text"]


def read_small(path: Union[str, Path], limit: int) -> bytes:
    """Up to ``limit + 1`` bytes of ``path`` (more than ``limit``: too large, the caller's
    word). ``OSError`` as ``open`` raises it (``FileNotFoundError``, ``PermissionError``...),
    ``IsADirectoryError`` for a directory, ``BlockingIOError`` for a pipe whose writer has not
    written yet."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb", buffering=0) as f:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        chunks, size = [], 0
        while size <= limit:
            chunk = f.read(limit + 1 - size)
            if chunk is None:  # a pipe with nothing to read yet
                raise BlockingIOError(errno.EAGAIN, "nothing to read yet (a pipe?)", str(path))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)


def read_small_text(path: Path, limit: int, what: str) -> str:
    """``path``'s UTF-8 text (a leading byte-order mark dropped), at most ``limit`` bytes;
    ``ConfigError`` (exit 2) naming ``what``
    (``config``, ``campaign``) and the file for a missing, unreadable, too large or non-UTF-8
    file."""
    try:
        raw = read_small(path, limit)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read: {e.strerror}") from None
    if len(raw) > limit:
        raise ConfigError(f"{what} {path}: larger than {size_text(limit)}, not a prestaged "
                          f"{what}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                          f"offset {e.start})") from None
    # A byte-order mark, as Windows editors write one: TOML parsers refuse it ("Invalid
    # statement at line 1, column 1", naming nothing one can see), lists of URLs take it.
    return text[1:] if text.startswith("\ufeff") else text


def size_text(limit: int) -> str:
    """``limit`` bytes as a file size limit is said: ``1 MiB``, ``128 KiB``."""
    return f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit >> 10} KiB"


def file_stamp(path: Path) -> Optional[tuple[int, int, int]]:
    """What tells a renewed file from the one read before (modification time, inode, size),
    whether it was rewritten in place or renamed over; None when it cannot be looked at."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino, st.st_size


def exposed_mode(path: Path) -> Optional[int]:
    """The permission bits of ``path`` when group or others have any access to it (a proxy or
    token file anyone else can read is theirs to use), else None; None too when it cannot be
    looked at."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    return mode if mode & 0o077 else None


_ACL = "system.posix_acl_access"
_ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK = 0x02, 0x04, 0x08, 0x10
_ACL_ENTRY = struct.Struct("<HHI")  # tag, permissions, user or group id


def exposed_beyond(path: Path, uid: int) -> Optional[str]:
    """What lets a user other than ``path``'s owner and ``uid`` (root aside) at ``path``
    (``"mode 640"``, ``"an ACL entry for user 1001"``), or None: nobody, or it cannot be looked
    at. As ``exposed_mode``, but a POSIX ACL granting ``uid`` alone passes: the group bits of a
    file with an ACL show its mask, not its group's access (systemd's ``LoadCredential=``
    grants the service's user so on a file system with ACLs: a 0400 file reads as 0440)."""
    mode = exposed_mode(path)
    if mode is None or mode & 0o007:
        return None if mode is None else f"mode {mode:o}"
    try:
        raw = os.getxattr(path, _ACL)
    except (OSError, AttributeError):  # no ACL (or no xattrs here): the group bits are the group's
        return f"mode {mode:o}"
    if len(raw) < 4 or (len(raw) - 4) % _ACL_ENTRY.size:
        return f"mode {mode:o}"
    entries = [_ACL_ENTRY.unpack_from(raw, at) for at in range(4, len(raw), _ACL_ENTRY.size)]
    mask = next((perm for tag, perm, _ in entries if tag == _ACL_MASK), 0o7)
    for tag, perm, who in entries:
        if not perm & mask:
            continue
        if tag == _ACL_GROUP_OBJ:
            return "its group, by its ACL"
        if tag == _ACL_GROUP:
            return f"an ACL entry for group {who}"
        if tag == _ACL_USER and who != uid:
            return f"an ACL entry for user {who}"
    return None
