"""What `actprm run` adds for a demo or a bounded run: the built-in stream, a held-out F1 per
served version, the learning curve, and a stop once `--max-trajectories` are done.

None of it is needed next to an RL run: there the stream is the policy's rollouts and the run
never ends. The held-out set is the built-in stream's, scored apart from the live one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import faust
import structlog

from actprm.client import messages
from actprm.model.eval.metrics import spread_of_newest
from actprm.streams.process import Process
from actprm.streams.roles.rounds import ADMISSION_COUNTERS
from actprm.streams.state.series import FlagSeries, KeepFirstAndLast, ThinnedList
from actprm.streams.tools.produce import iter_synthetic_trajectories

log = structlog.get_logger("actprm")


class HeldOut:
    """A labelled held-out set of the built-in stream, scored by each served version.

    On a frozen backbone (heads mode) the backbone runs over it once; each later version only
    runs its heads over the kept hidden states, so a fresh figure per version costs milliseconds."""

    def __init__(self, records, frozen_backbone: bool):
        self.records, self.frozen = records, frozen_backbone
        self._features = None

    def scores(self, served) -> dict:
        from actprm.model.eval.metrics import processbench_scores

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


def pipeline_settled(proc: Process) -> bool:
    """Has every selected trajectory gone through the stages this process runs?"""
    c = proc.counters()
    ok = True
    if proc.trainer is not None and proc.scorer is not None:
        kept = sum(c[name] for name in ADMISSION_COUNTERS.values())  # each candidate the keeper saw, once
        ok = ok and kept >= c["selected"] + c["validation_sample"]
    if proc.judge is not None and proc.trainer is not None:
        waiting = proc.judge.queued()  # asked again hours later: not this run's to wait for
        ok = ok and c["judged"] + c["judge_failures"] + c["judge_repeats"] + waiting >= c["annotation_requests"]
        ok = ok and c["labels_received"] + c["labels_duplicate"] >= c["judged"]
    return ok


def is_new_point(last: dict, point: dict) -> bool:
    """Does the learning curve take this point after `last`? When labels or scored trajectories
    moved, or the served version did: the closing consolidation's comes with no new label."""
    return any(point[k] != last[k] for k in ("labels", "scored", "version"))


def another_try_at_end(started: int, tries: int, last: dict | None) -> bool:
    """Start a consolidation at the end of a bounded run? The first always; another (a new seed)
    only while tries are left and the one before was not published (`last`: the consolidator's
    record of it)."""
    if started == 0:
        return True
    return started < tries and not (last or {}).get("published", False)


def stream_ends_within(scored: int, limit: int, rate_per_s: float, seconds: float) -> bool:
    """Will a bounded run's stream be all scored within `seconds`, at `rate_per_s` trajectories a
    second? A periodic consolidation (bounded by that many seconds) started then would still be
    training when the consolidation on every label should start, and would only delay it."""
    return rate_per_s > 0 and (limit - scored) / rate_per_s < seconds


async def produce_builtin_stream(proc: Process, n: int) -> None:
    """The built-in word problems onto the trajectories topic, paced like rollouts of an RL run
    (builtin.rate_per_s; 0 sends them all at once), so later trajectories meet later versions.
    Generated as they are sent: a stream of millions holds one trajectory in memory at a time."""
    from actprm.model.data.synthetic import parse_kinds

    b, topic = proc.settings.builtin, proc.topics.trajectories
    stream = iter_synthetic_trajectories(n, seed=proc.settings.model.seed, kinds=parse_kinds(b.kinds),
                                         error_rate=b.error_rate, markers=b.markers)
    acks, start = [], time.monotonic()
    for i, t in enumerate(stream):
        if b.rate_per_s > 0:
            await asyncio.sleep(max(0.0, start + i / b.rate_per_s - time.monotonic()))
        acks.append(await proc.sender.enqueue(topic, t.id, messages.encode(t)))
        if len(acks) >= 1000:  # the acknowledgements awaited in chunks: bounded too
            await asyncio.gather(*acks)
            acks.clear()
    await asyncio.gather(*acks)
    log.info("built-in stream produced", n=n)


