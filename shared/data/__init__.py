"""Calibration datasets: reading and writing, the validated contract, event rows, synthetic seasons."""
