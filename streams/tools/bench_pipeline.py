"""`actprm bench pipeline`: does the stream cost throughput, and does a swap lose or repeat anything?

One run measures:
- the model alone: batched scoring tokens/s of the same trajectories, in this process, on the
  layers the daemon runs (model.hidden_layer's default for the backbone);
- end to end: a real scorer process (`actprm run --role scorer`) on the embedded broker, from
  the first trajectory produced to the last reward read back, with the model already loaded;
- while the stream runs, ``swaps`` new versions are written to the checkpoint store; every
  reward is checked: ids missing (lost), ids rewarded twice (duplicated), and the versions
  that produced them. The scorer reports its worst event-loop lag during a swap.

Padding waste is that of the batches `score` forms from each take (sorted by length, cut by
scorer.max_batch and scorer.max_batch_tokens). On CUDA the model-alone run also reports its
peak memory and MFU (FLOPs counted as in model/lab/heads_bench.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from actprm.model.backbone import default_hidden_layer
from actprm.model.lab.heads_bench import device_peak, forward_flops
from actprm.model.build import build_prm, publish_initial
from actprm.model.training.checkpoints import CheckpointStore
from actprm.model.prm import PRMConfig
from actprm.model.steps import padding_stats, plan_batches
from actprm.model.training.trainer import TrainerConfig, trainable_state
from actprm.client import messages
from actprm.streams.kafka.broker import EmbeddedBroker
from actprm.client.topics import Topics, ensure_topics


from actprm.streams.app import SCORER_TAKE as TAKE


def _trajectories(n: int, seed: int):
    from actprm.streams.tools.produce import synthetic_trajectories

    return synthetic_trajectories(n, seed=seed)


def _publish_perturbed(store: CheckpointStore, prm, trainer: TrainerConfig, i: int) -> int:
    """A new version with slightly moved heads: what the trainer would publish."""
    with torch.no_grad():
        for p in prm.heads.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    fields = {"kind": "update", "mode": trainer.mode, "backbone": prm.backbone.reference(), "prm": asdict(prm.config),
              "settings": trainer.model_dump(mode="json"), "consumed_label_ids": [f"bench-{i}"]}
    return store.save(trainable_state(prm, trainer.mode), fields).version


async def _stream(bootstrap: str, topics: Topics, items, store, prm, trainer, swaps: int, swap_every_s: float, warmup) -> dict:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    consumer = AIOKafkaConsumer(topics.rewards, bootstrap_servers=bootstrap, group_id=f"bench-{time.time_ns()}",
                                auto_offset_reset="earliest", fetch_max_wait_ms=20)
    await producer.start()
    await consumer.start()
    try:
        # Warm-up: one trajectory through, so start-up and model load are not timed.
        await producer.send_and_wait(topics.trajectories, key=warmup.id.encode(), value=messages.encode(warmup))
        async for rec in consumer:
            if json.loads(rec.value)["id"] == warmup.id:
                break
        counts: dict[str, int] = {}
        versions: set[int] = set()
        start = time.perf_counter()

        async def feed():
            for t in items:
                await producer.send(topics.trajectories, key=t.id.encode(), value=messages.encode(t))
            await producer.flush()

        async def swap():
            for i in range(swaps):
                await asyncio.sleep(swap_every_s)
                await asyncio.to_thread(_publish_perturbed, store, prm, trainer, i)

        feeding = asyncio.create_task(feed())
        swapping = asyncio.create_task(swap())
        expected = {t.id for t in items}
        deadline = time.monotonic() + 1800
        while not expected.issubset(counts) and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for recs in batch.values():
                for rec in recs:
                    r = json.loads(rec.value)
                    counts[r["id"]] = counts.get(r["id"], 0) + 1
                    versions.add(r["model_version"])
        elapsed = time.perf_counter() - start
        await feeding
        await swapping
        # Swaps may outlast the stream on a fast model; keep reading briefly for late repeats.
        extra = await consumer.getmany(timeout_ms=1000)
        for recs in extra.values():
            for rec in recs:
                r = json.loads(rec.value)
                counts[r["id"]] = counts.get(r["id"], 0) + 1
        return {"elapsed_s": elapsed, "lost": len(expected - set(counts)),
                "duplicated": sum(1 for i in expected if counts.get(i, 0) > 1), "versions_seen": sorted(versions)}
    finally:
        await consumer.stop()
        await producer.stop()


def bench_pipeline(spec: str, trajectories: int = 256, swaps: int = 20, max_batch: int = 8, seed: int = 0,
                   threads: int = 1, repeats: int = 2, device: str = "auto", dtype: str = "auto",
                   max_batch_tokens: int = 16384, peak_tflops: float | None = None) -> dict:
    """`threads` torch threads in both measurements (the same for a fair ratio); the model-alone
    figure is the best of `repeats` runs, so a busy machine does not flatter the ratio.
    `device` / `dtype` as model.*, for the model alone and the scorer alike."""
    items = _trajectories(trajectories, seed)
    warmup = _trajectories(1, seed + 1)[0]
    warmup.id = "bench-warmup"
    with tempfile.TemporaryDirectory(prefix="actprm-bench-") as tmp, EmbeddedBroker() as broker:
        tmp = Path(tmp)
        trainer = TrainerConfig(mode="heads")
        # The layers the daemon's scorer runs (smollm2-135m: 15 of 30), as `bench gateway` does: the
        # model alone on all layers made the pipeline look 1.79x faster than its own model.
        hidden_layer = default_hidden_layer(spec)
        prm = build_prm(spec, hidden_layer=hidden_layer,
                        prm=PRMConfig(score_batch_size=max_batch, score_max_tokens=max_batch_tokens), device=device, dtype=dtype)
        on_cuda = prm.device.type == "cuda"
        store = CheckpointStore(tmp / "checkpoints")
        publish_initial(store, prm, trainer)

        # The model alone, same trajectories, same batch size, same threads.
        torch.set_num_threads(threads)
        prm.score([(warmup.problem, warmup.steps)])
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(prm.device)
        model_s = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            # In takes of TAKE trajectories, as the scorer consumes them (each take sorted by length).
            scores = [sc for i in range(0, len(items), TAKE) for sc in prm.score([(t.problem, t.steps) for t in items[i:i + TAKE]])]
            model_s = min(model_s, time.perf_counter() - t0)
        tokens = sum(s.n_tokens for s in scores)
        peak_bytes = torch.cuda.max_memory_allocated(prm.device) if on_cuda else None
        flops = forward_flops(prm, [s.n_tokens for s in scores], steps=sum(len(s.mu) for s in scores) / len(scores))
        lengths = [s.n_tokens for s in scores]
        # The plan score() makes for each take (the same function, on the same lengths).
        takes = [list(range(i, min(i + TAKE, len(lengths)))) for i in range(0, len(lengths), TAKE)]
        plan = [[take[j] for j in b] for take in takes
                for b in plan_batches([lengths[i] for i in take], max_batch, max_batch_tokens)]
        padding = padding_stats(lengths, plan)

        topics = Topics(f"bench{os.getpid()}")
        asyncio.run(ensure_topics(broker.bootstrap, topics, partitions=4))
        env = {**os.environ, "ACTPRM_KAFKA__BOOTSTRAP": broker.bootstrap, "ACTPRM_KAFKA__TOPIC_PREFIX": topics.prefix,
               "ACTPRM_STATE_DIR": str(tmp / "state"), "ACTPRM_CHECKPOINT_DIR": str(store.root),
               "ACTPRM_MODEL__BACKBONE": spec, "ACTPRM_SCORER__MAX_BATCH": str(max_batch),
               "ACTPRM_SCORER__MAX_BATCH_TOKENS": str(max_batch_tokens), "ACTPRM_MODEL__DEVICE": device,
               "ACTPRM_MODEL__DTYPE": dtype,
               "ACTPRM_SCORER__VERSION_POLL_S": "0.05", "ACTPRM_LOG_FORMAT": "json", "ACTPRM_METRICS__PORT": "0",
               "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        scorer = subprocess.Popen([sys.executable, "-m", "actprm.daemon.cli.main", "run", "--role", "scorer", "--heldout", "0"],
                                  env=env, stdout=subprocess.PIPE, stderr=open(tmp / "scorer.log", "w"), text=True)
        try:
            # Spread the versions over the expected stream time, so swaps land between live batches.
            swap_every_s = max(0.02, model_s / (swaps + 1))
            stream = asyncio.run(_stream(broker.bootstrap, topics, items, store, prm, trainer, swaps, swap_every_s, warmup))
        finally:
            scorer.send_signal(signal.SIGTERM)
            out, _ = scorer.communicate(timeout=120)
        try:
            final = json.loads(out[out.index("{"):])
        except ValueError:
            final = {"error": (tmp / "scorer.log").read_text()[-2000:]}
    model_tps = tokens / model_s
    e2e_tps = tokens / stream["elapsed_s"]
    peak, peak_source = device_peak(torch.cuda.get_device_name(prm.device), peak_tflops) if on_cuda else (None, "cpu")
    return {
        "backbone": spec, "hidden_layer": hidden_layer, "trajectories": trajectories, "tokens": tokens, "max_batch": max_batch, "threads": threads,
        "device": str(prm.device), "dtype": prm.backbone.dtype, "attn_implementation": prm.backbone.attn_implementation,
        "max_batch_tokens": max_batch_tokens, "batches": padding["batches"],
        "padded_tokens": padding["padded_tokens"], "padding_waste": round(padding["padding_waste"], 4),
        "model_mfu": round(flops / model_s / peak, 4) if peak else None, "peak_source": peak_source,
        "model_peak_bytes": peak_bytes,
        "model_tokens_per_s": round(model_tps, 1), "pipeline_tokens_per_s": round(e2e_tps, 1),
        "ratio": round(e2e_tps / model_tps, 3),
        "swaps_published": swaps, "swaps_applied": final.get("swaps"), "versions_seen": stream["versions_seen"],
        "swap_stall_ms_max": final.get("swap_stall_ms_max"),
        "stream_s": round(stream["elapsed_s"], 3), "model_alone_s": round(model_s, 3),
        "scorer_model_s": final.get("score_seconds"),  # time the scorer spent inside the model
        "lost": stream["lost"], "duplicated": stream["duplicated"],
        "goal": {"ratio_min": 0.85, "swap_stall_ms_max": 50, "lost": 0, "duplicated": 0},
    }
