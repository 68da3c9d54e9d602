"""Reading a state dir for the report: the learning journal and the checkpoint manifests, as JSON.

A torn last line (a crash mid-write) or any line that does not parse is skipped and counted;
manifests are read with json rather than model/training/checkpoints.py, which imports torch."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actprm.model.training.manifest import MANIFEST, version_dir_number
from actprm.streams.state.journal import journal_files

JOURNALS = ("labels", "scoring", "updates", "heldout", "status")
WHAT_NEEDS = {  # what each journal file feeds, for the "missing" notes
    "labels": "online F1 per version, calibration, labels by metadata field",
    "scoring": "selected share over time and by error kind",
    "updates": "refused and failed updates, labels replayed",
    "heldout": "held-out F1 per version (written only when the daemon runs with a held-out set)",
    "status": "budget against time, judge failures, labels dropped, the latest status",
}


class ReportError(ValueError):
    """A state dir that cannot be reported on; the message is one line."""


# --- reading ---------------------------------------------------------------------------------

def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The JSON objects of a JSON-lines file and how many lines did not parse (torn or not objects)."""
    rows, skipped = [], 0
    with path.open("rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError both
                skipped += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                skipped += 1
    return rows, skipped


def read_manifests(root: Path) -> tuple[list[dict], list[str]]:
    """Every readable manifest, oldest version first, and one line per unreadable one."""
    if not root.is_dir():
        return [], []
    found, bad = [], []
    for child in root.iterdir():
        if version_dir_number(child.name) is None:
            continue
        path = child / MANIFEST
        try:
            m = json.loads(path.read_text())
        except FileNotFoundError:
            continue  # a version being written or removed
        except (OSError, ValueError) as err:
            bad.append(f"{path}: {str(err).splitlines()[0]}")
            continue
        if not isinstance(m, dict) or not isinstance(m.get("version"), int):
            bad.append(f"{path}: no integer 'version'")
            continue
        # Only the count matters here; a long run's manifests list millions of ids.
        m["n_consumed"] = len(m.pop("consumed_label_ids", None) or [])
        found.append(m)
    # Pruned versions' manifests, compacted into CHECKPOINT_DIR/index/*.jsonl (a version in both
    # places, from a prune cut short, counts once).
    have = {m["version"] for m in found}
    for seg in sorted((root / "index").glob("*.jsonl")):
        rows, _ = read_jsonl(seg)
        for m in rows:
            if isinstance(m.get("version"), int) and m["version"] not in have:
                m["n_consumed"] = m.get("n_consumed") or len(m.pop("consumed_label_ids", None) or [])
                m.pop("consumed_label_ids", None)
                have.add(m["version"])
                found.append(m)
    return sorted(found, key=lambda m: m["version"]), bad


@dataclass
class State:
    state_dir: Path
    checkpoint_dir: Path
    journal: dict[str, list[dict]] = field(default_factory=dict)  # name -> rows, in time order
    present: dict[str, bool] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    manifests: list[dict] = field(default_factory=list)
    bad_manifests: list[str] = field(default_factory=list)


def num(x: Any) -> float | None:
    """A finite number, else None (a journal written by another version may lack a field)."""
    if type(x) is not float and type(x) is not int:  # bool is not a number here; type() is fast
        return None
    return float(x) if math.isfinite(x) else None


def label_scores(label: dict) -> list[float] | None:
    """The label's per-step scores when they are all probabilities, else None; checked once
    per label and kept under "_mu" (several figures need it; 100,000 labels)."""
    if "_mu" not in label:
        mu = label.get("mu")
        ok = type(mu) is list and mu and all((type(m) is float or type(m) is int) and 0 <= m <= 1 for m in mu)
        label["_mu"] = mu if ok else None
    return label["_mu"]


def read_state(state_dir: str | Path, checkpoint_dir: str | Path | None = None) -> State:
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise ReportError(f"no state directory at {state_dir}")
    st = State(state_dir, Path(checkpoint_dir) if checkpoint_dir else state_dir / "checkpoints")
    for name in JOURNALS:
        paths = journal_files(state_dir / "learning", name)  # the rotated set, oldest first, then the active file
        st.present[name] = bool(paths)
        rows, skipped = [], 0
        for path in paths:
            try:
                more, bad = read_jsonl(path)
            except FileNotFoundError:  # rotated away by the running daemon meanwhile
                continue
            rows += more
            skipped += bad
        # Arrival order; sorted() is stable, so rows with the same time keep their file order.
        st.journal[name] = sorted(rows, key=lambda r: num(r.get("at")) or 0.0)
        st.skipped[name] = skipped
    st.manifests, st.bad_manifests = read_manifests(st.checkpoint_dir)
    return st
