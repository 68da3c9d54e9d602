"""Bad updates and an unwritable checkpoint directory, through a running daemon.

- A label batch that makes the step logits NaN (the in-daemon fault hook) is refused by the
  trainer: no version is written, rewards keep coming from the served version, and the
  refusal shows in `ctl status --json`, in /metrics and in the final status.
- An update that wrecks the heads is caught by the canary (held-back labels) and refused.
- A checkpoint directory that cannot be written (its lock path made a directory: we run as
  root, so chmod would not stop a write) makes the update fail loudly while serving goes on;
  once the fault is gone the labels that waited are trained, none lost.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.error
import urllib.request

import pytest

from actprm.streams.tools.produce import synthetic_trajectories
from actprm.streams.tools.produce import produce_trajectories
from actprm.client.topics import Topics
from support.daemon import ACTPRM, Daemon, consumed_ids, read_topic
from support.wait import wait_until
from support.network import free_port
from support.trainer_faults import fault_hook_env

pytestmark = [pytest.mark.broker, pytest.mark.slow]

NAN, POISON = "[nan-batch]", "[poison-batch]"


def _wave(tag: str, n: int, seed: int, marker: str = ""):
    return [t.model_copy(update={"id": f"{tag}-{i}", "problem": f"{marker}({tag} {i}) {t.problem}"})
            for i, t in enumerate(synthetic_trajectories(n, seed=seed))]


def _ctl(bootstrap: str, prefix: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACTPRM_KAFKA__BOOTSTRAP": bootstrap, "ACTPRM_KAFKA__TOPIC_PREFIX": prefix}
    env.pop("ACTPRM_CONTROL_SECRET", None)
    return subprocess.run([ACTPRM, "ctl", *args, "--timeout", "20"], env=env, capture_output=True, text=True, timeout=120)


def _metric(port: int, name: str) -> float:
    """A counter or gauge from /metrics; -1 while the page is not up."""
    try:
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except (urllib.error.URLError, OSError):
        return -1
    m = re.search(rf"^{name}(?:_total)? ([-+0-9.e]+)$", page, re.M)
    return float(m.group(1)) if m else 0.0


def _rewards(bootstrap: str, topics: Topics, ids: set[str]) -> list:
    return [r for r in read_topic(bootstrap, topics.rewards, until=lambda got: ids <= {r.id for r in got}, timeout_s=120)
            if r.id in ids]


def test_nan_update_is_refused_and_an_unwritable_checkpoint_dir_fails_loudly_then_loses_nothing(broker, topic_prefix, tmp_path):
    topics, bs = Topics(topic_prefix), broker.bootstrap
    port = free_port()
    env = {"ACTPRM_SELECTION__STRATEGY": "full", "ACTPRM_METRICS__PORT": str(port), **fault_hook_env(tmp_path, nan=NAN)}
    daemon = Daemon(bs, topic_prefix, tmp_path / "d", env=env).start()
    store = daemon.store
    try:
        first = _wave("clean", 8, 1)
        produce_trajectories(bs, topic_prefix, first)
        wait_until(lambda: (store.latest() or 0) >= 1, 180, interval=0.5, what="the first update")
        served = store.latest()

        # (a) A NaN batch: refused, no version written, visible in ctl status and /metrics.
        produce_trajectories(bs, topic_prefix, _wave("nan", 8, 2, NAN))
        wait_until(lambda: _metric(port, "actprm_updates_rejected") >= 1, 120, interval=0.5, what="the refusal")
        assert store.latest() == served, "a refused update wrote a version"
        status = _ctl(bs, topic_prefix, "status", "--json")
        assert status.returncode == 0, status.stderr
        state = json.loads(status.stdout)["processes"][0]["state"]
        assert state["updates_rejected"] >= 1 and "non-finite" in state["last_error"], state
        assert state["served_version"] == served
        after = _wave("after-nan", 4, 3, NAN)  # scored after the refusal (and refused in turn)
        produce_trajectories(bs, topic_prefix, after)
        assert {r.model_version for r in _rewards(bs, topics, {t.id for t in after})} == {served}

        # (b) The checkpoint directory cannot be written: the update fails, serving goes on.
        lock = store.root / ".lock"
        lock.unlink(missing_ok=True)
        lock.mkdir()  # the writer opens it as a file: IsADirectoryError, also for root
        failures0 = _metric(port, "actprm_update_failures")
        stuck = _wave("stuck", 8, 4)
        produce_trajectories(bs, topic_prefix, stuck)
        wait_until(lambda: _metric(port, "actprm_update_failures") > failures0, 120, interval=0.5, what="a failed update")
        assert "update failed; serving continues" in daemon.stderr()
        during = _wave("during", 4, 5)
        produce_trajectories(bs, topic_prefix, during)
        assert {r.model_version for r in _rewards(bs, topics, {t.id for t in during})} == {served}
        state = json.loads(_ctl(bs, topic_prefix, "status", "--json").stdout)["processes"][0]["state"]
        assert "cannot write a checkpoint" in state["last_error"] and state["update_failures"] >= 1, state
        assert state["pending_labels"] >= len(stuck), "labels of the failed update must wait, not vanish"
        assert store.latest() == served

        # The fault is removed: what waited is trained, nothing lost.
        lock.rmdir()
        want = {t.id for t in stuck + during}
        wait_until(lambda: want <= set(consumed_ids(store)), 120, interval=0.5, what="the waiting labels trained")
        assert daemon.terminate(60) == 0, daemon.stderr()[-3000:]
    finally:
        daemon.kill()
    final = daemon.final_status()
    assert final["updates_rejected"] >= 1 and final["update_failures"] >= 1, final
    assert max(consumed_ids(store).values()) == 1
    failed_lines = daemon.stderr().count("update failed; serving continues")
    print(f"update failures while the directory was unwritable: {final['update_failures']} ({failed_lines} log lines)")


@pytest.mark.faults  # ~2 minutes: the fit is 300 gradient steps on CPU
def test_an_update_that_wrecks_the_heads_is_refused_by_the_canary(broker, topic_prefix, tmp_path):
    """Made deterministic: version 0 of the tiny model scores every step "correct", so no canary
    can lose F1 against it. So the canary (2 correct, 2 wrong trajectories, the first 4 labels)
    is followed by the same 4 texts under other ids, on which the hook trains 300 steps: that
    version knows the canary by heart (F1 1; 200 steps already did on this machine) and is
    published. Then the wreck (every step "correct": the 2 wrong ones are missed, F1 0) must be
    refused by the canary, whose tolerance is 0.05."""
    topics, bs = Topics(topic_prefix), broker.bootstrap
    port = free_port()
    pool = synthetic_trajectories(40, seed=6)
    canary = [t for t in pool if t.gold_first_error == -1][:2] + [t for t in pool if t.gold_first_error >= 0][:2]
    env = {"ACTPRM_SELECTION__STRATEGY": "full", "ACTPRM_METRICS__PORT": str(port),
           "ACTPRM_UPDATE__CANARY_SIZE": "4", "ACTPRM_UPDATE__CANARY_TOLERANCE": "0.05",
           "ACTPRM_UPDATE__STEPS": "1", "ACTPRM_UPDATE__REPLAY_SHARE": "0",  # the hook repeats each step 300 times
           **fault_hook_env(tmp_path, poison=POISON, fit="fit-")}
    daemon = Daemon(bs, topic_prefix, tmp_path / "d", env=env).start()
    try:
        produce_trajectories(bs, topic_prefix, canary)
        wait_until(lambda: _metric(port, "actprm_labels_received") >= 4, 120, interval=0.5, what="the canary")
        produce_trajectories(bs, topic_prefix, [t.model_copy(update={"id": f"fit-{t.id}"}) for t in canary])
        wait_until(lambda: (daemon.store.latest() or 0) >= 1, 300, interval=1, what="the fitted version")
        fitted = daemon.store.manifest(1).metrics["canary_f1"]
        assert fitted == 1.0, f"the fit did not learn the canary (F1 {fitted}); raise ACTPRM_FAULT_FIT_STEPS"

        produce_trajectories(bs, topic_prefix, _wave("poison", 8, 7, POISON))
        wait_until(lambda: _metric(port, "actprm_updates_rejected") >= 1, 120, interval=0.5, what="the refusal")
        assert daemon.store.latest() == 1, "the wrecked heads were published"
        assert daemon.terminate(60) == 0, daemon.stderr()[-3000:]
    finally:
        daemon.kill()
    final = daemon.final_status()
    assert final["updates_rejected"] == 1 and final["updates"] == 1, final
    assert "canary F1 fell from 1.000 to 0.000" in final["last_error"], final["last_error"]
    assert final["served_version"] == 1
