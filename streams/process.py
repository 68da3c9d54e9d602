"""One daemon process: the roles it runs, and what it shows of them.

A process runs some roles (scorer, judge, trainer; daemon/run.py builds them). Each role is
an object with the state it owns: `ScorerRole` (streams/roles/scoring.py) with its `Serving`
(streams/roles/swap.py), `KeeperRole` (streams/roles/rounds.py) and `TrainerRole` (streams/roles/training.py)
in the trainer's process, `JudgeRole` (streams/roles/judging.py). The agents (streams/app.py)
call the roles; control commands (streams/control.py) call narrow methods on them. What is
left here is what belongs to the process: pause, busy marks, the status it reports.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from actprm.model.training.checkpoints import CheckpointStore
from actprm.streams.config import ProcessSettings
from actprm.streams.state.journal import Journal
from actprm.streams.roles.judging import JudgeRole
from actprm.streams.state.ledger import Ledger
from actprm.streams.roles.rounds import KeeperRole
from actprm.streams.roles.scoring import ScorerRole
from actprm.streams.kafka.sender import LastError, Sender
from actprm.streams.roles.swap import serving_status
from actprm.client.topics import Topics
from actprm.streams.roles.training import TrainerRole

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
    metrics: object = None  # daemon.metrics.Metrics when serving metrics
    backbone_placement: dict = field(default_factory=dict)  # device, dtype, attn_implementation of the loaded backbone
    heldout: dict | None = None  # the served version's held-out F1, when the daemon keeps a held-out set
    paused_consume: bool = False  # `ctl pause --scope all`: agents stop taking messages, nothing is committed
    errors: LastError = field(default_factory=LastError)  # shared with the roles: the last error of any part
    counts: Counter = field(default_factory=Counter)  # the agents' own: batch retries

    def __post_init__(self):
        self.process_id = f"{socket.gethostname()}:{os.getpid()}"
        self.started_at = time.time()
        self.busy_since: dict[str, float | None] = {role: None for role in self.roles}

    @asynccontextmanager
    async def busy(self, role: str):
        """Wait out `pause --scope all`, then mark the role busy (the health check reads this)."""
        while self.paused_consume:
            await asyncio.sleep(0.2)  # the agent holds its batch uncommitted; nothing is lost
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
            out |= {"pending_labels": len(t.updates.pending()), "trained_version": t.updates.version,
                    "labels_received": c["labels_received"], "labels_duplicate": c["labels_duplicate"],
                    "labels_stale_round": c["labels_stale_round"], "labels_trained": c["labels_trained"],
                    "labels_replayed": c["labels_replayed"],
                    "replay_labels": len(t.updates.replay) if t.updates.replay is not None else 0,
                    # labels whose hidden states came from this process's scorer, not a second backbone pass
                    "features_reused": t.updates.memo.hits if t.updates.memo is not None else 0,
                    "online": t.online.summary()}
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
