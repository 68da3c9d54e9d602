"""Process wiring for `actprm run`: broker, topics, the roles, faust worker, status, stop.

With no Kafka configured, the embedded broker starts on a free 127.0.0.1 port (memory only:
everything on it is lost when it stops). The built-in synthetic stream, when asked for, is
produced by a task inside the same worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import faust
import structlog

from actprm.daemon.logs import PROCESS_CONTEXT
from actprm.daemon.memory import TRIM_EVERY_S, bound_arenas, fix_mmap_threshold, trim
from actprm.daemon.metrics import Metrics
from actprm.daemon.settings import Settings
from actprm.model.backbone import default_hidden_layer, load_backbone
from actprm.model.build import publish_initial
from actprm.model.checkpoints import CheckpointStore
from actprm.model.features import cache_key
from actprm.model.judges import Judge
from actprm.model.prm import EnsemblePRM, PRMConfig
from actprm.model.replay import FeatureMemo, ReplayStore
from actprm.model.trainer import Trainer
from actprm.client import messages
from actprm.streams.agents import aiokafka_options, kafka_sender, make_app, wire_agents
from actprm.streams.epoch import WriteGate, claim_epoch, restart_this_process
from actprm.streams.journal import Journal
from actprm.streams.judging import JudgeRole, VerdictLog, configured_judge
from actprm.streams.ledger import Ledger
from actprm.streams.process import ROLES, Process
from actprm.streams.rounds import ADMISSION_COUNTERS, KeeperRole, RoundKeeper
from actprm.streams.scoring import ScorerRole
from actprm.streams.sender import LastError, Sender
from actprm.streams.series import FlagSeries, KeepFirstAndLast, ThinnedList
from actprm.streams.swap import ServedModel, Serving, load_for_swap
from actprm.streams.tools import iter_synthetic_trajectories
from actprm.client.topics import Topics, ensure_topics
from actprm.streams.training import TrainerRole, UpdateLoop

log = structlog.get_logger("actprm")


@dataclass
class RunOptions:
    roles: tuple[str, ...] = ROLES
    synthetic: int = 0  # trajectories of the built-in stream to produce (0: none)
    max_trajectories: int | None = None  # stop once this many have been scored and their labels trained
    heldout: int = 32  # synthetic held-out trajectories for the live F1 (0: off)
    status_interval_s: float = 5.0
    drain_timeout_s: float | None = None  # after max_trajectories, how long to wait for judge and trainer (None: judge.drain_timeout_s)


def parse_roles(role: str) -> tuple[str, ...]:
    if role == "all":
        return ROLES
    roles = tuple(r.strip() for r in role.split(",") if r.strip())
    unknown = [r for r in roles if r not in ROLES]
    if unknown or not roles:
        raise ValueError(f"unknown role {', '.join(unknown) or role!r}; choose from all, {', '.join(ROLES)}")
    return roles


def build_process(settings: Settings, roles: tuple[str, ...], topics: Topics, sender: Sender,
                  broker_epoch: str | None = None) -> Process:
    """Load what the roles need (blocking: before the worker starts) and build them.

    The trainer publishes version 0 when the store is empty; a scorer waits for a version to
    appear (its trainer may be another process) and serves the newest."""
    s = settings
    s.state_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(s.state_dir / "ledger", retention_s=s.ledger_retention_s or None)  # 0: keep every key
    store = CheckpointStore(s.checkpoints)
    store.clean_partial()
    journal = Journal(s.state_dir)
    errors, metrics = LastError(), Metrics()
    parts: dict = {}
    if "scorer" in roles or "trainer" in roles:
        backbone = load_backbone(s.model.backbone, hidden_layer=default_hidden_layer(s.model.backbone, s.model.hidden_layer),
                                 seed=s.model.seed, device=s.model.device, dtype=s.model.dtype,
                                 attn_implementation=s.model.attn_implementation)
        parts["backbone_placement"] = {k: v for k, v in backbone.reference().items()
                                       if k in ("device", "dtype", "attn_implementation")}
        prm_cfg = PRMConfig(n_heads=s.model.n_heads, head_width=s.model.head_width, max_length=s.model.max_length,
                            score_batch_size=s.scorer.max_batch, score_max_tokens=s.scorer.max_batch_tokens,
                            seed=s.model.seed)
        template = EnsemblePRM(backbone, prm_cfg)
        # Only a frozen backbone's hidden states stay valid: then the scorer hands them to the trainer.
        heads_only = s.trainer.mode == "heads"
        memo = FeatureMemo() if heads_only and "scorer" in roles and "trainer" in roles else None
        if "trainer" in roles:
            if store.latest() is None:
                publish_initial(store, template, s.trainer)
            u = s.update
            replay = ReplayStore(s.state_dir / "replay", u.replay_size, cache_key(template)[0] if heads_only else None)
            updates = UpdateLoop(Trainer(template, s.trainer), store, ledger, u.batch_size, u.max_wait_s, u.min_batch,
                                 canary_size=u.canary_size, canary_tolerance=u.canary_tolerance,
                                 keep_versions=u.keep_versions, fit=u, replay=replay, memo=memo)
            rounds = RoundKeeper(ledger, s.round.budget)
            parts["keeper"] = KeeperRole(rounds, sender, topics)
        if "scorer" in roles:
            first = _first_version(store, EnsemblePRM(backbone, prm_cfg))  # its own heads: the trainer's keep changing
            log.info("serving", version=first.version)
            keeper = parts.get("keeper")
            parts["scorer"] = ScorerRole(s.scorer, s.selection, s.model.seed, Serving(first, store, errors, metrics),
                                         ledger, sender, topics, journal, memo=memo, epoch=broker_epoch, metrics=metrics,
                                         needs_gold=s.judge.kind == "oracle",
                                         round_id=(lambda: keeper.rounds.state.round_id) if keeper else (lambda: 0))
        if "trainer" in roles:
            scorer = parts.get("scorer")
            parts["trainer"] = TrainerRole(updates, rounds, sender, topics, journal, errors, u.online_window,
                                           after_publish=scorer.serving.follow if scorer else None,
                                           consolidate=s.consolidate)
    if "judge" in roles:
        parts["judge"] = JudgeRole(_make_judge(s), ledger, sender, topics, s.selection, metrics, settings=s.judge,
                                   audit=VerdictLog(s.state_dir / "judge", s.judge.audit_max_bytes), errors=errors)
    proc = Process(s, roles, topics, sender, ledger, store, journal, metrics=metrics, errors=errors, **parts)
    metrics.proc = proc
    return proc


def _first_version(store: CheckpointStore, base: EnsemblePRM, wait_s: float = 600) -> ServedModel:
    deadline = time.monotonic() + wait_s
    while store.latest() is None:  # the trainer (maybe elsewhere) publishes version 0
        if time.monotonic() > deadline:
            raise RuntimeError(f"no model version appeared in {store.root} within {wait_s / 60:g} minutes")
        time.sleep(1.0)
    return load_for_swap(ServedModel(-1, base), store, store.latest())


def _make_judge(s: Settings) -> Judge:
    return configured_judge(s.judge)


class HeldOut:
    """A labelled held-out set of the built-in stream, scored by each served version.

    On a frozen backbone (heads mode) the backbone runs over it once; each later version only
    runs its heads over the kept hidden states, so a fresh figure per version costs milliseconds."""

    def __init__(self, records, frozen_backbone: bool):
        self.records, self.frozen = records, frozen_backbone
        self._features = None

    def scores(self, served) -> dict:
        from actprm.model.metrics import processbench_scores

        items = [(r.problem, r.steps) for r in self.records]
        if self.frozen and self._features is not None:
            got = served.prm.score_features(self._features[0], n_steps=self._features[1], truncated=self._features[2])
        else:
            got = served.prm.score(items, keep_features=self.frozen)
            if self.frozen:
                self._features = ([s.features for s in got], [s.n_steps for s in got], [s.truncated for s in got])
                for s in got:
                    s.features = None
        return processbench_scores([s.first_error for s in got], [r.label for r in self.records])


def share(flags, part: slice) -> float | None:
    if isinstance(flags, FlagSeries):  # the scorer's, bounded at any age
        return flags.share(part)
    chunk = flags[part]
    return round(sum(chunk) / len(chunk), 4) if len(chunk) else None


def pipeline_settled(proc: Process) -> bool:
    """Has every selected trajectory gone through the stages this process runs?"""
    c = proc.counters()
    ok = True
    if proc.trainer is not None and proc.scorer is not None:
        kept = sum(c[name] for name in ADMISSION_COUNTERS.values())  # each candidate the keeper saw, once
        ok = ok and kept >= c["selected"]
    if proc.judge is not None and proc.trainer is not None:
        waiting = proc.judge.queued()  # asked again hours later: not this run's to wait for
        ok = ok and c["judged"] + c["judge_failures"] + c["judge_repeats"] + waiting >= c["annotation_requests"]
        ok = ok and c["labels_received"] + c["labels_duplicate"] >= c["judged"]
    return ok


class StatusService(faust.Service):
    """Prints the live status line, keeps the held-out F1 fresh, and stops the run when done."""

    def __init__(self, proc: Process, options: RunOptions, **kwargs):
        super().__init__(**kwargs)
        self.proc, self.options = proc, options
        self.f1: dict | None = None  # ProcessBench f1, acc_error, acc_correct of the served version
        self.f1_version: int | None = None
        self.f1_by_version: dict[int, dict] = KeepFirstAndLast(64)  # v0 and the newest 64 versions
        # (labels, held-out F1, online F1, recent selected share) over the run: at most 2,000 points,
        # older ones thinned, so a week-long run's curve has the shape of a short one's
        self.curve: list[dict] = ThinnedList(2000)
        self._heldout: HeldOut | None = None
        if options.heldout and proc.scorer is not None:
            from actprm.model.synthetic import builtin_records, parse_kinds

            b = proc.settings.builtin
            records = builtin_records(options.heldout, seed=10_000 + proc.settings.model.seed, kinds=parse_kinds(b.kinds),
                                      error_rate=b.error_rate, markers=b.markers)
            self._heldout = HeldOut(records, frozen_backbone=proc.settings.trainer.mode == "heads")
        self._drain_started: float | None = None
        self._trimmed = time.monotonic()

    async def on_start(self) -> None:
        from actprm.daemon.metrics import start_metrics

        m = self.proc.settings.metrics
        try:
            self.metrics_server = await start_metrics(self.proc)
        except OSError as err:  # e.g. the port is taken: the service runs on, without metrics
            self.metrics_server = None
            self.proc.errors.note(f"metrics server on {m.host}:{m.port} not started: {err}")
            log.error("metrics server not started", host=m.host, port=m.port, error=str(err))
        else:
            if self.metrics_server is not None:
                log.info("metrics", url=f"http://{m.host}:{self.metrics_server.port}/metrics")

    async def on_stop(self) -> None:
        if getattr(self, "metrics_server", None) is not None:
            await self.metrics_server.close()
        await self.proc.close_judge()

    def line(self) -> str:
        st = self.proc.status()
        parts = [f"scored {st['scored']}", f"selected {st['selected_pct']:.0f}%", f"judged {st['judged']}",
                 f"updates {st['updates']}", f"served v{st['served_version']}"]
        if "budget_left" in st:
            parts.append(f"budget left {st['budget_left']}")
        online = st.get("online")
        if online and online["labels"]:
            f1 = "-" if online["online_f1"] is None else f"{online['online_f1']:.3f}"
            parts.append(f"online F1 {f1} (last {online['labels']} labels)")
        if self._heldout:
            if self.f1 is not None and self.f1["f1"] is not None:
                # Both accuracies: an F1 of 0 is usually a model that calls every step correct.
                parts.append(f"held-out F1 {self.f1['f1']:.3f} (acc err {self.f1['acc_error']:.2f}, "
                             f"corr {self.f1['acc_correct']:.2f}; v{self.f1_version})")
            else:
                parts.append("held-out F1 -")
        if st["dead_lettered"]:
            parts.append(f"dead letters {st['dead_lettered']}")
        watch = self.proc.metrics.broker_watch if self.proc.metrics is not None else None
        warning = watch.warning() if watch is not None else None
        if warning:
            parts.append(f"WARNING {warning}")
        return " | ".join(parts)

    @faust.Service.task
    async def _report(self) -> None:
        while not self.should_stop:
            await self.sleep(self.options.status_interval_s)
            print(self.line(), file=sys.stderr, flush=True)
            self.proc.journal.append_if_changed("status", self.proc.status())  # idle: a line every few minutes
            if time.monotonic() - self._trimmed >= TRIM_EVERY_S:  # freed native memory back to the system (daemon/memory.py)
                self._trimmed = time.monotonic()
                trim()

    @faust.Service.task
    async def _heldout_eval(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.should_stop and self._heldout:
            served = self.proc.scorer.serving.current
            if served and served.version != self.f1_version:
                # Its own thread: the held-out set never delays scoring of the live stream.
                self.f1 = await loop.run_in_executor(None, self._heldout.scores, served)
                self.f1_version = served.version
                labels = self.proc.trainer.counts["labels_trained"] if self.proc.trainer else 0
                self.f1_by_version[served.version] = self.f1 | {"labels_trained": labels}
                self.proc.heldout = {"version": served.version, "f1": self.f1["f1"], "acc_error": self.f1["acc_error"],
                                   "acc_correct": self.f1["acc_correct"]}
                self.proc.journal.append("heldout", {"version": served.version, "f1": self.f1["f1"],
                                                   "acc_error": self.f1["acc_error"], "acc_correct": self.f1["acc_correct"],
                                                   "labels_trained": labels})
            await self.sleep(1.0)

    @faust.Service.task
    async def _curve(self) -> None:
        while not self.should_stop and self._heldout:  # its own task: held-out scoring can take a while
            self._record_curve_point()
            await self.sleep(1.0)

    def _record_curve_point(self) -> None:
        trainer = self.proc.trainer
        flags = self.proc.scorer.selected_flags if self.proc.scorer else FlagSeries()
        online = trainer.online.summary() if trainer is not None else {}
        consolidated = trainer.consolidator.published if trainer is not None and trainer.consolidator else []
        point = {"labels": trainer.counts["labels_received"] if trainer else 0, "scored": len(flags),
                 "heldout_f1": self.f1["f1"] if self.f1 else None, "online_f1": online.get("online_f1"),
                 "selected_share": share(flags, slice(-32, None)), "version": self.f1_version,
                 "consolidated": self.f1_version in consolidated}
        if not self.curve or (point["labels"], point["scored"]) != (self.curve[-1]["labels"], self.curve[-1]["scored"]):
            self.curve.append(point)

    def learning(self) -> dict | None:
        """The run's learning in one object (the final status), and its curve as a PNG."""
        trainer = self.proc.trainer
        if self._heldout is None or trainer is None:
            return None
        flags = self.proc.scorer.selected_flags
        q = len(flags) // 4
        final = self.f1_by_version.get(max(self.f1_by_version)) if self.f1_by_version else None
        out = {"heldout_f1_v0": (self.f1_by_version.get(0) or {}).get("f1"),
               "heldout_f1_final": final["f1"] if final else None,
               "online_f1": trainer.online.summary()["online_f1"],
               "selected_share_first": share(flags, slice(0, q)) if q else None,
               "selected_share_last": share(flags, slice(len(flags) - q, None)) if q else None,
               "labels": trainer.counts["labels_trained"], "consolidations": trainer.counts["consolidations"],
               "curve": None}
        try:
            from actprm.model.plots import run_learning_curve

            out["curve"] = str(run_learning_curve(self.curve, self.proc.settings.state_dir / "learning_curve.png"))
        except (OSError, ValueError) as err:
            log.warning("could not write the learning curve", error=str(err))
        return out

    @faust.Service.task
    async def _stop_when_done(self) -> None:
        limit = self.options.max_trajectories
        if limit is None:
            return
        proc = self.proc
        drain_s = self.options.drain_timeout_s
        drain_s = proc.settings.judge.drain_timeout_s if drain_s is None else drain_s
        while not self.should_stop:
            await self.sleep(0.5)
            scored = proc.counters()["scored"]
            if scored < limit:
                continue
            if self._drain_started is None:
                self._drain_started = time.monotonic()
                log.info("max trajectories scored; draining judge and trainer", scored=scored)
            settled = pipeline_settled(proc)
            if proc.trainer is not None and settled:
                await proc.trainer.maybe_update(force=True)
                settled = not proc.trainer.updates.pending() and not proc.trainer.updating
                consolidator = proc.trainer.consolidator
                settled = settled and (consolidator is None or consolidator.running_since is None)
            waiting_f1 = (settled and self._heldout is not None and proc.scorer is not None
                          and self.f1_version != proc.scorer.serving.current.version)
            if waiting_f1 and time.monotonic() - self._drain_started <= drain_s:
                continue  # the last version's held-out figure first (the heldout task computes it)
            if settled or time.monotonic() - self._drain_started > drain_s:
                if proc.judge is not None and (proc.judge.in_flight or proc.judge.queued()):
                    # Said, not hidden: charged requests neither judged nor failed in this run.
                    log.warning("stopping with judge requests unfinished", abandoned_in_flight=len(proc.judge.in_flight),
                                queued_for_later=proc.judge.queued(), waited_s=round(time.monotonic() - self._drain_started))
                    proc.counts["judge_abandoned"] = len(proc.judge.in_flight)
                self._record_curve_point()
                print(self.line(), file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)  # the worker's own clean shutdown path
                return


