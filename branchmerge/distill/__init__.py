"""Selective distillation: teacher traces per domain, verified and filtered into branch datasets."""
