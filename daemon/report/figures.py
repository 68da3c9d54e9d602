"""The report's figures: plain functions over the journal's rows (per version, per round, by kind, calibration)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from actprm.daemon.report.read import label_scores, num
from actprm.model.eval.calibration import Window, auto_window, calibration_over_time
from actprm.model.eval.metrics import predicted_first_errors, processbench_scores

MAX_TABLE_ROWS = 50  # the newest versions in the table; the plots show all of them
WORSE_BY = 0.05  # a version whose online F1 is this much below its parent's is flagged
MIN_TESTED = 10  # ... when both were tested on at least this many labels


# --- figures: plain functions over the rows --------------------------------------------------

def _predicted(label: dict) -> int | None:
    p = label.get("predicted_first_error")
    if isinstance(p, int) and not isinstance(p, bool):
        return p
    mu = label_scores(label)
    return predicted_first_errors([mu])[0] if mu else None


def online_by_version(labels: Iterable[dict]) -> dict[int, dict]:
    """Per version, ProcessBench F1 of its predictions on the labels it asked for (each tested
    before it was trained on): {"f1", "acc_error", "acc_correct", "n"}."""
    pred: dict[int, list[int]] = defaultdict(list)
    gold: dict[int, list[int]] = defaultdict(list)
    for label in labels:
        v, p, g = label.get("version"), _predicted(label), label.get("first_error")
        if isinstance(v, int) and p is not None and isinstance(g, int):
            pred[v].append(p)
            gold[v].append(g)
    return {v: processbench_scores(pred[v], gold[v]) for v in sorted(pred)}


def version_rows(manifests: Sequence[dict], labels: Sequence[dict], updates: Sequence[dict],
                 heldout: Sequence[dict]) -> list[dict]:
    """One row per published version: what it was trained on and how it did."""
    online = online_by_version(labels)
    held = {r["version"]: num(r.get("f1")) for r in heldout if isinstance(r.get("version"), int)}
    attempt = {r["version"]: r for r in updates if isinstance(r.get("version"), int)}
    rows = []
    for m in manifests:
        v, metrics, up = m["version"], m.get("metrics") or {}, attempt.get(m["version"], {})
        tested = online.get(v, {})
        f1 = tested.get("f1", num(metrics.get("online_f1")))
        rows.append({
            "version": v, "kind": m.get("kind", "update"), "parent": m.get("parent"),
            "rolled_back_from": m.get("rolled_back_from"), "created": num(m.get("created")),
            "loss": num(metrics.get("loss", up.get("loss"))),
            "labels_new": _first_int(metrics.get("labels_new"), up.get("labels_new"), m["n_consumed"]),
            "labels_replayed": _first_int(metrics.get("labels_replayed"), up.get("labels_replayed")),
            "steps": _first_int(metrics.get("steps"), up.get("steps")),
            "online_f1": f1, "online_n": tested.get("n", 0),
            "heldout_f1": held.get(v, num(metrics.get("heldout_f1"))),
            "canary_f1": num(metrics.get("canary_f1")),
        })
    row_of = {r["version"]: r for r in rows}
    for row in rows:  # compared with the version it was trained from
        prow = row_of.get(row["parent"])
        row["delta_f1"] = None
        if prow and row["online_f1"] is not None and prow["online_f1"] is not None:
            row["delta_f1"] = row["online_f1"] - prow["online_f1"]
        row["worse"] = bool(row["delta_f1"] is not None and row["delta_f1"] < -WORSE_BY
                            and row["online_n"] >= MIN_TESTED and prow["online_n"] >= MIN_TESTED)
    return rows


def _first_int(*values: Any) -> int | None:
    return next((int(v) for v in values if num(v) is not None), None)


def refused_updates(updates: Iterable[dict]) -> list[dict]:
    """Update attempts that published nothing: refused (a check said no) or failed (an error)."""
    return [{"at": num(u.get("at")), "parent": u.get("parent"), "refused": u.get("refused"), "error": u.get("error"),
             "labels_new": u.get("labels_new"), "loss": num(u.get("loss"))}
            for u in updates if u.get("refused") or u.get("error") or u.get("version") is None]


def consolidation_rows(updates: Iterable[dict]) -> list[dict]:
    """Every consolidation attempt of the updates journal: published (as which version) or not, and why."""
    out = []
    for u in updates:
        if u.get("kind") != "consolidate":
            continue
        c = u.get("consolidation") if isinstance(u.get("consolidation"), dict) else {}
        outcome = (f"published v{u['version']}" if isinstance(u.get("version"), int)
                   else f"refused: {u['refused']}" if u.get("refused") else f"failed: {u.get('error')}")
        out.append({"at": num(u.get("at")), "outcome": outcome, "parent": u.get("parent"), "labels": c.get("labels"),
                    "val_labels": c.get("val_labels"), "epochs": c.get("epochs"), "stopped": c.get("stopped"),
                    "val_f1": num(c.get("val_f1")), "served_val_f1": num(c.get("served_val_f1")),
                    "seconds": num(c.get("seconds"))})
    return out


def _increments(values: Sequence[float | None]) -> list[float]:
    """Per record, how much a process counter grew since the record before; a counter that went
    down was reset by a restart, so it counts from 0 again."""
    out, prev = [], None
    for v in values:
        if v is None:
            out.append(0.0)
            continue
        out.append(v if prev is None or v < prev else v - prev)
        prev = v
    return out


def round_rows(status: Sequence[dict], scoring: Sequence[dict], labels: Sequence[dict]) -> list[dict]:
    """One row per round: its time span, stream counts, budget, judge failures, labels dropped."""
    rounds: dict[int, dict] = defaultdict(lambda: {"from": None, "to": None, "scored": 0, "selected": 0,
                                                   "budget_used": None, "budget_left": None, "judge_failures": 0,
                                                   "labels": 0, "labels_dropped": 0})

    def seen(r: dict, at: float | None) -> None:
        if at is not None:
            r["from"] = at if r["from"] is None else min(r["from"], at)
            r["to"] = at if r["to"] is None else max(r["to"], at)

    for s in scoring:
        if isinstance(s.get("round_id"), int):
            r = rounds[s["round_id"]]
            r["scored"] += int(num(s.get("scored")) or 0)
            r["selected"] += int(num(s.get("selected")) or 0)
            seen(r, num(s.get("at")))
    failures = _increments([num(s.get("judge_failures")) for s in status])
    dropped = [a + b for a, b in zip(_increments([num(s.get("labels_stale_round")) for s in status]),
                                     _increments([num(s.get("labels_duplicate")) for s in status]))]
    for s, f, d in zip(status, failures, dropped):
        if isinstance(s.get("round"), int):
            r = rounds[s["round"]]
            used = num(s.get("budget_used"))
            if used is not None:
                r["budget_used"] = used if r["budget_used"] is None else max(r["budget_used"], used)
            if num(s.get("budget_left")) is not None:
                r["budget_left"] = num(s.get("budget_left"))  # the latest
            r["judge_failures"] += int(f)
            r["labels_dropped"] += int(d)
            seen(r, num(s.get("at")))
    for label in labels:
        if isinstance(label.get("round_id"), int):
            rounds[label["round_id"]]["labels"] += 1
            seen(rounds[label["round_id"]], num(label.get("at")))
    out = []
    for rid in sorted(rounds):
        r = rounds[rid]
        r["round"] = rid
        r["share"] = r["selected"] / r["scored"] if r["scored"] else None
        span_h = (r["to"] - r["from"]) / 3600 if r["from"] is not None and r["to"] and r["to"] > r["from"] else None
        r["budget_per_hour"] = r["budget_used"] / span_h if span_h and r["budget_used"] is not None else None
        out.append(r)
    return out


def by_kind(scoring: Iterable[dict]) -> list[dict]:
    """Scored and selected per error kind of the trajectories, summed over the run."""
    sums: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for s in scoring:
        kinds = s.get("by_kind")
        if not isinstance(kinds, dict):
            continue
        for kind, pair in kinds.items():
            if isinstance(pair, list) and len(pair) == 2 and all(num(x) is not None for x in pair):
                sums[str(kind)][0] += int(pair[0])
                sums[str(kind)][1] += int(pair[1])
    total_selected = sum(sel for _, sel in sums.values())
    return [{"kind": k, "scored": sc, "selected": sel, "share": sel / sc if sc else None,
             "of_selected": sel / total_selected if total_selected else None}
            for k, (sc, sel) in sorted(sums.items(), key=lambda kv: -kv[1][1])]


def by_field(labels: Sequence[dict], name: str, max_groups: int = 12) -> list[dict]:
    """Judged labels grouped by a metadata field: how many, how many the judge found wrong,
    and how often the version that asked agreed with the judge. A numeric field with many
    values (a policy step) is cut into equal-width ranges."""
    values = [(label.get("metadata") or {}).get(name) if isinstance(label.get("metadata"), dict) else None
              for label in labels]
    present = [(v, label) for v, label in zip(values, labels) if v is not None]
    if not present:
        return []
    numeric = all(num(v) is not None for v, _ in present)
    distinct = sorted({v for v, _ in present}, key=lambda v: (str(type(v)), v))
    if numeric and len(distinct) > max_groups:
        lo, hi = float(min(distinct)), float(max(distinct))
        width = (hi - lo) / max_groups

        def key(v):
            b = min(int((float(v) - lo) / width), max_groups - 1)
            return (b, f"{lo + b * width:g} .. {lo + (b + 1) * width:g}")
    else:
        def key(v):
            return (distinct.index(v) if numeric else str(v), str(v))
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for v, label in present:
        groups[key(v)].append(label)
    rows = []
    for (_, shown), members in sorted(groups.items(), key=lambda kv: kv[0][0]):
        judged = [(_predicted(m), m.get("first_error")) for m in members]
        tested = [(p, g) for p, g in judged if p is not None and isinstance(g, int)]
        rows.append({"value": shown, "labels": len(members),
                     "error_share": sum(1 for _, g in judged if isinstance(g, int) and g != -1) / len(members),
                     "agreement": sum(p == g for p, g in tested) / len(tested) if tested else None})
    return rows


def calibration_windows(labels: Sequence[dict], size: int | None = None, n_bins: int = 10) -> tuple[list[Window], list[float | None], int]:
    """Reliability bins and ECE per window of labels that carry scores; with each window the
    arrival time of its last label."""
    scored = [lb for lb in labels if type(lb.get("first_error")) is int and lb["first_error"] >= -1 and label_scores(lb)]
    size = size or auto_window(len(scored))
    found = calibration_over_time([(lb["_mu"], lb["first_error"]) for lb in scored], size, n_bins)
    ends = [num(scored[w.end - 1].get("at")) for w in found]
    return found, ends, size
