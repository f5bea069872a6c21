"""What an API caller may name as a definition (issue 12, section 1): a plain name inside
``catalog.local.dir`` (symlinks resolved and re-checked) or a remote catalog's name, never a
path the daemon would read for them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest

from prestaged.catalog.local import LocalCatalog
from prestaged.errors import ConfigError, NotFoundError
from prestaged.service.naming import open_requested


class _Remote:
    """A stand-in for a remote catalog: it only keeps the name."""

    name = "samweb"

    def __init__(self, definition: str) -> None:
        self.definition = definition


def _open(directory: Optional[Path]) -> tuple[list[tuple[str, str]], object]:
    """(what was opened, an ``open_catalog`` recording it: the real local catalog)."""
    opened: list[tuple[str, str]] = []

    def open_catalog(kind: str, definition: str) -> object:
        opened.append((kind, definition))
        return LocalCatalog(definition, directory) if kind == "local" else _Remote(definition)
    return opened, open_catalog


@pytest.fixture
def catalog_dir(tmp_path: Path) -> Path:
    """catalog.local.dir with a.txt; a secret outside it; symlinks in it to both."""
    d = tmp_path / "defs"
    d.mkdir()
    (d / "a.txt").write_text("https://h/a\n")
    (tmp_path / "secret.txt").write_text("TOP-SECRET first line\n")
    (d / "leak.txt").symlink_to(tmp_path / "secret.txt")
    (d / "alias.txt").symlink_to(d / "a.txt")
    return d


def test_a_plain_name_opens_the_file_in_the_catalog_directory(catalog_dir: Path) -> None:
    """`a` is `catalog.local.dir/a.txt`, recorded under its name; a symlink to a file in the
    directory is allowed."""
    _, open_catalog = _open(catalog_dir)
    cat = open_requested("local", "a", catalog_dir, open_catalog)  # type: ignore[arg-type]
    assert (cat.name, cat.definition) == ("local", "a")
    cat = open_requested("local", "alias", catalog_dir, open_catalog)  # type: ignore[arg-type]
    assert cat.definition == "alias"


@pytest.mark.parametrize("definition", [
    "/etc/shadow", "/proc/self/environ", "../secret", "..", ".", "defs/a", "a/../a",
    "~/.netrc", "~root", "a\\b", "a\0b", " a", "",
])
def test_paths_are_refused_before_anything_is_opened(catalog_dir: Path, definition: str) -> None:
    """Absolute paths, `..`, `~`, separators, NUL and blanks are 400s naming the rule; the
    catalog is never opened, so no file is read or even looked up."""
    opened, open_catalog = _open(catalog_dir)
    with pytest.raises(ConfigError, match="not a path") as e:
        open_requested("local", definition, catalog_dir, open_catalog)  # type: ignore[arg-type]
    assert e.value.http_status == 400 and opened == []


def test_a_symlink_out_of_the_directory_is_refused(catalog_dir: Path) -> None:
    """`leak` -> a file outside catalog.local.dir: 404, and its content is never quoted."""
    opened, open_catalog = _open(catalog_dir)
    with pytest.raises(NotFoundError, match=r"leads outside catalog\.local\.dir") as e:
        open_requested("local", "leak", catalog_dir, open_catalog)  # type: ignore[arg-type]
    assert "SECRET" not in str(e.value) and opened == []


def test_unknown_names_and_no_directory(catalog_dir: Path) -> None:
    """An unknown name is 404; with no catalog.local.dir local names are a 400 saying so."""
    opened, open_catalog = _open(catalog_dir)
    with pytest.raises(NotFoundError, match="not found in the local catalog"):
        open_requested("local", "nope", catalog_dir, open_catalog)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"catalog\.local\.dir, which is not set"):
        open_requested("local", "a", None, open_catalog)  # type: ignore[arg-type]
    assert opened == []


def test_a_name_shadowed_by_the_working_directory_is_refused(
        catalog_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local catalog tries a name as a path in the working directory first: a file `a`
    there must not be what an API caller gets for `a`."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "a").write_text("https://h/other\n")
    monkeypatch.chdir(cwd)
    _, open_catalog = _open(catalog_dir)
    with pytest.raises(NotFoundError, match="working directory"):
        open_requested("local", "a", catalog_dir, open_catalog)  # type: ignore[arg-type]


def test_remote_catalogs_resolve_names_themselves(catalog_dir: Path) -> None:
    """A SAM definition name goes to its catalog as given (it names nothing on this host)."""
    opened, open_catalog = _open(catalog_dir)
    open_requested("samweb", "mc/2026 ../x", catalog_dir, open_catalog)  # type: ignore[arg-type]
    assert opened == [("samweb", "mc/2026 ../x")]


def test_a_catalog_the_daemon_is_not_configured_for_is_its_fault_not_the_callers(
        catalog_dir: Path) -> None:
    """``catalog: samweb`` on a daemon with no SAM rewrite rules answered 400, as if the
    request were wrong: it is the daemon's configuration (HTTP 500, exit code 2 in the body)."""
    from prestaged.errors import ServerConfigError

    def open_catalog(kind: str, definition: str) -> object:
        raise ConfigError("catalog.samweb.rewrite: no rules to turn SAM locations into URLs")

    with pytest.raises(ServerConfigError) as err:
        open_requested("samweb", "mc-2026", catalog_dir, open_catalog)  # type: ignore[arg-type]
    assert err.value.http_status == 500 and err.value.exit_code == 2
    assert str(err.value) == ("the daemon's configuration: catalog.samweb.rewrite: no rules to "
                              "turn SAM locations into URLs")


@pytest.mark.parametrize("definition", ["a" * 252, "é" * 126])
def test_a_name_too_long_for_a_file_name_is_refused(catalog_dir: Path, definition: str) -> None:
    """NAME.txt must fit 255 bytes: a 300-character name was OSError ENAMETOOLONG, a 500."""
    opened, open_catalog = _open(catalog_dir)
    with pytest.raises(ConfigError, match="not a path"):
        open_requested("local", definition, catalog_dir, open_catalog)  # type: ignore[arg-type]
    assert opened == []
