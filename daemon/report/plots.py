"""The report's plots: matplotlib PNGs embedded as base64, so the page is one file with no server."""

from __future__ import annotations

import base64
import io
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from actprm.daemon.report.figures import WORSE_BY
from actprm.daemon.report.read import num
from actprm.model.eval.calibration import Window

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
    budget = [(s["at"], s.get("round"), num(s.get("budget_used"))) for s in status if num(s.get("at")) is not None]
    budget = [b for b in budget if b[2] is not None]
    chunks = [(s["at"], num(s.get("scored")) or 0, num(s.get("selected")) or 0)
              for s in scoring if num(s.get("at")) is not None]
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
