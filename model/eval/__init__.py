"""Measuring a PRM: ProcessBench metrics, prequential (test-then-train) scores, calibration, evaluation on a file."""
