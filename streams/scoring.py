"""Scorer logic: score a batch on the served version, pick candidates for the judge, hot-swap.

Plain functions and classes; the faust agent only feeds batches in and sends what comes out.
Scoring runs in a worker thread (``score_batch`` is blocking); the served model is a single
reference swapped between batches, so a batch is always scored by exactly one version.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

from actprm.model.build import apply_version
from actprm.model.checkpoints import CheckpointError, CheckpointStore
from actprm.model.prm import EnsembleHeads, EnsemblePRM
from actprm.model.replay import FeatureMemo
from actprm.model.uncertainty import Selector
from actprm.streams.ledger import SCORED, Ledger
from actprm.streams.messages import AnnotationRequest, Reward, Trajectory


@dataclass(frozen=True)
class ServedModel:
    version: int
    prm: EnsemblePRM


@dataclass
class ScoredBatch:
    rewards: list[Reward]
    candidates: list[AnnotationRequest]  # selected for the judge; the round keeper admits or not
    duplicates: list[str] = field(default_factory=list)  # ids already scored: skipped
    version: int = -1
    seconds: float = 0.0
    tokens: int = 0


def scored_before(ledger: Ledger, trajectory_id: str, epoch: str | None) -> bool:
    """Was a reward for this id sent in this life of the broker's data? A reward sent before the
    broker lost its data is gone with it, so that id is scored again."""
    mark = ledger.get(SCORED, trajectory_id)
    return mark is not None and mark.get("epoch") == epoch


def score_batch(served: ServedModel, selector: Selector, ledger: Ledger, batch: list[Trajectory], round_id: int = 0,
                epoch: str | None = None, memo: FeatureMemo | None = None) -> ScoredBatch:
    """Score trajectories not scored before; the caller marks them scored once rewards are sent.

    memo: keep the hidden states of the selected ones there, for a trainer in this process."""
    fresh, duplicates, seen = [], [], set()
    for t in batch:
        if scored_before(ledger, t.id, epoch) or t.id in seen:
            duplicates.append(t.id)
        else:
            seen.add(t.id)
            fresh.append(t)
    if not fresh:
        return ScoredBatch([], [], duplicates, served.version)
    start = time.perf_counter()
    scores = served.prm.score([(t.problem, t.steps) for t in fresh], keep_features=memo is not None)
    selected = selector.select(scores)
    if memo is not None:
        for t, s, picked in zip(fresh, scores, selected):
            if picked:
                memo.put(t.id, t.problem, t.steps, s.features)
            s.features = None
    seconds = time.perf_counter() - start
    now = time.time()
    rewards, candidates = [], []
    for t, s, picked in zip(fresh, scores, selected):
        rewards.append(Reward(id=t.id, mu=s.mu, sigma=s.sigma, first_error=s.first_error, selected=picked,
                              model_version=served.version, n_steps=s.n_steps, truncated=s.truncated,
                              round_id=round_id, scored_at=now))
        if picked:
            candidates.append(AnnotationRequest(id=t.id, problem=t.problem, steps=t.steps,
                                                gold_first_error=t.gold_first_error, round_id=round_id,
                                                model_version=served.version, mu=s.mu, metadata=t.metadata,
                                                requested_at=now))
    return ScoredBatch(rewards, candidates, duplicates, served.version, seconds, sum(s.n_tokens for s in scores))


def mark_scored(ledger: Ledger, rewards: list[Reward], epoch: str | None = None) -> None:
    with ledger.transaction():
        for r in rewards:
            ledger.put(SCORED, r.id, {"version": r.model_version, "epoch": epoch})


def load_for_swap(current: ServedModel, store: CheckpointStore, version: int) -> ServedModel:
    """Build the next served model off to the side; the current one keeps serving meanwhile.

    Heads-only versions get new heads around the same frozen backbone (megabytes). Versions
    that change the backbone (LoRA, full) get their own copy of it, so a batch being scored
    on the current version never sees weights change under it.
    """
    manifest, tensors = store.load(version)
    old = current.prm
    heads = EnsembleHeads(old.config.n_heads, old.backbone.hidden_size, old.config.head_width)
    backbone = old.backbone
    if manifest.mode != "heads" or any(k.startswith("body.") for k in tensors):
        backbone = copy.copy(old.backbone)
        backbone.model = copy.deepcopy(old.backbone.model)
    prm = EnsemblePRM(backbone, old.config, heads)
    apply_version(prm, manifest, tensors)  # the rule `load_prm` follows; only a backbone copied above is changed
    for p in prm.parameters():
        p.requires_grad_(False)
    return ServedModel(manifest.version, prm)


class VersionFollower:
    """Decides when to load a newer version and remembers versions that failed to load."""

    def __init__(self, store: CheckpointStore):
        self.store = store
        self.failed: dict[int, str] = {}

    def newer_than(self, served: int) -> int | None:
        """The newest stored version worth loading, else None. Lists the checkpoint directory
        (blocking, maybe on NFS): the runtime calls it on its swap thread."""
        latest = self.store.latest()
        if latest is None or latest <= served or latest in self.failed:
            return None
        return latest

    def try_load(self, current: ServedModel, version: int) -> ServedModel | None:
        try:
            return load_for_swap(current, self.store, version)
        except (CheckpointError, KeyError, RuntimeError, ValueError) as err:
            self.failed[version] = str(err).splitlines()[0]
            return None
