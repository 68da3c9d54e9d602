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

import html
import math
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from actprm.daemon.report.figures import (
    MAX_TABLE_ROWS,
    MIN_TESTED,
    WORSE_BY,
    by_field,
    by_kind,
    calibration_windows,
    consolidation_rows,
    refused_updates,
    round_rows,
    version_rows,
)
from actprm.daemon.report.plots import (
    Clock,
    plot_calibration,
    plot_rounds,
    plot_uncertainty,
    plot_versions,
)
from actprm.daemon.report.read import JOURNALS, WHAT_NEEDS, num, read_state

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
    times = [num(r.get("at")) for rows in j.values() for r in rows[:1]] + [num(m.get("created")) for m in st.manifests[:1]]
    t0 = min((t for t in times if t is not None), default=0.0)
    lasts = [num(r.get("at")) for rows in j.values() for r in rows[-1:]] + [num(m.get("created")) for m in st.manifests[-1:]]
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
        summary = (f"<p>Latest status, {_when(num(latest.get('at')))} UTC "
                   f"({_fmt((now - (num(latest.get('at')) or now)) / 60, 1)} min before this report):</p>"
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
        rows.append([_when(num(e.get("at"))), html.escape(str(e.get("id"))), html.escape(str(e.get("outcome"))),
                     _fmt(verdict), _fmt(e.get("gold")), html.escape(str(e.get("model") or e.get("judge"))),
                     html.escape(str(e.get("prompt_version"))), _fmt(num(e.get("latency_s")), 1), text])
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
