"""Helpers shared by the campaign tests (foreground and daemon): definitions on the test
storage and what the fake submit commands recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prestaged.testing.storage import ThreadedStorageServer


def write_definition(tmp_path: Path, srv: ThreadedStorageServer, paths: list[str],
                     name: str = "ds.txt") -> Path:
    """A local definition (URL list) ``tmp_path/name`` of ``paths`` on ``srv``."""
    path = tmp_path / name
    path.write_text("".join(srv.url(p) + "\n" for p in paths))
    return path


def read_records(tmp_path: Path) -> list[dict[str, Any]]:
    """The JSON lines the fake submit command appended to ``tmp_path/record.jsonl``."""
    path = tmp_path / "record.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []
