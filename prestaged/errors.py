"""The one error hierarchy: every user-facing failure is a ``PrestagedError``.

Each class carries the exit code the CLI gives it and the HTTP status the daemon's API answers
with, so no caller picks an exception class to get a status. The CLI turns any
``PrestagedError`` into a single line on stderr and ``exit_code``; anything else is a bug and
keeps its traceback. Exit codes follow DESIGN.md: 0 all warm, 1 some files failed, 2
usage/config/state, 3 credentials, 4 catalog, 5 storage refused everything, 75 a campaign held,
130 interrupted.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_CREDENTIALS = 3
EXIT_CATALOG = 4
EXIT_STORAGE = 5
EXIT_HELD = 75
"""``campaign run`` stopped because a hold kept it from launching more (EX_TEMPFAIL)."""
EXIT_DAEMON = 69
"""The daemon at ``daemon.listen`` did not answer, or not as our daemon would (EX_UNAVAILABLE)."""
EXIT_INTERRUPTED = 130


class PrestagedError(Exception):
    """Root of every error prestaged reports to a user; ``str()`` is the one-line message,
    without a secret a server may have quoted back (``model.scrub``) nor a control character
    (``model.printable``)."""

    exit_code: int = EXIT_SOME_FAILED
    http_status: int = 503
    """The API's answer: by default the daemon cannot do it now (stopping, busy)."""

    def __str__(self) -> str:
        from prestaged.model import printable, scrub

        return printable(scrub(super().__str__()))


class ConfigError(PrestagedError, ValueError):
    """Bad configuration, command line or request: names the key path and the fix (exit 2)."""

    exit_code = EXIT_USAGE
    http_status = 400


class ServerConfigError(ConfigError):
    """The daemon's own configuration cannot serve a request (a catalog it has no settings
    for): the operator's fault, not the caller's (exit 2, HTTP 500 with ``exit_code``)."""

    http_status = 500


class StateError(PrestagedError):
    """The state store cannot be opened or is not ours (exit 2); never overwritten."""

    exit_code = EXIT_USAGE


class StateUnavailable(StateError):
    """The PostgreSQL state does not answer: no server there, a failover, a network cut (exit
    69, EX_UNAVAILABLE, as for a daemon that does not answer). systemd restarts the daemon for
    it (it does not for 2, a configuration error), so a member started during a database
    outage joins once the database is back."""

    exit_code = EXIT_DAEMON


class ConflictError(StateError):
    """A refused state transition, e.g. cancelling a submitted submission (exit 2, HTTP 409)."""

    http_status = 409


class LeaseLost(ConflictError):
    """A daemon went to change a campaign whose lease it no longer holds (another member took
    it over after the lease expired): nothing was changed, the new holder goes on."""


class BusyError(PrestagedError):
    """The daemon has as much queued as it takes: try again after ``retry_after`` seconds
    (HTTP 429 with ``Retry-After``)."""

    http_status = 429

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CredentialError(PrestagedError):
    """Proxy or CA directory unusable, or the storage rejected our identity (exit 3)."""

    exit_code = EXIT_CREDENTIALS


class CatalogError(PrestagedError):
    """A catalog could not answer: unreachable, refused, malformed (exit 4, HTTP 502)."""

    exit_code = EXIT_CATALOG
    http_status = 502


class NotFoundError(CatalogError):
    """Something named does not exist: a definition, campaign, stage, submission or run
    (exit 4, HTTP 404)."""

    http_status = 404


class DaemonError(PrestagedError):
    """The daemon a command asked did not answer in time, answered something that is not its
    API, or failed the call (exit 69: not 1, which says files failed)."""

    exit_code = EXIT_DAEMON


class StorageError(PrestagedError):
    """The storage refused or could not serve anything at all (exit 5)."""

    exit_code = EXIT_STORAGE
    http_status = 502


class StorageSetupError(StorageError):
    """The storage cannot do what the configuration asks of it, and waiting will not change
    that: ``storage.stage = always`` on a door that says it has no Tape REST API (exit 5; a
    gate ends at once instead of trying again until its timeout)."""


def error_for_exit(code: object, message: str) -> PrestagedError:
    """The error a daemon's failure answer stands for, by the exit code it carries (its
    ``exit_code`` field): credentials 3, catalog 4, storage 5; anything else (or none) is a
    ``DaemonError``, exit 69."""
    kinds: dict[object, type[PrestagedError]] = {
        EXIT_CREDENTIALS: CredentialError, EXIT_CATALOG: CatalogError,
        EXIT_STORAGE: StorageError}
    return kinds.get(code, DaemonError)(message)
