"""The ``prestaged`` command line: parse, load config, call one library function, exit code.

``main`` (the entry point) in ``main``; the parser in ``parser``; one module per command family
(``warm``, ``gate``, ``campaign``, ``state``, ``serve``); what they print in ``render``.
"""

from __future__ import annotations

from prestaged.cli.main import main
from prestaged.cli.parser import build_parser

__all__ = ["build_parser", "main"]
