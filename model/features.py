"""An on-disk cache of a frozen backbone's hidden states at the step separators.

In `heads` mode the backbone never changes, so what the heads read for a trajectory,
`EnsemblePRM.hidden_at_steps` at its separators, is a pure function of (backbone, hidden
layer, max length, text). It is computed once and kept as one safetensors file per
trajectory (never a pickle), under a directory named by a key over:
- the backbone's reference (spec, hidden layer, seed, layer count, hidden size),
- a fingerprint of its weights and tokenizer (a model directory edited in place, or a
  different seed of `tiny`, gets a new key), and
- the PRM's max_length and FORMAT_VERSION (the encoding the positions come from).
A changed backbone therefore never reads an old entry: its key, and so its directory, differ.
Every file also records its key, and a file whose key does not match is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from actprm.model.backbone import cache_dir
from actprm.model.prm import EnsemblePRM

FORMAT_VERSION = 1  # bump when the encoding or the stored layout changes


@dataclass
class Features:
    """What the heads read for one trajectory, plus what StepScores reports about it."""

    at_steps: torch.Tensor  # (S_i, H) hidden states at the kept steps' separators
    n_steps: int  # steps in the trajectory (S_i is smaller when it was truncated)
    truncated: bool
    n_tokens: int


def text_key(problem: str, steps: Sequence[str]) -> str:
    """A hash of exactly what is encoded: the problem and the step list."""
    return hashlib.sha256(json.dumps([problem, list(steps)], ensure_ascii=False).encode()).hexdigest()[:32]


def tensor_digest(t: torch.Tensor) -> str:
    """Shape, dtype, the integer sum of the values' bit patterns and the first values.

    Integer addition is exact in any order, so the digest is the same on any number of threads
    (a float64 sum of squares of the 28M-value embedding differed in its last digit between 1
    and 2 threads, and with it every cache key); any changed value changes the sum."""
    flat = t.detach().reshape(-1).contiguous()
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    bits = int(flat.view(as_int).to(torch.int64).sum())  # wraps mod 2**64 when it overflows: still exact
    head = flat[:16].double().tolist()
    return f"{tuple(t.shape)}|{t.dtype}|{bits}|{head!r}"


def backbone_fingerprint(prm: EnsemblePRM) -> str:
    """A hash of the backbone's weights and tokenizer, cheap enough to take on every start.

    Any retrained or swapped weights change it (tensor_digest, per tensor); so does a different
    separator id or chat template."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in prm.body.state_dict().items():
            h.update(f"{name}|{tensor_digest(t)}".encode())
    tok = prm.backbone.tokenizer
    h.update(f"{len(tok)}|{prm.backbone.sep_token_id}|{getattr(tok, 'chat_template', '')}".encode())
    return h.hexdigest()[:16]


def cache_key(prm: EnsemblePRM) -> tuple[str, dict]:
    """(directory key, the description it hashes) for this PRM's backbone and encoding."""
    desc = {
        "backbone": prm.backbone.identity(),  # not where it ran: the fingerprint holds the dtype
        "fingerprint": backbone_fingerprint(prm),
        "max_length": prm.config.max_length,
        "format": FORMAT_VERSION,
    }
    key = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]
    return key, desc


class FeatureCache:
    """Hidden states at the steps for (problem, steps) pairs, computed once per backbone.

    `get` returns one Features per input, in input order, computing only the misses (sorted
    by length, in batches of the PRM's score_batch_size) and writing each as it is done, so an
    interrupted first pass resumes where it stopped. `hits` / `misses` count lookups."""

    def __init__(self, prm: EnsemblePRM, root: str | Path | None = None):
        self.prm = prm
        self.key, desc = cache_key(prm)
        spec = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(prm.backbone.spec))[-40:]
        self.directory = Path(root if root is not None else cache_dir() / "features") / f"{spec}-{self.key}"
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest = self.directory / "cache.json"
        if not manifest.is_file():
            _atomic_write_text(manifest, json.dumps(desc, indent=2, sort_keys=True))
        self.hits = 0
        self.misses = 0

    def path_for(self, problem: str, steps: Sequence[str]) -> Path:
        return self.directory / f"{text_key(problem, steps)}.safetensors"

    def _load(self, path: Path) -> Features | None:
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("key") != self.key:
                return None  # written for another backbone: stale, recompute
            at_steps = load_file(str(path))["at_steps"]
        except Exception:  # noqa: BLE001 - a torn or foreign file is a miss, never a crash
            return None
        return Features(at_steps, int(meta["n_steps"]), meta["truncated"] == "1", int(meta["n_tokens"]))

    def _store(self, path: Path, feat: Features) -> None:
        meta = {"key": self.key, "n_steps": str(feat.n_steps), "truncated": "1" if feat.truncated else "0",
                "n_tokens": str(feat.n_tokens)}
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=self.directory)
        os.close(fd)
        try:
            save_file({"at_steps": feat.at_steps.contiguous()}, tmp, metadata=meta)
            os.replace(tmp, path)  # a crash never leaves a half file under the real name
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def get(self, items: Sequence[tuple[str, Sequence[str]]], *, progress: bool = False, desc: str = "features") -> list[Features]:
        out: list[Features | None] = []
        missing: list[int] = []
        for problem, steps in items:
            got = self._load(self.path_for(problem, steps))
            out.append(got)
            if got is None:
                missing.append(len(out) - 1)
        self.hits += len(items) - len(missing)
        self.misses += len(missing)
        if missing:
            self._compute(items, missing, out, progress, desc)
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _compute(self, items, missing: list[int], out: list, progress: bool, desc: str) -> None:
        prm = self.prm
        prm.eval()
        encoded = {i: prm.encode(items[i][0], list(items[i][1])) for i in missing}
        order = sorted(missing, key=lambda i: len(encoded[i].input_ids))
        size = prm.config.score_batch_size
        with tqdm(total=len(order), desc=desc, unit="rec", file=sys.stderr, disable=not progress) as bar:
            for start in range(0, len(order), size):
                idx = order[start : start + size]
                batch = prm.collate([encoded[i] for i in idx])
                hidden = prm.hidden_at_steps(batch).float().cpu()  # (B, S, H): cached on the host
                for b, i in enumerate(idx):
                    e = encoded[i]
                    feat = Features(hidden[b, : e.n_scored].clone(), e.n_steps, e.truncated, len(e.input_ids))  # (S_i, H)
                    self._store(self.path_for(*items[i]), feat)
                    out[i] = feat
                bar.update(len(idx))


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
