"""Fixtures of the live-flow integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nudgeflow.dispatch_api.server import ServerThread, create_app


@pytest.fixture
def dispatch_api(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The reference dispatch API on loopback: (base URL, path of its JSON-lines log)."""
    log = tmp_path / "api.jsonl"
    with ServerThread(create_app(log_path=log)) as server:
        yield server.url, log
