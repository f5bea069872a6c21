"""prestaged: dataset prestaging and cache-warming for tape-backed grid storage.

The library API is re-exported here. The CLI (``prestaged.cli``) and the daemon
(``prestaged.service``) are thin callers of ``run_definition`` over one ``Context``:

    ctx = Context(load_config(path))
    catalog, creds = ctx.open_for_warm(None, "my-definition")
    async with ctx.make_toucher(creds.ssl_context(), creds.token) as toucher:
        report = await run_definition(catalog, ctx.warm_settings(creds), toucher)

The re-exports are loaded on first use (PEP 562), so that ``import prestaged.cli`` and commands
that never touch storage do not pay for aiohttp, cryptography and the rest at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from prestaged._version import __version__

_EXPORTS = {
    "prestaged.model": ("FileRef", "Outcome", "Result"),
    "prestaged.catalog": ("Catalog", "open_catalog"),
    "prestaged.context": ("Context",),
    "prestaged.config": ("Config", "load_config"),
    "prestaged.credentials": ("Credentials", "ProxyInfo", "inspect_proxy", "load_credentials"),
    "prestaged.errors": ("CatalogError", "ConfigError", "CredentialError", "PrestagedError",
                         "StorageError"),
    "prestaged.storage.http": ("HttpToucher",),
    "prestaged.warm": ("RunReport", "Tally", "WarmSettings", "warm"),
    "prestaged.gate": ("GateResult", "wait_until_ready"),
    "prestaged.pins": ("ReleaseReport", "release_pins"),
    "prestaged.metrics": ("Metrics",),
    "prestaged.state.store": ("Store",),
    "prestaged.campaign.spec": ("load_campaign",),
    "prestaged.campaign.runner": ("run_campaign",),
    "prestaged.runner": ("run_definition",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:
    from prestaged.campaign.runner import run_campaign
    from prestaged.campaign.spec import load_campaign
    from prestaged.catalog import Catalog, open_catalog
    from prestaged.config import Config, load_config
    from prestaged.context import Context
    from prestaged.credentials import Credentials, ProxyInfo, inspect_proxy, load_credentials
    from prestaged.errors import (
        CatalogError,
        ConfigError,
        CredentialError,
        PrestagedError,
        StorageError,
    )
    from prestaged.gate import GateResult, wait_until_ready
    from prestaged.metrics import Metrics
    from prestaged.model import FileRef, Outcome, Result
    from prestaged.pins import ReleaseReport, release_pins
    from prestaged.runner import run_definition
    from prestaged.state.store import Store
    from prestaged.storage.http import HttpToucher
    from prestaged.warm import RunReport, Tally, WarmSettings, warm


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'prestaged' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULE_OF])


__all__ = [
    "Catalog",
    "CatalogError",
    "Config",
    "ConfigError",
    "Context",
    "CredentialError",
    "Credentials",
    "FileRef",
    "GateResult",
    "HttpToucher",
    "Metrics",
    "Outcome",
    "PrestagedError",
    "ProxyInfo",
    "ReleaseReport",
    "Result",
    "RunReport",
    "StorageError",
    "Store",
    "Tally",
    "WarmSettings",
    "__version__",
    "inspect_proxy",
    "load_campaign",
    "load_config",
    "load_credentials",
    "open_catalog",
    "release_pins",
    "run_campaign",
    "run_definition",
    "wait_until_ready",
    "warm",
]
