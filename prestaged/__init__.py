"""prestaged: dataset prestaging and cache-warming for tape-backed grid storage.

The library entry points are re-exported here; the CLI (``prestaged.cli``) and the daemon are thin
callers of ``warm()``.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
