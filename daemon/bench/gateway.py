"""`actprm bench gateway`: what the HTTP gateway and Kafka add to the scorer's own time.

One run starts the embedded broker, a real scorer process (`actprm run --role scorer`) and a real
gateway process (`actprm serve`), then for each concurrency C posts `rounds` waves of C
OpenRLHF-shaped single-sample requests at once (OpenRLHF's real pattern: every rollout posts its
own sample, so a step's samples arrive as C concurrent one-sample requests) and records every
request's latency and how the scorer batched them (`mean_scorer_batch`). Beside it:
the scorer's own time for the same batch, prm.score on the same C samples in this process with
the same layers, threads and batch size, so the overhead is a ratio (p50 / scorer time).

Each wave is timed alone right before it goes through the gateway, so both figures see the same
load on the machine (timing every wave alone first, then the gateway, made the ratio swing from
x0.88 to x1.19 between runs on shared cores). The scorer's journal says how the scorer actually
batched each wave (`scorer_batches`): a wave split over two takes is visible, not guessed.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from actprm.model.backbone import default_hidden_layer
from actprm.model.build import build_prm, publish_initial
from actprm.model.training.checkpoints import CheckpointStore
from actprm.model.prm import PRMConfig
from actprm.model.training.trainer import TrainerConfig
from actprm.streams.state import journal
from actprm.streams.kafka.broker import EmbeddedBroker
from actprm.streams.tools.produce import synthetic_trajectories
from actprm.client.topics import Topics, ensure_topics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _samples(n: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, response) pairs whose response splits back into the synthetic steps. Each prompt
    is unique (ids come from the content: a repeated sample would be answered from the cache)."""
    return [(f"[{seed}.{i}] {t.problem}\n", "\n\n".join(t.steps))
            for i, t in enumerate(synthetic_trajectories(n, seed=seed))]


async def _level(url: str, samples: list[tuple[str, str]], concurrency: int, alone) -> dict:
    """Waves of `concurrency` requests sent together (as a rollout step's samples are), the next
    wave once all are answered: each wave meets the scorer as the same batch the scorer-alone
    figure times, so the ratio compares like with like. `alone(batch)` times the scorer on the
    wave just before it is sent (same moment, same load on the machine)."""
    latencies: list[float] = []
    failures: list[str] = []
    alone_s: list[float] = []
    waves: list[tuple[float, float]] = []  # wall-clock (start, end) of each wave, to match the scorer's journal

    async def one(http: httpx.AsyncClient, prompt: str, response: str) -> None:
        body = {"query": [prompt + response], "prompts": [prompt], "labels": [""]}
        t0 = time.perf_counter()
        got = await http.post(url, json=body)
        if got.status_code == 200 and got.json()["extra_logs"]["prm_ok"] == [1.0]:
            latencies.append(time.perf_counter() - t0)
        else:
            failures.append(f"{got.status_code}: {got.text[:200]}")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        elapsed = 0.0
        for i in range(0, len(samples), concurrency):
            wave = samples[i:i + concurrency]
            alone_s.append(alone([(p, r.split("\n\n")) for p, r in wave]))
            start, wall = time.perf_counter(), time.time()
            await asyncio.gather(*(one(http, p, r) for p, r in wave))
            elapsed += time.perf_counter() - start
            waves.append((wall, time.time()))
    return {"latencies": latencies, "elapsed_s": elapsed, "failures": failures, "alone_s": alone_s, "waves": waves}


def _scorer_batches(state_dir: Path, waves: list[tuple[float, float]], expected: int,
                    wait_s: float = 5.0) -> list[list[int]]:
    """The batch sizes the scorer ran for each wave, from its journal (one `scoring` record per
    chunk, written when the chunk is scored, so inside its wave's window)."""
    deadline = time.monotonic() + wait_s
    while True:
        records = list(journal.read(state_dir, "scoring"))
        per_wave = [[r["scored"] for r in records if start <= r["at"] <= end] for start, end in waves]
        if sum(map(sum, per_wave)) >= expected or time.monotonic() > deadline:  # the journal is written by a thread
            return per_wave
        time.sleep(0.1)


async def _wait_ready(url: str, sample: tuple[str, str], procs: list[subprocess.Popen], timeout_s: float = 600) -> None:
    """One request through, so start-up and model load are not timed."""
    prompt, response = sample
    body = {"query": [prompt + response], "prompts": [prompt]}
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=60) as http:
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("the scorer or the gateway exited during start-up (see their logs)")
            try:
                got = await http.post(url, json=body)
                if got.status_code == 200 and got.json()["extra_logs"]["prm_ok"] == [1.0]:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"no reward through the gateway within {timeout_s:g}s")


