"""The local catalog: URL list files, comments, lookup by name, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_runner import run_cli

from prestaged.catalog import Catalog, open_catalog
from prestaged.catalog.local import LocalCatalog
from prestaged.config import CatalogConfig, LocalCatalogConfig
from prestaged.errors import CatalogError, ConfigError
from prestaged.model import FileRef
from prestaged.testing.pki import TestPKI


async def _all(cat: LocalCatalog) -> list[FileRef]:
    return [ref async for ref in cat.files()]


async def test_reads_urls_skipping_comments_and_blanks(tmp_path: Path) -> None:
    """Comment lines, trailing comments and blank lines are ignored; names are URL basenames."""
    path = tmp_path / "defs.txt"
    path.write_text(
        "# my dataset\n\nhttps://h:2880/pnfs/a/one.root\n"
        "   https://h:2880/pnfs/a/two%20x.root   # second\n"
    )
    cat = LocalCatalog(str(path))
    assert isinstance(cat, Catalog)
    refs = await _all(cat)
    assert [r.url for r in refs] == ["https://h:2880/pnfs/a/one.root", "https://h:2880/pnfs/a/two%20x.root"]
    assert [r.name for r in refs] == ["one.root", "two x.root"]
    assert await cat.estimate() == 2


def test_a_missing_list_named_like_a_file_says_so(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`warm nope.txt` with a catalog directory said only "no file defs/nope.txt.txt": the
    user meant ./nope.txt, which the message never mentioned."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CatalogError) as err:
        LocalCatalog("nope.txt", tmp_path / "defs")
    assert str(err.value) == ("definition 'nope.txt' not found in the local catalog: neither "
                              f"nope.txt nor {tmp_path / 'defs' / 'nope.txt.txt'} is a file")


async def test_name_lookup_in_directory(tmp_path: Path) -> None:
    """With [catalog.local] dir, NAME resolves to DIR/NAME.txt."""
    (tmp_path / "mydef.txt").write_text("https://h/x\n")
    cfg = CatalogConfig(local=LocalCatalogConfig(dir=tmp_path))
    cat = open_catalog("local", "mydef", cfg)
    assert [r.url for r in await _all(cat)] == ["https://h/x"]  # type: ignore[arg-type]
    with pytest.raises(CatalogError, match="'other' not found in the local catalog"):
        open_catalog("local", "other", cfg)


def test_missing_file_and_unknown_catalog() -> None:
    """A missing definition is a catalog error (exit 4); an unknown catalog a config error."""
    with pytest.raises(CatalogError) as err:
        LocalCatalog("/nonexistent/list.txt")
    assert err.value.exit_code == 4
    with pytest.raises(ConfigError, match="catalog 'rucio' is not known"):
        open_catalog("rucio", "x", CatalogConfig())


async def test_non_url_line_names_file_and_line_but_not_its_content(tmp_path: Path) -> None:
    """A line that is not a URL is reported with file and line number, never quoted: the file
    may be anyone's (the first line of /etc/shadow reached API callers this way)."""
    path = tmp_path / "bad.txt"
    path.write_text("https://h/a\n\nroot:$6$s3cr3t-hash:19000:0:99999:7:::\n")
    with pytest.raises(CatalogError, match=r"bad.txt, line 3 is not a URL") as err:
        await _all(LocalCatalog(str(path)))
    assert "s3cr3t" not in str(err.value) and "99999" not in str(err.value)


async def test_a_line_that_is_not_utf8_is_named_by_its_line_and_byte(tmp_path: Path) -> None:
    """A Latin-1 byte on line 3 (CRLF lines): the error names the file, the line and the byte,
    not the line's text; it said only "not UTF-8 text (invalid continuation byte)", with no
    line to look at in a list of 100,000."""
    path = tmp_path / "latin.txt"
    path.write_bytes(b"https://h/a\r\nhttps://h/b\r\nhttps://h/caf\xe9-s3cr3t\r\n")
    with pytest.raises(CatalogError) as err:
        await _all(LocalCatalog(str(path)))
    assert str(err.value) == (f"definition file {path}, line 3 is not UTF-8 text (byte 0xe9 "
                              "at character 14)")
    assert err.value.exit_code == 4


async def test_any_scheme_is_a_url_and_a_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    """``ftp://`` and ``xroots://`` lines are URLs (the engine fails each alone: "unsupported
    scheme"), not the end of the load; a BOM before line 1 (Notepad's UTF-8) is not part of it."""
    path = tmp_path / "mixed.txt"
    path.write_bytes("\ufeffhttps://h/a\nftp://h/b\nxroots://h/c\nDAVS://h/d\n".encode())
    refs = await _all(LocalCatalog(str(path)))
    assert [r.url for r in refs] == ["https://h/a", "ftp://h/b", "xroots://h/c", "DAVS://h/d"]


async def test_streams_large_lists(tmp_path: Path) -> None:
    """Large lists stream in order, chunk boundaries included."""
    path = tmp_path / "big.txt"
    path.write_text("".join(f"https://h/f{i}\n" for i in range(2500)))
    refs = await _all(LocalCatalog(str(path)))
    assert len(refs) == 2500
    assert refs[0].url == "https://h/f0" and refs[-1].url == "https://h/f2499"


def test_a_bad_line_stops_warm_with_its_one_error_line_and_no_summary_of_zeros(
        tmp_path: Path, pki: TestPKI, proxy: Path) -> None:
    """`warm` of a list with a line that is not a URL printed an 11-line "stopped" summary
    ("files 0 of 2", nine lines of zeros) before the one line that says what is wrong. A run
    that ended no file shows that line alone (exit 4)."""
    listed = tmp_path / "bad2.txt"
    listed.write_text("https://127.0.0.1:1/pnfs/a.root\n127.0.0.1:1/pnfs/b.root\n")
    (tmp_path / "none.toml").write_text("")
    res = run_cli("warm", str(listed), "--no-state", "--proxy", str(proxy), "--ca-dir",
                  str(pki.ca_dir), "--config", str(tmp_path / "none.toml"))
    assert res.returncode == 4, res.stderr
    assert res.stdout == ""
    errors = [line for line in res.stderr.splitlines() if "error" in line]
    assert errors == [f"prestaged: error: definition file {listed}, line 2 is not a URL "
                      "(expected scheme://host/path)"], res.stderr
