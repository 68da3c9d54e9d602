"""The roles a process runs, each an object with the state it owns: scorer (scoring.py, swap.py), round keeper (rounds.py), trainer (training.py, consolidation.py), judge (judging.py)."""
