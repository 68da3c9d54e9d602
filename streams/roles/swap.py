"""The version a scorer serves, and the hot-swap to a newer one.

A scorer learns of a new version from the trainer's announcement on the versions topic (every
scorer reads all of it, in no consumer group) and, as a fallback for an announcement lost with
the broker's data, from a slow poll of the checkpoint directory. The version is loaded on a
thread of its own (filesystem and torch work, the directory maybe on NFS), off to the side of
the one serving. The switch itself is one reference, taken between two scoring chunks, so a
chunk is always scored by exactly one version and no message is dropped or scored twice.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import structlog

from actprm.model.build import apply_version
from actprm.model.training.checkpoints import CheckpointError, CheckpointStore
from actprm.model.prm import EnsembleHeads, EnsemblePRM
from actprm.client import messages
from actprm.client.messages import ModelVersion
from actprm.streams.kafka.sender import LastError, Observer
from actprm.streams.kafka.readers import read_from, started_reader

log = structlog.get_logger("actprm")


@dataclass(frozen=True)
class ServedModel:
    version: int
    prm: EnsemblePRM


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


def first_served(store: CheckpointStore, base: EnsemblePRM, wait_s: float = 600) -> ServedModel:
    """The version a scorer starts with: the newest stored, waiting (blocking, before the worker
    starts) for its trainer, maybe in another process, to publish version 0."""
    deadline = time.monotonic() + wait_s
    while store.latest() is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no model version appeared in {store.root} within {wait_s / 60:g} minutes")
        time.sleep(1.0)
    return load_for_swap(ServedModel(-1, base), store, store.latest())


class VersionFollower:
    """Decides when to load a newer version and remembers versions that failed to load."""

    def __init__(self, store: CheckpointStore):
        self.store = store
        self.failed: dict[int, str] = {}

    def newer_than(self, served: int) -> int | None:
        """The newest stored version worth loading, else None. Lists the checkpoint directory
        (blocking, maybe on NFS): call it on a worker thread."""
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


class LoopLag:
    """The event loop's worst lag (heartbeats and fetches wait that long) while it is watched."""

    def __init__(self, tick_s: float = 0.005):
        self.tick_s, self.worst_ms = tick_s, 0.0

    async def watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.tick_s)
            self.worst_ms = max(self.worst_ms, (loop.time() - before - self.tick_s) * 1000)


class Serving:
    """The served version of one scorer process, and its swaps."""

    def __init__(self, first: ServedModel, store: CheckpointStore, errors: LastError, metrics: Observer | None = None):
        self.current = first
        self.follower = VersionFollower(store)
        self.metrics = metrics
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="actprm-swap")  # loads never queue behind scoring
        self.lock = asyncio.Lock()  # the poll timer and a local publish may both ask at once
        self.counts: Counter = Counter()
        self.stall_ms_max: float | None = None  # the event loop's worst lag during any swap (a running max: bounded)
        self.errors = errors

    async def follow(self, announced: int | None = None) -> None:
        """Load a newer version in the background, then switch to it between two chunks.

        announced: the version the trainer announced (no directory listing); None: the newest stored."""
        async with self.lock:
            loop = asyncio.get_running_loop()
            if announced is None:
                version = await loop.run_in_executor(self.pool, self.follower.newer_than, self.current.version)
            else:
                version = announced if announced > self.current.version and announced not in self.follower.failed else None
            if version is None:
                return
            start = time.perf_counter()
            lag = LoopLag()
            watching = loop.create_task(lag.watch())  # only while this swap runs
            try:
                new = await loop.run_in_executor(self.pool, self.follower.try_load, self.current, version)
                if new is not None:
                    self.current = new  # the switch itself: one reference
            finally:
                watching.cancel()
            stall = lag.worst_ms
        if new is None:
            reason = self.follower.failed.get(version)
            self.counts["swap_failures"] += 1
            self.errors.note(f"version {version} failed to load: {reason}")
            log.error("swap failed; old version keeps serving", version=version, served=self.current.version, reason=reason)
            return
        self.stall_ms_max = stall if self.stall_ms_max is None else max(self.stall_ms_max, stall)
        self.counts["swaps"] += 1
        if self.metrics is not None:
            self.metrics.observe_swap(time.perf_counter() - start)
        log.info("swapped", version=new.version, load_s=round(time.perf_counter() - start, 3), stall_ms=round(stall, 2))

    async def on_announcement(self, raw: bytes | None) -> None:
        """One record of the versions topic: follow it if it names a newer version."""
        try:
            announced = messages.decode(ModelVersion, raw)
        except messages.MessageError as err:
            log.warning("unreadable version announcement", reason=err.reason)
            return
        if announced.status != "rejected":
            await self.follow(announced.version)

    async def follow_announcements(self, bootstrap: str, topic: str, **kafka_options) -> None:
        """Read the versions topic from its start, following each announcement; runs until cancelled.
        The old ones name versions not newer than the served one and cost nothing."""
        reader = await started_reader(bootstrap, "version follower", **kafka_options)
        try:
            await read_from(reader, topic)
            async for record in reader:
                try:
                    await self.on_announcement(record.value)
                except Exception as err:  # noqa: BLE001  (the poll still follows; the reader must go on)
                    self.errors.note(f"version announcement at offset {record.offset}: {type(err).__name__}: {err}"[:300])
                    log.exception("version announcement not followed", offset=record.offset)
        finally:
            await reader.stop()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def serving_status(serving: Serving | None) -> dict:
    """The swap figures of the status; a process without a scorer serves nothing."""
    if serving is None:
        return {"served_version": None, "swaps": 0, "swap_stall_ms_max": None, "swap_failures": 0}
    return {"served_version": serving.current.version, "swaps": serving.counts["swaps"],
            "swap_stall_ms_max": round(serving.stall_ms_max, 3) if serving.stall_ms_max is not None else None,
            "swap_failures": serving.counts["swap_failures"]}
