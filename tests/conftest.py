"""Shared fixtures: one test PKI per session and a fresh proxy per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from prestaged.testing.pki import TestPKI, create_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """A CA, host certificate and user certificate shared by the whole session."""
    return create_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def proxy(pki: TestPKI, tmp_path: Path) -> Path:
    """A valid 12-hour RFC 3820 proxy of the test user, in this test's tmp_path."""
    return pki.make_proxy(tmp_path / "x509up_test")
