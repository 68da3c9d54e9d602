"""The crash-trial harness: scorer, judge and trainer as three processes sharing one checkpoint
directory, a stream flowing in while a role is SIGKILLed and restarted again and again, then a
drain and a check of every invariant that a crash must not break (nothing lost, nothing judged
or trained twice, versions only increase, no half-written checkpoint). Both the short fault
tests and the long suite run it, with different kill counts and seeds, and it reports as a
row of the fault summary table plus the list of invariants that failed.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from actprm.model.training.checkpoints import CheckpointStore
from actprm.streams.tools.produce import produce_trajectories
from actprm.client.topics import Topics
from support.daemon import Daemon, consumed_ids, manifests, read_topic
from support.wait import wait_until
from support.fault_summary import SummaryRow
from support.faulty_judge import FaultyJudge, tagged_stream
from support.processes import sigkill


ROLES = ("scorer", "judge", "trainer")


@dataclass
class CrashReport:
    row: SummaryRow
    kills: Counter
    problems: list[str]  # invariant violations; empty when everything held


def run_crash_trials(bootstrap: str, prefix: str, tmp: Path, *, n_traj: int, n_kills: int, seed: int,
                     kill_after_s: tuple[float, float] = (0.5, 6.0), produce_every_s: float = 1.0,
                     drain_timeout_s: float = 300.0, scenario: str = "crash",
                     kill_plan: tuple[str, ...] | None = None) -> CrashReport:
    """Scorer, judge and trainer as three processes sharing a checkpoint directory; a stream
    flows in while a random role is SIGKILLed and restarted `n_kills` times; then everything
    drains and the invariants are checked. Selection is `full`, so every trajectory must end as
    a reward, a label and a trained label."""
    rng = random.Random(seed)
    topics = Topics(prefix)
    stream = tagged_stream(n_traj, scenario, seed=seed)
    ids = {t.id for t in stream}
    gold = {t.problem: t.gold_first_error for t in stream}
    shared = Path(tmp) / "checkpoints"
    store = CheckpointStore(shared)
    problems: list[str] = []
    kills: Counter = Counter()
    lost_in_flight: Counter = Counter()  # judge calls whose caller was killed while waiting

    with FaultyJudge(gold, delay_s=0.2).start() as judge:
        env = {"ACTPRM_CHECKPOINT_DIR": str(shared), "ACTPRM_SELECTION__STRATEGY": "full",
               "ACTPRM_JUDGE__KIND": "openai", "ACTPRM_JUDGE__BASE_URL": judge.base_url,
               "ACTPRM_JUDGE__CONCURRENCY": "2", "ACTPRM_JUDGE__MAX_RETRIES": "3", "ACTPRM_JUDGE__TIMEOUT_S": "20"}
        procs = {r: Daemon(bootstrap, prefix, Path(tmp) / r, "--role", r, env=env) for r in ROLES}
        try:
            procs["trainer"].start()
            procs["scorer"].start()
            procs["judge"].start()

            chunks = [stream[i:i + 8] for i in range(0, len(stream), 8)]
            produced = threading.Event()

            def produce():
                for chunk in chunks:
                    produce_trajectories(bootstrap, prefix, chunk)
                    time.sleep(produce_every_s)
                produced.set()

            producer = threading.Thread(target=produce, daemon=True)
            producer.start()
            for i in range(n_kills):
                time.sleep(rng.uniform(*kill_after_s))
                for r, d in procs.items():
                    if d.proc.poll() is not None:
                        raise AssertionError(f"the {r} exited on its own (rc {d.proc.returncode}):\n{d.stderr()[-3000:]}")
                role = kill_plan[i % len(kill_plan)] if kill_plan else rng.choice(ROLES)
                waiting = judge.in_flight_now() if role == "judge" else set()
                sigkill(procs[role].proc)
                if role == "judge":
                    lost_in_flight.update(waiting | judge.in_flight_now())
                kills[role] += 1
                procs[role].start()
            producer.join(600)
            if not produced.is_set():
                problems.append("the producer did not finish")

            trained = lambda: set(consumed_ids(store)) >= ids
            try:
                wait_until(trained, drain_timeout_s, interval=2, what="every label trained after the last kill")
            except AssertionError as err:
                problems.append(f"{err}; trained {len(set(consumed_ids(store)) & ids)}/{len(ids)}")
            for r, d in procs.items():
                if d.terminate(90) != 0:
                    problems.append(f"the {r} did not stop cleanly: {d.stderr()[-2000:]}")
        finally:
            for d in procs.values():
                d.kill()

        rewards = read_topic(bootstrap, topics.rewards, until=lambda got: ids <= {r.id for r in got}, timeout_s=60)
        dead = read_topic(bootstrap, topics.dead_letters, settle_s=0.5)
        labels = read_topic(bootstrap, topics.labels, settle_s=0.5)
        announced = read_topic(bootstrap, topics.versions, settle_s=0.5)
        calls = Counter(judge.calls)

    rewarded = {r.id for r in rewards}
    dead_keys = {d.key for d in dead}
    lost = ids - rewarded - dead_keys
    if lost:
        problems.append(f"{len(lost)} trajectories have neither a reward nor a dead letter: {sorted(lost)[:5]}")
    # Judged twice: a second call that is not explained by a judge killed while it waited.
    judged_twice = {p: n for p, n in calls.items() if n - 1 - lost_in_flight[p] > 0}
    if judged_twice:
        problems.append(f"judged twice: {judged_twice}")
    wrong = [l.id for l in labels if l.first_error != gold[next(t.problem for t in stream if t.id == l.id)]]
    if wrong:
        problems.append(f"labels that differ from the judge's answer: {wrong[:5]}")
    used = consumed_ids(store)
    trained_twice = {i: n for i, n in used.items() if n > 1}
    if trained_twice:
        problems.append(f"trained twice: {trained_twice}")
    # Versions only increase: contiguous version numbers, each update's parent the one before,
    # announcements in increasing order, and per partition every reward from a version no older.
    found = manifests(store)
    if [m.version for m in found] != list(range(len(found))):
        problems.append(f"version numbers are not 0..n: {[m.version for m in found]}")
    bad_parents = [m.version for m in found if m.kind == "update" and m.parent != m.version - 1]
    if bad_parents:
        problems.append(f"updates whose parent is not the previous version: {bad_parents}")
    announced_v = [v.version for v in announced]
    if announced_v != sorted(set(announced_v)):
        problems.append(f"version announcements not strictly increasing: {announced_v}")
    # No half-written checkpoint: every version loads with its checksum; no temporary left.
    for m in found:
        try:
            store.load(m.version)
        except Exception as err:  # noqa: BLE001  (any failure is the finding)
            problems.append(f"version {m.version} does not load: {err}")
    leftovers = list(shared.glob(".tmp-*"))
    if leftovers:
        problems.append(f"temporary checkpoint directories left: {leftovers}")
    logs = {r: d.stderr() for r, d in procs.items()}
    for r, text in logs.items():
        for needle in ("swap failed", "CheckpointError", "timer failed", "Traceback"):
            if needle in text:
                problems.append(f"the {r}'s log has {needle!r}: ...{text[text.index(needle) - 300:text.index(needle) + 700]}")
    # One scorer process at a time, so in scoring order the served version never goes back.
    in_order = [r.model_version for r in sorted(rewards, key=lambda r: r.scored_at)]
    if in_order != sorted(in_order):
        problems.append(f"a reward came from an older version than one before it: {in_order}")

    dup_rewards = len(rewards) - len(rewarded)
    # At-least-once rewards: a repeat names its version, so a consumer deduping by id loses nothing.
    per_id = Counter(r.id for r in rewards if r.id in ids)
    row = SummaryRow(scenario, faults=sum(kills.values()), sent=len(stream), rewards=len(rewarded & ids),
                     rewarded_twice=sum(1 for n in per_id.values() if n > 1),
                     dead_letters=len(dead), lost=len(lost), judged_twice=sum(n - 1 - lost_in_flight[p] for p, n in judged_twice.items()),
                     trained_twice=sum(n - 1 for n in trained_twice.values()))
    row.notes.append(f"seed {seed}; kills by role {dict(kills)}; {len(found)} versions; judge calls {sum(calls.values())} "
                     f"for {len(ids)} trajectories ({sum(lost_in_flight.values())} repeated after the judge died "
                     f"waiting for the answer); {dup_rewards} duplicate rewards from re-scoring after scorer kills")
    return CrashReport(row, kills, problems)
