"""`actprm bench report`: build the report of a synthetic week-long run and time it.

The state dir is written here in the journal's format (see daemon/report/page.py): labels with
per-step scores whose calibration drifts, a scoring chunk per 10 labels, an update per 64
labels (a few refused, a rollback), held-out F1 every 10 versions, a status line per 100
labels, all spread over a week.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

KINDS = ("correct", "carry_over", "misread", "sign_flip", "dropped_term")


def write_synthetic_state(root: str | Path, n_labels: int, seed: int = 0, per_update: int = 64) -> Path:
    root = Path(root)
    learn, ckpt = root / "learning", root / "checkpoints"
    learn.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    t0 = 1_700_000_000.0
    dt = 7 * 24 * 3600 / max(n_labels, 1)  # a week
    files = {n: (learn / f"{n}.jsonl").open("w") for n in ("labels", "scoring", "updates", "heldout", "status")}

    def manifest(v: int, parent: int | None, kind: str, at: float, metrics: dict, n_ids: int) -> None:
        d = ckpt / f"v{v:06d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "manifest.json").write_text(json.dumps({
            "version": v, "parent": parent, "kind": kind, "created": at, "mode": "heads", "metrics": metrics,
            "consumed_label_ids": [f"x{v}-{i}" for i in range(n_ids)],
            "rolled_back_from": parent if kind == "rollback" else None, "sha256": ""}))

    try:
        manifest(0, None, "init", t0, {}, 0)
        version, budget_used, round_id = 0, 0, 0
        for i in range(n_labels):
            at = t0 + i * dt
            if i and i % 20_000 == 0:
                round_id, budget_used = round_id + 1, 0
            n = rng.randint(3, 10)
            first = -1 if rng.random() < 0.4 else rng.randrange(n)
            noise = 0.1 + 0.3 * i / max(n_labels, 1)  # calibration drifts over the run
            mu = [min(1.0, max(0.0, (0.25 if k == first else 0.8) + rng.gauss(0, noise))) for k in range(n)]
            pred = next((k for k, m in enumerate(mu) if m < 0.5), -1)
            files["labels"].write(json.dumps({
                "id": f"t{i}", "at": at, "judged_at": at - 1, "round_id": round_id, "version": version,
                "first_error": first, "predicted_first_error": pred, "mu": [round(m, 4) for m in mu], "n_steps": n,
                "metadata": {"kind": "correct" if first == -1 else rng.choice(KINDS[1:]), "policy_step": i // 500}}) + "\n")
            budget_used += 1
            if i % 10 == 0:
                by_kind = {k: [rng.randint(5, 15), 0] for k in KINDS}
                for k in by_kind:
                    by_kind[k][1] = rng.randint(0, by_kind[k][0] // (3 if k != "correct" else 6))
                files["scoring"].write(json.dumps({
                    "at": at, "version": version, "round_id": round_id, "scored": sum(v[0] for v in by_kind.values()),
                    "selected": sum(v[1] for v in by_kind.values()), "by_kind": by_kind}) + "\n")
            if i % 100 == 0:
                files["status"].write(json.dumps({
                    "at": at, "round": round_id, "budget_used": budget_used, "budget_left": 20_000 - budget_used,
                    "scored": 4 * i, "selected": i, "judged": i, "judge_failures": i // 1000,
                    "labels_received": i, "labels_duplicate": i // 5000, "labels_stale_round": 0,
                    "pending_labels": i % per_update, "labels_replayed": 3 * i, "served_version": version,
                    "online": {"f1": 0.6, "window_labels": 500}}) + "\n")
            if (i + 1) % per_update == 0:
                if rng.random() < 0.03:
                    files["updates"].write(json.dumps({
                        "at": at, "version": None, "parent": version, "refused": "loss is not finite", "error": None,
                        "loss": None, "labels_new": per_update, "labels_replayed": 0, "steps": 0}) + "\n")
                    continue
                parent, version = version, version + 1
                kind = "rollback" if rng.random() < 0.005 else "update"
                loss = 0.7 * (1 - 0.5 * i / n_labels) + rng.gauss(0, 0.02)
                manifest(version, parent, kind, at, {"loss": loss, "labels_new": per_update,
                                                     "labels_replayed": 3 * per_update, "steps": 4}, per_update)
                files["updates"].write(json.dumps({
                    "at": at, "version": version, "parent": parent, "refused": None, "error": None, "loss": loss,
                    "labels_new": per_update, "labels_replayed": 3 * per_update, "steps": 4}) + "\n")
                if version % 10 == 0:
                    files["heldout"].write(json.dumps({
                        "at": at, "version": version, "f1": 0.5 + 0.3 * i / n_labels, "acc_error": 0.5,
                        "acc_correct": 0.7, "labels_trained": i + 1}) + "\n")
    finally:
        for f in files.values():
            f.close()
    return root


def bench_report(n_labels: int = 100_000, seed: int = 0) -> dict:
    """Seconds to write the synthetic state dir (not the figure) and to build the report
    (wall and CPU: on a shared machine the CPU time is the steadier figure)."""
    from actprm.daemon.report.page import write_report

    with tempfile.TemporaryDirectory(prefix="actprm-bench-report-") as tmp:
        t = time.perf_counter()
        state = write_synthetic_state(Path(tmp) / "state", n_labels, seed)
        made = time.perf_counter() - t
        t, cpu = time.perf_counter(), time.process_time()
        out = write_report(Path(tmp) / "report.html", state)
        built, built_cpu = time.perf_counter() - t, time.process_time() - cpu
        size = out.stat().st_size
        n_versions = sum(1 for _ in (state / "checkpoints").iterdir())
        journal_mb = sum(p.stat().st_size for p in (state / "learning").iterdir()) / 1e6
    return {"labels": n_labels, "versions": n_versions, "journal_mb": round(journal_mb, 1),
            "write_state_s": round(made, 2), "report_s": round(built, 2),
            "report_cpu_s": round(built_cpu, 2), "html_kb": round(size / 1024)}