class BoundedStopWorker(faust.Worker):
    """faust's worker, with a stop that cannot hang.

    With the broker gone, faust's consumers and producer wait up to a minute each for it while
    stopping (mode's shutdown_timeout), so Ctrl-C or a SIGTERM seemed to do nothing. Once a stop
    begins, a timer gives it `stop_timeout()` seconds, then calls `on_timeout` (which exits)."""

    def __init__(self, app: faust.App, *, stop_timeout, on_timeout, **kwargs):
        super().__init__(app, **kwargs)
        self._stop_timeout, self._on_timeout = stop_timeout, on_timeout
        self.stop_timer: threading.Timer | None = None

    async def on_stop(self) -> None:
        self.stop_timer = threading.Timer(self._stop_timeout(), self._on_timeout)
        self.stop_timer.daemon = True
        self.stop_timer.start()
        await super().on_stop()


def supervise_embedded_broker(app: faust.App, broker) -> None:
    """When the embedded broker dies (the OOM killer is the likely one: it keeps everything in
    RAM), start over as a whole process on the same port: a fresh broker, and no client left
    that remembers the old one's topics (see streams/epoch.py for why that matters)."""

    @app.timer(1.0)
    async def embedded_broker_alive():
        if broker.running:
            return
        code, port = broker.exit_code, broker.port
        os.environ["ACTPRM_KAFKA__EMBEDDED_PORT"] = str(port)
        broker.stop()  # removes its temporary directory; exec would skip every finally block
        restart_this_process("the embedded broker stopped; restarting the daemon with a new one on the same port "
                             "(everything the broker held is lost: it keeps data in memory only)",
                             exit_code=code, port=port)


