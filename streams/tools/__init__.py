"""Operator tools over any broker: the ctl client, produce and tail, the pipeline benchmark."""
