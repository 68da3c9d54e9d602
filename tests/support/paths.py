"""Where the tests find the repository and the shared data beside it."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
SHARED_DATA = ROOT.parent / "shared" / "data"  # ../shared/data: real datasets, never committed
