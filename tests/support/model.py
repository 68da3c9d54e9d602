"""Small shared helpers for the model tests (real torch, the in-code ``tiny`` backbone).

Nothing here mocks project code: it builds real PRMs and synthetic data whose labels are
visible in the text, so a model that trains correctly can learn them in seconds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from actprm.model.build import build_prm
from actprm.model.prm import EnsemblePRM, PRMConfig
from actprm.model.training.trainer import LabelledSample


@pytest.fixture(autouse=True, scope="module")
def torch_one_thread():
    """Run a test module's torch ops on one intra-op thread, then restore the setting.

    The machine has 2 cores shared with other jobs; two OpenMP threads competing with another
    process spin and run ~10x slower than one (measured: a 3-epoch tiny training run takes 4 s
    on 1 thread and 43 s on 2 threads under load). The tiny model gains nothing from 2.
    Import this name into a test module to activate it there.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_prm(n_heads: int = 4, **prm_kwargs) -> EnsemblePRM:
    """A fresh tiny PRM (2-layer random Llama, byte tokenizer); deterministic from its seeds."""
    return build_prm("tiny", prm=PRMConfig(n_heads=n_heads, **prm_kwargs))


@dataclass
class S:
    """The two fields the selectors read, for hand-worked uncertainty cases."""

    mu: list[float]
    sigma: list[float]


def synthetic_samples(n: int, seed: int, prefix: str = "t") -> list[LabelledSample]:
    """Trajectories whose first error is written in the text: steps "s{j} ok" / "s{j} bad".

    The label is the index of the first "bad" step (-1 when every step is "ok"); steps after
    the first bad one are random, as in real solutions after a mistake. About a third of the
    samples are all correct, so both ProcessBench accuracies are measured.
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        n_steps = rng.randint(2, 6)
        if rng.random() < 1 / 3:
            first = -1
        else:
            first = rng.randrange(n_steps)
        steps = []
        for j in range(n_steps):
            if first == -1 or j < first:
                word = "ok"
            elif j == first:
                word = "bad"
            else:
                word = rng.choice(["ok", "bad"])
            steps.append(f"s{j} {word}")
        out.append(LabelledSample(f"{prefix}{i}", f"problem {i}", steps, first))
    return out


def processbench_f1(prm: EnsemblePRM, samples: list[LabelledSample], threshold: float = 0.5) -> float:
    """Harmonic mean of accuracy on erroneous and on correct records.

    Prediction = first step with mu < threshold (-1 when none), i.e. ``StepScores.first_error``
    is NOT used here: it is recomputed from mu so the metric does not trust the code under test.
    """
    scores = prm.score([(s.problem, s.steps) for s in samples])
    hit_err = n_err = hit_ok = n_ok = 0
    for s, sc in zip(samples, scores):
        pred = next((i for i, m in enumerate(sc.mu) if m < threshold), -1)
        if s.first_error == -1:
            n_ok += 1
            hit_ok += pred == -1
        else:
            n_err += 1
            hit_err += pred == s.first_error
    a = hit_err / n_err if n_err else 0.0
    b = hit_ok / n_ok if n_ok else 0.0
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed_keys(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """Names of tensors that are not bit-exactly equal (torch.equal) between two state dicts."""
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def optimizer_state_snapshot(optimizer: torch.optim.Optimizer) -> dict:
    """A deep copy of the optimizer's state_dict (tensors cloned), for bit-exact comparison."""
    sd = optimizer.state_dict()
    state = {pid: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()} for pid, st in sd["state"].items()}
    groups = [dict(g) for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def assert_optimizer_states_equal(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for pid in a["state"]:
        sa, sb = a["state"][pid], b["state"][pid]
        assert sa.keys() == sb.keys()
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert torch.equal(sa[k], sb[k]), f"optimizer state {pid}.{k} changed"
            else:
                assert sa[k] == sb[k], f"optimizer state {pid}.{k} changed"
    assert a["param_groups"] == b["param_groups"]
