"""The emulated dCache's shared state: files, disk, tape library, statistics and change waiters."""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Optional

from prestaged.testing.dcache.model import (
    DCacheConfig,
    DCacheStats,
    Disk,
    Locality,
    Replica,
    TapeLibrary,
    fs_path,
)

__all__ = ["DCacheCore"]

NO_SPACE = "No space left on pool: every replica is pinned or disk-only"


class DCacheCore:
    """Namespace, pool disk and tape library of one emulated dCache (used on its own loop)."""

    def __init__(self, config: DCacheConfig) -> None:
        self.config = config
        self.stats = DCacheStats()
        self.files: dict[str, Replica] = {}
        self.disk = Disk(config.disk_capacity, self.files, self.stats)
        self.library = TapeLibrary(config, self.stats, self._restored)
        self._changed = asyncio.Event()

    def add_file(self, path: str, size: int, locality: Locality, *, tape: str = "T0001",
                 atime: float = 0.0) -> Replica:
        """Create (or replace) ``path`` of ``size`` bytes; ``tape`` is its volume when it has a
        tape copy; ``atime`` its last access (``time.time()`` seconds)."""
        if not path.startswith("/") or size < 0:
            raise ValueError(f"need an absolute path and size >= 0, got {path!r}, {size}")
        path = fs_path(path)
        on_disk = locality in (Locality.DISK, Locality.DISK_AND_TAPE)
        # LOST is a disk-only file whose pools are all down: for a file with a tape copy
        # dCache never says UNAVAILABLE (PoolMonitorV5.getFileLocality: stored is NEARLINE).
        replica = Replica(path, size, tape if locality in (Locality.TAPE, Locality.DISK_AND_TAPE)
                          else None, on_disk, readable=locality is not Locality.LOST,
                          atime=atime)
        self.files[path] = replica
        return replica

    def file(self, path: str) -> Optional[Replica]:
        """The file at ``path`` in any spelling (``//``, ``.``, ``..``: the namespace resolves
        it as dCache's does), or None."""
        return self.files.get(fs_path(path))

    def is_dir(self, path: str) -> bool:
        """Whether ``path`` (any spelling) is a directory: the root, or a parent of a file."""
        prefix = fs_path(path).rstrip("/") + "/"
        return prefix == "/" or any(p.startswith(prefix) for p in self.files)

    def recall(self, replica: Replica) -> asyncio.Future[Optional[str]]:
        """Bring a tape-only replica to disk; the future gives None or the error."""
        assert replica.tape is not None
        return self.library.recall(replica.path, replica.tape)

    def _restored(self, path: str) -> Optional[str]:
        replica = self.files[path]
        if not self.disk.make_room(replica.size):
            return NO_SPACE
        replica.on_disk, replica.atime = True, time.time()
        self.stats.recalled += 1
        self.changed()
        return None

    def changed(self) -> None:
        """Wake every ``wait_until``."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Return once ``predicate()`` is true (checked on each change); TimeoutError after
        ``timeout`` seconds."""
        async def wait() -> None:
            while not predicate():
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)
