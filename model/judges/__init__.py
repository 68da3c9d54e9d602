"""Judges that label a trajectory with its first wrong step: what one is (base.py), the prompt and verdict parser (verdict.py), the kinds (clients.py), and how good one is (quality.py)."""
