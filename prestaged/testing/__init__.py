"""Test helpers shipped with prestaged: a throw-away grid PKI and fake servers for tests."""
