"""Labelled trajectories: user files (records.py), the built-in word problems (synthetic.py), GSM8K slips."""
