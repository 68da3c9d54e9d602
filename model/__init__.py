"""The PRM and what it learns from: the ensemble (prm.py) on a backbone (backbone.py), steps and labels, the selection rule (uncertainty.py)."""
