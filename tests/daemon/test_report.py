"""`actprm report`: the figures on a hand-made state dir (hand-worked numbers), a young and a
torn one, the page in real headless Chromium, and the report of a real short daemon run.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from actprm.daemon.report.figures import by_field, by_kind, online_by_version, refused_updates, round_rows, version_rows

from actprm.daemon.report.page import build_report, write_report

from actprm.daemon.report.read import ReportError, read_state
from support.browser import CHROMIUM, visit
from support.daemon import ACTPRM

SECTIONS = ["Summary", "Versions", "Rounds and budget", "Calibration against the judge", "Where the uncertainty went",
            "What the judge said"]


def _jsonl(path: Path, rows: list, tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def _manifest(root: Path, version: int, **fields) -> None:
    d = root / "checkpoints" / f"v{version:06d}"
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"version": version, "created": 1000.0 + version, **fields}))


def _label(i: int, version: int, first_error: int, predicted: int | None, mu: list, round_id: int, **metadata) -> dict:
    return {"id": f"L{i}", "at": 1000.0 + 10 * i, "judged_at": 999.0 + 10 * i, "round_id": round_id, "version": version,
            "first_error": first_error, "predicted_first_error": predicted, "mu": mu, "n_steps": max(len(mu), 1),
            "metadata": metadata}


@pytest.fixture
def state(tmp_path) -> Path:
    root = tmp_path / "state"
    _manifest(root, 0, kind="init", parent=None, consumed_label_ids=[])
    _manifest(root, 1, kind="update", parent=0, consumed_label_ids=["L1", "L2", "L3", "L4"],
              metrics={"loss": 0.5, "labels_new": 4, "labels_replayed": 12, "steps": 2, "canary_f1": 0.5})
    _manifest(root, 2, kind="rollback", parent=1, rolled_back_from=0, metrics={})
    learning = root / "learning"
    _jsonl(learning / "labels.jsonl", [
        # Version 0: right on a correct one, wrong on a correct one, right on an error, wrong on an error.
        _label(1, 0, -1, -1, [0.9, 0.8], 0, kind="correct", policy_step=1),
        _label(2, 0, -1, 1, [0.9, 0.3], 0, kind="correct", policy_step=1),
        _label(3, 0, 2, 2, [0.9, 0.8, 0.2, 0.1], 0, kind="misread", policy_step=2),
        _label(4, 0, 1, -1, [0.7, 0.6], 0, kind="carry_over", policy_step=2),
        # Version 1: no predicted_first_error written, so it comes from mu (0.2 < 0.5 at step 0).
        _label(5, 1, 0, None, [0.2, 0.9], 1, kind="misread", policy_step=3),
        _label(6, 1, -1, -1, [0.95], 1),
    ], tail='{"id": "L7", "at": 10')  # a crash tore the last line
    _jsonl(learning / "scoring.jsonl", [
        {"at": 1000.0, "version": 0, "round_id": 0, "scored": 10, "selected": 3, "by_kind": {"correct": [6, 1], "misread": [4, 2]}},
        {"at": 1100.0, "version": 1, "round_id": 1, "scored": 10, "selected": 5, "by_kind": {"misread": [10, 5]}},
    ])
    _jsonl(learning / "updates.jsonl", [
        {"at": 1050.0, "version": 1, "parent": 0, "refused": None, "error": None, "loss": 0.5, "labels_new": 4,
         "labels_replayed": 12, "steps": 2},
        {"at": 1060.0, "version": None, "parent": 1, "refused": "canary F1 fell by 0.2", "error": None, "loss": 0.4,
         "labels_new": 8, "labels_replayed": 0, "steps": 2},
        {"at": 1070.0, "version": None, "parent": 1, "refused": None, "error": "cannot write a checkpoint", "loss": None,
         "labels_new": 8, "labels_replayed": 0, "steps": 0},
    ])
    _jsonl(learning / "heldout.jsonl", [{"at": 1055.0, "version": 1, "f1": 0.75, "acc_error": 0.6, "acc_correct": 1.0,
                                         "labels_trained": 4}])
    _jsonl(learning / "status.jsonl", [
        {"at": 1000.0, "round": 0, "budget_used": 3, "budget_left": 97, "judge_failures": 1, "labels_stale_round": 0,
         "labels_duplicate": 0, "scored": 10, "served_version": 0, "online": {"f1": 0.5}},
        {"at": 1050.0, "round": 0, "budget_used": 4, "budget_left": 96, "judge_failures": 3, "labels_stale_round": 0,
         "labels_duplicate": 1, "scored": 10, "served_version": 1},
        # The process restarted: its counters start from 0 again.
        {"at": 1100.0, "round": 1, "budget_used": 2, "budget_left": 98, "judge_failures": 1, "labels_stale_round": 2,
         "labels_duplicate": 0, "scored": 10, "served_version": 1},
    ])
    return root


def test_reading_skips_the_torn_line_and_keeps_only_counts_of_label_ids(state):
    st = read_state(state)
    assert len(st.journal["labels"]) == 6 and st.skipped["labels"] == 1
    assert [m["version"] for m in st.manifests] == [0, 1, 2]
    assert st.manifests[1]["n_consumed"] == 4 and "consumed_label_ids" not in st.manifests[1]


def test_online_f1_per_version_hand_worked(state):
    labels = read_state(state).journal["labels"]
    online = online_by_version(labels)
    # v0: 1 of 2 error records right, 1 of 2 correct records right -> F1 = 0.5.
    assert (online[0]["acc_error"], online[0]["acc_correct"], online[0]["f1"], online[0]["n"]) == (0.5, 0.5, 0.5, 4)
    assert online[1]["f1"] == 1.0 and online[1]["n"] == 2  # L5 predicted from its mu


def test_version_rows_hand_worked(state):
    st = read_state(state)
    j = st.journal
    rows = {r["version"]: r for r in version_rows(st.manifests, j["labels"], j["updates"], j["heldout"])}
    assert rows[1]["loss"] == 0.5 and rows[1]["labels_new"] == 4 and rows[1]["labels_replayed"] == 12
    assert rows[1]["heldout_f1"] == 0.75 and rows[1]["canary_f1"] == 0.5
    assert rows[1]["delta_f1"] == pytest.approx(0.5) and not rows[1]["worse"]
    assert rows[2]["kind"] == "rollback" and rows[2]["rolled_back_from"] == 0 and rows[2]["online_f1"] is None
    assert rows[0]["labels_new"] == 0 and rows[0]["delta_f1"] is None
    refused = refused_updates(j["updates"])
    assert [(u["refused"], u["error"]) for u in refused] == [("canary F1 fell by 0.2", None), (None, "cannot write a checkpoint")]


def test_round_rows_hand_worked(state):
    j = read_state(state).journal
    r0, r1 = round_rows(j["status"], j["scoring"], j["labels"])
    assert (r0["round"], r0["scored"], r0["selected"], r0["share"]) == (0, 10, 3, 0.3)
    assert (r0["budget_used"], r0["budget_left"], r0["labels"]) == (4, 96, 4)
    assert r0["judge_failures"] == 1 + 2 and r0["labels_dropped"] == 1  # one duplicate
    assert (r0["from"], r0["to"]) == (1000.0, 1050.0)
    assert r0["budget_per_hour"] == pytest.approx(4 / (50 / 3600))
    # After the restart the counter is 1 again: 1 new failure, not -2; 2 stale labels dropped.
    assert (r1["round"], r1["share"], r1["judge_failures"], r1["labels_dropped"], r1["labels"]) == (1, 0.5, 1, 2, 2)


def test_where_the_uncertainty_went_hand_worked(state):
    j = read_state(state).journal
    kinds = by_kind(j["scoring"])
    assert [(k["kind"], k["scored"], k["selected"]) for k in kinds] == [("misread", 14, 7), ("correct", 6, 1)]
    assert kinds[0]["share"] == 0.5 and kinds[0]["of_selected"] == 7 / 8
    steps = by_field(j["labels"], "policy_step")
    assert [(s["value"], s["labels"], s["error_share"], s["agreement"]) for s in steps] == [
        ("1", 2, 0.0, 0.5), ("2", 2, 1.0, 0.5), ("3", 1, 1.0, 1.0)]
    assert by_field(j["labels"], "no_such_field") == []
    # A numeric field with more values than groups is cut into equal ranges.
    many = [{"metadata": {"step": i}, "first_error": -1, "predicted_first_error": -1} for i in range(100)]
    groups = by_field(many, "step", max_groups=4)
    assert [g["labels"] for g in groups] == [25, 25, 25, 25] and groups[0]["value"] == "0 .. 24.75"


def test_page_has_every_section_and_names_what_is_missing(state, tmp_path):
    page = build_report(state)
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page
    assert page.count("data:image/png;base64,") == 4
    assert "1 lines skipped" in page and "canary F1 fell by 0.2" in page and "v2 (weights of v0)" in page
    assert "http://" not in page and "https://" not in page  # nothing to fetch

    young = tmp_path / "young"
    young.mkdir()
    page = build_report(young)
    for name in ("labels", "scoring", "updates", "heldout", "status"):
        assert f"missing: learning/{name}.jsonl" in page
    assert "no checkpoint manifests yet" in page
    with pytest.raises(ReportError, match="no state directory"):
        build_report(tmp_path / "nowhere")


def test_cli_writes_the_page_and_refuses_a_missing_dir_in_one_line(state, tmp_path):
    env = {**os.environ, "ACTPRM_STATE_DIR": str(state)}
    out = tmp_path / "r.html"
    done = subprocess.run([ACTPRM, "report", "--out", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out) and "<h2>Calibration against the judge</h2>" in out.read_text()
    bad = subprocess.run([ACTPRM, "report", "--state-dir", str(tmp_path / "nowhere")], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [f"error: no state directory at {tmp_path / 'nowhere'}"]


# --- in a real browser -----------------------------------------------------------------------

RENDERED = """JSON.stringify({
  sections: [...document.querySelectorAll("section")].map(s => [s.id, s.querySelector("h2").textContent]),
  images: [...document.images].map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]),
  tables: document.querySelectorAll("table").length,
  height: document.documentElement.scrollHeight})"""

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install chromium; .ci/run installs it)")


def _render(page: Path, screenshot: Path) -> dict:
    seen = visit(page, RENDERED, screenshot)
    assert seen["errors"] == [], seen["errors"]
    assert screenshot.stat().st_size > 10_000 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads(seen["value"])


@needs_chromium
def test_page_renders_in_headless_chromium(state, tmp_path):
    page = write_report(tmp_path / "report.html", state)
    got = _render(page, tmp_path / "report.png")
    assert [title for _, title in got["sections"]] == SECTIONS
    assert len(got["images"]) == 4
    assert all(complete and w > 300 and h > 100 for _, complete, w, h in got["images"]), got["images"]


@pytest.mark.broker
@pytest.mark.slow
@needs_chromium
def test_report_of_a_real_daemon_run_renders(broker, topic_prefix, tmp_path):
    from actprm.streams.tools.produce import produce_trajectories, synthetic_trajectories
    from support.daemon import Daemon

    # 40 synthetic trajectories on the tiny backbone, an update per 8 labels (TINY_ENV), and a
    # held-out set of 8 so every journal file is written.
    state = tmp_path / "state"
    daemon = Daemon(broker.bootstrap, topic_prefix, state, "--max-trajectories", "40", "--heldout", "8").start()
    try:
        produce_trajectories(broker.bootstrap, topic_prefix, synthetic_trajectories(40, seed=16))
        assert daemon.wait(300) == 0, daemon.stderr()[-3000:]
    finally:
        daemon.kill()
    learning = state / "learning"
    labels = [json.loads(line) for line in (learning / "labels.jsonl").read_text().splitlines()]
    assert labels and all(isinstance(lb["mu"], list) for lb in labels)

    page = write_report(tmp_path / "report.html", state)
    text = page.read_text()
    got = _render(page, tmp_path / "daemon-report.png")
    assert [title for _, title in got["sections"]] == SECTIONS
    images = {alt for alt, complete, w, _ in got["images"] if complete and w > 300}
    assert {"F1 and loss per version", "reliability diagram and ECE over time"} <= images, got["images"]
    assert "missing: learning/" not in text, [line for line in text.split("<p") if "missing:" in line]
    st = read_state(state)
    rows = version_rows(st.manifests, *(st.journal[n] for n in ("labels", "updates", "heldout")))
    assert any(r["heldout_f1"] is not None for r in rows) and rows[0]["online_n"] == len(
        [lb for lb in labels if lb["version"] == 0])
    versions = len(list((state / "checkpoints").glob("v*/manifest.json")))
    assert versions >= 2 and f"{versions} versions" in text
