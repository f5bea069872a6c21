"""The ``prestaged`` command line: parse, load config, call one library function, exit code.

``main`` (the entry point) in ``main``; the parser in ``parser``; one module per command family
(``warm``, ``gate``, ``campaign``, ``state``, ``serve``); what they print in ``render``.
"""

from __future__ import annotations

import sys

from prestaged.errors import EXIT_INTERRUPTED

# The console script (and ``python -m prestaged``) imports this package before it can call
# main(), which makes Ctrl-C exit 130: the same for a Ctrl-C during these imports, the first
# ~150 ms of every command.
try:
    from prestaged.cli.main import main
    from prestaged.cli.parser import build_parser
except KeyboardInterrupt:
    print("prestaged: interrupted", file=sys.stderr)
    raise SystemExit(EXIT_INTERRUPTED) from None

__all__ = ["build_parser", "main"]
