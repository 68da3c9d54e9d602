"""`actprm bench store`: does the cost of an update or a status depend on the run's age?

Two state dirs side by side:
- fresh: a run ten minutes old: `keep` + 1 versions (so its updates prune too) and a ledger of
  54,000 ids (ten minutes at 90/s), built the same way;
- aged: what a week at 100 trajectories/s leaves (issue 21): 200,000 versions (all but v0 and
  the newest `keep` compacted into the manifest index, as `prune` leaves them) and a ledger of
  10,000,000 trajectory ids spread over the retention's buckets, plus labels trained.

On each the storage side of an update and of a status is timed, alternately so both see the
same load on a shared CPU:
- update: 16 labels received (the trainer's three dedupe lookups, a pending write each), the
  latest version found, a version saved (heads-sized tensors), its labels marked trained with
  the ledger's mark, the old weights pruned (manifests compacted), and a scoring batch's
  bookkeeping (64 dedupe lookups and marks);
- status: what a status reads of storage (the latest version, the pending labels, the round)
  and a scorer's version poll.
The model's own compute is the same at any age and is left out. Ratios are aged / fresh medians.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from actprm.streams.state.ledger import BUCKETS, META, PENDING, SCORED, TRAINED, Ledger, mark_trained

HEAD_BYTES = 200_000  # about the tiny backbone's heads (E=8 MLPs): what a heads-mode version stores


def _tensors(seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"heads.w": torch.randn(HEAD_BYTES // 4, generator=g)}


def build_aged_store(root: Path, versions: int, keep: int) -> None:
    """The store as `prune(keep)` leaves it after `versions` versions: v0 and the newest `keep`
    with weights, the rest as rows of the manifest index."""
    from actprm.model.training.checkpoints import INDEX, INDEX_SEGMENT, CheckpointStore

    store = CheckpointStore(root)
    store.save(_tensors(0), {"kind": "init", "parent": None})
    index = root / INDEX
    index.mkdir(parents=True, exist_ok=True)
    first_kept = versions - keep
    created = time.time() - 7 * 86400
    for seg in range(0, first_kept, INDEX_SEGMENT):
        lo, hi = max(seg, 1), min(seg + INDEX_SEGMENT, first_kept)
        rows = (json.dumps({"version": v, "parent": v - 1, "kind": "update", "created": created + v * 3.2, "mode": "heads",
                            "metrics": {"loss": 0.5, "grad_norm": 1.0, "labels_new": 16}, "n_consumed": 16,
                            "consumed_label_ids": [f"l{v}-{i}" for i in range(16)], "sha256": ""}, separators=(",", ":"))
                for v in range(lo, hi))
        (index / f"{seg // INDEX_SEGMENT:06d}.jsonl").write_text("\n".join(rows) + "\n")
    # The newest versions with weights, written as the trainer writes them (numbered after the
    # index: without a pointer the store recovers the latest from the listing and the index).
    (root / "LATEST").unlink()
    for v in range(first_kept, versions):
        saved = store.save(_tensors(v), {"kind": "update", "consumed_label_ids": [f"l{v}-{i}" for i in range(16)]})
        if saved.version != v:
            raise RuntimeError(f"the aged store numbered version {v} as {saved.version}")


def build_aged_ledger(path: Path, ids: int, labels: int, retention_s: float) -> Ledger:
    """`ids` trajectory ids scored over the last retention (in its buckets) and `labels` trained."""
    from rocksdict import WriteBatch

    ledger = Ledger(path, retention_s=retention_s)
    now_bucket = ledger._bucket()
    value = json.dumps({"version": 123456, "epoch": "e", "at": [1, 123456789],
                        "reward": {"id": "x" * 16, "mu": [0.5] * 4, "sigma": [0.01] * 4}}).encode()
    chunk = 200_000
    for start in range(0, ids, chunk):
        batch = WriteBatch(raw_mode=True)
        bucket = now_bucket - BUCKETS + (start * (BUCKETS + 1)) // ids
        prefix = ledger._bucket_prefix(SCORED, bucket)
        for i in range(start, min(start + chunk, ids)):
            batch.put(prefix + f"traj-{i:012d}".encode(), value)
        ledger._db.write(batch)
    batch = WriteBatch(raw_mode=True)
    trained = ledger._bucket_prefix(TRAINED, now_bucket)
    for i in range(labels):
        batch.put(trained + f"label-{i:012d}".encode(), b"7")
    ledger._db.write(batch)
    ledger._db.flush()
    ledger._db.compact_range(None, None)  # settled, as steady writes over days leave it (not 10M keys in L0)
    return ledger


class _Side:
    def __init__(self, name: str, store, ledger: Ledger, keep: int):
        self.name, self.store, self.ledger, self.keep = name, store, ledger, keep
        self.update_s: list[float] = []
        self.store_s: list[float] = []
        self.ledger_s: list[float] = []
        self.status_s: list[float] = []
        self.n = 0

    def update(self) -> None:
        self.n += 1
        t0 = time.perf_counter()
        labels = [f"{self.name}-new-{self.n}-{i}" for i in range(16)]
        for label in labels:  # the trainer's receive(): three lookups, then pending
            if not (self.ledger.has(TRAINED, label) or self.ledger.has(PENDING, label) or self.ledger.has("canary", label)):
                self.ledger.put(PENDING, label, {"label": {"id": label}, "received": time.time()})
        t1 = time.perf_counter()
        parent = self.store.latest()
        manifest = self.store.save(_tensors(self.n), {"kind": "update", "parent": parent, "consumed_label_ids": labels})
        t2 = time.perf_counter()
        with self.ledger.transaction():
            mark_trained(self.ledger, labels, manifest.version)
            self.ledger.put(META, "trained_through", manifest.version)
        t3 = time.perf_counter()
        self.store.prune(self.keep)
        t4 = time.perf_counter()
        batch = [f"{self.name}-traj-{self.n}-{i}" for i in range(64)]  # a scorer's batch bookkeeping
        fresh = [t for t in batch if self.ledger.get(SCORED, t) is None]
        with self.ledger.transaction():
            for t in fresh:
                self.ledger.put(SCORED, t, {"version": manifest.version, "epoch": "e", "at": [0, self.n]})
        end = time.perf_counter()
        self.update_s.append(end - t0)
        self.store_s.append((t2 - t1) + (t4 - t3))  # latest, save (fsyncs), prune
        self.ledger_s.append((end - t0) - self.store_s[-1])  # dedupe lookups and marks

    def status(self) -> None:
        t0 = time.perf_counter()
        for _ in range(10):
            self.store.latest()  # the scorer's poll and the status's version
            sorted(self.ledger.items(PENDING), key=lambda kv: kv[1]["received"])
            self.ledger.get(META, "round")
        self.status_s.append((time.perf_counter() - t0) / 10)

    def summary(self) -> dict:
        def ms(xs: list[float]) -> dict:
            xs = sorted(xs)
            return {"p50_ms": round(1e3 * statistics.median(xs), 3), "p90_ms": round(1e3 * xs[int(0.9 * (len(xs) - 1))], 3)}
        return {"update": ms(self.update_s), "update_store": ms(self.store_s), "update_ledger": ms(self.ledger_s),
                "status": ms(self.status_s)}


def bench_store(versions: int = 200_000, ids: int = 10_000_000, labels: int = 3_000_000, rounds: int = 40,
                keep: int = 50, retention_s: float = 7 * 86400.0, fresh_ids: int = 54_000,
                root: str | Path | None = None) -> dict:
    from actprm.model.training.checkpoints import CheckpointStore

    with tempfile.TemporaryDirectory(prefix="actprm-bench-store-", dir=root) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        build_aged_store(tmp / "aged" / "checkpoints", versions, keep)
        aged_ledger = build_aged_ledger(tmp / "aged" / "ledger", ids, labels, retention_s)
        build_s = time.perf_counter() - t0
        # A run minutes old: just past `keep` versions, so its updates prune one version each too.
        fresh_store = CheckpointStore(tmp / "fresh" / "checkpoints")
        for v in range(keep + 1):
            fresh_store.save(_tensors(v), {"kind": "init" if v == 0 else "update", "parent": v - 1 if v else None})
        # ... and its ledger: ten minutes at 90/s, past the first memtable flush, as the aged one is built.
        fresh_ledger = build_aged_ledger(tmp / "fresh" / "ledger", fresh_ids, fresh_ids // 20, retention_s)
        sides = [_Side("fresh", fresh_store, fresh_ledger, keep),
                 _Side("aged", CheckpointStore(tmp / "aged" / "checkpoints"), aged_ledger, keep)]
        for side in sides:  # warm-up: first saves, page cache
            for _ in range(3):
                side.update()
                side.status()
            for xs in (side.update_s, side.store_s, side.ledger_s, side.status_s):
                xs.clear()
        for i in range(rounds):
            for side in sides if i % 2 == 0 else sides[::-1]:
                side.update()
                side.status()
        out = {side.name: side.summary() for side in sides}
        aged_dir = tmp / "aged" / "checkpoints"
        out["aged"] |= {"versions": sides[1].store.latest() + 1, "directories": sum(1 for p in aged_dir.iterdir() if p.is_dir()),
                        "index_files": sum(1 for _ in (aged_dir / "index").iterdir()), "ledger_ids": ids + labels,
                        "ledger_mb": round(sum(f.stat().st_size for f in (tmp / "aged" / "ledger").rglob("*") if f.is_file()) / 1e6, 1),
                        "build_s": round(build_s, 1)}
        out["ratio"] = {what: round(out["aged"][what]["p50_ms"] / out["fresh"][what]["p50_ms"], 3)
                        for what in ("update", "update_store", "update_ledger", "status")}
        out["goal"] = "aged / fresh p50 <= 1.10"
        out["met"] = out["ratio"]["update"] <= 1.10 and out["ratio"]["status"] <= 1.10
        out["rounds"] = rounds
        for side in sides:
            side.ledger.close()
        return out
