"""Versioned weights: safetensors plus a JSON manifest, written atomically.

Layout: ``ROOT/v000007/{weights.safetensors, manifest.json}``. A version is written into a
temporary directory, flushed, and renamed into place, so a crash never leaves a half version
visible. Versions only grow: a rollback writes a new version holding an old version's weights.
Only what the training mode changes is stored (heads, heads+LoRA, or everything) plus a
reference to the backbone, so a swap moves megabytes in ``heads``/``lora`` modes.
Loading checks the weights' sha256 against the manifest; pickles are never loaded.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
PRUNED = "PRUNED"  # marks a version whose weights retention removed; its manifest stays
_VERSION_DIR = re.compile(r"^v(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written; the message is one line."""


class Manifest(BaseModel):
    version: int
    parent: int | None = None
    kind: Literal["init", "update", "rollback"] = "update"
    created: float = Field(default_factory=time.time)
    mode: Literal["heads", "lora", "full"] = "heads"
    backbone: dict = Field(default_factory=dict, description="backbone reference: spec, layers, hidden size")
    prm: dict = Field(default_factory=dict, description="PRMConfig the heads were built with")
    settings: dict = Field(default_factory=dict, description="trainer settings in force")
    metrics: dict[str, float | None] = Field(default_factory=dict)
    consumed_label_ids: list[str] = Field(default_factory=list, description="label ids trained on in this update")
    rolled_back_from: int | None = None
    sha256: str = ""


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

    def versions(self, with_weights: bool = False) -> list[int]:
        """Every published version (a pruned one keeps its manifest); `with_weights`: loadable ones."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            m = _VERSION_DIR.match(child.name)
            if m and (child / MANIFEST).is_file() and not (with_weights and (child / PRUNED).exists()):
                found.append(int(m.group(1)))
        return sorted(found)

    def latest(self) -> int | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def manifest(self, version: int) -> Manifest:
        path = self._dir(version) / MANIFEST
        try:
            return Manifest.model_validate_json(path.read_text())
        except FileNotFoundError:
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
        if (self._dir(version) / PRUNED).exists():
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
        the versions pruned now. Manifests stay: the history of parents, metrics and consumed
        label ids (what makes "trained once" checkable) never shrinks. 0 keeps everything.

        Why: an update every minute for weeks is tens of thousands of versions; only the newest
        are ever served or rolled back to."""
        if keep_last <= 0:
            return []
        pruned = []
        with self._writer_lock():
            for v in self.versions(with_weights=True)[1:-keep_last]:  # [0] is the initial version
                folder = self._dir(v)
                (folder / PRUNED).touch()  # first: a crash between the two steps leaves a clear error, not a bad file
                (folder / WEIGHTS).unlink(missing_ok=True)
                pruned.append(v)
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
    m = _VERSION_DIR.match(p.name)
    if m and (p / MANIFEST).is_file():
        return CheckpointStore(p.parent), int(m.group(1))
    if not p.is_dir():
        raise CheckpointError(f"no checkpoint directory at {p}")
    return CheckpointStore(p), None


def manifest_json(manifest: Manifest) -> str:
    return json.dumps(manifest.model_dump(), indent=2)
