"""What the command families share: a command's signature, its ``Context``, its state store,
and the running daemon's answer.

Kept free of the storage stack at import time: ``import prestaged.cli`` (every command's start,
``--help`` included) must not load aiohttp or cryptography, so ``Context`` is imported only when
a command asks for one.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable, Optional

from prestaged.config import Config
from prestaged.errors import DaemonError, PrestagedError

if TYPE_CHECKING:
    from prestaged.context import Context
    from prestaged.state.store import Store

__all__ = ["Command", "answer_of", "checked_answer", "context", "open_store",
           "recorded_definition", "via_daemon"]

Command = Callable[[argparse.Namespace, Config], int]
"""A subcommand's handler: the parsed command line and the loaded config -> the exit code."""


def context(args: argparse.Namespace, cfg: Config) -> Context:
    """The context of this command: ``cfg`` with ``--proxy``/``--ca-dir``/``--token-file`` when
    given."""
    from prestaged.context import Context  # the storage stack: only for commands that use it

    return Context(cfg, proxy=getattr(args, "proxy", None), ca_dir=getattr(args, "ca_dir", None),
                   token_file=getattr(args, "token_file", None))


def recorded_definition(cfg: Config, kind: str, definition: str) -> str:
    """The name ``warm`` recorded ``definition`` of catalog ``kind`` under: a local definition
    file is known by its absolute path (``LocalCatalog``); one that no longer exists by the
    name given."""
    if kind != "local":
        return definition
    from prestaged.catalog.local import recorded_name

    return recorded_name(definition, cfg.catalog.local.dir)


def open_store(args: argparse.Namespace, cfg: Config, *, must_exist: bool = False) -> Store:
    """The state store of ``--state`` (or ``state.path``), open; ``must_exist`` for commands
    that only read it."""
    return context(args, cfg).open_store(must_exist=must_exist)


def via_daemon(args: argparse.Namespace, cfg: Config, method: str, path: str,
               body: Optional[dict[str, Any]] = None,
               keys: Optional[dict[str, type]] = None) -> Optional[dict[str, Any]]:
    """The daemon's answer (a JSON object with ``keys``, each of its type) to ``method
    path``, or None when ``--state`` was given or nothing listens at ``daemon.listen`` (then
    the command works on the state database itself). A daemon that does not answer in time is
    an error, never "no daemon" (see ``service.client``); so is an answer without ``keys``
    (something else listening there: it was a KeyError traceback, or silently nothing)."""
    from prestaged.errors import NotFoundError
    from prestaged.service.client import call

    if getattr(args, "state", None) is not None:
        return None
    try:
        doc = call(cfg, method, path, body)
    except NotFoundError as e:
        raise NotFoundError(f"{e} (asked the daemon at {cfg.daemon.listen}; --state FILE works "
                            "on a state file instead)") from None
    if doc is None:
        return None
    return checked_answer(cfg, method, path, doc, keys)


def checked_answer(cfg: Config, method: str, path: str, doc: dict[str, Any],
                   keys: Optional[dict[str, type]]) -> dict[str, Any]:
    """``doc``, the daemon's answer to ``method path``, once it has ``keys``, each of its type;
    ``DaemonError`` (exit 69) when it has not: something else is listening there."""
    for key, kind in (keys or {}).items():
        if not isinstance(doc.get(key), kind):
            raise _not_our_api(cfg, method, path, f"no {kind.__name__} {key!r}")
    return doc


@contextlib.contextmanager
def answer_of(cfg: Config, method: str, path: str, daemon: bool = True) -> Iterator[None]:
    """Inside, the daemon's answer to ``method path`` is read (turned into records, rendered):
    an item of another shape there (a KeyError, TypeError...) is a ``DaemonError`` (exit 69)
    saying something else answers, not a traceback. ``daemon`` False (the answer came from
    the state file): nothing is caught."""
    if not daemon:
        yield
        return
    try:
        yield
    except PrestagedError:
        raise
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        raise _not_our_api(cfg, method, path, f"{type(e).__name__} reading it") from None


def _not_our_api(cfg: Config, method: str, path: str, what: str) -> DaemonError:
    return DaemonError(f"{cfg.daemon.listen} (daemon.listen) answered {method} {path}, but not "
                       f"with prestaged's API ({what}): is something else listening there? "
                       "--state FILE works on a state file instead")
