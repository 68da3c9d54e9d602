"""The head-count benchmark on the tiny backbone: shape of the report, not the numbers
(timings on a shared 2-core machine are noise at this size)."""

from __future__ import annotations

import json

import pytest

from actprm.model.lab.heads_bench import bench_model, make_trajectory
from actprm.model.build import build_prm


@pytest.mark.slow
def test_bench_tiny_report():
    # Two subprocesses (one per head count), each importing torch + transformers: ~10 s.
    out = bench_model("tiny", heads=(4, 1), batch=2, tokens=64, repeats=1)
    json.dumps(out)  # the report is printed as JSON
    assert {"backbone", "device", "batch", "tokens", "results", "time_ratio", "memory_ratio",
            "goal", "meets_goal"} <= set(out)
    assert out["backbone"] == "tiny" and out["batch"] == 2 and out["tokens"] == 64
    assert [r["heads"] for r in out["results"]] == [1, 4]  # sorted, smallest first
    for r in out["results"]:
        assert r["forward_s"] > 0
        assert r["peak_bytes"] >= r["load_rss_bytes"] > 0
        assert r["peak_over_load_bytes"] == r["peak_bytes"] - r["load_rss_bytes"]
    assert out["time_ratio"] > 0 and out["memory_ratio"] > 0
    assert out["goal"] == {"time_ratio_max": 1.05, "memory_ratio_max": 1.10}
    assert isinstance(out["meets_goal"], bool)
    assert len(out["encoded_tokens"]) == 2


def test_trajectory_length_is_close_to_target():
    prm = build_prm("tiny")
    prompt_only = len(prm.encode(*make_trajectory(prm, 0)).input_ids)  # template + empty steps
    target = prompt_only + 100
    n = len(prm.encode(*make_trajectory(prm, target)).input_ids)
    # Byte-level tokenizer: one filler word is at most ~10 tokens, so the fit is that close.
    assert target - 12 <= n <= target
    problem, steps = make_trajectory(prm, target)
    assert len(steps) == 4


def test_bench_rejects_bad_arguments():
    with pytest.raises(ValueError):
        bench_model("tiny", heads=(0, 1))
    with pytest.raises(ValueError):
        bench_model("tiny", batch=0)


def test_train_bench_report_and_its_labels():
    from actprm.model.lab.train_bench import bench_train, synthetic_labels

    labels = synthetic_labels(12, hidden_size=8)
    assert [len(s.steps) for s in labels[:7]] == [3, 4, 5, 6, 7, 8, 3]  # the built-in stream's spread
    assert all(-1 <= s.first_error < len(s.steps) and s.features.shape == (len(s.steps), 8) for s in labels)
    out = bench_train("tiny", labels=24, mini_batch=4, steps=6, repeats=2, n_heads=4, head_width=8)
    json.dumps(out)
    assert out["backbone"] == "tiny" and out["n_heads"] == 4 and out["mini_batch"] == 4
    assert out["steps_per_s"] == max(out["runs_steps_per_s"]) > 0 and len(out["runs_steps_per_s"]) == 2
    assert out["ms_per_step"] == pytest.approx(1000 / out["steps_per_s"], rel=0.02)
    assert out["labels_per_s"] == pytest.approx(4 * out["steps_per_s"], rel=0.02)
    assert out["validation_s"] > 0
