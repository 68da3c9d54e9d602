"""Labels kept for replay, and hidden states kept between scoring and training.

- `ReplayStore`: the trainer's durable, bounded store of labels it has trained on (text,
  first error and, in heads mode, the frozen backbone's hidden states at the steps), one
  safetensors file per label (never a pickle), oldest out. An update replays a sample of it
  next to its new labels, so a steady stream of a few new labels does not make the PRM forget
  what earlier ones taught. It survives a restart: the directory is the store.
- `FeatureMemo`: a bounded in-memory map from trajectory id to the hidden states the scorer
  computed for it. When scorer and trainer share a process (and a frozen backbone), the
  trainer takes a label's hidden states from here instead of a second backbone pass.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from actprm.model.features import text_key
from actprm.model.training.trainer import LabelledSample


class ReplayStore:
    """At most `capacity` labelled samples under `directory`, in the order they were added.

    `feature_key` names the backbone the stored hidden states come from (features.cache_key);
    a sample stored under another key keeps its text and label but loses its hidden states,
    which the trainer then recomputes. Files are named by a growing sequence number, so the
    oldest is the smallest name, and written to a temporary name first, so a crash leaves a
    whole file or none."""

    def __init__(self, directory: str | Path, capacity: int, feature_key: str | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.capacity, self.feature_key = capacity, feature_key
        for tmp in self.directory.glob(".tmp-*"):
            tmp.unlink(missing_ok=True)  # a write a crash interrupted
        self._files = sorted(self.directory.glob("*.safetensors"))
        self._samples: dict[Path, LabelledSample] = {}
        self._ids = {}
        for path in self._files:
            sample = self._read(path)
            if sample is None:
                path.unlink(missing_ok=True)  # unreadable: a replay store never stops the trainer
                continue
            self._samples[path] = sample
            self._ids[sample.id] = path
        self._files = [p for p in self._files if p in self._samples]
        self._next = int(self._files[-1].stem) + 1 if self._files else 0
        self._evict()

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, label_id: str) -> bool:
        return label_id in self._ids

    def samples(self) -> list[LabelledSample]:
        """Every stored sample, oldest first."""
        return [self._samples[p] for p in self._files]

    def add(self, samples: Sequence[LabelledSample]) -> None:
        """Keep these (already trained) samples; ids already stored are not added again."""
        if self.capacity == 0:
            return
        for s in samples:
            if s.id in self._ids:
                continue
            path = self.directory / f"{self._next:012d}.safetensors"
            self._next += 1
            self._write(path, s)
            self._files.append(path)
            self._samples[path] = s
            self._ids[s.id] = path
        self._evict()

    def _evict(self) -> None:
        while len(self._files) > self.capacity:
            oldest = self._files.pop(0)
            sample = self._samples.pop(oldest)
            self._ids.pop(sample.id, None)
            oldest.unlink(missing_ok=True)

    def _write(self, path: Path, s: LabelledSample) -> None:
        meta = {"id": s.id, "problem": s.problem, "steps": json.dumps(s.steps), "first_error": str(s.first_error),
                "feature_key": (self.feature_key or "") if s.features is not None else ""}
        tensors = {"features": s.features.cpu().contiguous()} if s.features is not None else {"none": torch.zeros(0)}
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=self.directory)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _read(self, path: Path) -> LabelledSample | None:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                same_backbone = meta.get("feature_key") and meta.get("feature_key") == self.feature_key
                features = f.get_tensor("features") if same_backbone and "features" in f.keys() else None
            return LabelledSample(meta["id"], meta["problem"], json.loads(meta["steps"]), int(meta["first_error"]), features)
        except Exception:  # noqa: BLE001 - a torn or foreign file is dropped, never a crash
            return None


class FeatureMemo:
    """The newest `capacity` (trajectory id -> hidden states at its steps), thread-safe.

    Entries carry a hash of the text they were computed from, so a reused id with another
    text never gets the wrong hidden states."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def put(self, trajectory_id: str, problem: str, steps: Sequence[str], features: torch.Tensor) -> None:
        with self._lock:
            self._items[trajectory_id] = (text_key(problem, steps), features)
            self._items.move_to_end(trajectory_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def take(self, trajectory_id: str, problem: str, steps: Sequence[str]) -> torch.Tensor | None:
        """The hidden states for this id and text (removed from the memo), or None."""
        with self._lock:
            item = self._items.pop(trajectory_id, None)
        if item is not None and item[0] == text_key(problem, steps):
            self.hits += 1
            return item[1]
        self.misses += 1
        return None
