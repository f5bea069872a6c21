"""Shared test doubles: aioresponses made to work with the aiohttp this project pins.

aioresponses stands in for the network in unit tests only; integration tests use real TLS
servers on 127.0.0.1.
"""

from __future__ import annotations

import inspect
import types

import aiohttp
from aioresponses import aioresponses as _aioresponses

__all__ = ["aioresponses"]


_WANTS_WRITER = "stream_writer" in inspect.signature(aiohttp.ClientResponse.__init__).parameters
"""aiohttp 3.14 (Python 3.10+) requires it; 3.13, the last for Python 3.9, has no such argument."""


class _Response(aiohttp.ClientResponse):
    """aioresponses 0.7.9 predates aiohttp 3.14's required ``stream_writer`` argument."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        if _WANTS_WRITER:
            kwargs.setdefault("stream_writer", types.SimpleNamespace(output_size=0))
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


class aioresponses(_aioresponses):
    """aioresponses whose mocked responses build on aiohttp 3.14 as well."""

    def add(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        kwargs.setdefault("response_class", _Response)
        super().add(*args, **kwargs)  # type: ignore[arg-type]
