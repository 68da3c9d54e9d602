"""Experiments off the service: the label-efficiency simulation, the heads' cost benchmark, plots."""
