"""The learning curve of a simulation: test F1 against labels used, one line per strategy."""

from __future__ import annotations

from pathlib import Path


def learning_curve(result: dict, path: str | Path, title: str = "") -> Path:
    """Write a PNG: per strategy the mean F1 over seeds at each budget (x = mean labels used),
    a band from the lowest to the highest seed, the consolidated PRM's F1 dashed (when run) and
    the position-only baseline dotted."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    strategies = list(dict.fromkeys(s["strategy"] for s in result["summary"]))
    for k, strategy in enumerate(strategies):
        rows = sorted((s for s in result["summary"] if s["strategy"] == strategy and s["f1"] is not None),
                      key=lambda s: s["labels_used"])
        if not rows:
            continue
        color = f"C{k}"
        x = [s["labels_used"] for s in rows]
        ax.plot(x, [s["f1"] for s in rows], marker="o", color=color, label=strategy)
        ax.fill_between(x, [s["f1_min"] for s in rows], [s["f1_max"] for s in rows], color=color, alpha=0.15)
        cons = [s.get("consolidated_f1") for s in rows]
        if all(c is not None for c in cons):
            ax.plot(x, cons, marker="s", linestyle="--", color=color, label=f"{strategy}: consolidated")
            ax.fill_between(x, [s["consolidated_f1_min"] for s in rows], [s["consolidated_f1_max"] for s in rows],
                            color=color, alpha=0.08)
        pos = [s["position_f1"] for s in rows]
        if all(p is not None for p in pos):
            ax.plot(x, pos, linestyle=":", color=color, alpha=0.8, label=f"{strategy}: position only")
    ax.set_xlabel("labels used (trajectories)")
    ax.set_ylabel("test F1 (ProcessBench)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def run_learning_curve(points: list[dict], path: str | Path) -> Path:
    """Write a PNG of a daemon run: held-out F1, online (prequential) F1 and the recent
    selected share, each against the labels received so far, with a star where a consolidated
    version starts serving. points: dicts with "labels", "heldout_f1", "online_f1",
    "selected_share" (None where not known yet), and optionally "version", "consolidated"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not points:
        raise ValueError("no curve points recorded")
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for key, label, style in (("heldout_f1", "held-out F1 (served version)", "-"),
                              ("online_f1", "online F1 (last labels, before training on them)", "--"),
                              ("selected_share", "selected share (last 32 scored)", ":")):
        xy = [(p["labels"], p[key]) for p in points if p.get(key) is not None]
        if xy:
            ax.plot([x for x, _ in xy], [y for _, y in xy], style, label=label)
    # the first point each consolidated version was served at (its held-out F1)
    marks, seen = [], set()
    for p in points:
        if p.get("consolidated") and p.get("heldout_f1") is not None and p.get("version") not in seen:
            seen.add(p.get("version"))
            marks.append((p["labels"], p["heldout_f1"]))
    if marks:
        ax.scatter([x for x, _ in marks], [y for _, y in marks], marker="*", s=90, color="C3", zorder=3,
                   label="consolidated version (held-out F1)")
    ax.set_xlabel("labels received (judged trajectories)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("actprm run: learning as it happens", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
