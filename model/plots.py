"""The learning curve of a simulation: test F1 against labels used, one line per strategy."""

from __future__ import annotations

from pathlib import Path


def learning_curve(result: dict, path: str | Path, title: str = "") -> Path:
    """Write a PNG: per strategy the mean F1 over seeds at each budget (x = mean labels used),
    a band from the lowest to the highest seed, and the position-only baseline dashed."""
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
