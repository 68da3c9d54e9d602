"""Faults injected inside the daemon's trainer, for the update tests. Two trainer faults cannot be
produced from outside a healthy model (NaN step logits, and an update that is applied and then
wrecks the heads), so `fault_hook_env` writes a `sitecustomize` hook that the daemon subprocess
alone loads through its PYTHONPATH; the hook wraps Trainer.update and acts only on batches that
carry a marker text the test chose, leaving every other batch to the real code.
"""

from __future__ import annotations

import os
from pathlib import Path

# The markers (each acts only when its environment variable is set):
# - ACTPRM_FAULT_NAN_MARKER: a label batch with this text in a problem makes the step logits
#   NaN, so the trainer's own finiteness check has to catch it;
# - ACTPRM_FAULT_POISON_MARKER: an update on such a batch is applied and then its heads are
#   wrecked (every step scored "correct"), so the canary check has to catch the F1 drop;
# - ACTPRM_FAULT_FIT_MARKER: an update on a batch with this text in a label id is repeated
#   ACTPRM_FAULT_FIT_STEPS times, a model that has learnt its batch by heart (the canary test
#   uses it to give the canary, the same texts under other ids, a known F1 before the wreck).
_SITECUSTOMIZE = '''
import os

_nan, _poison = os.environ.get("ACTPRM_FAULT_NAN_MARKER"), os.environ.get("ACTPRM_FAULT_POISON_MARKER")
_fit, _fit_steps = os.environ.get("ACTPRM_FAULT_FIT_MARKER"), int(os.environ.get("ACTPRM_FAULT_FIT_STEPS", "300"))
if _nan or _poison or _fit:
    import torch
    from actprm.model.training import trainer as _t

    _update = _t.Trainer.update

    def update(self, samples):
        hit = lambda marker: marker and any(marker in s.problem for s in samples)
        if hit(_nan):
            real = self.prm.head_logits  # every update path reads the heads through it
            self.prm.head_logits = lambda *a, **k: real(*a, **k) * float("nan")
            try:
                return _update(self, samples)
            finally:
                del self.prm.head_logits
        result = _update(self, samples)
        if _fit and any(_fit in s.id for s in samples):
            for _ in range(_fit_steps - 1):
                result = _update(self, samples)
        if hit(_poison) and result.applied:
            with torch.no_grad():
                self.prm.heads.w3.zero_()
                self.prm.heads.b3.fill_(50.0)  # sigmoid(50) = 1: "no error anywhere", whatever the input
        return result

    _t.Trainer.update = update
'''


def fault_hook_env(tmp: Path, **markers: str) -> dict[str, str]:
    """Environment that installs the in-daemon fault hook; markers: nan=..., poison=..., fit=..."""
    hook = Path(tmp) / "fault_hook"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    if "nan" in markers:
        env["ACTPRM_FAULT_NAN_MARKER"] = markers["nan"]
    if "poison" in markers:
        env["ACTPRM_FAULT_POISON_MARKER"] = markers["poison"]
    if "fit" in markers:
        env["ACTPRM_FAULT_FIT_MARKER"] = markers["fit"]
    return env