def run_daemon(settings: Settings, options: RunOptions) -> dict:
    """Run until stopped (Ctrl-C / SIGTERM) or until max_trajectories are done; returns the final status."""
    if "judge" in options.roles:
        from actprm.daemon.cli_judge import qualify

        qualify(settings)  # judge.qualify_n > 0: the judge's F1 on gold records first; below judge.min_f1 it stops here
    if "MALLOC_ARENA_MAX" not in os.environ:  # an operator's own setting wins
        bound_arenas()  # before the threads start: each would take its own arena (daemon/memory.py)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        fix_mmap_threshold()  # activations of every size would fragment the heaps (daemon/memory.py)
    broker = None
    bootstrap = settings.kafka.bootstrap
    if not bootstrap:
        from actprm.streams.broker import EmbeddedBroker

        broker = EmbeddedBroker(port=settings.kafka.embedded_port)
        broker.start()
        bootstrap = broker.bootstrap
        log.warning("no Kafka configured: started the embedded broker (memory only, lost on exit)", bootstrap=bootstrap)
    try:
        topics = Topics(settings.kafka.topic_prefix)
        asyncio.run(ensure_topics(bootstrap, topics, partitions=settings.kafka.partitions,
                                  replication_factor=settings.kafka.replication_factor, **aiokafka_options(settings.kafka)))
        PROCESS_CONTEXT.update(role=",".join(options.roles))
        epoch = asyncio.run(claim_epoch(bootstrap, topics.epoch, **aiokafka_options(settings.kafka)))
        app = make_app(settings, options.roles, bootstrap, epoch)
        proc = build_process(settings, options.roles, topics, kafka_sender(app, topics, WriteGate()), epoch)
        PROCESS_CONTEXT.update(proc.log_context())
        if "scorer" in options.roles and settings.judge.kind == "oracle":
            log.warning("the judge is the gold-label one (judge.kind=oracle): samples without gold (those of RL clients "
                        "and `actprm serve`) are scored but never selected for the judge, nor charged; they are counted as "
                        "not_selected_no_gold. Set judge.kind=openai (an LLM judge) to label them.")
        wire_agents(app, proc, bootstrap, epoch)
        status = StatusService(proc, options)
        app.service(status)
        if broker is not None:
            supervise_embedded_broker(app, broker)
            if proc.metrics is not None:
                from actprm.streams.broker import BrokerWatch

                limit = settings.broker_memory_limit_mb
                proc.metrics.broker_watch = BrokerWatch(lambda: broker.pid, int(limit * (1 << 20)) if limit else None)  # ctl status, metrics, the status line

        if options.synthetic:
            from actprm.model.synthetic import parse_kinds

            b = settings.builtin
            # Generated as it is sent: a stream of millions holds one trajectory in memory at a time.
            stream = iter_synthetic_trajectories(options.synthetic, seed=settings.model.seed, kinds=parse_kinds(b.kinds),
                                                 error_rate=b.error_rate, markers=b.markers)

            @app.task
            async def produce_builtin_stream():
                # Paced like rollouts of an RL run (builtin.rate_per_s), so later trajectories
                # meet later versions; 0 sends the whole stream at once.
                acks, start, rate = [], time.monotonic(), b.rate_per_s
                for i, t in enumerate(stream):
                    if rate > 0:
                        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
                    acks.append(await proc.sender.enqueue(topics.trajectories, t.id, messages.encode(t)))
                    if len(acks) >= 1000:  # the acknowledgements awaited in chunks: bounded too
                        await asyncio.gather(*acks)
                        acks.clear()
                await asyncio.gather(*acks)
                log.info("built-in stream produced", n=options.synthetic)

        def stop_now() -> None:
            log.error("the stop did not finish in time (is the broker unreachable?); exiting now: what is durable "
                      "is on disk, and whatever was not acknowledged is delivered again after the restart",
                      sends_held=proc.sender.gate.held_because)
            print(json.dumps(proc.status(), indent=2, default=str), flush=True)
            if broker is not None:
                broker.stop()
            sys.stderr.flush()
            os._exit(0)  # as safe as a crash, which the fault suite proves; the stop was asked for

        worker = BoundedStopWorker(app, stop_timeout=lambda: 5.0 if proc.sender.gate.held else settings.stop_timeout_s,
                                   on_timeout=stop_now, loglevel="warning", quiet=True, redirect_stdouts=False,
                                   stdout=sys.stderr)
        worker.spinner = None  # its cursor codes would end up in the final JSON on stdout
        try:
            worker.execute_from_commandline()
        except SystemExit:
            pass
        if worker.stop_timer is not None:
            worker.stop_timer.cancel()  # the stop finished in time
        final = proc.status()
        learning = status.learning()
        if learning is not None:
            final["learning"] = learning
            if learning["curve"]:
                print(f"learning curve: {learning['curve']}", file=sys.stderr, flush=True)
        proc.close()
        return final
    finally:
        if broker is not None:
            broker.stop()
