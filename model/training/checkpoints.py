"""Versioned weights: safetensors plus a JSON manifest, written atomically.

Layout: ``ROOT/v000007/{weights.safetensors, manifest.json}``. A version is written into a
temporary directory, flushed, and renamed into place, so a crash never leaves a half version
visible. ``ROOT/LATEST`` names the newest version (written to a temporary name, then renamed),
so finding it costs one small read and two stats at any age of the run; the directory is listed
only to recover a missing or unreadable pointer. Pruned versions leave no directory: their
manifests (less the settings and PRM config, which only a loadable version needs) are appended
to ``ROOT/index/NNNNNN.jsonl``, one file per 1,000 versions: about 0.4 KB a version plus its
consumed label ids, so a new ledger can still be rebuilt from the history. Versions only grow: a rollback writes a new version holding an old version's weights.
Only what the training mode changes is stored (heads, heads+LoRA, or everything) plus a
reference to the backbone, so a swap moves megabytes in ``heads``/``lora`` modes.
Loading checks the weights' sha256 against the manifest; pickles are never loaded.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from actprm.model.training.manifest import (
    INDEX,
    INDEX_SEGMENT,
    MANIFEST,
    POINTER,
    PRUNED,
    WEIGHTS,
    CheckpointError,
    Manifest,
    read_segment,
    version_dir_number,
)

_COMPACT_DROP = ("settings", "prm")  # only a loadable version needs these


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _dir(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def _segment(self, version: int) -> Path:
        return self.root / INDEX / f"{version // INDEX_SEGMENT:06d}.jsonl"

    def _dir_versions(self, with_weights: bool = False) -> list[int]:
        """Versions that still have a directory: the unpruned ones (bounded by keep_versions)."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            v = version_dir_number(child.name)
            if v is not None and (child / MANIFEST).is_file() and not (with_weights and (child / PRUNED).exists()):
                found.append(v)
        return sorted(found)

    def _index_rows(self, since: int = 0):
        folder = self.root / INDEX
        if not folder.is_dir():
            return
        for seg in sorted(folder.glob("*.jsonl")):
            if not seg.stem.isdigit() or (int(seg.stem) + 1) * INDEX_SEGMENT <= since:
                continue
            yield from read_segment(seg)

    def versions(self, with_weights: bool = False, since: int = 0) -> list[int]:
        """Published versions from `since` on (a pruned one stays in the index); `with_weights`:
        loadable ones only, which never reads the index."""
        found = {v for v in self._dir_versions(with_weights) if v >= since}
        if not with_weights:
            found |= {row["version"] for row in self._index_rows(since) if row["version"] >= since}
        return sorted(found)

    def has(self, version: int) -> bool:
        """Whether `version` was published (one stat, or one index file for a pruned version)."""
        if version < 0:
            return False
        if (self._dir(version) / MANIFEST).is_file():
            return True
        seg = self._segment(version)
        return seg.is_file() and any(row["version"] == version for row in read_segment(seg))

    def latest(self) -> int | None:
        """The newest version: the pointer, then a step past any version written after it (a
        writer that died between its rename and its pointer). Lists the directory only when the
        pointer is missing or names no version."""
        try:
            version = int(json.loads((self.root / POINTER).read_text())["version"])
        except (OSError, ValueError, KeyError, TypeError):
            return self._recover_latest()
        if not (self._dir(version) / MANIFEST).is_file():
            return self._recover_latest()
        while (self._dir(version + 1) / MANIFEST).is_file():
            version += 1
        return version

    def _recover_latest(self) -> int | None:
        versions = self._dir_versions()
        index_max = max((row["version"] for row in self._index_rows(versions[-1] if versions else 0)), default=None)
        latest = max([v for v in (versions[-1] if versions else None, index_max) if v is not None], default=None)
        if latest is not None and (self._dir(latest) / MANIFEST).is_file():
            self._write_pointer(latest)  # the next call is O(1) again
        return latest

    def _write_pointer(self, version: int) -> None:
        # Best effort: a stale or missing pointer is corrected by latest() itself.
        tmp = self.root / f".{POINTER}.{os.getpid()}.{threading.get_ident()}"
        try:
            tmp.write_text(json.dumps({"version": version}))
            os.rename(tmp, self.root / POINTER)
        except OSError:
            tmp.unlink(missing_ok=True)

    def manifest(self, version: int) -> Manifest:
        """A version's manifest; a pruned version's compacted one comes from the index."""
        path = self._dir(version) / MANIFEST
        try:
            return Manifest.model_validate_json(path.read_text())
        except FileNotFoundError:
            seg = self._segment(version)
            for row in read_segment(seg) if seg.is_file() else ():
                if row["version"] == version:
                    return Manifest.model_validate(row)
            raise CheckpointError(f"no version {version} in {self.root}") from None
        except ValueError as err:
            raise CheckpointError(f"manifest {path} is invalid: {str(err).splitlines()[0]}") from None

    def load(self, version: int | None = None) -> tuple[Manifest, dict[str, torch.Tensor]]:
        """The manifest and tensors of a version (default: the latest), checksum verified."""
        if version is None:
            version = self.latest()
            if version is None:
                raise CheckpointError(f"no checkpoint versions in {self.root}")
        manifest = self.manifest(version)
        weights = self._dir(version) / WEIGHTS
        if (self._dir(version) / PRUNED).exists() or not (self._dir(version) / MANIFEST).is_file():
            raise CheckpointError(f"version {version}'s weights were pruned (update.keep_versions keeps the newest); "
                                  f"versions with weights: {self.versions(with_weights=True)}")
        if not weights.is_file():
            raise CheckpointError(f"version {version} has no {WEIGHTS}")
        if _sha256(weights) != manifest.sha256:
            raise CheckpointError(f"version {version}: {WEIGHTS} does not match its manifest checksum")
        try:
            return manifest, load_file(weights)
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"version {version}: cannot read {WEIGHTS}: {err}") from None

    @contextmanager
    def _writer_lock(self):
        # One writer at a time assigns version numbers; a second trainer waits rather than
        # racing for the same number.
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def save(self, tensors: dict[str, torch.Tensor], manifest: Manifest | dict) -> Manifest:
        """Write the next version. ``manifest.version`` is assigned here; returns the saved manifest."""
        fields = manifest.model_dump() if isinstance(manifest, Manifest) else dict(manifest)
        try:
            with self._writer_lock():
                latest = self.latest()
                fields["version"] = 0 if latest is None else latest + 1
                if fields.get("parent") is None and fields.get("kind", "update") != "init":
                    fields["parent"] = latest
                tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
                try:
                    weights = tmp / WEIGHTS
                    save_file({k: v.contiguous() for k, v in tensors.items()}, weights)
                    fields["sha256"] = _sha256(weights)
                    saved = Manifest.model_validate(fields)
                    (tmp / MANIFEST).write_text(saved.model_dump_json(indent=2))
                    for f in (weights, tmp / MANIFEST):
                        with f.open("rb") as fh:
                            os.fsync(fh.fileno())
                    os.rename(tmp, self._dir(saved.version))  # the atomic step
                    _fsync_dir(self.root)
                    self._write_pointer(saved.version)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
        except OSError as err:
            raise CheckpointError(f"cannot write a checkpoint in {self.root}: {err.strerror or err}") from None
        except SafetensorError as err:  # e.g. disk full while writing the tensors
            raise CheckpointError(f"cannot write a checkpoint in {self.root}: {str(err).splitlines()[0]}") from None
        return saved

    def rollback(self, version: int) -> Manifest:
        """Publish a new version carrying ``version``'s weights, so training continues from it."""
        old, tensors = self.load(version)
        fields = old.model_dump()
        fields.update(kind="rollback", parent=version, rolled_back_from=version, created=time.time(), consumed_label_ids=[])
        return self.save(tensors, fields)

    def prune(self, keep_last: int) -> list[int]:
        """Remove the weights of every version but version 0 and the newest `keep_last`; returns
        the versions pruned now. Their manifests are compacted into the index (parents, kinds,
        metrics and consumed label ids stay) and their directories removed, so the store holds about `keep_last`
        directories at any age. 0 keeps everything.

        Why: an update every minute for weeks is tens of thousands of versions; only the newest
        are ever served or rolled back to."""
        if keep_last <= 0:
            return []
        with self._writer_lock():
            loadable = self._dir_versions(with_weights=True)
            pruned = loadable[1:-keep_last]  # [0] is the initial version
            marked = sorted(set(self._dir_versions()) - set(loadable))  # pruned by an older layout
            rows: dict[Path, list[str]] = {}
            for v in sorted(pruned + marked):
                m = json.loads((self._dir(v) / MANIFEST).read_text())
                m["n_consumed"] = len(m.get("consumed_label_ids") or [])
                for k in _COMPACT_DROP:
                    m.pop(k, None)
                rows.setdefault(self._segment(v), []).append(json.dumps(m, separators=(",", ":")))
            # First the index (flushed), then the directories: a crash between the two leaves a
            # version in both places, which reads the same.
            for seg, lines in rows.items():
                seg.parent.mkdir(exist_ok=True)
                with seg.open("a") as f:
                    f.write("\n".join(lines) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            for v in sorted(pruned + marked):
                shutil.rmtree(self._dir(v), ignore_errors=True)
        return pruned

    def clean_partial(self) -> int:
        """Remove temporary directories left by a crashed writer; returns how many."""
        if not self.root.is_dir():
            return 0
        # Under the writer lock: a live writer holds it for its whole write, so only the
        # directories of dead writers are removed.
        with self._writer_lock():
            stale = [p for p in self.root.glob(".tmp-*") if p.is_dir()]
            for p in stale:
                shutil.rmtree(p, ignore_errors=True)
        return len(stale)


def resolve_checkpoint(path: str | Path) -> tuple[CheckpointStore, int | None]:
    """A store root (latest version) or one version directory inside it."""
    p = Path(path)
    v = version_dir_number(p.name)
    if v is not None and (p / MANIFEST).is_file():
        return CheckpointStore(p.parent), v
    if not p.is_dir():
        raise CheckpointError(f"no checkpoint directory at {p}")
    return CheckpointStore(p), None
