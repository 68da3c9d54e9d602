"""What a version is, without torch: its manifest, the names in a checkpoint directory, and the
compacted index of pruned versions. checkpoints.py writes and loads versions; the report reads
these names too, so they have one home.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
PRUNED = "PRUNED"  # an older layout's marker of a pruned version (its directory is now compacted)
POINTER = "LATEST"  # {"version": N}: the newest version
INDEX = "index"  # the compacted manifests of pruned versions
INDEX_SEGMENT = 1000  # versions per index file: a lookup reads at most this many lines
_VERSION_DIR = re.compile(r"^v(\d{6,})$")


def version_dir_number(name: str) -> int | None:
    """The version a checkpoint directory's name holds (v000007 -> 7), None for any other name."""
    m = _VERSION_DIR.match(name)
    return int(m.group(1)) if m else None


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written; the message is one line."""


class Manifest(BaseModel):
    version: int
    parent: int | None = None
    kind: Literal["init", "update", "rollback", "consolidate"] = "update"
    created: float = Field(default_factory=time.time)
    mode: Literal["heads", "lora", "full"] = "heads"
    backbone: dict = Field(default_factory=dict, description="backbone reference: spec, layers, hidden size")
    prm: dict = Field(default_factory=dict, description="PRMConfig the heads were built with")
    settings: dict = Field(default_factory=dict, description="trainer settings in force")
    metrics: dict[str, float | None] = Field(default_factory=dict)
    consumed_label_ids: list[str] = Field(default_factory=list, description="label ids trained on in this update")
    rolled_back_from: int | None = None
    consolidated: dict | None = Field(None, description="a consolidation: epochs, labels, its and the served version's validation F1")
    sha256: str = ""
    n_consumed: int | None = Field(None, description="a compacted manifest: how many label ids it consumed")


def read_segment(path: Path) -> list[dict]:
    """The rows of one index file; a torn last line (a crash mid-append) is skipped."""
    rows = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("version"), int):
            rows.append(row)
    return rows
