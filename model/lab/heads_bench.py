"""How much the ensemble heads cost: forward time and peak memory for several head counts.

The method's claim is that E heads are nearly free next to the backbone (one backbone pass,
heads as batched matmuls). This measures it: the same batch of `batch` trajectories of about
`tokens` tokens is scored with E = 1, 8, 32 heads, and the largest E is compared with the
smallest. Goal: time within 5%, peak memory within 10%.

What is timed: the PRM forward only (backbone, gather at the separators, heads, sigmoid and
the mean/std over heads). Tokenization and collation happen before the clock starts.

Peak memory on CPU: each head count runs in a fresh subprocess, so allocator caches and the
previous model cannot leak into the next number. After the model is loaded (and its
memory-mapped weights read once, so they are resident) the process's high-water mark is reset
(`/proc/self/clear_refs` = 5) and the RSS is recorded (`load_rss_bytes`); `peak_bytes` is
VmHWM at the end, so it covers the forward passes and the model that stays resident, and
`peak_over_load_bytes` is what the forward added on top. When the reset is not allowed,
VmHWM also covers loading (then `hwm_reset` is false). The subprocess runs with a fixed glibc
mmap threshold so the high-water mark follows live tensors rather than allocation order.
On CUDA the same is done in-process with torch.cuda.max_memory_allocated.

Wall time on a shared CPU is noisy and noise only adds time, so the figure is the fastest of
`repeats` runs; each result also carries every run's wall time, their median and the process
CPU time, so a ratio skewed by a neighbour's job can be recognised.

Throughput and MFU: tokens/s counts the real (unpadded) tokens of the batch. The forward's
FLOPs follow the PaLM appendix-B convention: per sequence of T tokens, 2 x N x T for the
matmuls of the N non-embedding backbone parameters plus 4 x L x d x T^2 for attention (L
layers, d = heads x head_dim, the full T x T square although the mask is causal), plus the
heads' matmuls. MFU is achieved FLOP/s over the device's dense bf16 peak, named in the report
(`peak_source`); on CPU, or on a GPU missing from PEAK_BF16_TFLOPS, MFU is null unless
`peak_tflops` is given.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

GOAL = {"time_ratio_max": 1.05, "memory_ratio_max": 1.10}
N_STEPS = 4  # "a few steps" per trajectory: enough separators to exercise the gather

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' datasheets, matched
# against torch.cuda.get_device_name() in this order (the first substring that matches wins).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("A6000", 155.0),
)


def device_peak(name: str, peak_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s, where the figure comes from) for a device name; (None, why) when unknown."""
    if peak_tflops is not None:
        return peak_tflops * 1e12, f"given: {peak_tflops:g} TFLOP/s"
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops * 1e12, f"{key} dense bf16 datasheet peak, {tflops:g} TFLOP/s"
    return None, f"no bf16 peak known for {name!r}; pass --peak-tflops"


def forward_flops(prm, lengths: list[int], steps: float = N_STEPS) -> float:
    """FLOPs of one PRM forward over sequences of these lengths (see the module docstring)."""
    cfg = prm.body.config
    embed = prm.body.get_input_embeddings().weight.numel()
    n = sum(p.numel() for p in prm.body.parameters()) - embed  # non-embedding parameters
    layers = len(prm.body.layers)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d_attn = cfg.num_attention_heads * head_dim
    E, H, D = prm.config.n_heads, prm.backbone.hidden_size, prm.config.head_width
    heads_per_step = 2 * E * (H * D + D * D + D)
    return float(sum(2 * n * T + 4 * layers * d_attn * T * T + heads_per_step * steps for T in lengths))

# Plain words for filler text; varied so trajectories in a batch are not identical.
_WORDS = (
    "we add the two numbers then multiply by three so the total is seven more than half of "
    "twelve apples each box holds five and there are four boxes left after selling nine"
).split()


# --- the batch -------------------------------------------------------------------------------

