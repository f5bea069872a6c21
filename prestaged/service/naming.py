"""What a caller of the daemon's API may name as a definition.

The daemon reads files as its own user, and an API caller may be any local user (the API needs
no token on a loopback listener). So a definition named over the API is never a path: for the
local catalog it is a plain name (no ``/``, no ``..``, no ``~``) of a ``NAME.txt`` file inside
``catalog.local.dir``, whose real path (symlinks resolved) must stay inside that directory;
a remote catalog (SAM web) resolves names on its server. Paths remain for the operator: the
config's ``[[watch]]`` entries and campaign files (whose changes always need the token).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from prestaged.catalog import Catalog
from prestaged.errors import CatalogError, ConfigError, NotFoundError, ServerConfigError

__all__ = ["local_file", "open_requested"]


def _plain_name(definition: str) -> bool:
    # NAME.txt must fit a file name's 255 bytes.
    return (definition.strip() == definition and definition not in ("", ".", "..")
            and len(definition.encode("utf-8", "surrogatepass")) <= 251
            and not definition.startswith("~")
            and not any(c in definition for c in ("/", "\\", "\0")))


def local_file(definition: str, directory: Optional[Path]) -> Path:
    """The real path of local definition ``definition`` named over the API: ``ConfigError``
    (HTTP 400) for a path or for no ``catalog.local.dir``; ``NotFoundError`` (404) when there
    is no such file in the directory or it leads outside it (a symlink)."""
    if directory is None:
        raise ConfigError("local definitions named over the API are looked up in "
                          "catalog.local.dir, which is not set: set it, or name a "
                          "definition of a remote catalog")
    if not _plain_name(definition):
        raise ConfigError(f"definition {definition[:80]!r}: over the API a local definition "
                          "is a name in catalog.local.dir (no '/', '..' or '~'; at most 251 "
                          "bytes), not a path")
    base = directory.resolve()
    real = (base / f"{definition}.txt").resolve()
    if base not in real.parents:
        raise NotFoundError(f"definition '{definition}' is not in the local catalog: its file "
                            "leads outside catalog.local.dir")
    if not real.is_file():
        raise NotFoundError(f"definition '{definition}' not found in the local catalog")
    return real


def _opened(open_catalog: Callable[[str, str], Catalog], kind: str,
            definition: str) -> Catalog:
    """``open_catalog(kind, definition)``; a ``ConfigError`` then is the daemon's config (no
    SAM rewrite rules, no MetaCat URL), not the caller's request: a ``ServerConfigError``."""
    try:
        return open_catalog(kind, definition)
    except ServerConfigError:
        raise
    except ConfigError as e:
        raise ServerConfigError(f"the daemon's configuration: {e}") from None


def open_requested(kind: str, definition: str, directory: Optional[Path],
                   open_catalog: Callable[[str, str], Catalog]) -> Catalog:
    """The catalog of ``definition`` as an API caller named it (see the module docstring);
    ``open_catalog(kind, definition)`` opens it once the name is allowed."""
    if kind != "local":
        return _opened(open_catalog, kind, definition)
    real = local_file(definition, directory)
    try:
        catalog = _opened(open_catalog, kind, definition)
    except CatalogError as e:  # only finds the file, which was just there: gone meanwhile
        raise NotFoundError(str(e)) from e
    # The local catalog tries the name as a path in the working directory first: make sure
    # it chose the file checked above.
    found = getattr(catalog, "path", None)
    if not isinstance(found, Path) or found.resolve() != real:
        raise NotFoundError(f"definition '{definition}' is not in the local catalog: the "
                            "name also names a file in the daemon's working directory")
    return catalog
