"""`actprm simulate`: the label-efficiency experiment (see model/lab/simulate.py and docs/simulate.md).

Heavy imports (torch, transformers) happen inside the command, so `actprm --help` stays fast.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import typer


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{what}: expected a comma list of numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{what}: empty list")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _load(path: Path, format: str, limit: int | None, what: str):
    """Usable records of a file; skipped ones are counted and reported, never dropped silently."""
    from actprm.model.data.records import load_records

    loaded = load_records(path, format=format)
    if loaded.skipped:
        reasons = Counter(reason.split(" (")[0] if reason.startswith("no steps") else reason for _, reason in loaded.skipped)
        typer.echo(f"{what} {path}: skipped {len(loaded.skipped)} unusable records: "
                   + "; ".join(f"{n} x {r}" for r, n in reasons.most_common(5)), err=True)
    records = loaded.records
    if limit is not None and limit < len(records):
        # A fixed shuffle before cutting, so a subset does not follow the file's grouping.
        order = list(range(len(records)))
        random.Random(f"actprm-subset-{what}").shuffle(order)
        records = [records[i] for i in sorted(order[:limit])]
    n_err = sum(r.label != -1 for r in records)
    if n_err == 0 or n_err == len(records):
        raise ValueError(f"{what} {path}: ProcessBench F1 needs records both with and without an error "
                         f"({n_err} of {len(records)} usable records have one)")
    return records, len(loaded.skipped)


def _atomic_json(path: Path, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a results file is meant to be read
    os.replace(tmp, path)


def simulate(
    pool: Annotated[Path, typer.Option("--pool", help="labelled pool replayed as the stream (ProcessBench JSON or JSONL)")],
    test: Annotated[Path, typer.Option("--test", help="labelled test file, only ever scored")],
    out: Annotated[Path, typer.Option("--out", help="directory for results.json and learning_curve.png")],
    backbone: Annotated[str, typer.Option(help="'tiny', 'smollm2-135m' or a local model directory")] = "smollm2-135m",
    strategies: Annotated[str, typer.Option(help="comma list: actprm, random, full, confidence, disagreement")] = "actprm,random,full",
    budgets: Annotated[str, typer.Option(help="comma list of shares of the stream that may be labelled")] = "0.1,0.2,0.3,0.5,1.0",
    seeds: Annotated[int, typer.Option(help="seeds per (strategy, budget): heads init, stream order, validation slice")] = 3,
    mode: Annotated[str, typer.Option(help="heads (frozen backbone, cached features), lora or full")] = "heads",
    hidden_layer: Annotated[Optional[int], typer.Option(help="decoder layer whose output feeds the heads (default: the backbone's, smollm2-135m 15; -1: the last)")] = None,
    batch_size: Annotated[int, typer.Option(help="trajectories per stream batch (score, select, label, update)")] = 16,
    epochs: Annotated[int, typer.Option(help="passes over the pool")] = 1,
    val_fraction: Annotated[float, typer.Option(help="share of the pool held out to choose the threshold")] = 0.1,
    heads: Annotated[int, typer.Option(help="ensemble heads E")] = 32,
    lr: Annotated[Optional[float], typer.Option(help="learning rate (default: the trainer's, 1e-3; LoRA wants ~1e-4)")] = None,
    steps: Annotated[Optional[int], typer.Option(help="optimizer steps per update (default: the daemon's update.steps)")] = None,
    mini_batch: Annotated[Optional[int], typer.Option(help="trajectories per optimizer step (default: update.mini_batch)")] = None,
    replay_share: Annotated[Optional[float], typer.Option(help="share of each mini-batch replayed from earlier labels (default: update.replay_share)")] = None,
    replay_size: Annotated[Optional[int], typer.Option(help="earlier labels kept for replay (default: update.replay_size)")] = None,
    delta_pred: Annotated[float, typer.Option(help="ActPRM confidence threshold")] = 0.95,
    delta_std: Annotated[float, typer.Option(help="ActPRM disagreement threshold")] = 0.005,
    rank: Annotated[str, typer.Option(help="which flagged candidates a batch admits first when the budget cannot take them all: 'mutual-information' (the heads' disagreement about where the first error is) or 'least-confidence'")] = "mutual-information",
    max_length: Annotated[int, typer.Option(help="tokens per trajectory; later steps are dropped whole")] = 2048,
    pool_limit: Annotated[Optional[int], typer.Option(help="use a fixed random subset of N pool records")] = None,
    test_limit: Annotated[Optional[int], typer.Option(help="use a fixed random subset of N test records")] = None,
    format: Annotated[str, typer.Option("--format", help="auto, processbench or jsonl (both files)")] = "auto",
    cache_dir: Annotated[Optional[Path], typer.Option(help="feature cache (default $ACTPRM_CACHE/features)")] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 1,
    consolidate: Annotated[bool, typer.Option(help="also consolidate a PRM on each run's admitted labels, as the daemon does (the consolidated column)")] = True,
    consolidate_start: Annotated[Optional[str], typer.Option(help="consolidation starts from 'fresh' heads (their initial weights) or the run's 'served' PRM (default: consolidate.start)")] = None,
    consolidate_epochs: Annotated[Optional[int], typer.Option(help="most epochs of a consolidation (default: consolidate.epochs)")] = None,
    consolidate_lr: Annotated[Optional[float], typer.Option(help="a consolidation's learning rate (default: the trainer's)")] = None,
    consolidate_mini_batch: Annotated[Optional[int], typer.Option(help="labels per consolidation step (default: consolidate.mini_batch)")] = None,
    consolidate_patience: Annotated[Optional[int], typer.Option(help="epochs without a better validation figure before a consolidation stops (default: consolidate.patience)")] = None,
    consolidate_min_steps: Annotated[Optional[int], typer.Option(help="optimizer steps a consolidation takes before early stopping may end it or choose its epoch (default: consolidate.min_steps)")] = None,
    consolidate_min_val_labels: Annotated[Optional[int], typer.Option(help="a smaller validation slice neither stops nor chooses the epoch (default: consolidate.min_val_labels)")] = None,
    consolidate_average_epochs: Annotated[Optional[int], typer.Option(help="a consolidation trains this many epochs with no early stopping and keeps the mean of its second half's weights, as the daemon's periodic ones with consolidate.average_epochs (default: consolidate.average_epochs, None: early stopping)")] = None,
    consolidate_val_sample: Annotated[Optional[str], typer.Option(help="the consolidation's validation slice: 'stream' (the pool's validation split) or 'selected' (a slice of the run's admitted labels) (default: consolidate.val_sample)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result JSON instead of the table")] = False,
) -> None:
    """Replay a labelled pool as a stream (score, select, label, update) for each strategy and
    budget; write results.json and a learning curve, print a table."""
    import torch

    from actprm.model.backbone import load_backbone
    from actprm.model.features import FeatureCache
    from actprm.model.lab.plots import learning_curve
    from actprm.model.prm import PRMConfig
    from actprm.model.lab.simulate import HeadsEngine, SimConfig, TextEngine, format_table, run_simulation
    from actprm.model.training.consolidate import ConsolidateConfig
    from actprm.model.training.trainer import FitConfig, TrainerConfig

    from actprm.model.backbone import default_hidden_layer

    hidden_layer = default_hidden_layer(backbone, hidden_layer)
    if mode not in ("heads", "lora", "full"):
        raise ValueError(f"--mode must be heads, lora or full, got {mode!r}")
    torch.set_num_threads(max(1, threads))
    trainer_kw = {"mode": mode} | ({"lr": lr} if lr is not None else {})
    config = SimConfig(strategies=_names(strategies), budgets=_floats(budgets, "--budgets"), seeds=seeds,
                       batch_size=batch_size, epochs=epochs, val_fraction=val_fraction, delta_pred=delta_pred,
                       delta_std=delta_std, rank=rank, prm=PRMConfig(n_heads=heads, max_length=max_length),
                       trainer=TrainerConfig(**trainer_kw),
                       fit=FitConfig(**{k: v for k, v in {"steps": steps, "mini_batch": mini_batch, "replay_share": replay_share,
                                                          "replay_size": replay_size}.items() if v is not None}),
                       consolidate=ConsolidateConfig(**{k: v for k, v in {
                           "start": consolidate_start, "epochs": consolidate_epochs, "lr": consolidate_lr,
                           "mini_batch": consolidate_mini_batch, "patience": consolidate_patience,
                           "min_steps": consolidate_min_steps, "min_val_labels": consolidate_min_val_labels,
                           "val_sample": consolidate_val_sample, "average_epochs": consolidate_average_epochs}.items()
                           if v is not None}) if consolidate else None)
    config.check()
    pool_records, pool_skipped = _load(pool, format, pool_limit, "pool")
    test_records, test_skipped = _load(test, format, test_limit, "test")
    out.mkdir(parents=True, exist_ok=True)

    def load():
        return load_backbone(backbone, hidden_layer=hidden_layer)

    if mode == "heads":
        bb = load()
        from actprm.model.prm import EnsemblePRM

        cache = FeatureCache(EnsemblePRM(bb, replace_heads(config.prm)), cache_dir)
        engine = HeadsEngine(bb, cache, pool_records, test_records, config, progress=True)
    else:
        engine = TextEngine(load, pool_records, test_records, config, mode)
    result = run_simulation(engine, pool_records, test_records, config, progress=True)
    result |= {"pool": str(pool), "test": str(test), "backbone": backbone, "hidden_layer": hidden_layer, "mode": mode,
               "pool_skipped": pool_skipped, "test_skipped": test_skipped, "pool_limit": pool_limit,
               "test_limit": test_limit, "feature_cache": {"hits": engine.cache_hits, "misses": engine.cache_misses}}
    _atomic_json(out / "results.json", result)
    layer = "last" if hidden_layer is None else hidden_layer
    learning_curve(result, out / "learning_curve.png",
                   title=f"{backbone} layer {layer}, {mode}; pool {pool.name} ({len(pool_records)}), test {test.name} ({len(test_records)})")
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        typer.echo(format_table(result))
        typer.echo(f"wrote {out / 'results.json'} and {out / 'learning_curve.png'}")


def replace_heads(prm_config):
    """The cache only runs the backbone; one head keeps its throwaway heads cheap."""
    from dataclasses import replace

    return replace(prm_config, n_heads=1)
