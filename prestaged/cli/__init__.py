"""The ``prestaged`` command line: parse, load config, call one library function, exit code."""

from __future__ import annotations

from prestaged.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