def bench_gateway(spec: str, concurrency: tuple[int, ...] = (1, 8, 32), rounds: int = 4, max_batch: int = 8,
                  max_wait_s: float = 0.02, threads: int = 1, seed: int = 0) -> dict:
    levels = {c: _samples(c * rounds, seed=seed + c) for c in concurrency}
    warmup = _samples(1, seed=seed + 10_000)[0]
    with tempfile.TemporaryDirectory(prefix="actprm-bench-gw-") as tmp, EmbeddedBroker() as broker:
        tmp = Path(tmp)
        # The layers the daemon's scorer runs (smollm2-135m: 15 of 30), or the comparison is unfair.
        prm = build_prm(spec, hidden_layer=default_hidden_layer(spec), prm=PRMConfig(score_batch_size=max_batch))
        store = CheckpointStore(tmp / "checkpoints")
        publish_initial(store, prm, TrainerConfig(mode="heads"))

        torch.set_num_threads(threads)
        prm.score([(warmup[0], warmup[1].split("\n\n"))])

        def alone(batch: list[tuple[str, list[str]]]) -> float:
            """The scorer alone on one wave's samples, in chunks of max_batch as the scorer scores."""
            t0 = time.perf_counter()
            prm.score(batch)
            return time.perf_counter() - t0

        topics = Topics(f"benchgw{os.getpid()}")
        asyncio.run(ensure_topics(broker.bootstrap, topics, partitions=4))
        port = _free_port()
        env = {**os.environ, "ACTPRM_KAFKA__BOOTSTRAP": broker.bootstrap, "ACTPRM_KAFKA__TOPIC_PREFIX": topics.prefix,
               "ACTPRM_STATE_DIR": str(tmp / "state"), "ACTPRM_CHECKPOINT_DIR": str(store.root),
               "ACTPRM_MODEL__BACKBONE": spec, "ACTPRM_SCORER__MAX_BATCH": str(max_batch),
               "ACTPRM_SCORER__MAX_WAIT_S": str(max_wait_s), "ACTPRM_LOG_FORMAT": "json", "ACTPRM_METRICS__PORT": "0",
               "ACTPRM_GATEWAY__PORT": str(port), "ACTPRM_GATEWAY__TIMEOUT_S": "600", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        cli = [sys.executable, "-m", "actprm.daemon.cli.main"]
        scorer = subprocess.Popen([*cli, "run", "--role", "scorer", "--heldout", "0"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=open(tmp / "scorer.log", "w"))
        gateway = subprocess.Popen([*cli, "serve"], env=env, stdout=subprocess.DEVNULL,
                                   stderr=open(tmp / "gateway.log", "w"))
        url = f"http://127.0.0.1:{port}/get_reward"
        results = []
        try:
            asyncio.run(_wait_ready(url, warmup, [scorer, gateway]))
            for c, samples in levels.items():
                got = asyncio.run(_level(url, samples, c, alone))
                lat = got["latencies"] or [float("nan")]
                p50, scorer_s = statistics.median(lat), statistics.median(got["alone_s"])
                batches = _scorer_batches(tmp / "state", got["waves"], len(got["latencies"]))
                results.append({
                    "concurrency": c, "requests": len(samples), "failed": len(got["failures"]),
                    "requests_per_s": round(len(got["latencies"]) / got["elapsed_s"], 2),
                    "p50_ms": round(p50 * 1000, 1), "p99_ms": round(_percentile(lat, 0.99) * 1000, 1),
                    "scorer_batch_ms": round(scorer_s * 1000, 1), "ratio_p50": round(p50 / scorer_s, 3),
                    # Split: the scorer met the wave as more batches than max_batch needs (two takes).
                    "scorer_batches": batches, "waves_split": sum(len(b) > math.ceil(c / max_batch) for b in batches),
                    "mean_scorer_batch": round(statistics.mean([x for b in batches for x in b] or [0]), 1),
                    **({"first_failure": got["failures"][0]} if got["failures"] else {}),
                })
        finally:
            for proc in (gateway, scorer):
                proc.send_signal(signal.SIGTERM)
            for proc in (gateway, scorer):
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return {
        "backbone": spec, "max_batch": max_batch, "scorer_max_wait_s": max_wait_s, "threads": threads,
        "rounds": rounds, "levels": results,
        "goal": {"ratio_p50_max": 1.2, "mean_scorer_batch_at_concurrency_64_min": 16},
    }
