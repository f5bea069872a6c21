"""An emulated dCache for tests and benchmarks: WebDAV door, pool, Tape REST frontend, tape library.

``DCacheServer(ssl, pool_ssl, DCacheConfig(...))`` listens on 127.0.0.1 with three ports; tests
set files up with ``server.core.add_file(path, size, Locality.TAPE, tape="T1")`` and assert on
``server.core.stats`` and ``server.core.files``; ``ThreadedDCache`` runs one in a thread for
synchronous callers, and ``python -m prestaged.testing.dcache`` as a process of its own (for
benchmarks: see its ``--help``). ``DCacheServer(..., bearer=BearerCheck(...))`` accepts WLCG
tokens as dCache does (``prestaged.testing.dcache.auth``); ``server.faults`` makes frontend and
discovery fail now and then as a real site's do (``prestaged.testing.dcache.faults``). Not for
production: everything is in memory.
"""

from prestaged.testing.dcache.faults import PNFS_TIMEOUT, Faults
from prestaged.testing.dcache.model import (
    DCACHE_RATE,
    DCacheConfig,
    DCacheStats,
    Locality,
    Replica,
)
from prestaged.testing.dcache.server import DOOR_TIMEOUT_MESSAGE, DCacheServer
from prestaged.testing.dcache.threaded import ThreadedDCache

__all__ = ["DCACHE_RATE", "DOOR_TIMEOUT_MESSAGE", "PNFS_TIMEOUT", "DCacheConfig", "DCacheServer",
           "DCacheStats", "Faults", "Locality", "Replica", "ThreadedDCache"]
