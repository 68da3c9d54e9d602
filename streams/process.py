"""One daemon process: the roles it runs, built in one place, and what it shows of them.

A process runs some roles (scorer, judge, trainer). Each role is an object with the state it
owns, given everything it needs when `build_process` makes it: `ScorerRole`
(streams/roles/scoring.py) with its `Serving` (streams/roles/swap.py), `KeeperRole`
(streams/roles/rounds.py) and `TrainerRole` (streams/roles/training.py) in the trainer's
process, `JudgeRole` (streams/roles/judging.py). The agents (streams/app.py) call the roles;
control commands (streams/control.py) call narrow methods on them. What is left here is what
belongs to the process: pause, busy marks, the status it reports.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import structlog

from actprm.client.topics import Topics
from actprm.model.backbone import default_hidden_layer, load_backbone
from actprm.model.build import publish_initial
from actprm.model.features import cache_key
from actprm.model.prm import EnsemblePRM, PRMConfig
from actprm.model.training.checkpoints import CheckpointStore
from actprm.model.training.replay import FeatureMemo, ReplayStore
from actprm.model.training.trainer import Trainer
from actprm.streams.config import ProcessSettings
from actprm.streams.kafka.sender import LastError, Observer, Sender
from actprm.streams.roles.judging import JudgeRole, VerdictLog, configured_judge
from actprm.streams.roles.rounds import KeeperRole, RoundKeeper
from actprm.streams.roles.scoring import ScorerRole
from actprm.streams.roles.swap import Serving, first_served, serving_status
from actprm.streams.roles.training import TrainerRole, UpdateLoop
from actprm.streams.state.journal import Journal
from actprm.streams.state.ledger import Ledger

log = structlog.get_logger("actprm")

ROLES = ("scorer", "judge", "trainer")


@dataclass
class Process:
    settings: ProcessSettings  # daemon/settings.py's Settings, or any object with these sections
    roles: tuple[str, ...]
    topics: Topics
    sender: Sender
    ledger: Ledger
    store: CheckpointStore
    journal: Journal  # what was learned, readable while this runs (streams/state/journal.py)
    scorer: ScorerRole | None = None
    keeper: KeeperRole | None = None  # with the trainer: one writer keeps the round
    trainer: TrainerRole | None = None
    judge: JudgeRole | None = None
    metrics: Observer | None = None  # daemon/metrics.py's Metrics when serving metrics
    backbone_placement: dict = field(default_factory=dict)  # device, dtype, attn_implementation of the loaded backbone
    heldout: dict | None = None  # the served version's held-out F1, when the daemon keeps a held-out set
    errors: LastError = field(default_factory=LastError)  # shared with the roles: the last error of any part
    counts: Counter = field(default_factory=Counter)  # the agents' own: batch retries
    # When loading began, not when loading ended: control commands issued before it are not for
    # this process, but one sent while it loads (once version 0 is on disk, say) is.
    started_at: float = field(default_factory=time.time)

    def __post_init__(self):
        self.process_id = f"{socket.gethostname()}:{os.getpid()}"
        self.busy_since: dict[str, float | None] = {role: None for role in self.roles}
        self._consuming = asyncio.Event()  # cleared by `ctl pause --scope all`
        self._consuming.set()

    @property
    def paused_consume(self) -> bool:
        """`ctl pause --scope all`: agents stop taking messages, nothing is committed."""
        return not self._consuming.is_set()

    @paused_consume.setter
    def paused_consume(self, paused: bool) -> None:
        if paused:
            self._consuming.clear()
        else:
            self._consuming.set()

    @asynccontextmanager
    async def busy(self, role: str):
        """Wait out `pause --scope all`, then mark the role busy (the health check reads this)."""
        await self._consuming.wait()  # while paused the agent holds its batch uncommitted; nothing is lost
        self.busy_since[role] = time.time()
        try:
            yield
        finally:
            self.busy_since[role] = None

    def counters(self) -> Counter:
        """Every role's counts in one Counter (names do not overlap)."""
        out = Counter(self.counts)
        for part in (self.sender, self.scorer, self.scorer and self.scorer.serving, self.keeper, self.trainer, self.judge):
            if part is not None:
                out.update(part.counts)
        return out

    def log_context(self) -> dict:
        """What every log line of this process carries: roles, round, model version (read when logged)."""
        return {"role": ",".join(self.roles),
                "round": lambda: self.keeper.rounds.state.round_id if self.keeper else None,
                "model_version": lambda: (self.scorer.serving.current.version if self.scorer
                                          else self.trainer.updates.version if self.trainer else None)}

    def status(self) -> dict:
        c = self.counters()
        serving = serving_status(self.scorer.serving if self.scorer else None)
        gate = self.sender.gate
        out = {"roles": list(self.roles), "scored": c["scored"], "selected": c["selected"],
               "selected_pct": round(100 * c["selected"] / c["scored"], 1) if c["scored"] else 0.0,
               "validation_sample": c["validation_sample"],
               "annotation_requests": c["annotation_requests"], "judged": c["judged"], "judge_failures": c["judge_failures"],
               "updates": c["updates"], "updates_rejected": c["updates_rejected"], "update_failures": c["update_failures"],
               "dead_lettered": c["dead_lettered"], **serving, "duplicates_skipped": c["duplicates_skipped"],
               "score_tokens": c["score_tokens"], "score_seconds": round(float(c["score_seconds"]), 3),
               **self.backbone_placement, "heldout": self.heldout, "last_error": self.errors.message,
               "sends_held": gate.held_because, "sends_held_times": gate.holds}
        if self.keeper:
            st = self.keeper.rounds.state
            out |= {"round": st.round_id, "budget_used": st.used, "budget_left": st.left,
                    "paused_annotate": st.paused_annotate, "paused_train": st.paused_train}
        if self.trainer:
            t = self.trainer
            out |= {"pending_labels": t.updates.n_pending, "trained_version": t.updates.version,
                    "labels_received": c["labels_received"], "labels_duplicate": c["labels_duplicate"],
                    "labels_stale_round": c["labels_stale_round"], "labels_trained": c["labels_trained"],
                    "labels_validation_only": c["labels_validation_only"],
                    "labels_replayed": c["labels_replayed"],
                    "replay_labels": len(t.updates.replay) if t.updates.replay is not None else 0,
                    # labels whose hidden states came from this process's scorer, not a second backbone pass
                    "features_reused": t.updates.memo.hits if t.updates.memo is not None else 0,
                    "online": t.online.summary(), "stream_sample": t.sample.summary()}
        return out

    async def close_judge(self) -> None:
        if self.judge is not None:
            await self.judge.aclose()  # its counts stay: the final status reports them

    def close(self) -> None:
        """After the worker has stopped: finish in-flight work, then release the ledger."""
        for role in (self.scorer, self.trainer):
            if role is not None:
                role.close()
        self.journal.close()
        self.ledger.close()


