"""The label-efficiency experiment: replay a labelled pool as a stream, as the daemon runs.

For every (strategy, budget, seed) a fresh PRM goes once over the pool in the published order
of operations, per batch of `batch_size` trajectories:
1. score the batch with the current PRM (`EnsemblePRM.score`, or `score_features` on cached
   hidden states in `heads` mode: the same heads, the same summary);
2. select with the daemon's selector (`uncertainty.make_selector`);
3. admit candidates within the budget and reveal their gold labels, as the gold-label judge
   would (see "Budget" below);
4. update as the daemon does: once `update_batch` new labels are waiting (and at the end of
   a pass), `Trainer.fit` on them, the daemon's own update (FitConfig: steps per update, a
   replayed share of the labels revealed earlier).
Then the threshold is chosen on a validation slice of the pool (never on the test file) and
the PRM is scored on the test file: ProcessBench F1. Beside every run a position-only
baseline (a logistic model of step position, fitted on the same labelled trajectories) is
scored the same way, so a gain that step position alone explains is visible.

Budget: a budget b is a share of the stream. Like the daemon's round keeper it is a cap on
admitted labels, paced over the stream: after n trajectories have streamed by, at most
floor(b * n) labels are used, and budget a batch leaves unused carries over. With several
passes (epochs) the budget is paced over all of them, so later passes, on a model that has
learned from the labels so far, can still spend some; known labels are re-used for free. When the rule
flags more trajectories than a batch may admit, uncertainty-based strategies admit first those
the heads disagree about most on where the first error is, or with `rank` "least-confidence"
the least confident (`uncertainty_priority`); random and full admit in stream order.
"""

from __future__ import annotations

import math
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm import tqdm

from actprm.model.backbone import Backbone
from actprm.model.training.consolidate import ConsolidateConfig, consolidation_candidate, validation_ids
from actprm.model.data.records import Record
from actprm.model.features import Features, FeatureCache
from actprm.model.labels import step_labels
from actprm.model.eval.metrics import best_threshold, predicted_first_errors, processbench_scores
from actprm.model.prm import EnsemblePRM, PRMConfig, StepScores
from actprm.model.training.trainer import FitConfig, LabelledSample, Trainer, TrainerConfig
from actprm.model.uncertainty import STRATEGIES, first_error_mutual_information, make_selector, uncertainty_window

RANKED = ("actprm", "confidence", "disagreement")  # strategies whose candidates have an order
RANKS = ("mutual-information", "least-confidence")  # the orders uncertainty_priority knows
PUBLISHED = (0.95, 0.005)  # the published delta_pred, delta_std: the selected share is also read at these


