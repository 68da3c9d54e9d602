"""The label-efficiency simulation on the tiny backbone: selection, budget, baselines, CLI."""

from __future__ import annotations

import json
import statistics
from types import SimpleNamespace

import pytest
import typer
from typer.testing import CliRunner

from actprm.daemon.cli.simulate import simulate
from actprm.model.backbone import load_backbone
from actprm.model.training.consolidate import ConsolidateConfig
from actprm.model.features import FeatureCache
from actprm.model.prm import EnsemblePRM, PRMConfig
from actprm.model.lab.simulate import (
    HeadsEngine,
    SimConfig,
    TextEngine,
    fit_position_model,
    format_table,
    headline,
    position_scores,
    replay,
    run_simulation,
    split_validation,
    summarise_runs,
    uncertainty_priority,
)
from actprm.model.data.synthetic import hard_minority_pool, marker_trajectories
from actprm.model.training.trainer import FitConfig, TrainerConfig
from tests.support.model import torch_one_thread  # noqa: F401 - autouse fixture

# Small and fast: 4 heads of width 32, a high learning rate, several passes over the pool. Not
# higher than 1e-2 on standardised inputs: at 3e-2 a run turned chaotic (a 1e-6 difference in
# the hidden states, cache against text, moved test F1 from 1.0 to 0.67).
# One step per stream batch on that batch's labels (the published loop): these tests are about
# selection and budgets, and on this toy pool the daemon's many replayed steps per update make
# the 4 heads agree everywhere, the never-seen hard markers included, so there is no
# disagreement left for a selector to find (measured: hard share 0.18 instead of > 0.45).
FAST = dict(prm=PRMConfig(n_heads=4, head_width=32), trainer=TrainerConfig(lr=1e-2, warmup_steps=2),
            delta_pred=0.9, delta_std=0.01, batch_size=16, update_batch=1,
            fit=FitConfig(steps=1, mini_batch=64, replay_share=0.0, replay_size=0), consolidate=None)


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


def _engine(tiny, tmp_path, pool, test, config):
    cache = FeatureCache(EnsemblePRM(tiny, PRMConfig(n_heads=1)), tmp_path / "features")
    return HeadsEngine(tiny, cache, pool, test, config)


def test_uncertainty_selection_finds_the_hard_minority(tiny, tmp_path):
    # A quarter of the pool is "hard" (markers the easy majority says nothing about). Once the
    # heads know the easy records they are confident there, so ActPRM spends its budget on the
    # hard ones; random selection at the same budget labels them at their pool share.
    pool = hard_minority_pool(160, seed=0, hard_share=0.25)
    test = hard_minority_pool(40, seed=1, hard_share=0.5)
    # The published thresholds: at FAST's 0.9 / 0.01 the heads grow sure of the whole pool and
    # stop asking before the budget is spent (measured: 55 and 45 of 57 labels).
    config = SimConfig(strategies=("actprm", "random"), budgets=(0.4,), seeds=2, epochs=8,
                       **(FAST | {"delta_pred": 0.95, "delta_std": 0.005}))
    result = run_simulation(_engine(tiny, tmp_path, pool, test, config), pool, test, config)
    hard_share = {}
    for r in result["runs"]:
        budget = int(0.4 * result["n_stream"])
        # equal budgets, spent (ActPRM's heads may grow sure of the last few records and stop asking)
        assert budget - 2 <= r["labels_used"] <= budget and (r["strategy"] == "actprm" or r["labels_used"] == budget)
        hard_share.setdefault(r["strategy"], []).append(r["labelled_kinds"].get("hard", 0) / r["labels_used"])
    actprm, random_ = (sum(v) / len(v) for v in (hard_share["actprm"], hard_share["random"]))
    assert random_ < 0.35  # about the pool share, 0.25
    assert actprm > 0.45 and actprm > 1.5 * random_
    # Every run also carries the position-only baseline and a threshold chosen on validation.
    assert all(r["position_f1"] is not None and 0.05 <= r["threshold"] <= 0.95 for r in result["runs"])


def test_budget_is_a_paced_cap_and_validation_is_never_labelled(tiny, tmp_path):
    pool = marker_trajectories(60, seed=2)
    config = SimConfig(seeds=1, **FAST)
    engine = _engine(tiny, tmp_path, pool, pool[:4], config)
    stream, val = split_validation(pool, 0.1, seed=0)
    assert not set(stream) & set(val) and len(stream) + len(val) == len(pool)
    assert {pool[i].label == -1 for i in val} == {True, False}  # stratified: both groups
    for strategy in ("actprm", "random", "full"):
        for budget in (0.2, 1.0):
            engine.new_run(0)
            done = replay(engine, pool, stream, strategy, budget, 0, config)
            assert len(done["labelled"]) <= int(budget * len(stream))
            assert len(set(done["labelled"])) == len(done["labelled"]) and not set(done["labelled"]) & set(val)
            if strategy == "full":
                assert len(done["labelled"]) == int(budget * len(stream))


