"""Hydra sweeper `bm_optuna`: Optuna (4 and later) studies behind `python merge.py +hparams_search=...`.

Select it in a config with `override /hydra/sweeper: bm_optuna` (see conf/hparams_search/); the
work is done by branchmerge.sweep.optuna_sweep.
"""
