"""Fixtures of the kernl.optimize tests: a cache folder of the test's own, and the compile
calls optimize makes."""

from __future__ import annotations

import pytest

from kernl.compiler import api


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


@pytest.fixture
def compiles(monkeypatch):
    """The compile calls optimize makes (the real compile still runs)."""
    calls: list[tuple] = []
    real = api.compile

    def counting(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "compile", counting)
    return calls
