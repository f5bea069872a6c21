"""Files of the operator's state (the database, campaign slice lists) are private: 0600 in
0700 directories, whatever the umask. The units set UMask=0077, but a user's shell usually has
022, and definitions, URLs and run history are nobody else's business."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["create_private", "private_dirs", "write_private"]


def private_dirs(directory: Path) -> None:
    """Create ``directory`` and missing parents; those made here are 0700."""
    missing = [p for p in [directory, *directory.parents] if not p.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    for made in missing:
        with contextlib.suppress(OSError):
            made.chmod(0o700)


def create_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (its directories with
    ``private_dirs``)."""
    private_dirs(path.parent)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, created 0600 if new (an existing file keeps its mode)."""
    create_private(path)
    path.write_text(text, encoding="utf-8")