def build_process(settings: ProcessSettings, roles: tuple[str, ...], topics: Topics, sender: Sender,
                  broker_epoch: str | None = None, metrics: Observer | None = None) -> Process:
    """Load what the roles need (blocking: before the worker starts) and build them, each with
    what it uses as constructor arguments.

    The trainer publishes version 0 when the store is empty; a scorer waits for a version to
    appear (its trainer may be another process) and serves the newest."""
    started_at = time.time()
    s = settings
    s.state_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(s.state_dir / "ledger", retention_s=s.ledger_retention_s or None)  # 0: keep every key
    store = CheckpointStore(s.checkpoints)
    store.clean_partial()
    journal = Journal(s.state_dir)
    errors = LastError()
    scorer = keeper = trainer = judge = None
    placement: dict = {}
    if "scorer" in roles or "trainer" in roles:
        backbone = load_backbone(s.model.backbone, hidden_layer=default_hidden_layer(s.model.backbone, s.model.hidden_layer),
                                 seed=s.model.seed, device=s.model.device, dtype=s.model.dtype,
                                 attn_implementation=s.model.attn_implementation)
        placement = {k: v for k, v in backbone.reference().items() if k in ("device", "dtype", "attn_implementation")}
        prm_cfg = PRMConfig(n_heads=s.model.n_heads, head_width=s.model.head_width, max_length=s.model.max_length,
                            score_batch_size=s.scorer.max_batch, score_max_tokens=s.scorer.max_batch_tokens,
                            seed=s.model.seed)
        template = EnsemblePRM(backbone, prm_cfg)
        # Only a frozen backbone's hidden states stay valid: then the scorer hands them to the trainer.
        heads_only = s.trainer.mode == "heads"
        memo = FeatureMemo() if heads_only and "scorer" in roles and "trainer" in roles else None
        rounds = None
        if "trainer" in roles:
            if store.latest() is None:
                publish_initial(store, template, s.trainer)
            rounds = RoundKeeper(ledger, s.round.budget)
            keeper = KeeperRole(rounds, sender, topics)
        if "scorer" in roles:
            first = first_served(store, EnsemblePRM(backbone, prm_cfg))  # its own heads: the trainer's keep changing
            log.info("serving", version=first.version)
            scorer = ScorerRole(s.scorer, s.selection, s.model.seed, Serving(first, store, errors, metrics), ledger, sender,
                                topics, journal, memo=memo, rounds=rounds, epoch=broker_epoch, metrics=metrics,
                                needs_gold=s.judge.kind == "oracle", consolidate=s.consolidate)
        if "trainer" in roles:
            u = s.update
            replay = ReplayStore(s.state_dir / "replay", u.replay_size, cache_key(template)[0] if heads_only else None)
            updates = UpdateLoop(Trainer(template, s.trainer), store, ledger, u.batch_size, u.max_wait_s, u.min_batch,
                                 canary_size=u.canary_size, canary_tolerance=u.canary_tolerance,
                                 keep_versions=u.keep_versions, fit=u, replay=replay, memo=memo,
                                 validation=s.consolidate, serve_average=u.serve_average)
            trainer = TrainerRole(updates, rounds, sender, topics, journal, errors, u.online_window,
                                  serving=scorer.serving if scorer else None, consolidate=s.consolidate)
    if "judge" in roles:
        judge = JudgeRole(configured_judge(s.judge), ledger, sender, topics, s.selection, metrics, settings=s.judge,
                          audit=VerdictLog(s.state_dir / "judge", s.judge.audit_max_bytes), errors=errors)
    return Process(s, roles, topics, sender, ledger, store, journal, scorer=scorer, keeper=keeper, trainer=trainer,
                   judge=judge, metrics=metrics, backbone_placement=placement, errors=errors, started_at=started_at)
