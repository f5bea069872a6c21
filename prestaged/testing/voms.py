"""The real VOMS client tools (Debian package ``voms-clients``) for tests.

``voms_proxy_fake`` makes a proxy carrying a VOMS attribute certificate signed by a test host
certificate, as ``voms-proxy-init`` gets one from a VOMS server (the tool is the VOMS project's
own, for tests without a server); ``voms_proxy_info`` reads a proxy back with ``voms-proxy-info
-all``, the tool users compare our output with.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["VomsToolError", "voms_proxy_fake", "voms_proxy_info", "voms_tools_available"]


class VomsToolError(RuntimeError):
    """A VOMS tool failed (its exit status and output in the message)."""


def voms_tools_available() -> bool:
    """True if ``voms-proxy-fake`` and ``voms-proxy-info`` are on ``PATH``."""
    return all(shutil.which(t) for t in ("voms-proxy-fake", "voms-proxy-info"))


def _run(cmd: list[str], ca_dir: Path, timeout: float) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("X509_")}
    env["X509_CERT_DIR"] = str(ca_dir)
    with tempfile.TemporaryDirectory() as home:
        env["HOME"] = home  # OpenSSL's RANDFILE (~/.rnd) goes there, not to the real home
        res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             env=env, timeout=timeout, check=False)
    if res.returncode != 0:
        raise VomsToolError(f"{Path(cmd[0]).name} exited with {res.returncode}: "
                            f"{(res.stderr + res.stdout).strip()}")
    return res.stdout


def voms_proxy_fake(cert: Path, key: Path, out: Path, *, ca_dir: Path, voms_cert: Path,
                    voms_key: Path, vo: str, fqans: Sequence[str],
                    uri: str = "voms.example.org:15000", hours: int = 12,
                    voms_hours: int = 12, ac_started_ago: int = 0,
                    timeout: float = 60.0) -> Path:
    """An RFC 3820 proxy of ``cert``/``key`` (unencrypted) valid ``hours``, with an attribute
    certificate of ``vo`` granting ``fqans`` (in order), signed by ``voms_cert``/``voms_key``
    as the VOMS server at ``uri`` and valid ``voms_hours`` from ``ac_started_ago`` seconds ago
    (so ``voms_hours=1, ac_started_ago=7200`` expired an hour ago). Returns ``out``."""
    cmd = ["voms-proxy-fake", "-q", "-rfc", "-cert", str(cert), "-key", str(key),
           "-certdir", str(ca_dir), "-out", str(out), "-hours", str(hours), "-voms", vo,
           "-uri", uri, "-hostcert", str(voms_cert), "-hostkey", str(voms_key),
           "-vomslife", str(voms_hours)]
    for fqan in fqans:
        cmd += ["-fqan", fqan]
    if ac_started_ago:
        cmd += ["-pastac", str(ac_started_ago)]
    _run(cmd, ca_dir, timeout)
    if not out.is_file():
        raise VomsToolError(f"voms-proxy-fake wrote no {out}")
    return out


def voms_proxy_info(proxy: Path, *, ca_dir: Path, timeout: float = 60.0) -> list[tuple[str, str]]:
    """``voms-proxy-info -all -file proxy`` as (field, value) pairs in order (``attribute``
    once per FQAN); the ``=== VO ... ===`` section headers are left out."""
    out = _run(["voms-proxy-info", "-all", "-file", str(proxy)], ca_dir, timeout)
    pairs = []
    for line in out.splitlines():
        name, sep, value = line.partition(":")
        if sep and not line.startswith("==="):
            pairs.append((name.strip(), value.strip()))
    return pairs