def test_cached_features_and_text_give_the_same_run(tiny, tmp_path):
    # heads mode on the cache and the text path (prm.score + Trainer.update) are one code path
    # apart only in where the hidden states come from: same labels chosen, same F1.
    pool, test = marker_trajectories(40, seed=3), marker_trajectories(12, seed=4)
    config = SimConfig(strategies=("actprm",), budgets=(0.5,), seeds=1, **FAST)
    cached = run_simulation(_engine(tiny, tmp_path, pool, test, config), pool, test, config)
    text = run_simulation(TextEngine(lambda: tiny, pool, test, config, "heads"), pool, test, config)
    a, b = cached["runs"][0], text["runs"][0]
    assert a["labels_used"] == b["labels_used"] and a["flagged_share"] == b["flagged_share"]
    assert a["f1"] == pytest.approx(b["f1"], abs=1e-6) and a["position_f1"] == pytest.approx(b["position_f1"])


def test_least_confidence_priority_hand_worked():
    s = lambda mu, sigma: SimpleNamespace(mu=mu, sigma=sigma)  # noqa: E731
    sure = s([0.99, 0.98, 0.02], [0.0, 0.0, 0.0])
    unsure = s([0.99, 0.6, 0.2], [0.0, 0.01, 0.3])  # window ends at step 2 (first mu < 0.5)
    late = s([0.99, 0.97, 0.1, 0.5], [0.0, 0.0, 0.0, 0.4])  # step 3 is past E(s): ignored
    key = lambda x: uncertainty_priority(x, "least-confidence")  # noqa: E731
    assert key(unsure) == (0.6, -0.3)
    assert key(late) == (0.9, -0.0)
    assert sorted([sure, late, unsure], key=key) == [unsure, late, sure]


def test_mutual_information_priority_puts_disagreement_about_the_label_first():
    def s(*heads):
        probs = [list(h) for h in heads]
        mu = [sum(col) / len(col) for col in zip(*probs)]
        sigma = [statistics.stdev(col) for col in zip(*probs)]
        return SimpleNamespace(mu=mu, sigma=sigma, probs=probs)

    ambiguous = s([0.55, 0.55], [0.6, 0.55])  # the least confident (0.575), the heads nearly agree
    split = s([0.99, 0.2], [0.99, 0.99])  # surer (0.595), but of different first errors
    sure = s([0.99, 0.98], [0.99, 0.98])
    assert sorted([sure, ambiguous, split], key=uncertainty_priority) == [split, ambiguous, sure]
    assert sorted([sure, ambiguous, split], key=lambda x: uncertainty_priority(x, "least-confidence"))[0] is ambiguous
    with pytest.raises(ValueError, match="unknown rank"):
        SimConfig(rank="entropy").check()


def test_position_baseline_learns_that_late_steps_fail():
    # Every trajectory has 4 steps and its first error at step 2: p(correct) must fall with the index.
    w = fit_position_model([(4, 4, 2)] * 20 + [(4, 4, -1)] * 5)
    p = position_scores(w, 4, 4)
    assert len(p) == 4 and p[0] > p[1] > p[2]
    assert fit_position_model([]).abs().sum() == 0  # nothing labelled: a constant 0.5 model


def test_consolidated_column_trains_on_exactly_the_admitted_labels(tiny, tmp_path):
    # Each run also consolidates a PRM on the labels it admitted (as the daemon's trainer does,
    # early stopping on a sample of the stream: the pool's validation split) and tests it like
    # the online one.
    pool, test = marker_trajectories(64, seed=6), marker_trajectories(24, seed=7)
    config = SimConfig(strategies=("actprm", "random", "full"), budgets=(0.5,), seeds=1,
                       **(FAST | {"consolidate": ConsolidateConfig(epochs=60, patience=15, lr=1e-2, mini_batch=8)}))
    result = run_simulation(_engine(tiny, tmp_path, pool, test, config), pool, test, config)
    n_val = len(split_validation(pool, config.val_fraction, 0)[1])
    for r in result["runs"]:
        assert r["consolidated_train_labels"] == r["labels_used"] and r["consolidated_val_labels"] == n_val
        assert 1 <= r["consolidated_epochs"] <= 60 and r["consolidated_f1"] is not None
        assert 0 <= r["consolidated_test_flagged_share"] <= 1 and 0 <= r["test_flagged_share"] <= 1
    full = next(r for r in result["runs"] if r["strategy"] == "full")
    # 60 epochs on the labels learn the markers
    assert full["consolidated_f1"] >= 0.8, full
    assert result["headline"]["consolidated"]["full_f1"] == full["consolidated_f1"]
    table = format_table(result)
    assert "cons F1" in table and "consolidated: full-data F1" in table

    # val_sample "selected": the slice comes out of the admitted labels (by id hash) instead.
    config.consolidate = ConsolidateConfig(epochs=5, lr=1e-2, mini_batch=8, val_sample="selected")
    config.strategies = ("random",)
    for r in run_simulation(_engine(tiny, tmp_path, pool, test, config), pool, test, config)["runs"]:
        assert r["consolidated_train_labels"] + r["consolidated_val_labels"] == r["labels_used"]
        assert 0 < r["consolidated_val_labels"] < r["labels_used"]

    # average_epochs: the daemon's periodic recipe, every epoch run and the second half averaged
    config.consolidate = ConsolidateConfig(average_epochs=6, lr=1e-2, mini_batch=8)
    for r in run_simulation(_engine(tiny, tmp_path, pool, test, config), pool, test, config)["runs"]:
        assert (r["consolidated_epochs"], r["consolidated_stopped"]) == (6, "epochs")
        assert r["consolidated_train_labels"] == r["labels_used"] and r["consolidated_f1"] is not None


