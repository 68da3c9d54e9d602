"""The model's section of the settings: which backbone, how many heads, where it runs.

Read by whoever builds the ensemble (the daemon's scorer and trainer); the trainer's own
settings are TrainerConfig and FitConfig in model/training/trainer.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)  # as every section of the settings

    backbone: str = Field("smollm2-135m", description="'tiny', 'smollm2-135m', or a local Hugging Face model directory")
    hidden_layer: int | None = Field(None, description="feed the heads from this decoder layer (None: the backbone's default, "
                                     "smollm2-135m 15 of 30, where a probe finds the most step-correctness signal; "
                                     "others the last; -1: the last)")
    n_heads: int = Field(32, ge=1, description="ensemble size E (published 32)")
    head_width: int = Field(128, ge=1)
    max_length: int = Field(2048, ge=16, description="tokens per trajectory; whole trailing steps are dropped beyond it")
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="backbone weights; auto is bfloat16 on CUDA, float32 on CPU (bf16 is ~4x slower there); heads are always float32")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field("auto", description="auto takes flash-attn on a CUDA bf16/fp16 backbone when installed, else sdpa")
