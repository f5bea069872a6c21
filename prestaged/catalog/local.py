"""The local catalog: a definition is a text file of URLs, one per line.

``#`` starts a comment (whole line or trailing after whitespace); blank lines are ignored.
``prestaged warm path/to/list.txt`` reads that file; ``prestaged warm NAME`` reads
``[catalog.local] dir``/``NAME.txt``. A line is a URL when it starts with ``scheme://``
(any scheme: one no toucher speaks, ``ftp://``, fails that file alone); anything else stops the
load, naming the line. A UTF-8 byte-order mark (Windows editors write one) is ignored.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Optional
from urllib.parse import unquote

from prestaged.errors import CatalogError
from prestaged.model import FileRef, redact

__all__ = ["LocalCatalog", "parse_line"]

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
"""The start of a URL (RFC 3986's scheme, then ``//``)."""
_CHUNK = 1000  # lines parsed per thread hop: keeps file I/O off the event loop, cheaply


def parse_line(line: str) -> Optional[str]:
    """Return the URL on ``line`` or None for blank/comment lines (trailing ``# ...`` dropped)."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    cut = text.find(" #")
    if cut >= 0:
        text = text[:cut].rstrip()
    return text


def recorded_name(definition: str, directory: Optional[Path] = None) -> str:
    """The name a run records the local definition ``definition`` under (``LocalCatalog``: a
    file given by path is known by its absolute path); the name given when there is no such
    file (any more)."""
    try:
        return LocalCatalog(definition, directory).definition
    except CatalogError:
        return definition


class LocalCatalog:
    """Definitions stored as text files of URLs (see module docstring)."""

    name = "local"

    def __init__(self, definition: str, directory: Optional[Path] = None) -> None:
        self.path = self._locate(definition, directory)
        # A name found in the catalog directory keeps its name; a file given by path is known
        # by its absolute path, so that `ds.txt` and `./ds.txt` are one definition in the state.
        named = directory is not None and self.path.parent == directory and "/" not in definition
        self.definition = definition if named else str(self.path.resolve())

    @staticmethod
    def _locate(definition: str, directory: Optional[Path]) -> Path:
        try:
            return LocalCatalog._find(definition, directory)
        except (OSError, RuntimeError) as e:  # a name too long for a path, ~nosuchuser
            shown = definition if len(definition) <= 80 else definition[:77] + "..."
            why = getattr(e, "strerror", None) or str(e)
            raise CatalogError(f"definition '{shown}': not a usable file name ({why})") from None

    @staticmethod
    def _find(definition: str, directory: Optional[Path]) -> Path:
        given = Path(definition).expanduser()
        if given.is_file():
            return given
        if directory is not None and "/" not in definition:
            candidate = directory / f"{definition}.txt"
            if candidate.is_file():
                return candidate
            # `warm nope.txt` meant ./nope.txt: say that it is missing too, not only
            # defs/nope.txt.txt.
            missing = (f"neither {given} nor {candidate} is a file"
                       if definition.endswith(".txt") else f"no file {candidate}")
            raise CatalogError(
                f"definition '{definition}' not found in the local catalog: {missing}")
        if given.exists():
            raise CatalogError(f"definition file {given}: not a regular file")
        hint = "" if directory else " (set [catalog.local] dir to look names up in a directory)"
        raise CatalogError(f"definition '{definition}': no such file{hint}")

    def _lines(self) -> Iterator[list[tuple[int, str]]]:
        try:
            # A byte that is no UTF-8 comes through as a lone surrogate, so that it is named by
            # its line (strict decoding fails a whole chunk: "invalid start byte", no line).
            with open(self.path, encoding="utf-8-sig", errors="surrogateescape") as fh:
                batch: list[tuple[int, str]] = []
                for number, line in enumerate(fh, 1):
                    _check_utf8(line, number, self.path)
                    url = parse_line(line)
                    if url is not None:
                        batch.append((number, url))
                        if len(batch) >= _CHUNK:
                            yield batch
                            batch = []
                if batch:
                    yield batch
        except OSError as e:
            raise CatalogError(f"definition file {self.path}: cannot read: {e.strerror}") from e

    async def files(self) -> AsyncIterator[FileRef]:
        """Yield one ``FileRef`` per URL line; a line that is not a URL is a ``CatalogError``."""
        chunks = self._lines()
        done = object()
        while True:
            batch = await asyncio.to_thread(next, chunks, done)
            if batch is done:
                return
            assert isinstance(batch, list)
            for number, url in batch:
                if not _URL.match(url):
                    # The line itself is not quoted: a definition may be any file (the daemon
                    # once read /etc/shadow for an API caller), and an error is shown to others.
                    raise CatalogError(f"definition file {self.path}, line {number} is not a URL "
                                       "(expected scheme://host/path)")
                yield FileRef(name=_basename(url), url=url)

    async def estimate(self) -> Optional[int]:
        """Count the URL lines (one quick pass over the file, off the event loop)."""
        return await asyncio.to_thread(lambda: sum(len(b) for b in self._lines()))


def _basename(url: str) -> str:
    """The last segment of ``url``'s path; a URL with no path segment is named by itself,
    redacted (its authority may carry a password: ``https://u:pw@h/``)."""
    rest = url.split("?", 1)[0].split("#", 1)[0]
    slash = rest.find("/", rest.find("://") + 3)
    name = rest[slash:].rsplit("/", 1)[-1] if slash >= 0 else ""
    return (unquote(name) if "%" in name else name) or redact(url)


_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def _check_utf8(line: str, number: int, path: Path) -> None:
    """``CatalogError`` naming line ``number`` of definition file ``path`` and its first byte
    that is no UTF-8 (read with ``surrogateescape``), never quoting the line."""
    bad = _NOT_UTF8.search(line)
    if bad is not None:
        raise CatalogError(f"definition file {path}, line {number} is not UTF-8 text (byte "
                           f"0x{ord(bad.group()) - 0xDC00:02x} at character {bad.start() + 1})")
