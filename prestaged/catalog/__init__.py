"""Catalogs turn a definition name into a stream of ``FileRef``s.

Every backend implements the ``Catalog`` protocol; the engine only ever sees the async iterator,
so SAM web, MetaCat or Rucio plug in without touching it. Nothing here holds a whole dataset in
memory: backends stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Protocol, runtime_checkable

from prestaged.errors import ConfigError

if TYPE_CHECKING:
    from prestaged.config import CatalogConfig

__all__ = ["KINDS", "Catalog", "FileRef", "open_catalog"]


@dataclass(frozen=True)
class FileRef:
    """One file of a definition: its catalog name, the URL to touch and its size if known."""

    name: str
    url: str
    size: Optional[int] = None


@runtime_checkable
class Catalog(Protocol):
    """A source of files for one definition."""

    name: str
    """Catalog kind shown in summaries, e.g. ``local`` or ``samweb``."""
    definition: str
    """The definition as the user named it."""

    def files(self) -> AsyncIterator[FileRef]:
        """Yield the definition's files, streaming; raises ``CatalogError`` when unresolvable."""
        ...

    async def estimate(self) -> Optional[int]:
        """Number of files if cheaply known (for progress), else None."""
        ...


KINDS = ("local",)
"""Catalog backends this build knows (``--catalog``, ``catalog.default``)."""


def open_catalog(kind: str, definition: str, cfg: CatalogConfig) -> Catalog:
    """The catalog ``kind`` for ``definition``; ``ConfigError`` for an unknown kind."""
    if kind == "local":
        from prestaged.catalog.local import LocalCatalog

        return LocalCatalog(definition, cfg.local.dir)
    raise ConfigError(f"catalog {kind!r} is not known; choose one of: {', '.join(KINDS)}")