class Demo(faust.Service):
    """The held-out F1 of each served version, the learning curve, and the stop when done."""

    def __init__(self, proc: Process, heldout: int, max_trajectories: int | None, drain_timeout_s: float | None, **kwargs):
        super().__init__(**kwargs)
        self.proc, self.max_trajectories = proc, max_trajectories
        self.drain_timeout_s = proc.settings.judge.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        self.f1: dict | None = None  # ProcessBench f1, acc_error, acc_correct of the served version
        self.f1_version: int | None = None
        self.f1_by_version: dict[int, dict] = KeepFirstAndLast(64)  # v0 and the newest 64 versions
        # (labels, held-out F1, online F1, recent selected share) over the run: at most 2,000 points,
        # older ones thinned, so a week-long run's curve has the shape of a short one's
        self.curve: list[dict] = ThinnedList(2000)
        self.heldout: HeldOut | None = None
        if heldout and proc.scorer is not None:
            from actprm.model.data.synthetic import builtin_records, parse_kinds

            b = proc.settings.builtin
            records = builtin_records(heldout, seed=10_000 + proc.settings.model.seed, kinds=parse_kinds(b.kinds),
                                      error_rate=b.error_rate, markers=b.markers)
            self.heldout = HeldOut(records, frozen_backbone=proc.settings.trainer.mode == "heads")
        self._drain_started: float | None = None
        self._first_scored: tuple[float, int] | None = None  # (when, how many) the stream was first seen scored
        self._tries_at_end = 0  # consolidations started at the end of a bounded run

    @faust.Service.task
    async def _heldout_eval(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.should_stop and self.heldout:
            served = self.proc.scorer.serving.current
            if served and served.version != self.f1_version:
                # Its own thread: the held-out set never delays scoring of the live stream.
                self.f1 = await loop.run_in_executor(None, self.heldout.scores, served)
                self.f1_version = served.version
                labels = self.proc.trainer.counts["labels_trained"] if self.proc.trainer else 0
                self.f1_by_version[served.version] = self.f1 | {"labels_trained": labels}
                figures = {"version": served.version, "f1": self.f1["f1"], "acc_error": self.f1["acc_error"],
                           "acc_correct": self.f1["acc_correct"]}
                self.proc.heldout = figures
                self.proc.journal.append("heldout", figures | {"labels_trained": labels})
            await self.sleep(1.0)

    @faust.Service.task
    async def _curve(self) -> None:
        while not self.should_stop and self.heldout:  # its own task: held-out scoring can take a while
            self.record_curve_point()
            await self.sleep(1.0)

    def record_curve_point(self) -> None:
        trainer = self.proc.trainer
        flags = self.proc.scorer.selected_flags if self.proc.scorer else FlagSeries()
        online = trainer.online.summary() if trainer is not None else {}
        consolidated = trainer.consolidator.published if trainer is not None and trainer.consolidator else []
        point = {"labels": trainer.counts["labels_received"] if trainer else 0, "scored": len(flags),
                 "heldout_f1": self.f1["f1"] if self.f1 else None, "online_f1": online.get("online_f1"),
                 "selected_share": flags.share(slice(-32, None)), "version": self.f1_version,
                 "consolidated": self.f1_version in consolidated}
        if not self.curve or is_new_point(self.curve[-1], point):
            self.curve.append(point)

    def learning(self) -> dict | None:
        """The run's learning in one object (the final status), and its curve as a PNG."""
        trainer = self.proc.trainer
        if self.heldout is None or trainer is None:
            return None
        flags = self.proc.scorer.selected_flags
        q = len(flags) // 4
        final = self.f1_by_version.get(max(self.f1_by_version)) if self.f1_by_version else None
        out = {"heldout_f1_v0": (self.f1_by_version.get(0) or {}).get("f1"),
               "heldout_f1_final": final["f1"] if final else None,
               "online_f1": trainer.online.summary()["online_f1"],
               "sample_f1": trainer.sample.summary()["online_f1"],
               "selected_share_first": flags.share(slice(0, q)) if q else None,
               "selected_share_last": flags.share(slice(len(flags) - q, None)) if q else None,
               "spread_last_10": spread_of_newest({v: f["f1"] for v, f in self.f1_by_version.items()}, 10),
               "labels": trainer.counts["labels_trained"], "consolidations": trainer.counts["consolidations"],
               "final_consolidated": bool(trainer.consolidator and self.f1_by_version
                                          and max(self.f1_by_version) in trainer.consolidator.published),
               "curve": None}
        try:
            from actprm.model.lab.plots import run_learning_curve

            out["curve"] = str(run_learning_curve(self.curve, self.proc.settings.state_dir / "learning_curve.png"))
        except (OSError, ValueError) as err:
            log.warning("could not write the learning curve", error=str(err))
        return out

    def ends_with_consolidation(self) -> bool:
        """Does this run end with a consolidation on every label kept (consolidate.at_end)?"""
        trainer = self.proc.trainer
        return trainer is not None and trainer.consolidator is not None and self.proc.settings.consolidate.at_end

    def consolidate_at_end(self) -> bool:
        """Start the consolidation that ends a bounded run (after the last update): the PRM the
        run leaves is trained on every label kept, as the published method trains the PRM it
        ships on the selected data. When it is refused, another seed tries, up to
        consolidate.at_end_tries. True when one started now."""
        trainer = self.proc.trainer
        if not self.ends_with_consolidation() or not trainer.counts["labels_trained"]:
            return False
        if not another_try_at_end(self._tries_at_end, self.proc.settings.consolidate.at_end_tries,
                                  trainer.consolidator.last):
            return False
        self._tries_at_end += 1
        log.info("consolidating every label kept before the run ends", labels=trainer.counts["labels_trained"],
                 attempt=self._tries_at_end)
        trainer.consolidate("end of run", self.proc.settings.consolidate.at_end_config())
        return True

    def hold_periodic_near_the_end(self, scored: int, limit: int) -> None:
        """No periodic consolidation once the stream will be all scored within one's time bound
        (consolidate.max_seconds) at the rate it has been scored so far."""
        if not scored or not self.ends_with_consolidation() or self.proc.trainer.consolidator.hold_periodic:
            return
        now = time.monotonic()
        if self._first_scored is None:
            self._first_scored = (now, scored)
            return
        t0, n0 = self._first_scored
        if now - t0 < 10:  # too soon to know the rate
            return
        rate = (scored - n0) / (now - t0)
        bound = self.proc.settings.consolidate.max_seconds
        if stream_ends_within(scored, limit, rate, bound):
            self.proc.trainer.consolidator.hold_periodic = True
            log.info("no more periodic consolidations: the stream ends within one's time bound", scored=scored,
                     rate_per_s=round(rate, 2), max_seconds=bound)

    @faust.Service.task
    async def _stop_when_done(self) -> None:
        limit, proc = self.max_trajectories, self.proc
        if limit is None:
            return
        while not self.should_stop:
            await self.sleep(0.5)
            scored = proc.counters()["scored"]
            if scored < limit:
                self.hold_periodic_near_the_end(scored, limit)
                continue
            if self._drain_started is None:
                self._drain_started = time.monotonic()
                log.info("max trajectories scored; draining judge and trainer", scored=scored)
                if self.ends_with_consolidation():
                    proc.trainer.consolidator.hold_periodic = True  # the one at the end trains on every label
            settled = pipeline_settled(proc)
            if proc.trainer is not None and settled:
                await proc.trainer.maybe_update(force=True)
                settled = not proc.trainer.updates.n_pending and not proc.trainer.updating
                consolidator = proc.trainer.consolidator
                settled = settled and (consolidator is None or consolidator.running_since is None)
                if settled and self.consolidate_at_end():
                    settled = False
            waited = time.monotonic() - self._drain_started
            # The last version is the trainer's newest: a consolidation published just now is
            # served once the scorer has swapped it in, and its held-out figure is the run's final one.
            waiting_f1 = (settled and self.heldout is not None and proc.scorer is not None
                          and self.f1_version != (proc.trainer.updates.version if proc.trainer is not None
                                                  else proc.scorer.serving.current.version))
            if waiting_f1 and waited <= self.drain_timeout_s:
                continue  # the last version's held-out figure first (the heldout task computes it)
            if settled or waited > self.drain_timeout_s:
                if proc.judge is not None and (proc.judge.in_flight or proc.judge.queued()):
                    # Said, not hidden: charged requests neither judged nor failed in this run.
                    log.warning("stopping with judge requests unfinished", abandoned_in_flight=len(proc.judge.in_flight),
                                queued_for_later=proc.judge.queued(), waited_s=round(waited))
                    proc.counts["judge_abandoned"] = len(proc.judge.in_flight)
                self.record_curve_point()
                os.kill(os.getpid(), signal.SIGTERM)  # the worker's own clean shutdown path (it prints the last status line)
                return
