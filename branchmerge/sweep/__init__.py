"""Sweeps over merge coefficients: a trial = merge + evaluate -> one objective (see trial.py)."""
