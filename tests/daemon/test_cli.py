"""The console script as users meet it: one-line errors for bad files, flags and settings;
`eval --json` keys; `produce` and `tail` against a real broker; `config show` masks secrets.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from support.daemon import ACTPRM


def actprm(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([ACTPRM, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) >= 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_lists_every_command():
    out = actprm("--help").stdout
    for command in ("run", "eval", "simulate", "produce", "tail", "bench", "config", "ctl"):
        assert command in out


def test_bad_inputs_are_one_line_errors(tmp_path):
    _one_line_error(actprm("eval", "--data", str(tmp_path / "missing.json"), "--backbone", "tiny"), "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    _one_line_error(actprm("eval", "--data", str(broken), "--backbone", "tiny"), "broken.json")
    _one_line_error(actprm("eval", "--data", str(broken), "--backbone", str(tmp_path / "no-model")), "no-model")
    _one_line_error(actprm("run", "--role", "painter"), "painter")
    _one_line_error(actprm("run", "--max-trajectories", "-3"), "--max-trajectories")  # not a run of 0 that "succeeds"
    _one_line_error(actprm("config", "show", env={"ACTPRM_SELECTION__DELTA_PRED": "2.0"}), "delta_pred")
    _one_line_error(actprm("bench", "model", "--heads", "0,x"), "0,x")
    _one_line_error(actprm("bench", "train", "--mini-batch", "0"), "--mini-batch")


def test_eval_json_on_a_hand_made_file(tmp_path):
    data = [
        {"id": "a", "problem": "1+1?", "steps": ["1+1=2", "The answer is 2."], "label": -1},
        {"id": "b", "problem": "2+2?", "steps": ["2+2=5", "The answer is 5."], "label": 0},
    ]
    path = tmp_path / "pb.json"
    path.write_text(json.dumps(data))
    proc = actprm("eval", "--data", str(path), "--backbone", "tiny", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["n"] == 2 and 0.0 <= out["f1"] <= 1.0 and {"acc_error", "acc_correct"} <= set(out)


def test_config_show_masks_secrets():
    proc = actprm("config", "show", env={"ACTPRM_CONTROL_SECRET": "hunter2", "ACTPRM_KAFKA__SASL_PASSWORD": "pw-123"})
    assert proc.returncode == 0, proc.stderr
    assert "hunter2" not in proc.stdout and "pw-123" not in proc.stdout
    assert json.loads(proc.stdout)["selection"]["delta_pred"] == 0.95


@pytest.mark.broker
def test_produce_then_tail(broker, topic_prefix, tmp_path):
    rows = [{"id": f"r{i}", "problem": f"{i}+1?", "steps": [f"{i}+1={i + 1}", "done"], "label": -1} for i in range(5)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n" + '{"id": "bad", "problem": "x", "steps": []}\n')
    env = {"ACTPRM_KAFKA__BOOTSTRAP": broker.bootstrap, "ACTPRM_KAFKA__TOPIC_PREFIX": topic_prefix}
    produced = actprm("produce", str(path), env=env)
    assert produced.returncode == 0, produced.stderr
    assert json.loads(produced.stdout.strip().splitlines()[-1]) == {"produced": 5, "skipped": 1}
    assert "bad" in produced.stderr  # the skipped record is named, never dropped silently
    tailed = actprm("tail", "trajectories", "--limit", "5", env=env, timeout=60)
    assert tailed.returncode == 0, tailed.stderr
    got = [json.loads(line) for line in tailed.stdout.splitlines() if line.strip()]
    assert sorted(m["id"] for m in got) == [f"r{i}" for i in range(5)]
    assert all(m["gold_first_error"] == -1 for m in got)
