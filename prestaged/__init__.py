"""prestaged: dataset prestaging and cache-warming for tape-backed grid storage.

The library API is re-exported here; the CLI (``prestaged.cli``) and, later, the daemon are thin
callers of ``warm()``:

    async with HttpToucher(credentials.ssl_context()) as toucher:
        report = await warm(catalog.files(), WarmSettings.from_config(cfg), toucher)
"""

from __future__ import annotations

__version__ = "0.1.0"

# Imported after __version__: storage.http reads it for the User-Agent.
from prestaged.catalog import Catalog, FileRef, open_catalog
from prestaged.config import Config, load_config
from prestaged.credentials import Credentials, ProxyInfo, inspect_proxy, load_credentials
from prestaged.errors import (
    CatalogError,
    ConfigError,
    CredentialError,
    PrestagedError,
    StorageError,
)
from prestaged.storage.http import HttpToucher, Result
from prestaged.warm import Outcome, RunReport, Tally, WarmSettings, warm

__all__ = [
    "Catalog",
    "CatalogError",
    "Config",
    "ConfigError",
    "CredentialError",
    "Credentials",
    "FileRef",
    "GateResult",
    "HttpToucher",
    "Metrics",
    "Outcome",
    "PrestagedError",
    "ProxyInfo",
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
    "run_campaign",
    "run_definition",
    "wait_until_ready",
    "warm",
]
