"""branchmerge: Branch-Merge distillation (TinyR1-32B-Preview, arXiv 2503.04872) as a runnable framework.

Stages, each a folder on disk in a documented format (see README.md):
distill.py -> domain datasets, train.py -> branch checkpoints, merge.py -> merged checkpoint,
evaluate.py -> result files, ``python -m branchmerge.report`` -> tables.
"""

__version__ = "0.1.0"
