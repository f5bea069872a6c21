"""Catalogs turn a definition name into a stream of ``FileRef``s.

Every backend implements the ``Catalog`` protocol; the engine only ever sees the async iterator,
so SAM web or MetaCat with Rucio plug in without touching it. Nothing here holds a whole dataset in
memory: backends stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Optional, Protocol, runtime_checkable

from prestaged.config import CATALOG_KINDS
from prestaged.errors import ConfigError
from prestaged.model import FileRef

if TYPE_CHECKING:
    import ssl

    from prestaged.config import CatalogConfig
    from prestaged.tokens import TokenSource

__all__ = ["KINDS", "Catalog", "open_catalog", "unresolved_in"]


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


def unresolved_in(catalog: Catalog) -> int:
    """Files the last ``files()`` pass of ``catalog`` named but could give no URL for (0 for
    catalogs that cannot have any: see ``cli.render.Resolving``)."""
    count = getattr(catalog, "unresolved_count", 0)
    return count if isinstance(count, int) else 0


KINDS = CATALOG_KINDS
"""Catalog backends this build knows (``--catalog``, ``catalog.default``)."""


def open_catalog(
    kind: str,
    definition: str,
    cfg: CatalogConfig,
    *,
    ssl_context: Optional[ssl.SSLContext] = None,
    dims: Optional[str] = None,
    mql: bool = False,
    identity: Optional[str] = None,
    token: Optional[TokenSource] = None,
) -> Catalog:
    """The catalog ``kind`` for ``definition``; ``ConfigError`` for an unknown kind.

    For the networked catalogs (``samweb``, ``metacat``): ``ssl_context`` (the client TLS
    context, built by the caller), ``identity`` (the DN presented, for error messages) and
    ``token`` (the bearer token, sent where the catalog's configuration says). ``dims`` (a SAM
    dimensions query instead of a definition) is for ``samweb``; ``mql`` (``definition`` is an
    MQL query, not a dataset) for ``metacat``.
    """
    if dims is not None and kind != "samweb":
        raise ConfigError(f"--dims needs the samweb catalog, not {kind!r}")
    if mql and kind != "metacat":
        raise ConfigError(f"--mql needs the metacat catalog, not {kind!r}")
    if kind == "local":
        from prestaged.catalog.local import LocalCatalog

        return LocalCatalog(definition, cfg.local.dir)
    if kind == "samweb":
        from prestaged.catalog.samweb import SamWebCatalog

        return SamWebCatalog(definition, cfg.samweb, ssl_context, dims=dims, identity=identity,
                             token=token)
    if kind == "metacat":
        from prestaged.catalog.metacat import MetaCatCatalog

        return MetaCatCatalog(definition, cfg, ssl_context, mql=mql, identity=identity,
                              token=token)
    raise ConfigError(f"catalog {kind!r} is not known; choose one of: {', '.join(KINDS)}")
