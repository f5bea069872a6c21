"""Which filesystem a path is on, for the SQLite state's journal mode.

SQLite's write-ahead log (WAL) keeps its index in shared memory (the ``-shm`` file, mapped by
every process that opens the database), which only processes of one host share: "WAL does not
work over a network filesystem" (https://sqlite.org/wal.html). The CLI's state defaults to
``~/.local/state/prestaged/state.db``, and interactive grid nodes (Fermilab's GPVMs, CERN's
lxplus) have their home directories on NFS or AFS, mounted on several nodes at once: two nodes
writing one WAL database can corrupt it. The rollback journal relies on file locks instead,
which those filesystems provide across hosts. ``Store`` asks ``network_filesystem`` which one to
use (``[state] journal = "auto"``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

__all__ = ["MOUNTINFO", "NETWORK_FILESYSTEMS", "filesystem_of", "network_filesystem"]

MOUNTINFO = Path("/proc/self/mountinfo")
"""Linux's mount table of this process (``proc(5)``); elsewhere it does not exist."""

NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "afs", "ceph", "lustre", "gpfs", "glusterfs",
    "beegfs", "ocfs2", "gfs2", "9p", "coda", "ncpfs",
    # FUSE clients of remote storage (a local FUSE filesystem keeps WAL).
    "fuse.eosxd", "fuse.sshfs", "fuse.s3fs", "fuse.glusterfs", "fuse.ceph-fuse", "fuse.gcsfuse",
    "fuse.rclone", "fuse.juicefs", "fuse.xrootdfs",
})
"""Filesystem types (as the mount table names them) that processes on several hosts share."""

_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """A mount point as the kernel writes it (space, tab, newline and backslash as ``\\ooo``)."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def _under(target: str, point: str) -> bool:
    return point in ("/", target) or target.startswith(point.rstrip("/") + "/")


def filesystem_of(path: Path, mountinfo: Optional[Path] = None) -> Optional[str]:
    """The type of the filesystem ``path`` is (or would be created) on: that of the deepest
    mount point above its real path, the last mounted of equals. None when the mount table
    (``mountinfo``, default ``MOUNTINFO``) cannot be read."""
    try:
        table = (mountinfo or MOUNTINFO).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    target = os.path.realpath(path)
    found: Optional[str] = None
    depth = -1
    for line in table.splitlines():
        # "36 35 98:0 /root /mnt/point rw,noatime master:1 - ext4 /dev/sda1 rw": the fields
        # before " - " vary in number, the mount point is the fifth.
        left, sep, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if not sep or len(fields) < 5 or not rest:
            continue
        point = _unescape(fields[4])
        if _under(target, point) and len(point) >= depth:
            found, depth = rest[0], len(point)
    return found


def network_filesystem(path: Path, mountinfo: Optional[Path] = None) -> Optional[str]:
    """The type of ``path``'s filesystem when other hosts may share it (``nfs4``), else None."""
    kind = filesystem_of(path, mountinfo)
    return kind if kind in NETWORK_FILESYSTEMS else None
