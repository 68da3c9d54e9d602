"""Turning labels into versions: the trainer, the replay store, consolidation, and versioned checkpoints."""
