"""`actprm report`: one self-contained HTML page on how a run is going.

Built only from what the daemon keeps on disk, read as JSON (never pickles), so it works while
the daemon runs and after a crash:
- the learning journal, STATE_DIR/learning/*.jsonl: labels (each a prequential test of the
  version that asked for it), scoring chunks, update attempts, held-out evaluations, status;
  a torn last line (a crash mid-write) or any line that does not parse is skipped and counted;
- the checkpoint manifests, CHECKPOINT_DIR/vNNNNNN/manifest.json, read with json rather than
  model/training/checkpoints.py: that module imports torch, seconds of start-up a report does not need.
Plots are matplotlib PNGs embedded as base64: no server, no network, one file to mail around.
Whatever is missing (a young run, no held-out set, metadata without the field) is said in the
page instead of failing.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actprm.model.eval.calibration import Window, auto_window, calibration_over_time
from actprm.model.eval.metrics import predicted_first_errors, processbench_scores
from actprm.model.training.manifest import MANIFEST, version_dir_number
from actprm.streams.state.journal import journal_files

JOURNALS = ("labels", "scoring", "updates", "heldout", "status")
WHAT_NEEDS = {  # what each journal file feeds, for the "missing" notes
    "labels": "online F1 per version, calibration, labels by metadata field",
    "scoring": "selected share over time and by error kind",
    "updates": "refused and failed updates, labels replayed",
    "heldout": "held-out F1 per version (written only when the daemon runs with a held-out set)",
    "status": "budget against time, judge failures, labels dropped, the latest status",
}
MAX_TABLE_ROWS = 50  # the newest versions in the table; the plots show all of them
WORSE_BY = 0.05  # a version whose online F1 is this much below its parent's is flagged
MIN_TESTED = 10  # ... when both were tested on at least this many labels


class ReportError(ValueError):
    """A state dir that cannot be reported on; the message is one line."""


# --- reading ---------------------------------------------------------------------------------

def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The JSON objects of a JSON-lines file and how many lines did not parse (torn or not objects)."""
    rows, skipped = [], 0
    with path.open("rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError both
                skipped += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                skipped += 1
    return rows, skipped


def read_manifests(root: Path) -> tuple[list[dict], list[str]]:
    """Every readable manifest, oldest version first, and one line per unreadable one."""
    if not root.is_dir():
        return [], []
    found, bad = [], []
    for child in root.iterdir():
        if version_dir_number(child.name) is None:
            continue
        path = child / MANIFEST
        try:
            m = json.loads(path.read_text())
        except FileNotFoundError:
            continue  # a version being written or removed
        except (OSError, ValueError) as err:
            bad.append(f"{path}: {str(err).splitlines()[0]}")
            continue
        if not isinstance(m, dict) or not isinstance(m.get("version"), int):
            bad.append(f"{path}: no integer 'version'")
            continue
        # Only the count matters here; a long run's manifests list millions of ids.
        m["n_consumed"] = len(m.pop("consumed_label_ids", None) or [])
        found.append(m)
    # Pruned versions' manifests, compacted into CHECKPOINT_DIR/index/*.jsonl (a version in both
    # places, from a prune cut short, counts once).
    have = {m["version"] for m in found}
    for seg in sorted((root / "index").glob("*.jsonl")):
        rows, _ = read_jsonl(seg)
        for m in rows:
            if isinstance(m.get("version"), int) and m["version"] not in have:
                m["n_consumed"] = m.get("n_consumed") or len(m.pop("consumed_label_ids", None) or [])
                m.pop("consumed_label_ids", None)
                have.add(m["version"])
                found.append(m)
    return sorted(found, key=lambda m: m["version"]), bad


@dataclass
class State:
    state_dir: Path
    checkpoint_dir: Path
    journal: dict[str, list[dict]] = field(default_factory=dict)  # name -> rows, in time order
    present: dict[str, bool] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    manifests: list[dict] = field(default_factory=list)
    bad_manifests: list[str] = field(default_factory=list)


def _num(x: Any) -> float | None:
    """A finite number, else None (a journal written by another version may lack a field)."""
    if type(x) is not float and type(x) is not int:  # bool is not a number here; type() is fast
        return None
    return float(x) if math.isfinite(x) else None


def _scores(label: dict) -> list[float] | None:
    """The label's per-step scores when they are all probabilities, else None; checked once
    per label and kept under "_mu" (several figures need it; 100,000 labels)."""
    if "_mu" not in label:
        mu = label.get("mu")
        ok = type(mu) is list and mu and all((type(m) is float or type(m) is int) and 0 <= m <= 1 for m in mu)
        label["_mu"] = mu if ok else None
    return label["_mu"]


def read_state(state_dir: str | Path, checkpoint_dir: str | Path | None = None) -> State:
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise ReportError(f"no state directory at {state_dir}")
    st = State(state_dir, Path(checkpoint_dir) if checkpoint_dir else state_dir / "checkpoints")
    for name in JOURNALS:
        paths = journal_files(state_dir / "learning", name)  # the rotated set, oldest first, then the active file
        st.present[name] = bool(paths)
        rows, skipped = [], 0
        for path in paths:
            try:
                more, bad = read_jsonl(path)
            except FileNotFoundError:  # rotated away by the running daemon meanwhile
                continue
            rows += more
            skipped += bad
        # Arrival order; sorted() is stable, so rows with the same time keep their file order.
        st.journal[name] = sorted(rows, key=lambda r: _num(r.get("at")) or 0.0)
        st.skipped[name] = skipped
    st.manifests, st.bad_manifests = read_manifests(st.checkpoint_dir)
    return st


# --- figures: plain functions over the rows --------------------------------------------------

def _predicted(label: dict) -> int | None:
    p = label.get("predicted_first_error")
    if isinstance(p, int) and not isinstance(p, bool):
        return p
    mu = _scores(label)
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
    held = {r["version"]: _num(r.get("f1")) for r in heldout if isinstance(r.get("version"), int)}
    attempt = {r["version"]: r for r in updates if isinstance(r.get("version"), int)}
    rows = []
    for m in manifests:
        v, metrics, up = m["version"], m.get("metrics") or {}, attempt.get(m["version"], {})
        tested = online.get(v, {})
        f1 = tested.get("f1", _num(metrics.get("online_f1")))
        rows.append({
            "version": v, "kind": m.get("kind", "update"), "parent": m.get("parent"),
            "rolled_back_from": m.get("rolled_back_from"), "created": _num(m.get("created")),
            "loss": _num(metrics.get("loss", up.get("loss"))),
            "labels_new": _first_int(metrics.get("labels_new"), up.get("labels_new"), m["n_consumed"]),
            "labels_replayed": _first_int(metrics.get("labels_replayed"), up.get("labels_replayed")),
            "steps": _first_int(metrics.get("steps"), up.get("steps")),
            "online_f1": f1, "online_n": tested.get("n", 0),
            "heldout_f1": held.get(v, _num(metrics.get("heldout_f1"))),
            "canary_f1": _num(metrics.get("canary_f1")),
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
    return next((int(v) for v in values if _num(v) is not None), None)


def refused_updates(updates: Iterable[dict]) -> list[dict]:
    """Update attempts that published nothing: refused (a check said no) or failed (an error)."""
    return [{"at": _num(u.get("at")), "parent": u.get("parent"), "refused": u.get("refused"), "error": u.get("error"),
             "labels_new": u.get("labels_new"), "loss": _num(u.get("loss"))}
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
        out.append({"at": _num(u.get("at")), "outcome": outcome, "parent": u.get("parent"), "labels": c.get("labels"),
                    "val_labels": c.get("val_labels"), "epochs": c.get("epochs"), "stopped": c.get("stopped"),
                    "val_f1": _num(c.get("val_f1")), "served_val_f1": _num(c.get("served_val_f1")),
                    "seconds": _num(c.get("seconds"))})
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
            r["scored"] += int(_num(s.get("scored")) or 0)
            r["selected"] += int(_num(s.get("selected")) or 0)
            seen(r, _num(s.get("at")))
    failures = _increments([_num(s.get("judge_failures")) for s in status])
    dropped = [a + b for a, b in zip(_increments([_num(s.get("labels_stale_round")) for s in status]),
                                     _increments([_num(s.get("labels_duplicate")) for s in status]))]
    for s, f, d in zip(status, failures, dropped):
        if isinstance(s.get("round"), int):
            r = rounds[s["round"]]
            used = _num(s.get("budget_used"))
            if used is not None:
                r["budget_used"] = used if r["budget_used"] is None else max(r["budget_used"], used)
            if _num(s.get("budget_left")) is not None:
                r["budget_left"] = _num(s.get("budget_left"))  # the latest
            r["judge_failures"] += int(f)
            r["labels_dropped"] += int(d)
            seen(r, _num(s.get("at")))
    for label in labels:
        if isinstance(label.get("round_id"), int):
            rounds[label["round_id"]]["labels"] += 1
            seen(rounds[label["round_id"]], _num(label.get("at")))
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
            if isinstance(pair, list) and len(pair) == 2 and all(_num(x) is not None for x in pair):
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
    numeric = all(_num(v) is not None for v, _ in present)
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
    scored = [lb for lb in labels if type(lb.get("first_error")) is int and lb["first_error"] >= -1 and _scores(lb)]
    size = size or auto_window(len(scored))
    found = calibration_over_time([(lb["_mu"], lb["first_error"]) for lb in scored], size, n_bins)
    ends = [_num(scored[w.end - 1].get("at")) for w in found]
    return found, ends, size


# --- plots -----------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass(frozen=True)
class Clock:
    """The plots' time axis: counted from the first record, in a unit that suits the run's span."""

    t0: float
    unit_s: float = 3600.0
    unit: str = "hours"

    @classmethod
    def spanning(cls, t0: float, t_end: float) -> Clock:
        span = t_end - t0
        if span < 120:
            return cls(t0, 1.0, "seconds")
        if span < 2 * 3600:
            return cls(t0, 60.0, "minutes")
        return cls(t0, 3600.0, "hours") if span < 4 * 86400 else cls(t0, 86400.0, "days")

    def __call__(self, ts: Iterable[float]) -> list[float]:
        return [(t - self.t0) / self.unit_s for t in ts]

    def label(self, what: str = "") -> str:
        return f"{self.unit} since the first record" + (f" ({what})" if what else "")


def plot_versions(rows: Sequence[dict]) -> str | None:
    if not rows:
        return None
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6), dpi=90)
    for key, label, marker in (("online_f1", "online F1 (labels it asked for)", "o"),
                               ("heldout_f1", "held-out F1", "s"), ("canary_f1", "canary F1", "^")):
        pts = [(r["version"], r[key]) for r in rows if r[key] is not None]
        if pts:
            a.plot(*zip(*pts), marker=marker, markersize=3, linewidth=1, label=label)
    worse = [(r["version"], r["online_f1"]) for r in rows if r["worse"]]
    if worse:
        a.scatter(*zip(*worse), s=60, facecolors="none", edgecolors="red", label=f"worse than parent by > {WORSE_BY}")
    rb = [r["version"] for r in rows if r["kind"] == "rollback"]
    for v in rb:
        a.axvline(v, color="grey", linestyle=":", linewidth=1)
    cons = [r["version"] for r in rows if r["kind"] == "consolidate"]
    for v in cons:
        a.axvline(v, color="green", linestyle="--", linewidth=1, alpha=0.6)
    versions = [r["version"] for r in rows]
    a.set_xlim(min(versions) - 0.5, max(versions) + 0.5)  # every version, even those not tested yet
    a.set(xlabel="version", ylabel="F1 (ProcessBench)", ylim=(-0.02, 1.02), title="F1 per version"
          + (" (dotted: rollbacks)" if rb else "") + (" (dashed: consolidations)" if cons else ""))
    a.grid(alpha=0.3)
    if a.get_legend_handles_labels()[0]:
        a.legend(fontsize=7)
    loss = [(r["version"], r["loss"]) for r in rows if r["loss"] is not None]
    if loss:
        b.plot(*zip(*loss), marker=".", linewidth=1, color="C3")
    b.set(xlabel="version", ylabel="training loss", title="loss per update")
    b.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def plot_rounds(status: Sequence[dict], scoring: Sequence[dict], clock: Clock) -> str | None:
    budget = [(s["at"], s.get("round"), _num(s.get("budget_used"))) for s in status if _num(s.get("at")) is not None]
    budget = [b for b in budget if b[2] is not None]
    chunks = [(s["at"], _num(s.get("scored")) or 0, _num(s.get("selected")) or 0)
              for s in scoring if _num(s.get("at")) is not None]
    if not budget and not chunks:
        return None
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6), dpi=90)
    for k, rid in enumerate(dict.fromkeys(r for _, r, _ in budget)):
        pts = [(t, u) for t, r, u in budget if r == rid]
        a.plot(clock(t for t, _ in pts), [u for _, u in pts], color=f"C{k % 10}", label=f"round {rid}")
    a.set(xlabel=clock.label(), ylabel="budget used (labels asked for)", title="budget against time")
    a.grid(alpha=0.3)
    if budget and len({r for _, r, _ in budget}) <= 12:
        a.legend(fontsize=7)
    if chunks:
        # The share per time slice: about 50 slices over the run, so a long run stays readable.
        t0, t_end = clock.t0, max(t for t, _, _ in chunks)
        width = max((t_end - t0) / 50, 1e-9)
        sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for t, sc, sel in chunks:
            i = int((t - t0) / width)
            sums[i][0] += sc
            sums[i][1] += sel
        xs = sorted(i for i in sums if sums[i][0])
        b.plot(clock(t0 + (i + 0.5) * width for i in xs), [100 * sums[i][1] / sums[i][0] for i in xs],
               marker=".", linewidth=1)
    b.set(xlabel=clock.label(), ylabel="selected (% of scored)", title="selected share over time")
    b.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def plot_calibration(found: Sequence[Window], ends: Sequence[float | None], clock: Clock) -> str | None:
    if not found or not any(w.n_steps for w in found):
        return None
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=90)
    a.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    # At most 4 windows on the diagram (first, last, two between): more would be a tangle.
    picks = sorted({round(i * (len(found) - 1) / 3) for i in range(4)}) if len(found) > 4 else range(len(found))
    cmap = plt.get_cmap("viridis")
    for j, i in enumerate(picks):
        w = found[i]
        pts = [(bn.confidence, bn.accuracy) for bn in w.bins if bn.n]
        if pts:
            ece = "n/a" if w.ece is None else f"{w.ece:.3f}"
            a.plot(*zip(*pts), marker="o", markersize=4, color=cmap(j / max(len(picks) - 1, 1)),
                   label=f"labels {w.start + 1}-{w.end} (ECE {ece})")
    a.set(xlabel="mean step score mu (the PRM's P(correct))", ylabel="share the judge called correct",
          xlim=(0, 1), ylim=(0, 1.02), title="reliability diagram per window of labels")
    a.grid(alpha=0.3)
    a.legend(fontsize=7)
    pts = [(t, w.ece) for w, t in zip(found, ends) if w.ece is not None and t is not None]
    if pts:
        b.plot(clock(t for t, _ in pts), [e for _, e in pts], marker="o", markersize=4)
    b.set(xlabel=clock.label("end of window"), ylabel="expected calibration error",
          title="ECE over time", ylim=(0, None))
    b.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def plot_uncertainty(kinds: Sequence[dict], fields: Sequence[dict], field_name: str) -> str | None:
    if not kinds and not fields:
        return None
    plt = _pyplot()
    panels = [p for p in (kinds, fields) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), dpi=90, squeeze=False)
    k = 0
    if kinds:
        ax = axes[0][k]
        k += 1
        ax.bar([r["kind"] for r in kinds], [100 * (r["share"] or 0) for r in kinds], color="C1")
        ax.set(ylabel="selected (% of scored of that kind)", title="selected share by error kind")
        ax.tick_params(axis="x", rotation=30, labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    if fields:
        ax = axes[0][k]
        ax.bar([r["value"] for r in fields], [r["labels"] for r in fields], color="C2")
        ax.set(ylabel="judged labels", title=f"labels by metadata {field_name!r}")
        ax.tick_params(axis="x", rotation=30, labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _png(fig)


# --- HTML ------------------------------------------------------------------------------------

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
th { background: #f4f4f4; } td { white-space: nowrap; } td.l, th.l { text-align: left; }
tr.worse td { background: #fde8e8; } .missing { color: #8a5a00; background: #fff7e0; padding: .4em .8em; }
img { max-width: 100%; } .muted { color: #777; }
"""


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if math.isfinite(x) else str(x)
    return html.escape(str(x))


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _when(t: float | None) -> str:
    return "–" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], classes: Iterable[str] | None = None,
           left: int = 0) -> str:
    """Cells are already escaped; the first `left` columns are left-aligned."""
    head = "".join(f'<th class="l">{h}</th>' if i < left else f"<th>{h}</th>" for i, h in enumerate(headers))
    body = []
    for row, cls in zip(rows, classes or iter(lambda: "", None)):
        cells = "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>" for i, c in enumerate(row))
        body.append(f'<tr class="{cls}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _img(png: str | None, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png}">' if png else ""


def _missing(text: str) -> str:
    return f'<p class="missing">{html.escape(text)}</p>'


def build_report(state_dir: str | Path, checkpoint_dir: str | Path | None = None, *, window: int | None = None,
                 n_bins: int = 10, field_name: str = "policy_step", now: float | None = None) -> str:
    """The whole page as one string."""
    st = read_state(state_dir, checkpoint_dir)
    j = st.journal
    labels, scoring, updates, heldout, status = (j[n] for n in JOURNALS)
    times = [_num(r.get("at")) for rows in j.values() for r in rows[:1]] + [_num(m.get("created")) for m in st.manifests[:1]]
    t0 = min((t for t in times if t is not None), default=0.0)
    lasts = [_num(r.get("at")) for rows in j.values() for r in rows[-1:]] + [_num(m.get("created")) for m in st.manifests[-1:]]
    clock = Clock.spanning(t0, max((t for t in lasts if t is not None), default=t0))
    now = time.time() if now is None else now
    parts = [f"<h1>actprm run report</h1><p class=\"muted\">state dir <code>{html.escape(str(st.state_dir))}</code>, "
             f"checkpoints <code>{html.escape(str(st.checkpoint_dir))}</code>; built {_when(now)} UTC; "
             f"times below are UTC, plots count {clock.unit} from {_when(t0) if times else '–'}.</p>"]

    # What is there and what is not.
    inv = []
    for name in JOURNALS:
        n = len(j[name])
        state = f"{n} records" if st.present[name] else "missing"
        if st.skipped[name]:
            state += f", {st.skipped[name]} lines skipped (did not parse: a torn write?)"
        inv.append((f"learning/{name}.jsonl", html.escape(state), html.escape(WHAT_NEEDS[name])))
    inv.append(("checkpoints/v*/manifest.json", f"{len(st.manifests)} versions"
                + (f", {len(st.bad_manifests)} unreadable" if st.bad_manifests else ""), "the versions table"))
    notes = [_missing(f"missing: learning/{n}.jsonl, so no {WHAT_NEEDS[n]}") for n in JOURNALS if not st.present[n]]
    notes += [_missing(f"unreadable manifest {b}") for b in st.bad_manifests[:10]]
    if not st.manifests:
        notes.append(_missing("no checkpoint manifests yet: the trainer has not published version 0"))
    latest = status[-1] if status else None
    summary = ""
    if latest:
        keys = [k for k in ("round", "budget_used", "budget_left", "scored", "selected", "judged", "judge_failures",
                            "labels_received", "labels_duplicate", "labels_stale_round", "pending_labels",
                            "labels_replayed", "served_version") if k in latest]
        online = latest.get("online") if isinstance(latest.get("online"), dict) else {}
        cells = [(html.escape(k), _fmt(latest[k])) for k in keys] + [(f"online.{html.escape(str(k))}", _fmt(v))
                                                                     for k, v in online.items() if not isinstance(v, (dict, list))]
        summary = (f"<p>Latest status, {_when(_num(latest.get('at')))} UTC "
                   f"({_fmt((now - (_num(latest.get('at')) or now)) / 60, 1)} min before this report):</p>"
                   + _table(["status", "value"], cells, left=1))
    parts.append('<section id="summary"><h2>Summary</h2>' + summary
                 + _table(["file", "state", "feeds"], inv, left=3) + "".join(notes) + "</section>")

    # Per version.
    rows = version_rows(st.manifests, labels, updates, heldout)
    refused = refused_updates(updates)
    sec = ['<section id="versions"><h2>Versions</h2>']
    if rows:
        sec.append(_img(plot_versions(rows), "F1 and loss per version"))
        shown = rows[-MAX_TABLE_ROWS:]
        if len(rows) > len(shown):
            sec.append(f'<p class="muted">The newest {len(shown)} of {len(rows)} versions.</p>')
        sec.append(_table(
            ["version", "kind", "parent", "created", "loss", "labels new", "replayed", "steps", "online F1",
             "tested on", "Δ F1 vs parent", "held-out F1", "canary F1"],
            ([str(r["version"]), html.escape(str(r["kind"])) + (f" of v{r['rolled_back_from']}" if r["rolled_back_from"] is not None else ""),
              _fmt(r["parent"]), _when(r["created"]), _fmt(r["loss"], 4), _fmt(r["labels_new"]), _fmt(r["labels_replayed"]),
              _fmt(r["steps"]), _fmt(r["online_f1"]), str(r["online_n"]),
              "–" if r["delta_f1"] is None else f"{r['delta_f1']:+.3f}", _fmt(r["heldout_f1"]), _fmt(r["canary_f1"])]
             for r in reversed(shown)),
            ("worse" if r["worse"] else "" for r in reversed(shown)), left=2))
        if any(r["worse"] for r in rows):
            sec.append(f'<p>Red rows: online F1 more than {WORSE_BY} below the parent\'s (both tested on at least '
                       f'{MIN_TESTED} labels).</p>')
        rollbacks = [r for r in rows if r["kind"] == "rollback"]
        sec.append(f"<p>Rollbacks: {len(rollbacks)}"
                   + (": " + ", ".join(f"v{r['version']} (weights of v{r['rolled_back_from']})" for r in rollbacks) if rollbacks else "")
                   + ".</p>")
    else:
        sec.append(_missing("no versions yet"))
    consolidations = consolidation_rows(updates)
    sec.append(f"<h3>Consolidations ({len(consolidations)})</h3>")
    if consolidations:
        sec.append("<p>A candidate trained on every label kept, published only if it beats the served version "
                   "on a validation slice of labels it never trained on.</p>")
        sec.append(_table(["at", "outcome", "from version", "labels", "validation labels", "epochs", "stopped",
                           "val F1", "served val F1", "seconds"],
                          ([_when(c["at"]), html.escape(c["outcome"]), _fmt(c["parent"]), _fmt(c["labels"]),
                            _fmt(c["val_labels"]), _fmt(c["epochs"]), _fmt(c["stopped"]), _fmt(c["val_f1"]),
                            _fmt(c["served_val_f1"]), _fmt(c["seconds"], 1)] for c in consolidations[-MAX_TABLE_ROWS:]),
                          left=2))
    sec.append(f"<h3>Refused and failed updates ({len(refused)})</h3>")
    if refused:
        sec.append(_table(["at", "from version", "refused because", "error", "labels", "loss"],
                          ([_when(u["at"]), _fmt(u["parent"]), _fmt(u["refused"]), _fmt(u["error"]), _fmt(u["labels_new"]),
                            _fmt(u["loss"], 4)] for u in refused[-MAX_TABLE_ROWS:]), left=4))
    elif not st.present["updates"]:
        sec.append(_missing("no learning/updates.jsonl"))
    parts.append("".join(sec) + "</section>")

    # Per round.
    rounds = round_rows(status, scoring, labels)
    sec = ['<section id="rounds"><h2>Rounds and budget</h2>']
    if rounds:
        sec.append(_img(plot_rounds(status, scoring, clock), "budget and selected share against time"))
        sec.append(_table(["round", "from", "to", "scored", "selected", "share", "budget used", "budget left",
                           "budget / hour", "labels", "judge failures", "labels dropped"],
                          ([str(r["round"]), _when(r["from"]), _when(r["to"]), str(r["scored"]), str(r["selected"]),
                            _pct(r["share"]), _fmt(r["budget_used"], 0), _fmt(r["budget_left"], 0),
                            _fmt(r["budget_per_hour"], 1), str(r["labels"]), str(r["judge_failures"]),
                            str(r["labels_dropped"])] for r in rounds)))
        sec.append('<p class="muted">Labels dropped: labels of an earlier round after a reset, plus duplicates.</p>')
    else:
        sec.append(_missing("no rounds yet (no status, scoring or label records)"))
    parts.append("".join(sec) + "</section>")

    # Calibration.
    sec = ['<section id="calibration"><h2>Calibration against the judge</h2>']
    found, ends, size = calibration_windows(labels, window, n_bins)
    png = plot_calibration(found, ends, clock)
    if png:
        sec.append(f"<p>Step scores mu of the version that asked for each label against the judge's step labels "
                   f"(correct before the first error, wrong at it, steps after it not judged); windows of {size} "
                   f"labels, {n_bins} bins.</p>")
        sec.append(_img(png, "reliability diagram and ECE over time"))
        sec.append(_table(["window", "labels", "until", "labelled steps", "ECE"],
                          ([str(i + 1), f"{w.start + 1}-{w.end}", _when(t), str(w.n_steps), _fmt(w.ece)]
                           for i, (w, t) in enumerate(zip(found, ends)))))
    else:
        sec.append(_missing("no labels with step scores yet" if st.present["labels"] else "no learning/labels.jsonl"))
    parts.append("".join(sec) + "</section>")

    # Where uncertainty went.
    kinds, fields = by_kind(scoring), by_field(labels, field_name)
    sec = ['<section id="uncertainty"><h2>Where the uncertainty went</h2>']
    png = plot_uncertainty(kinds, fields, field_name)
    sec.append(_img(png, "selected share by kind and labels by metadata field"))
    if kinds:
        sec.append(_table(["kind", "scored", "selected", "selected share", "of all selected"],
                          ([html.escape(r["kind"]), str(r["scored"]), str(r["selected"]), _pct(r["share"]),
                            _pct(r["of_selected"])] for r in kinds), left=1))
    else:
        sec.append(_missing("no error kinds in the scoring records"))
    if fields:
        sec.append(_table([f"{html.escape(field_name)}", "labels", "judge found an error", "version agreed with judge"],
                          ([html.escape(r["value"]), str(r["labels"]), _pct(r["error_share"]), _pct(r["agreement"])]
                           for r in fields), left=1))
    else:
        sec.append(_missing(f"no label carries the metadata field {field_name!r}"))
    parts.append("".join(sec) + "</section>")

    parts.append(verdict_section(st.state_dir))

    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<link rel=\"icon\" href=\"data:,\">"  # no favicon request: nothing leaves the file
            f"<title>actprm report: {html.escape(st.state_dir.name or str(st.state_dir))}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")


def verdict_sample(entries: Sequence[dict], per_outcome: int = 6) -> tuple[dict[str, int], list[dict]]:
    """Counts by outcome, and the newest few of each outcome (labels, asked again later, given up)."""
    counts: dict[str, int] = defaultdict(int)
    for e in entries:
        counts[str(e.get("outcome"))] += 1
    sample = []
    for outcome in ("label", "retry_later", "dead"):
        sample += [e for e in entries if e.get("outcome") == outcome][-per_outcome:]
    return dict(counts), sample


def verdict_section(state_dir: Path, answer_chars: int = 600) -> str:
    """What the judge said: a sample of its verdicts with the end of each answer (the verdict log
    a judge process keeps in state_dir/judge/, rotated)."""
    from actprm.streams.roles.judging import read_verdicts

    sec = ['<section id="verdicts"><h2>What the judge said</h2>']
    counts, sample = verdict_sample(list(read_verdicts(Path(state_dir) / "judge")))
    if not sample:
        sec.append(_missing("no verdict log (judge/verdicts.jsonl): this state dir has no judge role, or it judged nothing yet"))
        return "".join(sec) + "</section>"
    sec.append("<p>" + ", ".join(f"{html.escape(k)}: {v}" for k, v in sorted(counts.items()))
               + " (in the log kept now). The newest of each outcome:</p>")
    rows = []
    for e in sample:
        answer = e.get("answer")
        text = "–" if answer is None else "<pre>" + html.escape(answer[-answer_chars:]) + "</pre>"
        verdict = e.get("first_error") if e.get("outcome") == "label" else e.get("reason")
        rows.append([_when(_num(e.get("at"))), html.escape(str(e.get("id"))), html.escape(str(e.get("outcome"))),
                     _fmt(verdict), _fmt(e.get("gold")), html.escape(str(e.get("model") or e.get("judge"))),
                     html.escape(str(e.get("prompt_version"))), _fmt(_num(e.get("latency_s")), 1), text])
    sec.append(_table(["at", "id", "outcome", "verdict / reason", "gold", "model", "prompt", "latency s", "answer (end)"],
                      rows, left=9))
    return "".join(sec) + "</section>"


def write_report(out: str | Path, state_dir: str | Path, checkpoint_dir: str | Path | None = None, **kwargs: Any) -> Path:
    """Build the page and write it atomically (a browser reloading it never sees half a file)."""
    page = build_report(state_dir, checkpoint_dir, **kwargs)
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".html", dir=out.parent if str(out.parent) else ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for reading
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
