"""`actprm run`: the broker, the process's roles, a faust worker, the status line, the stop.

With no Kafka configured, the embedded broker starts on a free 127.0.0.1 port (memory only:
everything on it is lost when it stops). The roles are built by streams/process.py and wired
to their topics by streams/app.py; the built-in stream, the held-out F1 and a bounded run's
stop are daemon/demo.py's.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass

import faust
import structlog

from actprm.client.settings import aiokafka_options
from actprm.client.topics import Topics, ensure_topics
from actprm.daemon.demo import Demo, produce_builtin_stream
from actprm.daemon.logs import PROCESS_CONTEXT
from actprm.daemon.memory import (TRIM_EVERY_S, bound_arenas, children_as_before, fix_mmap_threshold, loaded_allocator,
                                  trim)
from actprm.daemon.metrics import Metrics
from actprm.daemon.settings import Settings
from actprm.streams.app import BoundedStopWorker, kafka_sender, make_app, supervise_embedded_broker, wire_agents
from actprm.streams.kafka.epoch import WriteGate, claim_epoch
from actprm.streams.process import ROLES, Process, build_process

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


class StatusService(faust.Service):
    """Prints the live status line, journals the status, serves metrics, gives memory back."""

    def __init__(self, proc: Process, options: RunOptions, demo: Demo | None = None, **kwargs):
        super().__init__(**kwargs)
        self.proc, self.options, self.demo = proc, options, demo
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
        print(self.line(), file=sys.stderr, flush=True)  # where the run stopped (a bounded run's last figures)
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
        sample = st.get("stream_sample")
        if sample and sample["labels"] and sample["online_f1"] is not None:
            parts.append(f"stream-sample F1 {sample['online_f1']:.3f} (last {sample['labels']})")
        if self.demo is not None and self.demo.heldout is not None:
            f1 = self.demo.f1
            if f1 is not None and f1["f1"] is not None:
                # Both accuracies: an F1 of 0 is usually a model that calls every step correct.
                parts.append(f"held-out F1 {f1['f1']:.3f} (acc err {f1['acc_error']:.2f}, "
                             f"corr {f1['acc_correct']:.2f}; v{self.demo.f1_version})")
            else:
                parts.append("held-out F1 -")
        if st["dead_lettered"]:
            parts.append(f"dead letters {st['dead_lettered']}")
        watch = getattr(self.proc.metrics, "broker_watch", None)
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


def run_daemon(settings: Settings, options: RunOptions) -> dict:
    """Run until stopped (Ctrl-C / SIGTERM) or until max_trajectories are done; returns the final status."""
    if "judge" in options.roles:
        from actprm.daemon.cli.judge import qualify

        qualify(settings)  # judge.qualify_n > 0: the judge's F1 on gold records first; below judge.min_f1 it stops here
    allocator = loaded_allocator()
    children_as_before()
    if allocator == "glibc" and "MALLOC_ARENA_MAX" not in os.environ:  # an operator's own setting wins
        bound_arenas()  # before the threads start: each would take its own arena (daemon/memory.py)
    if allocator == "glibc" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        fix_mmap_threshold()  # activations of every size would fragment the heaps (daemon/memory.py)
    broker, bootstrap, watch = None, settings.kafka.bootstrap, None
    if not bootstrap:
        from actprm.streams.kafka.broker import BrokerWatch, EmbeddedBroker

        broker = EmbeddedBroker(port=settings.kafka.embedded_port)
        broker.start()
        bootstrap = broker.bootstrap
        limit = settings.broker_memory_limit_mb
        watch = BrokerWatch(lambda: broker.pid, int(limit * (1 << 20)) if limit else None)  # ctl status, metrics, status line
        log.warning("no Kafka configured: started the embedded broker (memory only, lost on exit)", bootstrap=bootstrap)
    try:
        topics, kafka = Topics(settings.kafka.topic_prefix), aiokafka_options(settings.kafka)
        asyncio.run(ensure_topics(bootstrap, topics, partitions=settings.kafka.partitions,
                                  replication_factor=settings.kafka.replication_factor, **kafka))
        PROCESS_CONTEXT.update(role=",".join(options.roles))
        epoch = asyncio.run(claim_epoch(bootstrap, topics.epoch, **kafka))
        app = make_app(settings, options.roles, bootstrap, epoch)
        proc = build_process(settings, options.roles, topics, kafka_sender(app, topics, WriteGate()), epoch,
                             Metrics(broker_watch=watch))
        PROCESS_CONTEXT.update(proc.log_context())
        log.info("memory allocator", allocator=allocator, setting=settings.allocator)  # once the broker answered: a bad address stays one line
        if "scorer" in options.roles and settings.judge.kind == "oracle":
            log.warning("the judge is the gold-label one (judge.kind=oracle): samples without gold (those of RL clients "
                        "and `actprm serve`) are scored but never selected for the judge, nor charged; they are counted as "
                        "not_selected_no_gold. Set judge.kind=openai (an LLM judge) to label them.")
        wire_agents(app, proc, bootstrap, epoch)
        demo = Demo(proc, options.heldout, options.max_trajectories, options.drain_timeout_s)
        app.service(StatusService(proc, options, demo))
        app.service(demo)
        if broker is not None:
            supervise_embedded_broker(app, broker)
        if options.synthetic:
            @app.task
            async def produce_builtin() -> None:
                await produce_builtin_stream(proc, options.synthetic)

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
        learning = demo.learning()
        if learning is not None:
            final["learning"] = learning
            if learning["curve"]:
                print(f"learning curve: {learning['curve']}", file=sys.stderr, flush=True)
        proc.close()
        return final
    finally:
        if broker is not None:
            broker.stop()