@dataclass
class SimConfig:
    strategies: tuple[str, ...] = ("actprm", "random", "full")
    budgets: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 1.0)
    seeds: int = 3
    batch_size: int = 16  # trajectories per stream batch; the published 64 gives a 1000-record pool only 15 updates
    update_batch: int = 16  # new labels per update (the daemon's update.batch_size)
    epochs: int = 1  # passes over the pool; later passes re-train on known labels, new ones still cost budget
    val_fraction: float = 0.1  # share of the pool held out (stratified) to choose the threshold
    delta_pred: float = 0.95  # published ActPRM thresholds
    delta_std: float = 0.005
    # Which flagged candidates a batch admits first when the budget cannot take them all
    # (uncertainty_priority); measured in docs/simulate.md, "Which candidates first".
    rank: str = "mutual-information"
    reach_tolerance: float = 0.01  # "reaches full-data F1" = mean F1 >= full mean F1 - this
    prm: PRMConfig = field(default_factory=PRMConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    fit: FitConfig = field(default_factory=FitConfig)  # the daemon's update: steps, mini-batch, replay
    # After each run, a PRM consolidated as the daemon does on exactly the labels the run
    # admitted (model/training/consolidate.py); None: no consolidated column.
    consolidate: ConsolidateConfig | None = field(default_factory=ConsolidateConfig)

    def check(self) -> None:
        for s in self.strategies:
            if s not in STRATEGIES:
                raise ValueError(f"unknown strategy {s!r}; choose from {', '.join(STRATEGIES)}")
        if not self.strategies or not self.budgets:
            raise ValueError("need at least one strategy and one budget")
        for b in self.budgets:
            if not 0.0 < b <= 1.0:
                raise ValueError(f"a budget is a share of the pool in (0, 1], got {b}")
        if self.seeds < 1 or self.batch_size < 1 or self.epochs < 1 or self.update_batch < 1:
            raise ValueError("seeds, batch size and epochs must be >= 1")
        if self.rank not in RANKS:
            raise ValueError(f"unknown rank {self.rank!r}; choose from {', '.join(RANKS)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


# --- engines: the same PRM/trainer code, on cached features or on text ---------------------


class HeadsEngine:
    """heads mode: a frozen backbone's hidden states come from the FeatureCache once; every
    run gets fresh heads (seeded) and a fresh Trainer, and scores/updates on the cache."""

    def __init__(self, backbone: Backbone, cache: FeatureCache, pool: Sequence[Record], test: Sequence[Record],
                 config: SimConfig, progress: bool = False):
        self.backbone, self.config = backbone, config
        self.pool_f = cache.get([(r.problem, r.steps) for r in pool], progress=progress, desc="pool features")
        self.test_f = cache.get([(r.problem, r.steps) for r in test], progress=progress, desc="test features")
        self.cache_hits, self.cache_misses = cache.hits, cache.misses

    def new_run(self, seed: int) -> None:
        self.prm = EnsemblePRM(self.backbone, replace(self.config.prm, seed=seed))
        self.trainer = Trainer(self.prm, self.config.trainer.model_copy(update={"mode": "heads", "seed": seed}))

    def _score(self, feats: list[Features]) -> list[StepScores]:
        return self.prm.score_features([f.at_steps for f in feats], n_steps=[f.n_steps for f in feats],
                                       truncated=[f.truncated for f in feats], n_tokens=[f.n_tokens for f in feats])

    def score_pool(self, idx: Sequence[int]) -> list[StepScores]:
        return self._score([self.pool_f[i] for i in idx])

    def sample(self, pool: Sequence[Record], i: int) -> LabelledSample:
        r = pool[i]
        return LabelledSample(r.id, r.problem, r.steps, r.label, self.pool_f[i].at_steps)

    def score_test(self) -> list[StepScores]:
        return self._score(self.test_f)

    def n_scored_pool(self, i: int) -> int:
        return self.pool_f[i].at_steps.shape[0]

    def n_scored_test(self, i: int) -> int:
        return self.test_f[i].at_steps.shape[0]


class TextEngine:
    """lora / full mode: the backbone trains, so every score is a real forward pass; each run
    loads a fresh backbone (LoRA adapters are injected into the body in place)."""

    def __init__(self, load: Callable[[], Backbone], pool: Sequence[Record], test: Sequence[Record], config: SimConfig,
                 mode: str):
        self.load, self.pool, self.test, self.config, self.mode = load, pool, test, config, mode
        self.cache_hits = self.cache_misses = 0
        self._n_scored: dict[tuple[str, int], int] = {}

    def new_run(self, seed: int) -> None:
        self.prm = EnsemblePRM(self.load(), replace(self.config.prm, seed=seed))
        self.trainer = Trainer(self.prm, self.config.trainer.model_copy(update={"mode": self.mode, "seed": seed}))

    def _score(self, recs: Sequence[Record], where: str, idx: Sequence[int]) -> list[StepScores]:
        got = self.prm.score([(r.problem, r.steps) for r in recs])
        for i, s in zip(idx, got):
            self._n_scored[(where, i)] = len(s.mu)
        return got

    def score_pool(self, idx: Sequence[int]) -> list[StepScores]:
        return self._score([self.pool[i] for i in idx], "pool", idx)

    def sample(self, pool: Sequence[Record], i: int) -> LabelledSample:
        r = pool[i]
        return LabelledSample(r.id, r.problem, r.steps, r.label)

    def score_test(self) -> list[StepScores]:
        return self._score(self.test, "test", range(len(self.test)))

    def n_scored_pool(self, i: int) -> int:
        if ("pool", i) not in self._n_scored:
            r = self.pool[i]
            self._n_scored[("pool", i)] = self.prm.encode(r.problem, r.steps).n_scored
        return self._n_scored[("pool", i)]

    def n_scored_test(self, i: int) -> int:
        return self._n_scored[("test", i)]


# --- pure helpers ----------------------------------------------------------------------------


def uncertainty_priority(score: StepScores, rank: str = "mutual-information") -> tuple[float, ...]:
    """Sort key, the candidate most worth a label first; it only orders candidates the selector
    already flagged. "least-confidence": the lowest confidence max(mu, 1 - mu) up to E(s), then
    the largest head disagreement there. "mutual-information": how much the heads disagree
    about the label itself (`first_error_mutual_information`), then least confidence."""
    least_confident = (1.0, 0.0)  # nothing scored: last
    if score.mu:
        end = uncertainty_window(score.mu)
        least_confident = (min(max(m, 1.0 - m) for m in score.mu[: end + 1]), -max(score.sigma[: end + 1]))
    if rank == "least-confidence":
        return least_confident
    return (-first_error_mutual_information(score.probs),) + least_confident


def split_validation(records: Sequence[Record], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(stream indices, validation indices): a share `fraction` of the erroneous and of the
    correct records each (at least one of each when the group has two or more), by seed."""
    rng = random.Random(f"actprm-val-{seed}")
    val: list[int] = []
    for group in ([i for i, r in enumerate(records) if r.label == -1], [i for i, r in enumerate(records) if r.label != -1]):
        rng.shuffle(group)
        k = round(len(group) * fraction)
        if k == 0 and len(group) >= 2:
            k = 1
        val += group[:k]
    held = set(val)
    return [i for i in range(len(records)) if i not in held], sorted(val)


def position_features(n_scored: int, n_steps: int) -> torch.Tensor:
    """(S, 4) per step: index, relative position, log(1 + index), trajectory length; scaled to ~1."""
    i = torch.arange(n_scored, dtype=torch.float32)  # (S,)
    n = float(max(n_steps, 1))
    return torch.stack([i / 10, i / max(n - 1, 1.0), torch.log1p(i), torch.full_like(i, n / 10)], dim=1)  # (S, 4)


def fit_position_model(labelled: Sequence[tuple[int, int, int]], l2: float = 1e-3) -> torch.Tensor:
    """Logistic regression of step correctness on position alone. labelled: (n_scored,
    n_steps, first_error) per trajectory. Returns the weights (5,) (last = bias)."""
    xs, ys = [], []
    for n_scored, n_steps, k in labelled:
        labels = step_labels(k, n_steps)[:n_scored]
        x = position_features(n_scored, n_steps)  # (S, 4)
        for j, y in enumerate(labels):
            if y is not None:
                xs.append(x[j])
                ys.append(y)
    w = torch.zeros(5, requires_grad=True)
    if not xs:
        return w.detach()
    X = torch.cat([torch.stack(xs), torch.ones(len(xs), 1)], dim=1)  # (N, 5)
    Y = torch.tensor(ys)  # (N,)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(X @ w, Y) + l2 * (w[:4] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def position_scores(w: torch.Tensor, n_scored: int, n_steps: int) -> list[float]:
    x = position_features(n_scored, n_steps)  # (S, 4)
    return torch.sigmoid(x @ w[:4] + w[4]).tolist()  # (S,)


def f1_with_val_threshold(val_scores, val_gold, test_scores, test_gold) -> dict:
    """Choose the threshold on validation (metrics.best_threshold), apply it to the test set."""
    try:
        t, val_f1 = best_threshold(val_scores, val_gold)
    except ValueError:  # validation lacks a group: fall back to the default threshold
        t, val_f1 = 0.5, None
    test = processbench_scores(predicted_first_errors(test_scores, t), test_gold)
    at_half = processbench_scores(predicted_first_errors(test_scores, 0.5), test_gold)
    return {"f1": test["f1"], "acc_error": test["acc_error"], "acc_correct": test["acc_correct"],
            "threshold": t, "val_f1": val_f1, "f1_at_0.5": at_half["f1"]}


# --- one run ---------------------------------------------------------------------------------


def replay(engine, pool: Sequence[Record], stream: Sequence[int], strategy: str, budget: float, seed: int,
           config: SimConfig, bar: tqdm | None = None) -> dict:
    """One pass (or config.epochs passes) of the stream; returns what was labelled and done."""
    selector = make_selector(strategy, delta_pred=config.delta_pred, delta_std=config.delta_std, rate=budget, seed=seed)
    rng = random.Random(f"actprm-stream-{seed}")
    order = list(stream)
    labelled: list[int] = []
    known: set[int] = set()
    seen = flagged = updates = skipped_updates = 0
    for epoch in range(config.epochs):
        rng.shuffle(order)
        pending: list[int] = []
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            seen += len(batch)
            scores = engine.score_pool(batch)  # 1. score
            picked = selector.select(scores)  # 2. select
            flagged += sum(picked)
            candidates = [(i, s) for i, s, p in zip(batch, scores, picked) if p and i not in known]
            if strategy in RANKED:
                candidates.sort(key=lambda c: uncertainty_priority(c[1], config.rank))
            allowed = max(0, math.floor(budget * seen / config.epochs + 1e-9) - len(labelled))
            for i, _ in candidates[:allowed]:  # 3. reveal the gold labels of the admitted
                known.add(i)
                labelled.append(i)
            # known labels met again in a later pass are trained again, like new ones
            pending += [i for i in batch if i in known and i not in pending]
            if len(pending) >= config.update_batch:  # 4. update, as the daemon's trainer does
                updates, skipped_updates = _fit(engine, pool, pending, labelled, config, updates, skipped_updates)
                pending = []
            if bar is not None:
                bar.update(1)
        if pending:  # the end of a pass: what is waiting is trained too
            updates, skipped_updates = _fit(engine, pool, pending, labelled, config, updates, skipped_updates)
    return {"labelled": labelled, "seen": seen, "flagged": flagged, "updates": updates,
            "skipped_updates": skipped_updates}


def _fit(engine, pool, pending: list[int], labelled: list[int], config: SimConfig, updates: int, skipped: int):
    """One daemon update on the pending labels, replaying the newest earlier ones."""
    now = set(pending)
    earlier = [i for i in labelled if i not in now][-config.fit.replay_size:] if config.fit.replay_size else []
    result = engine.trainer.fit([engine.sample(pool, i) for i in pending], [engine.sample(pool, i) for i in earlier],
                                config.fit)
    return updates + result.applied, skipped + (not result.applied)


def evaluate_run(engine, pool: Sequence[Record], test: Sequence[Record], val_idx: Sequence[int],
                 labelled: Sequence[int]) -> dict:
    """Test F1 of the trained PRM and of the position-only baseline, thresholds from validation."""
    val_mu = [s.mu for s in engine.score_pool(val_idx)]
    test_scores = engine.score_test()
    test_mu = [s.mu for s in test_scores]
    val_gold, test_gold = [pool[i].label for i in val_idx], [r.label for r in test]
    out = f1_with_val_threshold(val_mu, val_gold, test_mu, test_gold)
    # Would the published rule still ask about the test records? (a stream of the same kind)
    out["test_flagged_share"] = _share(make_selector("actprm", delta_pred=PUBLISHED[0], delta_std=PUBLISHED[1]).select(test_scores))
    kinds = sorted({str(r.extra["kind"]) for r in test if r.label >= 0 and "kind" in r.extra})
    if kinds:  # how well each error kind is found, at the threshold chosen on validation
        predicted = predicted_first_errors(test_mu, out["threshold"])
        out["by_kind"] = {k: _share([p == r.label for p, r in zip(predicted, test) if r.extra.get("kind") == k])
                          for k in kinds}

    w = fit_position_model([(engine.n_scored_pool(i), len(pool[i].steps), pool[i].label) for i in labelled])
    pos_val = [position_scores(w, engine.n_scored_pool(i), len(pool[i].steps)) for i in val_idx]
    pos_test = [position_scores(w, engine.n_scored_test(j), len(r.steps)) for j, r in enumerate(test)]
    pos = f1_with_val_threshold(pos_val, val_gold, pos_test, test_gold)
    out |= {"position_f1": pos["f1"], "position_threshold": pos["threshold"]}
    return out


def consolidated_run(engine, pool: Sequence[Record], test: Sequence[Record], val_idx: Sequence[int],
                     labelled: Sequence[int], config: ConsolidateConfig, seed: int) -> dict:
    """A PRM consolidated as the daemon's trainer does (`consolidation_candidate`), on exactly the
    labels the run admitted: up to config.epochs with early stopping (or config.average_epochs,
    averaged), starting fresh or from the run's final PRM; then the same test as the online PRM
    (threshold from the pool's validation slice), under "consolidated_*". Its validation slice is
    the pool's validation split, a sample of the stream as the daemon's val_sample "stream" is
    (the same for every strategy, and labelled in every run already to choose the threshold), or
    with val_sample "selected" a slice of the admitted labels themselves (by id hash, never
    trained on)."""
    samples = [engine.sample(pool, i) for i in labelled]
    if config.val_sample == "stream":
        train, val = samples, [engine.sample(pool, i) for i in val_idx]
    else:
        val_ids = validation_ids([(s.id, s.first_error) for s in samples], config.val_fraction)
        train, val = [s for s in samples if s.id not in val_ids], [s for s in samples if s.id in val_ids]
    cand = consolidation_candidate(engine.prm, engine.trainer.config, train, val, config, seed=seed)
    online = engine.prm
    engine.prm = cand.prm
    try:
        got = evaluate_run(engine, pool, test, val_idx, [])
    finally:
        engine.prm = online
    return {"consolidated_f1": got["f1"], "consolidated_threshold": got["threshold"], "consolidated_val_f1": got["val_f1"],
            "consolidated_f1_at_0.5": got["f1_at_0.5"], "consolidated_test_flagged_share": got["test_flagged_share"],
            "consolidated_epochs": cand.epochs, "consolidated_best_epoch": cand.best_epoch,
            "consolidated_stopped": cand.stopped, "consolidated_steps": cand.steps,
            "consolidated_val_trusted": cand.val_trusted, "consolidated_train_labels": len(cand.train_ids),
            "consolidated_val_labels": len(cand.val_ids),
            "consolidated_seconds": cand.seconds,
            **({"consolidated_by_kind": got["by_kind"]} if "by_kind" in got else {})}


def run_simulation(engine, pool: Sequence[Record], test: Sequence[Record], config: SimConfig,
                   progress: bool = False) -> dict:
    """Every (strategy, budget, seed); returns {"runs", "summary", "headline"}."""
    config.check()
    splits = {seed: split_validation(pool, config.val_fraction, seed) for seed in range(config.seeds)}
    n_stream = len(splits[0][0])
    per_run = math.ceil(n_stream / config.batch_size) * config.epochs
    # "full" labels everything it meets in stream order, so below a budget of 1.0 it is only a
    # weaker "random"; it runs once, at 1.0, as the full-data reference.
    grid = [(st, b) for st in config.strategies for b in config.budgets if st != "full" or b == 1.0]
    if "full" in config.strategies and 1.0 not in config.budgets:
        grid.append(("full", 1.0))
    total = per_run * config.seeds * len(grid)
    runs = []
    with tqdm(total=total, desc="simulate", unit="batch", file=sys.stderr, disable=not progress) as bar:
        for strategy, budget in grid:
            for seed in range(config.seeds):
                stream, val_idx = splits[seed]
                bar.set_postfix_str(f"{strategy} b={budget} seed={seed}")
                t0 = time.time()
                engine.new_run(seed)
                done = replay(engine, pool, stream, strategy, budget, seed, config, bar)
                metrics = evaluate_run(engine, pool, test, val_idx, done["labelled"])
                labelled = done["labelled"]
                if config.consolidate is not None:
                    metrics |= consolidated_run(engine, pool, test, val_idx, labelled, config.consolidate, seed)
                run = {"strategy": strategy, "budget": budget, "seed": seed,
                       "labels_used": len(labelled), "label_share": len(labelled) / max(1, len(stream)),
                       "flagged_share": done["flagged"] / max(1, done["seen"]),
                       "updates": done["updates"], "skipped_updates": done["skipped_updates"],
                       **metrics, "seconds": round(time.time() - t0, 2)}
                kinds = Counter(str(pool[i].extra["kind"]) for i in labelled if "kind" in pool[i].extra)
                if kinds:
                    run["labelled_kinds"] = dict(kinds)
                runs.append(run)
    summary = summarise_runs(runs)
    return {"config": config_dict(config), "n_pool": len(pool), "n_stream": n_stream,
            "n_val": len(splits[0][1]), "n_test": len(test), "runs": runs, "summary": summary,
            "headline": headline(runs, summary, config.reach_tolerance)}


def config_dict(config: SimConfig) -> dict:
    d = asdict(config)
    d["trainer"] = config.trainer.model_dump(mode="json")
    d["fit"] = config.fit.model_dump(mode="json")
    d["consolidate"] = config.consolidate.model_dump(mode="json") if config.consolidate is not None else None
    return d


def _share(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _mean_std(xs: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = [x for x in xs if x is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), statistics.pstdev(vals) if len(vals) > 1 else 0.0


def summarise_runs(runs: Sequence[dict]) -> list[dict]:
    """Mean and spread over seeds per (strategy, budget), in run order."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["strategy"], r["budget"]), []).append(r)
    out = []
    for (strategy, budget), rs in groups.items():
        f1, f1_sd = _mean_std([r["f1"] for r in rs])
        pos, pos_sd = _mean_std([r["position_f1"] for r in rs])
        labels, _ = _mean_std([r["labels_used"] for r in rs])
        cons = {}
        if "consolidated_f1" in rs[0]:
            c_f1 = [r["consolidated_f1"] for r in rs if r["consolidated_f1"] is not None]
            m, sd = _mean_std(c_f1)
            cons = {"consolidated_f1": m, "consolidated_f1_std": sd, "consolidated_f1_min": min(c_f1, default=None),
                    "consolidated_f1_max": max(c_f1, default=None),
                    "consolidated_epochs": _mean_std([r["consolidated_epochs"] for r in rs])[0],
                    "test_flagged_share": _mean_std([r.get("test_flagged_share") for r in rs])[0],
                    "consolidated_test_flagged_share": _mean_std([r["consolidated_test_flagged_share"] for r in rs])[0]}
        out.append({"strategy": strategy, "budget": budget, "seeds": len(rs), "labels_used": labels,
                    "label_share": _mean_std([r["label_share"] for r in rs])[0],
                    "f1": f1, "f1_std": f1_sd, "f1_min": min((r["f1"] for r in rs if r["f1"] is not None), default=None),
                    "f1_max": max((r["f1"] for r in rs if r["f1"] is not None), default=None),
                    "position_f1": pos, "position_f1_std": pos_sd, **cons,
                    **({"by_kind": {k: _mean_std([r["by_kind"].get(k) for r in rs])[0] for k in rs[0]["by_kind"]}}
                       if "by_kind" in rs[0] else {})})
    return out


def headline(runs: Sequence[dict], summary: Sequence[dict], tolerance: float, key: str = "f1") -> dict:
    """Full-data F1, the smallest ActPRM budget reaching it, ActPRM - random per budget (paired
    by seed); key "consolidated_f1" gives the same for the consolidated PRMs (under "consolidated")."""
    by = {(s["strategy"], s["budget"]): s for s in summary}
    full = by.get(("full", 1.0))
    out: dict = {"full_f1": full.get(key) if full else None, "full_position_f1": full["position_f1"] if full else None,
                 "reach_tolerance": tolerance, "actprm_reaches_full_at": None, "actprm_minus_random": {}}
    if full and full.get(key) is not None:
        budgets = sorted(b for (s, b) in by if s == "actprm" and by[(s, b)].get(key) is not None)
        for b in budgets:
            if by[("actprm", b)][key] >= full[key] - tolerance:
                out["actprm_reaches_full_at"] = {"budget": b, "label_share": by[("actprm", b)]["label_share"],
                                                 "f1": by[("actprm", b)][key]}
                break
    paired: dict[float, list[float]] = {}
    index = {(r["strategy"], r["budget"], r["seed"]): r for r in runs}
    for (s, b, seed), r in index.items():
        other = index.get(("random", b, seed))
        if s == "actprm" and other and r.get(key) is not None and other.get(key) is not None:
            paired.setdefault(b, []).append(r[key] - other[key])
    for b, diffs in sorted(paired.items()):
        m, sd = _mean_std(diffs)
        out["actprm_minus_random"][str(b)] = {"mean": m, "std": sd, "per_seed": diffs}
    if key == "f1" and any("consolidated_f1" in r for r in runs):
        out["consolidated"] = headline(runs, summary, tolerance, "consolidated_f1")
    return out


def format_table(result: dict) -> str:
    """A plain-text table of the summary plus the headline figures."""
    def f(x, spec=".3f"):
        return "n/a" if x is None else format(x, spec)

    cons = any("consolidated_f1" in s for s in result["summary"])
    lines = [f"{'strategy':<12} {'budget':>6} {'labels':>7} {'share':>6} {'F1':>6} {'±sd':>6} {'pos F1':>7}"
             + (f" {'cons F1':>7} {'±sd':>6} {'flag':>5} {'c.flag':>6}" if cons else "")]
    for s in result["summary"]:
        lines.append(f"{s['strategy']:<12} {s['budget']:>6.2f} {f(s['labels_used'], '.1f'):>7} {f(s['label_share'], '.2f'):>6} "
                     f"{f(s['f1']):>6} {f(s['f1_std']):>6} {f(s['position_f1']):>7}"
                     + (f" {f(s.get('consolidated_f1')):>7} {f(s.get('consolidated_f1_std')):>6} "
                        f"{f(s.get('test_flagged_share'), '.2f'):>5} {f(s.get('consolidated_test_flagged_share'), '.2f'):>6}"
                        if cons else ""))
    if cons:
        lines.append("(flag, c.flag: share of the test records the published rule 0.95/0.005 selects, online and consolidated PRM)")
    for name, h in (("online", result["headline"]), ("consolidated", result["headline"].get("consolidated"))):
        if h is None:
            continue
        lines.append(f"{name}: full-data F1 {f(h['full_f1'])} (position-only on the same labels: {f(h['full_position_f1'])})")
        reach = h["actprm_reaches_full_at"]
        lines.append("  ActPRM reaches it (within {:.3f}) at budget: {}".format(
            h["reach_tolerance"], "not within the budgets run" if reach is None else f"{reach['budget']} "
            f"({f(reach['label_share'], '.2f')} of the stream labelled, F1 {f(reach['f1'])})"))
        for b, d in h["actprm_minus_random"].items():
            lines.append(f"  ActPRM - random at budget {b}: {f(d['mean'], '+.3f')} (sd {f(d['std'])} over {len(d['per_seed'])} seeds)")
    return "\n".join(lines)