def test_headline_hand_worked():
    runs = []
    for seed, (full, a2, r2, a5, r5) in enumerate([(0.5, 0.40, 0.35, 0.50, 0.45), (0.6, 0.44, 0.41, 0.58, 0.50)]):
        runs += [dict(strategy="full", budget=1.0, seed=seed, f1=full, labels_used=100, label_share=1.0, position_f1=0.3),
                 dict(strategy="actprm", budget=0.2, seed=seed, f1=a2, labels_used=20, label_share=0.2, position_f1=0.3),
                 dict(strategy="random", budget=0.2, seed=seed, f1=r2, labels_used=20, label_share=0.2, position_f1=0.3),
                 dict(strategy="actprm", budget=0.5, seed=seed, f1=a5, labels_used=50, label_share=0.5, position_f1=0.3),
                 dict(strategy="random", budget=0.5, seed=seed, f1=r5, labels_used=50, label_share=0.5, position_f1=0.3)]
    summary = summarise_runs(runs)
    h = headline(runs, summary, tolerance=0.01)
    assert h["full_f1"] == pytest.approx(0.55)
    # actprm means: 0.42 at 0.2 (short of 0.54), 0.54 at 0.5 (reaches within 0.01)
    assert h["actprm_reaches_full_at"]["budget"] == 0.5
    assert h["actprm_minus_random"]["0.2"]["mean"] == pytest.approx(0.04)
    assert h["actprm_minus_random"]["0.5"]["mean"] == pytest.approx(0.065)
    assert "ActPRM - random at budget 0.5: +0.065" in format_table({"summary": summary, "headline": h})


def _cli():
    app = typer.Typer()
    app.command()(simulate)
    return app


def _write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_cli_writes_results_and_curve_and_reports_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTPRM_CACHE", str(tmp_path / "cache"))
    rows = [{"id": r.id, "problem": r.problem, "steps": r.steps, "label": r.label} for r in marker_trajectories(40, seed=5)]
    bad = [{"id": "no-steps", "problem": "p", "steps": [], "label": -1},
           {"id": "out-of-range", "problem": "p", "steps": ["a", "b"], "label": 5}]
    _write(tmp_path / "pool.jsonl", rows[:30] + bad)
    _write(tmp_path / "test.jsonl", rows[30:])
    out = tmp_path / "out"
    args = ["--pool", str(tmp_path / "pool.jsonl"), "--test", str(tmp_path / "test.jsonl"), "--out", str(out),
            "--backbone", "tiny", "--strategies", "actprm,random,full", "--budgets", "0.5,1.0", "--seeds", "2",
            "--heads", "4", "--batch-size", "8"]
    got = CliRunner().invoke(_cli(), args)
    assert got.exit_code == 0, got.output
    assert "skipped 2 unusable records" in got.output and "out of range" in got.output
    assert "full-data F1" in got.output and "ActPRM - random at budget 0.5" in got.output
    result = json.loads((out / "results.json").read_text())
    # actprm and random at both budgets, full once at 1.0 (its reference), each for 2 seeds
    assert result["pool_skipped"] == 2 and len(result["runs"]) == (2 * 2 + 1) * 2
    assert {(r["strategy"], r["budget"]) for r in result["runs"] if r["strategy"] == "full"} == {("full", 1.0)}
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    first = result["feature_cache"]
    assert first["misses"] > 0 and first["hits"] + first["misses"] == 40  # toy texts repeat across files
    # A second run reads every feature from the cache.
    assert CliRunner().invoke(_cli(), args + ["--strategies", "random", "--budgets", "1.0", "--seeds", "1"]).exit_code == 0
    assert json.loads((out / "results.json").read_text())["feature_cache"] == {"hits": 40, "misses": 0}


def test_cli_rejects_bad_settings(tmp_path):
    rows = [{"id": f"r{i}", "problem": "p", "steps": ["a"], "label": -1} for i in range(4)]
    _write(tmp_path / "all-correct.jsonl", rows)
    base = ["--pool", str(tmp_path / "all-correct.jsonl"), "--test", str(tmp_path / "all-correct.jsonl"),
            "--out", str(tmp_path / "o"), "--backbone", "tiny"]
    for extra, message in ((["--strategies", "bogus"], "unknown strategy"), (["--budgets", "0,1"], "budget"),
                           (["--mode", "nope"], "--mode"), ([], "both with and without an error")):
        got = CliRunner().invoke(_cli(), base + extra)
        assert isinstance(got.exception, ValueError) and message in str(got.exception), (extra, got.exception)