def _text(n_words: int, offset: int) -> tuple[str, list[str]]:
    """A problem and N_STEPS steps holding n_words filler words in all (a fifth in the problem)."""
    words = [_WORDS[(offset + i) % len(_WORDS)] for i in range(n_words)]
    n_problem = n_words // 5
    problem = "Solve: " + " ".join(words[:n_problem])
    rest = words[n_problem:]
    per = -(-len(rest) // N_STEPS) if rest else 0
    steps = [f"Step {k + 1}: " + " ".join(rest[k * per : (k + 1) * per]) for k in range(N_STEPS)]
    return problem, steps


def make_trajectory(prm, tokens: int, offset: int = 0) -> tuple[str, list[str]]:
    """A trajectory whose encoded length is the largest not above `tokens` (the prompt
    template alone may already be longer; then it is that)."""
    def length(n: int) -> int:
        return len(prm.encode(*_text(n, offset)).input_ids)

    # Encoded length grows with the word count, so a binary search finds the largest fit.
    lo, hi = 0, max(1, tokens)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if length(mid) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return _text(lo, offset)


def _make_batch(prm, batch: int, tokens: int):
    encoded = [prm.encode(*make_trajectory(prm, tokens, offset=7 * b)) for b in range(batch)]
    return prm.collate(encoded), [len(e.input_ids) for e in encoded]


def _forward(prm, batch) -> torch.Tensor:
    # What EnsemblePRM.score computes per batch, without tokenization or list conversion.
    probs = torch.sigmoid(prm.step_logits(batch)).float()  # (E, B, S)
    return torch.stack([probs.mean(dim=0), probs.std(dim=0, unbiased=False)])


def _time_forward(prm, batch, repeats: int, sync=lambda: None) -> dict:
    """Wall seconds (median and each run) of the forward after one untimed warm-up, plus the
    process CPU seconds, which a busy shared machine disturbs less than wall time."""
    with torch.inference_mode():
        _forward(prm, batch)  # warm-up: first-call allocations and kernel selection
        sync()
        wall, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            _forward(prm, batch)
            sync()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    # The fastest run is the one a neighbour's job disturbed least (noise only ever adds time);
    # the median and the raw times show the spread.
    return {"forward_s": min(wall), "forward_s_median": statistics.median(wall), "forward_s_all": wall,
            "forward_cpu_s": min(cpu)}


def _prm_config(n_heads: int, batch: int, tokens: int):
    from actprm.model.prm import PRMConfig

    # max_length above the target so no step is dropped; same head seed for every E.
    return PRMConfig(n_heads=n_heads, score_batch_size=batch, max_length=max(2048, 2 * tokens),
                     score_max_tokens=None)


# --- CPU: one subprocess per head count -------------------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
    return int(m.group(1)) if m else 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _cpu_worker(args: dict) -> dict:
    """Runs inside the subprocess: load, reset the high-water mark, build the batch, time."""
    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    from actprm.model.build import build_prm

    prm = build_prm(args["spec"], hidden_layer=args["hidden_layer"], device="cpu", dtype=args["dtype"],
                    attn_implementation=args["attn"], prm=_prm_config(args["heads"], args["batch"], args["tokens"]))
    prm.eval()
    batch, lengths = _make_batch(prm, args["batch"], args["tokens"])
    # safetensors weights are memory-mapped and only become resident when first read; read
    # them all now so the first forward's page-ins are not counted as forward memory.
    with torch.inference_mode():
        for t in list(prm.parameters()) + list(prm.buffers()):
            t.sum()
    gc.collect()
    # Reset after load and batch building, so loading's transient peak (reading the weight
    # file) does not hide what the forward needs.
    hwm_reset = _reset_hwm()
    load_rss = _status_kib("VmRSS") * 1024
    timing = _time_forward(prm, batch, args["repeats"])
    peak = _status_kib("VmHWM") * 1024
    return {"heads": args["heads"], **timing, "peak_bytes": peak, "load_rss_bytes": load_rss,
            "peak_over_load_bytes": peak - load_rss, "hwm_reset": hwm_reset, "lengths": lengths,
            "flops": forward_flops(prm, lengths), "dtype": prm.backbone.dtype,
            "attn_implementation": prm.backbone.attn_implementation}


def _worker_main(raw: str) -> None:
    result = _cpu_worker(json.loads(raw))
    print("ACTPRM_BENCH " + json.dumps(result), flush=True)  # a marked line: libraries may print too


def _run_cpu_subprocess(args: dict) -> dict:
    env = dict(os.environ)
    # Same thread count in every subprocess, set before torch starts its pools.
    env.update(OMP_NUM_THREADS=str(args["threads"]), MKL_NUM_THREADS=str(args["threads"]),
               TOKENIZERS_PARALLELISM="false")
    # glibc raises its mmap threshold after large frees, so later big tensors land in a heap
    # that is not given back and the high-water mark drifts with allocation order. A fixed
    # threshold (glibc's own default value) keeps big tensors mmapped and freed at once, so
    # VmHWM follows the live tensors. A value the user set wins.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    code = "import sys; from actprm.model.lab.heads_bench import _worker_main; _worker_main(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("ACTPRM_BENCH "):
            return json.loads(line[len("ACTPRM_BENCH "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"bench subprocess for {args['heads']} heads failed (exit {proc.returncode}): {tail}")


# --- CUDA: in-process -----------------------------------------------------------------------

def _bench_cuda(spec: str, heads, batch: int, tokens: int, repeats: int, hidden_layer, device: torch.device,
                dtype: str, attn: str) -> list[dict]:
    from actprm.model.backbone import load_backbone
    from actprm.model.prm import EnsemblePRM

    torch.cuda.set_device(device)
    backbone = load_backbone(spec, hidden_layer=hidden_layer, device=str(device), dtype=dtype, attn_implementation=attn)
    sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    results = []
    for E in heads:
        # The backbone is shared; only the heads differ, so the same weights serve every E.
        prm = EnsemblePRM(backbone, _prm_config(E, batch, tokens)).eval()
        cpu_batch, lengths = _make_batch(prm, batch, tokens)
        on = cpu_batch.to(device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        load = torch.cuda.memory_allocated()
        timing = _time_forward(prm, on, repeats, sync=sync)
        peak = torch.cuda.max_memory_allocated()
        results.append({"heads": E, **timing, "peak_bytes": peak, "load_rss_bytes": load,
                        "peak_over_load_bytes": peak - load, "hwm_reset": True, "lengths": lengths,
                        "flops": forward_flops(prm, lengths), "dtype": backbone.dtype,
                        "attn_implementation": backbone.attn_implementation})
        del prm, on
        gc.collect()
        torch.cuda.empty_cache()
    return results


# --- entry point ----------------------------------------------------------------------------

def bench_model(
    spec: str,
    heads=(1, 8, 32),
    batch: int = 8,
    tokens: int = 256,
    repeats: int = 3,
    hidden_layer: int | None = None,
    threads: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    attn_implementation: str = "auto",
    peak_tflops: float | None = None,
) -> dict:
    """Forward seconds (fastest of `repeats` after one warm-up), tokens/s, MFU and peak memory
    of scoring one batch, for each head count. Ratios compare the largest head count with the
    smallest (1 by default). `threads`: torch CPU threads in every run (default: this
    process's). `device` / `dtype` / `attn_implementation` as model.* settings."""
    from actprm.model.backbone import default_hidden_layer, resolve_device
    hidden_layer = default_hidden_layer(spec, hidden_layer)  # the layers the daemon runs (smollm2-135m: 15 of 30)
    heads = sorted(set(int(e) for e in heads))
    if not heads or heads[0] < 1:
        raise ValueError(f"head counts must be >= 1, got {heads}")
    if batch < 1 or tokens < 1 or repeats < 1:
        raise ValueError("batch, tokens and repeats must be >= 1")
    threads = threads or torch.get_num_threads()
    dev = resolve_device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        where = f"{dev} ({name})"
        peak, peak_source = device_peak(name, peak_tflops)
        results = _bench_cuda(spec, heads, batch, tokens, repeats, hidden_layer, dev, dtype, attn_implementation)
    else:
        where = f"cpu ({threads} threads)"
        peak, peak_source = (peak_tflops * 1e12, f"given: {peak_tflops:g} TFLOP/s") if peak_tflops else \
            (None, "no peak for a CPU; pass --peak-tflops")
        results = [
            _run_cpu_subprocess({"spec": spec, "heads": E, "batch": batch, "tokens": tokens, "repeats": repeats,
                                 "hidden_layer": hidden_layer, "threads": threads, "dtype": dtype,
                                 "attn": attn_implementation})
            for E in heads
        ]
    lengths = results[0].pop("lengths")
    for r in results[1:]:
        r.pop("lengths")
    placement = {"dtype": results[0]["dtype"], "attn_implementation": results[0]["attn_implementation"]}
    for r in results:
        r.pop("dtype"), r.pop("attn_implementation")
        r["tokens_per_s"] = sum(lengths) / r["forward_s"]
        r["achieved_tflops"] = r["flops"] / r["forward_s"] / 1e12
        r["mfu"] = r["flops"] / r["forward_s"] / peak if peak else None
    first, last = results[0], results[-1]
    time_ratio = last["forward_s"] / first["forward_s"]
    cpu_time_ratio = last["forward_cpu_s"] / first["forward_cpu_s"]
    memory_ratio = last["peak_bytes"] / first["peak_bytes"]
    return {
        "backbone": spec,
        "hidden_layer": hidden_layer,
        "device": where,
        **placement,
        "peak_flops": peak,
        "peak_source": peak_source,
        "batch": batch,
        "tokens": tokens,
        "encoded_tokens": lengths,  # actual lengths of the batch (identical for every E)
        "steps": N_STEPS,
        "repeats": repeats,
        "results": results,
        "time_ratio": time_ratio,
        "cpu_time_ratio": cpu_time_ratio,
        "memory_ratio": memory_ratio,
        "goal": dict(GOAL),
        "meets_goal": time_ratio <= GOAL["time_ratio_max"] and memory_ratio <= GOAL["memory_ratio_max"],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m actprm.model.lab.heads_bench", description=__doc__.splitlines()[0])
    p.add_argument("spec", help="backbone spec: tiny, smollm2-135m, random:<arch> or a directory")
    p.add_argument("--heads", default="1,8,32", help="comma-separated head counts")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden-layer", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attn-implementation", default="auto")
    p.add_argument("--peak-tflops", type=float, default=None)
    a = p.parse_args(argv)
    out = bench_model(a.spec, tuple(int(x) for x in a.heads.split(",")), a.batch, a.tokens, a.repeats,
                      a.hidden_layer, a.threads, a.device, a.dtype, a.attn_implementation, a.peak_tflops)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
