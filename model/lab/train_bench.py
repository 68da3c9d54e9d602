"""How fast the heads train on cached hidden states: what a consolidation's time bound buys.

In heads mode every update and every consolidation trains the E heads on the hidden states the
scorer kept, never the backbone; a consolidation bounded by `consolidate.max_seconds` takes as
many optimizer steps as fit in it. This times those steps: `Trainer.update` on mini-batches of
`mini_batch` labelled trajectories with 3-8 steps each (the built-in stream's spread, so the
padding is real), on random hidden states of the backbone's width, and `validation_figures`
(the heads scoring a slice, as each consolidation epoch ends).

The backbone is built from its config with random weights and one layer: only its hidden size
matters here, and nothing is downloaded. Wall time on a shared CPU is noisy and noise only adds
time, so the figure is the fastest of `repeats` runs; each run's figure comes with it.
"""

from __future__ import annotations

import time

import torch

from actprm.model.backbone import load_backbone
from actprm.model.prm import EnsemblePRM, PRMConfig
from actprm.model.training.consolidate import validation_figures
from actprm.model.training.trainer import LabelledSample, Trainer, TrainerConfig


def synthetic_labels(n: int, hidden_size: int, seed: int = 0) -> list[LabelledSample]:
    """n labelled trajectories of 3-8 steps with random (S, H) hidden states and first errors."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        s = 3 + i % 6
        first_error = int(torch.randint(-1, s, (1,), generator=g))
        out.append(LabelledSample(f"bench-{i}", "", ["step"] * s, first_error, torch.randn((s, hidden_size), generator=g)))
    return out


def bench_train(backbone: str = "random:smollm2-135m", *, labels: int = 512, mini_batch: int = 16, steps: int = 200,
                repeats: int = 3, n_heads: int = 32, head_width: int = 128, threads: int | None = None) -> dict:
    """Heads optimizer steps per second and validation scoring time, as JSON-ready figures."""
    if threads is not None:
        torch.set_num_threads(threads)
    bb = load_backbone(backbone, hidden_layer=1, device="cpu", dtype="float32")
    prm = EnsemblePRM(bb, PRMConfig(n_heads=n_heads, head_width=head_width))
    samples = synthetic_labels(labels, bb.hidden_size)
    trainer = Trainer(prm, TrainerConfig(mode="heads"))
    trainer.standardise_inputs(samples)
    batches = [samples[at:at + mini_batch] for at in range(0, len(samples), mini_batch)]
    for b in batches[:5]:  # warm-up: allocator, kernels, the optimizer's moments
        trainer.update(b)
    step_runs, val_runs = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(steps):
            trainer.update(batches[i % len(batches)])
        step_runs.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        validation_figures(prm, samples)
        val_runs.append(time.perf_counter() - t0)
    best = min(step_runs)
    return {
        "backbone": backbone, "hidden_size": bb.hidden_size, "n_heads": n_heads, "head_width": head_width,
        "threads": torch.get_num_threads(), "mini_batch": mini_batch, "labels": labels,
        "steps_per_s": round(steps / best, 2),
        "ms_per_step": round(1000 * best / steps, 2),
        "labels_per_s": round(steps * mini_batch / best, 1),
        "validation_s": round(min(val_runs), 4),  # validation_figures on all `labels`
        "runs_steps_per_s": [round(steps / r, 2) for r in step_runs],
    }
