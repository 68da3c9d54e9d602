"""Layers point down only: model <- streams <- daemon. Importing a layer loads nothing above it
(checked in a fresh interpreter, so what the test process imported before does not count)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from support.paths import ROOT


def _loaded_after(imports: list[str]) -> list[str]:
    code = (f"import json, sys\nfor m in {imports!r}: __import__(m)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('actprm.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout)


def _modules(folder: str) -> list[str]:
    return sorted("actprm." + ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in (ROOT / folder).rglob("*.py") if "client" not in p.relative_to(ROOT).parts)


@pytest.mark.slow
def test_the_stream_layer_loads_nothing_of_the_daemon():
    loaded = _loaded_after(_modules("streams"))
    assert not [m for m in loaded if m.startswith("actprm.daemon")], loaded


@pytest.mark.slow
def test_the_model_layer_loads_nothing_of_the_streams_or_the_daemon():
    loaded = _loaded_after(_modules("model"))
    assert not [m for m in loaded if m.startswith(("actprm.streams", "actprm.daemon"))], loaded
