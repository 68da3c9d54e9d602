"""The long fault suite (`make test-faults`): at least 20 SIGKILLs of scorer, judge and trainer
at random moments, with the invariants checked after every run, and the summary table printed
at the end and written to /tmp/actprm-faults-summary.txt."""

from __future__ import annotations

import os
import random

import pytest

from helpers_faults import SUMMARY_FILE, format_summary, run_crash_trials

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.slow]

ROWS: list = []


@pytest.fixture(scope="module", autouse=True)
def summary_table(request):
    yield
    if not ROWS:
        return
    text = format_summary(ROWS)
    SUMMARY_FILE.write_text(text + "\n")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("\nfault suite summary (also in %s):\n%s" % (SUMMARY_FILE, text))


@pytest.mark.parametrize("run", range(2))
def test_random_sigkills_lose_nothing_and_repeat_nothing(broker, topic_prefix, tmp_path, run):
    """12 random kills per run, two runs: >= 20 crash trials in all."""
    seed = int(os.environ.get("ACTPRM_FAULT_SEED", random.randrange(1 << 16))) + run
    report = run_crash_trials(broker.bootstrap, topic_prefix, tmp_path, n_traj=64, n_kills=12, seed=seed,
                              kill_after_s=(0.5, 6.0), scenario=f"crash run {run + 1}")
    ROWS.append(report.row)
    assert not report.problems, "\n".join(report.problems)
