"""`actprm bench gateway`: what the HTTP gateway and Kafka add to the scorer's own time.

One run starts the embedded broker, a real scorer process (`actprm run --role scorer`) and a real
gateway process (`actprm serve`), then for each concurrency C posts `rounds` waves of C
OpenRLHF-shaped single-sample requests at once and records every request's latency. Beside it:
the scorer's own time for the same batch, prm.score on C of the same samples in this process
with the same threads and batch size, so the overhead is a ratio (p50 / scorer time).
"""

from __future__ import annotations

import asyncio
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
from actprm.model.checkpoints import CheckpointStore
from actprm.model.prm import PRMConfig
from actprm.model.trainer import TrainerConfig
from actprm.streams.broker import EmbeddedBroker
from actprm.streams.tools import synthetic_trajectories
from actprm.streams.topics import Topics, ensure_topics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _samples(n: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, response) pairs whose response splits back into the synthetic steps."""
    return [(t.problem + "\n", "\n\n".join(t.steps)) for t in synthetic_trajectories(n, seed=seed)]


async def _level(url: str, samples: list[tuple[str, str]], concurrency: int) -> dict:
    """Waves of `concurrency` requests sent together (as a rollout step's samples are), the next
    wave once all are answered: each wave meets the scorer as the same batch the scorer-alone
    figure times, so the ratio compares like with like."""
    latencies: list[float] = []
    failures: list[str] = []

    async def one(http: httpx.AsyncClient, prompt: str, response: str) -> None:
        body = {"query": [prompt + response], "prompts": [prompt], "labels": [""]}
        t0 = time.perf_counter()
        got = await http.post(url, json=body)
        if got.status_code == 200:
            latencies.append(time.perf_counter() - t0)
        else:
            failures.append(f"{got.status_code}: {got.text[:200]}")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        for i in range(0, len(samples), concurrency):
            await asyncio.gather(*(one(http, p, r) for p, r in samples[i:i + concurrency]))
        elapsed = time.perf_counter() - start
    return {"latencies": latencies, "elapsed_s": elapsed, "failures": failures}


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
                if (await http.post(url, json=body)).status_code == 200:
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

        # The scorer alone on the same batch: C of the same samples, as the scorer gets C
        # concurrent requests; the median over the waves.
        torch.set_num_threads(threads)
        prm.score([(warmup[0], warmup[1].split("\n\n"))])
        scorer_s = {}
        for c, samples in levels.items():
            times = []
            for i in range(0, len(samples), c):  # every wave, as the gateway will send them
                batch = [(p, r.split("\n\n")) for p, r in samples[i:i + c]]
                t0 = time.perf_counter()
                prm.score(batch)
                times.append(time.perf_counter() - t0)
            scorer_s[c] = statistics.median(times)
        del prm

        topics = Topics(f"benchgw{os.getpid()}")
        asyncio.run(ensure_topics(broker.bootstrap, topics, partitions=4))
        port = _free_port()
        env = {**os.environ, "ACTPRM_KAFKA__BOOTSTRAP": broker.bootstrap, "ACTPRM_KAFKA__TOPIC_PREFIX": topics.prefix,
               "ACTPRM_STATE_DIR": str(tmp / "state"), "ACTPRM_CHECKPOINT_DIR": str(store.root),
               "ACTPRM_MODEL__BACKBONE": spec, "ACTPRM_SCORER__MAX_BATCH": str(max_batch),
               "ACTPRM_SCORER__MAX_WAIT_S": str(max_wait_s), "ACTPRM_LOG_FORMAT": "json", "ACTPRM_METRICS__PORT": "0",
               "ACTPRM_GATEWAY__PORT": str(port), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        cli = [sys.executable, "-m", "actprm.daemon.cli"]
        scorer = subprocess.Popen([*cli, "run", "--role", "scorer", "--heldout", "0"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=open(tmp / "scorer.log", "w"))
        gateway = subprocess.Popen([*cli, "serve"], env=env, stdout=subprocess.DEVNULL,
                                   stderr=open(tmp / "gateway.log", "w"))
        url = f"http://127.0.0.1:{port}/get_reward"
        results = []
        try:
            asyncio.run(_wait_ready(url, warmup, [scorer, gateway]))
            for c, samples in levels.items():
                got = asyncio.run(_level(url, samples, c))
                lat = got["latencies"] or [float("nan")]
                p50 = statistics.median(lat)
                results.append({
                    "concurrency": c, "requests": len(samples), "failed": len(got["failures"]),
                    "requests_per_s": round(len(got["latencies"]) / got["elapsed_s"], 2),
                    "p50_ms": round(p50 * 1000, 1), "p99_ms": round(_percentile(lat, 0.99) * 1000, 1),
                    "scorer_batch_ms": round(scorer_s[c] * 1000, 1), "ratio_p50": round(p50 / scorer_s[c], 3),
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
        "goal": {"ratio_p50_at_concurrency_8_max": 1.2},
    }
