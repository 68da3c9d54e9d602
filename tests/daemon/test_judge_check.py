"""`actprm judge check` and the daemon's check at start (judge.qualify_n, judge.min_f1), on
small gold files: the gold-label judge scores 1.0; a judge that calls everything correct
(a real HTTP server) scores what it is worth, and the daemon refuses it below min_f1."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from actprm.daemon.cli.main import app
from actprm.daemon.cli.errors import CLIError
from actprm.streams.tools.produce import synthetic_trajectories
from support.faulty_judge import FaultyJudge


@pytest.fixture
def gold_file(tmp_path):
    gold = [{"id": t.id, "problem": t.problem, "steps": t.steps, "label": t.gold_first_error}
            for t in synthetic_trajectories(12, seed=21)]
    assert {g["label"] == -1 for g in gold} == {True, False}
    path = tmp_path / "gold.json"
    path.write_text(json.dumps(gold))
    return path


def test_judge_check_with_the_gold_judge_reports_every_figure(gold_file, monkeypatch):
    monkeypatch.setenv("ACTPRM_JUDGE__KIND", "oracle")
    result = CliRunner().invoke(app, ["judge", "check", "--data", str(gold_file), "--n", "10", "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert (r["n"], r["f1"], r["agreement"], r["parse_rate"]) == (10, 1.0, 1.0, 1.0)
    assert {"latency_p50_s", "latency_p99_s", "acc_error", "acc_correct", "failures"} <= set(r)
    table = CliRunner().invoke(app, ["judge", "check", "--data", str(gold_file)])
    assert table.exit_code == 0 and "ProcessBench F1 as a labeller  1.000" in table.stdout


def test_a_judge_that_finds_no_error_is_measured_and_refused_below_min_f1(gold_file, tmp_path, monkeypatch):
    from actprm.daemon.run import RunOptions, run_daemon
    from actprm.daemon.settings import Settings

    n_error = sum(r["label"] != -1 for r in json.loads(gold_file.read_text()))
    with FaultyJudge(gold={}).start() as server:  # answers \boxed{-1} to every problem it does not know
        judge = {"kind": "openai", "base_url": server.base_url, "model": "m", "max_retries": 0,
                 "qualify_data": str(gold_file), "qualify_n": 12}
        from actprm.daemon.cli.judge import qualify

        measured = qualify(Settings(state_dir=tmp_path, judge=judge))  # no min_f1: measured, warned, not refused
        assert measured["parse_rate"] == 1.0 and measured["f1"] == 0.0 and measured["acc_correct"] == 1.0
        assert measured["agreement"] == pytest.approx(1 - n_error / 12, abs=1e-3)
        with pytest.raises(CLIError, match="below judge.min_f1=0.5"):
            run_daemon(Settings(state_dir=tmp_path, judge=judge | {"min_f1": 0.5}), RunOptions(roles=("judge",)))
        assert sum(server.calls.values()) == 24  # judged before anything else started
