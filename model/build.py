"""Build an ensemble PRM from a backbone spec or from a checkpoint: one loading path for the
CLI, the daemon and the simulation."""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path

from actprm.model.backbone import load_backbone
from actprm.model.training.checkpoints import CheckpointStore, Manifest, resolve_checkpoint
from actprm.model.prm import EnsemblePRM, PRMConfig
from actprm.model.training.trainer import TrainerConfig, configure_trainable, load_trainable_state, trainable_state


def build_prm(spec: str, *, hidden_layer: int | None = None, prm: PRMConfig | None = None, seed: int = 0,
              device: str = "auto", dtype: str = "auto", attn_implementation: str = "auto") -> EnsemblePRM:
    """A fresh PRM: the backbone from its spec on `device`, heads newly initialised (float32)."""
    backbone = load_backbone(spec, hidden_layer=hidden_layer, seed=seed, device=device, dtype=dtype,
                             attn_implementation=attn_implementation)
    return EnsemblePRM(backbone, prm or PRMConfig())


def prm_config_from(manifest: Manifest) -> PRMConfig:
    known = {f.name for f in fields(PRMConfig)}
    return PRMConfig(**{k: v for k, v in manifest.prm.items() if k in known})


def load_prm(path: str | Path | CheckpointStore, version: int | None = None, *, device: str = "auto",
             dtype: str = "auto", attn_implementation: str = "auto") -> tuple[EnsemblePRM, Manifest]:
    """Rebuild the PRM a checkpoint describes (backbone from its reference) and load its weights.

    Where it runs is this host's choice (`device`, `dtype`), not the one the manifest records."""
    store, v = (path, version) if isinstance(path, CheckpointStore) else resolve_checkpoint(path)
    manifest, tensors = store.load(version if version is not None else v)
    ref = manifest.backbone
    prm = build_prm(ref["spec"], hidden_layer=ref.get("hidden_layer"), prm=prm_config_from(manifest), seed=ref.get("seed", 0),
                    device=device, dtype=dtype, attn_implementation=attn_implementation)
    apply_version(prm, manifest, tensors)
    return prm, manifest


def apply_version(prm: EnsemblePRM, manifest: Manifest, tensors: dict) -> None:
    """Put a stored version's weights on `prm` (LoRA adapters injected first when the version has
    them) and switch it to eval mode: the one rule for the CLI's load and the scorer's hot-swap."""
    if manifest.mode != "heads":
        configure_trainable(prm, TrainerConfig(**{**manifest.settings, "mode": manifest.mode}))
    load_trainable_state(prm, tensors)
    prm.eval()


def publish_initial(store: CheckpointStore, prm: EnsemblePRM, trainer: TrainerConfig) -> Manifest:
    """Version 0: the untrained heads, so scorers and the trainer start from the same weights."""
    configure_trainable(prm, trainer)
    return store.save(
        trainable_state(prm, trainer.mode),
        {"kind": "init", "parent": None, "mode": trainer.mode, "backbone": prm.backbone.reference(),
         "prm": asdict(prm.config), "settings": trainer.model_dump(mode="json")},
    )
