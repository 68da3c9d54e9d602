"""The scorer: each trajectory scored once, its reward out, its selection to the round keeper.

`ScorerRole.on_trajectories` is what the trajectories agent calls with each take. It scores in
chunks of `scorer.max_batch` on a worker thread (`score_batch` is blocking torch work); each
chunk is scored by exactly one version (streams/roles/swap.py swaps between chunks). Rewards and
candidates of a chunk go out while the next chunk is scored; the ids are marked scored only
after every ack, so a crash re-scores rather than drops.

An id seen again is not scored again. Kafka redelivering the same record (same partition and
offset) needs nothing: its reward went out. The same id in a new record is a caller's retry
(client ids come from the content): the scorer sends the reward it kept, so the retry gets an
answer without a second forward pass or a second charge.

With the gold-label judge (`judge.kind = "oracle"`), a trajectory without gold (an RL client's
sample) is never selected: that judge could only dead-letter it, after it was charged.

The consolidations' validation sample (`consolidate.val_sample = "stream"`) is judged too,
selected or not: every trajectory whose id hashes below `consolidate.val_fraction`. Its reward
says `selected` only when the uncertainty rule chose it, so the selected share stays the rule's.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from actprm.model.training.consolidate import in_validation
from actprm.model.training.replay import FeatureMemo
from actprm.model.uncertainty import Selector, make_selector
from actprm.client import messages
from actprm.streams.config import ConsolidateSettings, ScorerSettings, SelectionSettings
from actprm.streams.state.journal import Journal
from actprm.streams.state.ledger import SCORED, Ledger
from actprm.streams.state.series import FlagSeries
from actprm.client.messages import AnnotationRequest, Reward, Trajectory
from actprm.streams.kafka.sender import Event, Observer, Sender
from actprm.streams.roles.rounds import RoundKeeper
from actprm.streams.roles.swap import ServedModel, Serving
from actprm.client.topics import Topics


@dataclass
class ScoredBatch:
    rewards: list[Reward]
    candidates: list[AnnotationRequest]  # selected for the judge; the round keeper admits or not
    duplicates: list[str] = field(default_factory=list)  # ids already scored: skipped
    version: int = -1
    seconds: float = 0.0
    tokens: int = 0
    no_gold: int = 0  # uncertain, but not selected: the gold-label judge has nothing to judge them by
    validation: int = 0  # judged only as the validation sample: the rule did not select them


def scored_before(ledger: Ledger, trajectory_id: str, epoch: str | None) -> bool:
    """Was a reward for this id sent in this life of the broker's data? A reward sent before the
    broker lost its data is gone with it, so that id is scored again."""
    mark = ledger.get(SCORED, trajectory_id)
    return mark is not None and mark.get("epoch") == epoch


def score_batch(served: ServedModel, selector: Selector, ledger: Ledger, batch: list[Trajectory], round_id: int = 0,
                epoch: str | None = None, memo: FeatureMemo | None = None, needs_gold: bool = False,
                batch_size: int | None = None, max_tokens: int | None = None,
                val_fraction: float | None = None) -> ScoredBatch:
    """Score trajectories not scored before; the caller marks them scored once rewards are sent.

    memo: keep the hidden states of the selected ones there, for a trainer in this process.
    needs_gold: the judge labels from gold only, so a trajectory without gold is not selected.
    batch_size, max_tokens: the limits of one forward pass, scorer.max_batch and
    scorer.max_batch_tokens as they are now (`ctl set` changes them), not as they were at start.
    val_fraction: judge every trajectory whose id hashes below it as well (the validation
    sample of the stream), selected or not."""
    fresh, duplicates, seen = [], [], set()
    for t in batch:
        if scored_before(ledger, t.id, epoch) or t.id in seen:
            duplicates.append(t.id)
        else:
            seen.add(t.id)
            fresh.append(t)
    if not fresh:
        return ScoredBatch([], [], duplicates, served.version)
    start = time.perf_counter()
    scores = served.prm.score([(t.problem, t.steps) for t in fresh], keep_features=memo is not None,
                              batch_size=batch_size, max_tokens=max_tokens)
    uncertain = selector.select(scores)
    judgeable = [not needs_gold or t.gold_first_error is not None for t in fresh]
    selected = [u and j for u, j in zip(uncertain, judgeable)]
    sampled = [j and val_fraction is not None and in_validation(t.id, val_fraction) for t, j in zip(fresh, judgeable)]
    judged = [a or b for a, b in zip(selected, sampled)]
    if memo is not None:
        for t, s, asked in zip(fresh, scores, judged):
            if asked:
                memo.put(t.id, t.problem, t.steps, s.features)
            s.features = None
    seconds = time.perf_counter() - start
    now = time.time()
    rewards, candidates = [], []
    for t, s, picked, asked in zip(fresh, scores, selected, judged):
        rewards.append(Reward(id=t.id, mu=s.mu, sigma=s.sigma, first_error=s.first_error, selected=picked,
                              model_version=served.version, n_steps=s.n_steps, truncated=s.truncated,
                              round_id=round_id, scored_at=now))
        if asked:
            candidates.append(AnnotationRequest(id=t.id, problem=t.problem, steps=t.steps,
                                                gold_first_error=t.gold_first_error, round_id=round_id,
                                                model_version=served.version, mu=s.mu, metadata=t.metadata,
                                                requested_at=now))
    return ScoredBatch(rewards, candidates, duplicates, served.version, seconds, sum(s.n_tokens for s in scores),
                       no_gold=sum(u and not s for u, s in zip(uncertain, selected)),
                       validation=sum(a and not s for a, s in zip(judged, selected)))


def mark_scored(ledger: Ledger, rewards: list[Reward], epoch: str | None = None,
                origin: dict[str, tuple[int | None, int | None]] | None = None) -> None:
    """Record each reward sent, with the record it answered (partition, offset) and the reward
    itself, so a retry in a later record can be answered with it."""
    origin = origin or {}
    with ledger.transaction():
        for r in rewards:
            ledger.put(SCORED, r.id, {"version": r.model_version, "epoch": epoch, "at": list(origin.get(r.id, (None, None))),
                                      "reward": r.model_dump(mode="json")})


def kept_reward_for_retry(ledger: Ledger, trajectory_id: str, at: tuple[int | None, int | None]) -> bytes | None:
    """The reward to send again for an id seen in a new record (a caller's retry), or None for
    Kafka redelivering the record it was scored from (its reward went out already)."""
    mark = ledger.get(SCORED, trajectory_id)
    if not mark or "reward" not in mark or list(at) == mark.get("at"):
        return None
    return messages.encode(Reward.model_validate(mark["reward"]))


class ScorerRole:
    def __init__(self, scorer: ScorerSettings, selection: SelectionSettings, seed: int, serving: Serving,
                 ledger: Ledger, sender: Sender, topics: Topics, journal: Journal, *, memo: FeatureMemo | None = None,
                 rounds: RoundKeeper | None = None, epoch: str | None = None, metrics: Observer | None = None,
                 needs_gold: bool = False, consolidate: ConsolidateSettings | None = None):
        self.settings, self.selection, self.seed = scorer, selection, seed  # live: `ctl set` changes them
        self.consolidate = consolidate  # its validation sample is judged too (val_sample, val_fraction; live)
        self.serving, self.ledger, self.sender, self.topics, self.journal = serving, ledger, sender, topics, journal
        self.memo = memo  # hidden states of selected trajectories, for a trainer in this process (heads mode)
        self.rounds = rounds  # the round keeper, when it runs in this process: requests carry its round
        self.epoch = epoch  # the broker data's life this process started in (streams/kafka/epoch.py)
        self.metrics = metrics
        self.needs_gold = needs_gold  # the judge labels from gold only (judge.kind = "oracle")
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="actprm-score")
        self.counts: Counter = Counter()
        self.selected_flags = FlagSeries()  # 1 per scored trajectory, in scoring order: the selected share over the run (bounded, streams/state/series.py)
        self.rebuild_selector()

    def rebuild_selector(self) -> None:
        """(Re)make the selection rule from the settings; `ctl set selection.*` calls this."""
        sel = self.selection
        self.selector = make_selector(sel.strategy, delta_pred=sel.delta_pred, delta_std=sel.delta_std,
                                      rate=sel.random_rate, seed=self.seed)

    async def on_trajectories(self, events: Sequence[Event]) -> None:
        batch: list[Trajectory] = []
        origin: dict[str, tuple[int | None, int | None]] = {}
        for event, msg in await self.sender.decoded(Trajectory, events):
            if msg.id in origin:
                self.counts["duplicates_skipped"] += 1  # the same id twice in one take
            else:
                batch.append(msg)
                origin[msg.id] = (event.partition, event.offset)
        self.counts["consumed"] += len(events)
        size = self.settings.max_batch  # live: `ctl set scorer.max_batch` applies to the next chunk
        # Chunks of similar length waste less compute on padding; rewards carry ids, not order.
        batch.sort(key=lambda t: len(t.problem) + sum(len(x) for x in t.steps))
        acks, scored = [], []
        for start in range(0, len(batch), size):
            result = await self._score_chunk(batch[start:start + size])
            for r in result.rewards:
                acks.append(await self.sender.enqueue(self.topics.rewards, r.id, messages.encode(r)))
            for c in result.candidates:
                acks.append(await self.sender.enqueue(self.topics.candidates, c.id, messages.encode(c)))
            for tid in result.duplicates:
                kept = kept_reward_for_retry(self.ledger, tid, origin.get(tid, (None, None)))
                if kept is not None:
                    acks.append(await self.sender.enqueue(self.topics.rewards, tid, kept))
                    self.counts["rewards_resent"] += 1
            scored += result.rewards
        await asyncio.gather(*acks)
        mark_scored(self.ledger, scored, self.epoch, origin)

    @property
    def val_fraction(self) -> float | None:
        """The share of the stream judged as the consolidations' validation sample (None: none)."""
        return self.consolidate.stream_sample() if self.consolidate is not None else None

    async def _score_chunk(self, batch: list[Trajectory]) -> ScoredBatch:
        served = self.serving.current  # this chunk is scored by exactly this version
        round_id = self.rounds.state.round_id if self.rounds is not None else 0  # elsewhere: the keeper restamps
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self.pool, score_batch, served, self.selector, self.ledger, batch,
                                            round_id, self.epoch, self.memo, self.needs_gold, self.settings.max_batch,
                                            self.settings.max_batch_tokens, self.val_fraction)
        self.counts["scored"] += len(result.rewards)
        self.selected_flags.extend(int(r.selected) for r in result.rewards)
        if result.rewards:
            self.journal.append("scoring", {"version": served.version, "round_id": round_id, "scored": len(result.rewards),
                                            "selected": len(result.candidates) - result.validation,
                                            "validation": result.validation, "by_kind": kind_counts(batch, result)})
        self.counts["selected"] += len(result.candidates) - result.validation
        self.counts["validation_sample"] += result.validation
        self.counts["not_selected_no_gold"] += result.no_gold
        self.counts["duplicates_skipped"] += len(result.duplicates)
        self.counts["score_tokens"] += result.tokens
        self.counts["score_seconds"] += result.seconds  # a float count: Counter adds any number
        if self.metrics is not None:
            self.metrics.observe_scores([r.mu for r in result.rewards])
        return result

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.serving.close()


def kind_counts(batch: list[Trajectory], result: ScoredBatch) -> dict[str, list[int]]:
    """{error kind (the trajectory's metadata "kind", else "-"): [scored, selected]} of a chunk."""
    kind = {t.id: str(t.metadata.get("kind", "-")) for t in batch}
    out: dict[str, list[int]] = {}
    for r in result.rewards:
        row = out.setdefault(kind.get(r.id, "-"), [0, 0])
        row[0] += 1
        row[1] += int(r.selected)
    return out
