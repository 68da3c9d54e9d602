"""What one daemon process holds, and the handlers its agents call.

A process runs some roles (scorer, judge, trainer). The trainer role is the single writer:
it publishes versions and keeps the round and its budget. Model and judge work never runs on
the event loop: scoring and swaps go to one worker thread, updates to another (torch
releases the GIL), so Kafka heartbeats keep flowing while a forward pass takes seconds.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import Counter
from contextlib import asynccontextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

from actprm.model.backbone import default_hidden_layer, load_backbone
from actprm.model.build import publish_initial
from actprm.model.checkpoints import CheckpointStore
from actprm.model.judges import make_judge
from actprm.model.features import cache_key
from actprm.model.prequential import OnlineWindow, score_label
from actprm.model.prm import EnsemblePRM, PRMConfig
from actprm.model.replay import FeatureMemo, ReplayStore
from actprm.model.trainer import Trainer
from actprm.model.uncertainty import make_selector, predicted_first_error
from actprm.streams import messages
from actprm.streams.config import ProcessSettings
from actprm.streams.control import accept_label
from actprm.streams.epoch import WriteGate
from actprm.streams.journal import Journal
from actprm.streams.judging import judge_once
from actprm.streams.ledger import Ledger
from actprm.streams.messages import AnnotationRequest, Label, ModelVersion, Trajectory
from actprm.streams.rounds import ADMISSION_COUNTERS, Admission, RoundKeeper, in_round
from actprm.streams.scoring import ServedModel, VersionFollower, load_for_swap, mark_scored, score_batch
from actprm.streams.topics import Topics
from actprm.streams.training import UpdateLoop

log = structlog.get_logger("actprm")

ROLES = ("scorer", "judge", "trainer")


@dataclass
class Event:
    """One consumed message as the handlers need it (faust events are adapted to this)."""

    topic: str
    partition: int | None
    offset: int | None
    key: bytes | None
    value: bytes


@dataclass
class Runtime:
    settings: ProcessSettings  # daemon/settings.py's Settings, or any object with these sections
    roles: tuple[str, ...]
    topics: Topics
    send: object = None  # async (topic_name, key: str|None, value: bytes) -> None, set by the app
    enqueue: object = None  # async (topic, key, value) -> future of the ack: many sends in flight at once
    counters: Counter = field(default_factory=Counter)
    served: ServedModel | None = None
    swap_stalls_ms: list[float] = field(default_factory=list)
    last_error: str | None = None
    broker_epoch: str | None = None  # the broker data's life this process started in (streams/epoch.py)
    write_gate: WriteGate = field(default_factory=WriteGate)  # sends wait while that life is in doubt
    paused_consume: bool = False  # `ctl pause --scope all`: agents stop taking messages, nothing is committed
    metrics: object = None  # daemon.metrics.Metrics when serving metrics
    heldout: dict | None = None  # the served version's held-out F1, when the daemon keeps a held-out set
    backbone_placement: dict = field(default_factory=dict)  # device, dtype, attn_implementation of the loaded backbone

    def __post_init__(self):
        s = self.settings
        s.state_dir.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(s.state_dir / "ledger")
        self.store = CheckpointStore(s.checkpoints)
        self.store.clean_partial()
        self.model_pool = ThreadPoolExecutor(1, thread_name_prefix="actprm-score")
        self.train_pool = ThreadPoolExecutor(1, thread_name_prefix="actprm-train")
        self.swap_pool = ThreadPoolExecutor(1, thread_name_prefix="actprm-swap")  # loads never queue behind scoring
        self.process_id = f"{socket.gethostname()}:{os.getpid()}"
        self.started_at = time.time()
        self.busy_since: dict[str, float | None] = {role: None for role in self.roles}
        self.rebuild_selector()
        self.follower = VersionFollower(self.store)
        self.keeper = RoundKeeper(self.ledger, s.round.budget) if "trainer" in self.roles else None
        self.judge = None
        self.updates: UpdateLoop | None = None
        self._updating = False
        self._update_retry_at = 0.0  # after a failed write, the next try waits (backoff)
        self._update_failures_in_row = 0
        self._swap_lag_ms: float | None = None
        self._swap_lock = asyncio.Lock()
        self.journal = Journal(s.state_dir)  # what was learned, readable while this runs (streams/journal.py)
        self.online = OnlineWindow(s.update.online_window)  # each label tests the version that scored it
        self.selected_flags = bytearray()  # 1 per scored trajectory, in scoring order: the selected share over the run
        self.memo: FeatureMemo | None = None  # hidden states the scorer hands to the trainer (same process, heads mode)

    def rebuild_selector(self) -> None:
        """(Re)make the selection rule from the settings; `ctl set selection.*` calls this."""
        sel = self.settings.selection
        self.selector = make_selector(sel.strategy, delta_pred=sel.delta_pred, delta_std=sel.delta_std,
                                      rate=sel.random_rate, seed=self.settings.model.seed)

    # --- start-up (blocking; called before the worker starts) ----------------------------

    def prepare_models(self) -> None:
        s = self.settings
        needs_model = "scorer" in self.roles or "trainer" in self.roles
        if not needs_model:
            return
        backbone = load_backbone(s.model.backbone, hidden_layer=default_hidden_layer(s.model.backbone, s.model.hidden_layer),
                                 seed=s.model.seed,
                                 device=s.model.device, dtype=s.model.dtype, attn_implementation=s.model.attn_implementation)
        self.backbone_placement = {k: v for k, v in backbone.reference().items() if k in ("device", "dtype", "attn_implementation")}
        prm_cfg = PRMConfig(n_heads=s.model.n_heads, head_width=s.model.head_width, max_length=s.model.max_length,
                            score_batch_size=s.scorer.max_batch, score_max_tokens=s.scorer.max_batch_tokens,
                            seed=s.model.seed)
        template = EnsemblePRM(backbone, prm_cfg)
        if "trainer" in self.roles:
            if self.store.latest() is None:
                publish_initial(self.store, template, s.trainer)
            trainer = Trainer(template, s.trainer)
            u = s.update
            heads_only = s.trainer.mode == "heads"  # only a frozen backbone's hidden states stay valid
            if heads_only and "scorer" in self.roles:
                self.memo = FeatureMemo()
            replay = ReplayStore(s.state_dir / "replay", u.replay_size, cache_key(template)[0] if heads_only else None)
            self.updates = UpdateLoop(trainer, self.store, self.ledger, u.batch_size, u.max_wait_s, u.min_batch,
                                      canary_size=u.canary_size, canary_tolerance=u.canary_tolerance,
                                      keep_versions=u.keep_versions, fit=u, replay=replay, memo=self.memo)
        if "scorer" in self.roles:
            deadline = time.monotonic() + 600
            while self.store.latest() is None:  # the trainer (maybe elsewhere) publishes version 0
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no model version appeared in {self.store.root} within 10 minutes")
                time.sleep(1.0)
            base = EnsemblePRM(backbone, prm_cfg)  # its own heads: the trainer's keep changing
            self.served = load_for_swap(ServedModel(-1, base), self.store, self.store.latest())
            log.info("serving", version=self.served.version)

    def prepare_judge(self) -> None:
        if "judge" in self.roles:
            j = self.settings.judge
            kwargs = {} if j.kind == "oracle" else {
                "base_url": j.base_url, "model": j.model, "timeout_s": j.timeout_s, "max_retries": j.max_retries,
                "concurrency": j.concurrency, "temperature": j.temperature, "max_tokens": j.max_tokens,
                "api_key": j.api_key.get_secret_value() if j.api_key else None}
            if j.kind == "vllm":
                kwargs |= {"device": j.device, "gpu_memory_utilization": j.gpu_memory_utilization}
            self.judge = make_judge(j.kind, **kwargs)

    async def close_judge(self) -> None:
        if self.judge is not None:
            await self.judge.aclose()
            self.judge = None

    def close(self) -> None:
        """After the worker has stopped: finish in-flight work, then release the ledger."""
        self.model_pool.shutdown(wait=True)
        self.train_pool.shutdown(wait=True)
        self.swap_pool.shutdown(wait=True)
        self.journal.close()
        self.ledger.close()

    # --- shared helpers ------------------------------------------------------------------

    async def dead_letter(self, event: Event, error: Exception | str) -> None:
        reason = getattr(error, "reason", None) or str(error)
        dl = messages.dead_letter(event.topic, event.partition, event.offset, event.key, event.value, reason)
        await self.send(self.topics.dead_letters, None, messages.encode(dl))
        self.counters["dead_lettered"] += 1
        key = event.key.decode("utf-8", "replace") if event.key else None
        log.warning("dead letter", id=key, topic=event.topic, partition=event.partition, offset=event.offset,
                    reason=str(reason)[:200])

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

    async def decoded(self, cls, events: list[Event]) -> list[tuple[Event, object]]:
        """Each event that decodes as `cls`, with its message; the others become dead letters."""
        out = []
        for event in events:
            try:
                out.append((event, messages.decode(cls, event.value)))
            except messages.MessageError as err:
                await self.dead_letter(event, err)
        return out

    # --- scorer --------------------------------------------------------------------------

    async def on_trajectories(self, events: list[Event]) -> None:
        batch: list[Trajectory] = []
        for _, msg in await self.decoded(Trajectory, events):
            if any(t.id == msg.id for t in batch):
                self.counters["duplicates_skipped"] += 1  # the same id twice in one take
            else:
                batch.append(msg)
        self.counters["consumed"] += len(events)
        size = self.settings.scorer.max_batch  # live: `ctl set scorer.max_batch` applies to the next chunk
        # Chunks of similar length waste less compute on padding; rewards carry ids, not order.
        batch.sort(key=lambda t: len(t.problem) + sum(len(x) for x in t.steps))
        acks, scored = [], []
        for start in range(0, len(batch), size):
            # Each chunk's records go out while the next chunk is scored; all acks are awaited
            # before any id is marked scored, so a crash re-scores rather than drops.
            result = await self._score_chunk(batch[start:start + size])
            for r in result.rewards:
                acks.append(await self.enqueue(self.topics.rewards, r.id, messages.encode(r)))
            for c in result.candidates:
                acks.append(await self.enqueue(self.topics.candidates, c.id, messages.encode(c)))
            scored += result.rewards
        await asyncio.gather(*acks)
        mark_scored(self.ledger, scored, self.broker_epoch)

    async def _score_chunk(self, batch: list[Trajectory]):
        served = self.served  # this chunk is scored by exactly this version; swaps land between chunks
        round_id = self.keeper.state.round_id if self.keeper else 0
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self.model_pool, score_batch, served, self.selector, self.ledger, batch,
                                            round_id, self.broker_epoch, self.memo)
        self.counters["scored"] += len(result.rewards)
        self.selected_flags.extend(int(r.selected) for r in result.rewards)
        if result.rewards:
            self.journal.append("scoring", {"version": served.version, "round_id": round_id, "scored": len(result.rewards),
                                            "selected": len(result.candidates), "by_kind": kind_counts(batch, result)})
        self.counters["selected"] += len(result.candidates)
        self.counters["duplicates_skipped"] += len(result.duplicates)
        self.counters["score_tokens"] += result.tokens
        self.counters["score_seconds"] += result.seconds  # a float count: Counter adds any number
        if self.metrics is not None:
            self.metrics.observe_scores([r.mu for r in result.rewards])
        return result

    async def follow_versions(self) -> None:
        """Load a newer version in the background, then switch between batches."""
        if self.served is None:
            return
        async with self._swap_lock:  # the poll timer and a local publish may both ask at once
            await self._follow_versions()

    async def _follow_versions(self) -> None:
        loop = asyncio.get_running_loop()
        # Listing the checkpoint directory (maybe NFS) is filesystem work: never on the loop.
        version = await loop.run_in_executor(self.swap_pool, self.follower.newer_than, self.served.version)
        if version is None:
            return
        start = time.perf_counter()
        self._swap_lag_ms = 0.0  # the loop-lag monitor records the worst lag while this is not None
        try:
            new = await loop.run_in_executor(self.swap_pool, self.follower.try_load, self.served, version)
            if new is not None:
                self.served = new  # the switch itself: one reference, between two batches
        finally:
            stall, self._swap_lag_ms = self._swap_lag_ms, None
        if new is None:
            self.counters["swap_failures"] += 1
            self.last_error = f"version {version} failed to load: {self.follower.failed.get(version)}"
            log.error("swap failed; old version keeps serving", version=version, served=self.served.version,
                      reason=self.follower.failed.get(version))
            return
        self.swap_stalls_ms.append(stall)
        self.counters["swaps"] += 1
        if self.metrics is not None:
            self.metrics.observe_swap(time.perf_counter() - start)
        log.info("swapped", version=new.version, load_s=round(time.perf_counter() - start, 3), stall_ms=round(stall, 2))

    async def watch_loop_lag(self, tick_s: float = 0.005) -> None:
        """How long the event loop was unable to run (heartbeats, fetches) during a swap."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(tick_s)
            lag_ms = (loop.time() - before - tick_s) * 1000
            if self._swap_lag_ms is not None:
                self._swap_lag_ms = max(self._swap_lag_ms, lag_ms)

    # --- round keeper (trainer role) -----------------------------------------------------

    async def on_candidates(self, events: list[Event]) -> None:
        for event, msg in await self.decoded(AnnotationRequest, events):
            verdict = self.keeper.admit(msg.id)
            if verdict in (Admission.NEW, Admission.RESEND):
                # The keeper's round, not the scorer's stamp: a scorer in its own process has none.
                forward = in_round(msg, event.value, self.keeper.admitted_round(msg.id))
                await self.send(self.topics.annotations, msg.id, forward)
            self.counters[ADMISSION_COUNTERS[verdict]] += 1

    # --- judge ---------------------------------------------------------------------------

    async def on_annotations(self, events: list[Event]) -> None:
        requests = await self.decoded(AnnotationRequest, events)
        # The judge client bounds its own concurrency; the batch runs in parallel up to it.
        outcomes = await asyncio.gather(*(judge_once(self.judge, self.ledger, m) for _, m in requests))
        for (event, request), outcome in zip(requests, outcomes):
            if self.metrics is not None and not outcome.repeated:
                self._observe_judgement(request, outcome)
            if outcome.label is not None:
                await self.send(self.topics.labels, outcome.label.id, messages.encode(outcome.label))
                self.counters["judged" if not outcome.repeated else "judge_repeats"] += 1
            elif not outcome.repeated:
                await self.dead_letter(event, f"judge failed: {outcome.failure}")
                self.counters["judge_failures"] += 1

    def _observe_judgement(self, request: AnnotationRequest, outcome) -> None:
        if outcome.label is None:
            self.metrics.observe_judge(0.0, ok=False)
            return
        self.metrics.observe_judge(outcome.label.latency_s, ok=True)
        # Agreement of the scorer's prediction with the judge; "confident" as the aleatoric rule means it.
        d = self.settings.selection.delta_pred
        confident = bool(request.mu) and all(m >= d or m <= 1 - d for m in request.mu)
        self.metrics.observe_agreement(predicted_first_error(request.mu), outcome.label.first_error, confident)

    # --- trainer -------------------------------------------------------------------------

    async def on_labels(self, events: list[Event]) -> None:
        for _, msg in await self.decoded(Label, events):
            if not accept_label(self, msg):
                self.counters["labels_stale_round"] += 1  # its round was reset without --keep-pending
            elif self.updates.receive(msg):
                self.counters["labels_received"] += 1
                self._test_label(msg)
            else:
                self.counters["labels_duplicate"] += 1

    def _test_label(self, label: Label) -> None:
        """Prequential evaluation: the label first tests the version that asked for it."""
        test = score_label(label.mu, label.first_error, label.n_steps, label.scored_version) if label.mu is not None else None
        if test is not None:
            self.online.add(test)
        self.journal.append("labels", {
            "id": label.id, "judged_at": label.judged_at, "round_id": label.round_id, "version": label.scored_version,
            "first_error": label.first_error, "predicted_first_error": test.predicted if test else None,
            "mu": label.mu, "n_steps": label.n_steps, "metadata": label.metadata})

    async def maybe_update(self, force: bool = False) -> None:
        if self._updating or self.updates is None or self.keeper.state.paused_train:
            return
        if time.monotonic() < self._update_retry_at:
            return
        if not (self.updates.ready() or (force and self.updates.pending())):
            return
        self._updating = True
        try:
            loop = asyncio.get_running_loop()
            outcome = await loop.run_in_executor(self.train_pool, self.updates.update)
        finally:
            self._updating = False
        r, published = outcome.result, outcome.manifest
        self.journal.append("updates", {
            "version": published.version if published else None,
            "parent": published.parent if published else self.updates.version,
            "refused": outcome.rejected, "error": outcome.error,
            "loss": r.loss if r.applied else None, "labels_new": len(outcome.label_ids), "labels_replayed": r.n_replayed,
            "steps": r.steps})
        if outcome.error:
            # e.g. a full disk: each try costs a gradient step, so back off 1, 2, 4 ... 60 s.
            self._update_failures_in_row += 1
            self._update_retry_at = time.monotonic() + min(60.0, 2.0 ** (self._update_failures_in_row - 1))
            self.counters["update_failures"] += 1
            self.last_error = outcome.error
            log.error("update failed; serving continues", reason=outcome.error)
        elif outcome.manifest is None:
            self.counters["updates_rejected"] += 1
            self.last_error = f"update rejected: {outcome.rejected}"
            log.warning("update rejected; the served version stays", reason=outcome.rejected, labels=len(outcome.label_ids))
        else:
            m = outcome.manifest
            self._update_failures_in_row = 0
            self.counters["updates"] += 1
            self.counters["labels_trained"] += len(outcome.label_ids)
            self.counters["labels_replayed"] += outcome.result.n_replayed
            await self.publish_version(m)
            log.info("published", version=m.version, loss=round(outcome.result.loss, 4), labels=len(outcome.label_ids))

    async def publish_version(self, m) -> None:
        """Announce a stored version (update or rollback); local scorers switch to it at once."""
        announce = ModelVersion(version=m.version, location=str(self.store.root), parent=m.parent,
                                metrics={k: float(v) for k, v in m.metrics.items() if v is not None},
                                created_at=m.created, status="rolled_back" if m.kind == "rollback" else "published")
        await self.send(self.topics.versions, str(m.version), messages.encode(announce))
        if self.served is not None:
            await self.follow_versions()

    # --- status --------------------------------------------------------------------------

    def log_context(self) -> dict:
        """What every log line of this process carries: roles, round, model version (read when logged)."""
        return {"role": ",".join(self.roles),
                "round": lambda: self.keeper.state.round_id if self.keeper else None,
                "model_version": lambda: self.served.version if self.served else (self.updates.version if self.updates else None)}

    def status(self) -> dict:
        c = self.counters
        out = {"roles": list(self.roles), "scored": c["scored"], "selected": c["selected"],
               "selected_pct": round(100 * c["selected"] / c["scored"], 1) if c["scored"] else 0.0,
               "annotation_requests": c["annotation_requests"], "judged": c["judged"], "judge_failures": c["judge_failures"],
               "updates": c["updates"], "updates_rejected": c["updates_rejected"], "update_failures": c["update_failures"],
               "dead_lettered": c["dead_lettered"],
               "served_version": self.served.version if self.served else None, "swaps": c["swaps"],
               "swap_stall_ms_max": round(max(self.swap_stalls_ms), 3) if self.swap_stalls_ms else None,
               "swap_failures": c["swap_failures"], "duplicates_skipped": c["duplicates_skipped"],
               "score_tokens": c["score_tokens"], "score_seconds": round(float(c["score_seconds"]), 3),
               **self.backbone_placement,
               "heldout": self.heldout,
               "last_error": self.last_error,
               "sends_held": self.write_gate.held_because, "sends_held_times": self.write_gate.holds}
        if self.keeper:
            st = self.keeper.state
            out |= {"round": st.round_id, "budget_used": st.used, "budget_left": st.left,
                    "paused_annotate": st.paused_annotate, "paused_train": st.paused_train}
        if self.updates:
            out["pending_labels"] = len(self.updates.pending())
            out["trained_version"] = self.updates.version
            out |= {"labels_received": c["labels_received"], "labels_duplicate": c["labels_duplicate"],
                    "labels_stale_round": c["labels_stale_round"], "labels_trained": c["labels_trained"],
                    "labels_replayed": c["labels_replayed"],
                    "replay_labels": len(self.updates.replay) if self.updates.replay is not None else 0,
                    # labels whose hidden states came from this process's scorer, not a second backbone pass
                    "features_reused": self.memo.hits if self.memo is not None else 0,
                    "online": self.online.summary()}
        return out


def kind_counts(batch: list[Trajectory], result) -> dict[str, list[int]]:
    """{error kind (the trajectory's metadata "kind", else "-"): [scored, selected]} of a chunk."""
    kind = {t.id: str(t.metadata.get("kind", "-")) for t in batch}
    out: dict[str, list[int]] = {}
    for r in result.rewards:
        row = out.setdefault(kind.get(r.id, "-"), [0, 0])
        row[0] += 1
        row[1] += int(r.selected)
    return out
