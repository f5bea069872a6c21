"""The one error hierarchy: every user-facing failure is a ``PrestagedError`` with an exit code.

The CLI turns any ``PrestagedError`` into a single line on stderr and ``exit_code``; anything else
is a bug and keeps its traceback. Exit codes follow DESIGN.md:
0 all warm, 1 some files failed, 2 usage/config, 3 credentials, 4 catalog, 5 storage refused
everything, 130 interrupted.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_CREDENTIALS = 3
EXIT_CATALOG = 4
EXIT_STORAGE = 5
EXIT_INTERRUPTED = 130


class PrestagedError(Exception):
    """Root of every error prestaged reports to a user; ``str()`` is the one-line message."""

    exit_code: int = EXIT_SOME_FAILED


class ConfigError(PrestagedError, ValueError):
    """Bad configuration or command line: names the file, key path and the fix (exit 2)."""

    exit_code = EXIT_USAGE


class StateError(PrestagedError):
    """The state store cannot be opened or is not ours (exit 2); never overwritten."""

    exit_code = EXIT_USAGE


class CredentialError(PrestagedError):
    """Proxy or CA directory unusable, or the storage rejected our identity (exit 3)."""

    exit_code = EXIT_CREDENTIALS


class CatalogError(PrestagedError):
    """Definition unknown or catalog unreachable (exit 4)."""

    exit_code = EXIT_CATALOG


class StorageError(PrestagedError):
    """The storage refused or could not serve anything at all (exit 5)."""

    exit_code = EXIT_STORAGE
